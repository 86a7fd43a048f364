"""The sequential decoder's peak device memory, predicted from the VAE config alone (for the memory planner).

It follows what each primitive of :mod:`distlin.vae.sequential` keeps alive on the compute device, band by
band; validated against measured peaks in ``tests/test_sequential_vae.py``.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import pairwise
from math import gcd
from typing import Any

import torch

from distlin.ops.group_norm import MOMENT_CHUNK_ELEMENTS


def device_peak_elements(
    vae_config: dict[str, Any],
    latent_height: int,
    latent_width: int,
    band_rows: int,
    attention_rows: int | None,
    batch: int = 1,
    query_chunk: int = 4096,
    dtype: torch.dtype = torch.float16,
    fetch_ahead: bool = True,
) -> int:
    """Predicted peak of live activation elements on ``compute`` during
    :func:`~distlin.vae.sequential.decode_sequential`.

    To size ``band_rows`` / ``attention_rows`` / ``query_chunk`` for a device before a long decode.
    ``vae_config`` is diffusers' ``AutoencoderKL`` config; the decode walked is the one
    :func:`~distlin.vae.sequential.check_supported` accepts (3x3 convs), with ``store_dtype`` equal to the compute
    ``dtype``. It follows what each ``_Streamer`` primitive keeps alive, band by band (``_conv_peak``,
    ``_attention_peak``). Float32 scratch (softmax state and score tile, GroupNorm moments of half-precision
    bands) counts ``4 / dtype.itemsize`` elements, so ``elements * dtype.itemsize`` is bytes. ``fetch_ahead``:
    the convolutions hold the next band's rows while one computes (CUDA with a host store,
    :attr:`~distlin.vae.transfer.HostStore.lookahead`). Not counted:
    weights, kernel workspaces (cuDNN, fused SDPA), per-channel vectors, allocator fragmentation.
    """
    wide = 4 / dtype.itemsize
    chans = list(reversed(vae_config["block_out_channels"]))
    groups = vae_config.get("norm_num_groups", 32)
    bounds = [*range(0, latent_height, band_rows), latent_height]

    def conv(
        scale: int, c_in: int, c_out: int, pre: str | None = "norm", f: int = 1, residual: int | None = None
    ) -> float:
        rows = [scale * f * b for b in bounds]
        width = scale * f * latent_width
        return _conv_peak(rows, width, c_in, c_out, pre, f, residual, groups, batch, wide, fetch_ahead)

    def resnet(scale: int, c_in: int, c_out: int) -> float:
        return max(conv(scale, c_in, c_out), conv(scale, c_out, c_out, residual=c_in))

    post_quant = "conv" if vae_config.get("use_post_quant_conv", True) else None
    peaks = [conv(1, vae_config["latent_channels"], chans[0], pre=post_quant), resnet(1, chans[0], chans[0])]
    if vae_config.get("mid_block_add_attention", True):
        peaks.append(_attention_peak(bounds, latent_width, chans[0], attention_rows, query_chunk, groups, batch, wide))
    peaks.append(resnet(1, chans[0], chans[0]))
    scale, c_in = 1, chans[0]
    for i, c in enumerate(chans):
        peaks += [resnet(scale, c_in if j == 0 else c, c) for j in range(vae_config["layers_per_block"] + 1)]
        c_in = c
        if i + 1 < len(chans):
            peaks.append(conv(scale, c, c, pre=None, f=2))
            scale *= 2
    peaks.append(conv(scale, chans[-1], vae_config.get("out_channels", 3)))
    return int(max(peaks))


def _moments_scratch(elements: int, channels: int, groups: int, batch: int, wide: float) -> float:
    """Float32 copy ``group_moments`` makes of a half-precision band, per batch item (none in float32)."""
    if wide <= 1 or channels % groups:
        return 0.0
    per_group = elements // groups
    return wide * min(groups, max(1, MOMENT_CHUNK_ELEMENTS // max(1, per_group * batch))) * per_group


def _conv_peak(
    bounds: list[int],
    width: int,
    c_in: int,
    c_out: int,
    pre: str | None,
    f: int,
    residual: int | None,
    groups: int,
    batch: int,
    wide: float,
    fetch_ahead: bool,
) -> float:
    """Largest live set of ``_Streamer.conv`` (3x3, output rows ``bounds``), over its bands and steps.

    Steps: the fetched rows (with halos) and the ``pre`` outputs (1x1 conv, or GroupNorm then activation);
    fetched and x``f`` upsampled copy; that and the zero-padded copy; padded input and conv output; the
    residual (conv output + loaded input + 1x1 shortcut, then + sum, then sum + quotient); the kept band
    with its GroupNorm moments scratch. Throughout, with ``fetch_ahead``, the next band's rows.
    """
    height = bounds[-1]

    def fetched(lo: int, hi: int) -> float:
        lo_in, hi_in = max(lo - 1, 0), min(hi + 1, height)
        return c_in * ((hi_in - 1) // f + 1 - lo_in // f) * (width // f)

    bands = list(pairwise(bounds))
    peak = 0.0
    # Bands away from the edges are alike (same rows, halos and next band): the first and last three stand for all,
    # so a latent of millions of rows is planned in microseconds.
    for r in sorted({*range(min(3, len(bands))), *range(max(0, len(bands) - 3), len(bands))}):
        lo, hi = bands[r]
        ahead = fetched(*bands[r + 1]) if fetch_ahead and r + 1 < len(bands) else 0.0
        rows = fetched(lo, hi)
        padded, out = c_in * (hi - lo + 2) * width, c_out * (hi - lo) * width
        steps = [rows * {None: 1, "conv": 2, "norm": 3}[pre]]
        if f > 1:
            steps.append(5 * rows)
            rows *= 4
        steps += [rows + padded, padded + out]
        if residual is not None:
            shortcut = out if residual != c_out else 0
            steps += [out + residual * (hi - lo) * width + shortcut, 3 * out]
        steps.append(out + _moments_scratch(out, c_out, groups, batch, wide))
        peak = max(peak, *(step + ahead for step in steps))
    return batch * peak


def _attention_peak(
    bounds: list[int],
    width: int,
    channels: int,
    attention_rows: int | None,
    query_chunk: int,
    groups: int,
    batch: int,
    wide: float,
) -> float:
    """Largest live set of ``_Streamer.attention`` (one head, as diffusers' ``Decoder`` builds it).

    K/V pass, per band: normalized tokens, K, and V as the projection's matmul output plus its bias add
    (4 bands), on top of the resident K/V of every token when ``attention_rows`` is None. Query pass, per
    group of ``g`` elements: residual, normalized tokens and Q (matmul + bias add); then residual + Q + the
    attention state; then residual + Q + output + projection, sum and quotient; then the output with each
    kept piece's copy (the output is token-major, so ``group_moments`` reshapes by copying) and moments.
    """
    height = bounds[-1]
    half = 1.0 if wide > 1 else 0.0
    band = max(b - a for a, b in pairwise(bounds)) * width * channels
    if attention_rows is None:
        resident, group_bounds, block = 2.0 * height * width * channels, bounds, 0
    else:
        group_bounds = [*range(0, height, attention_rows), height]
        resident, block = 0.0, min(attention_rows, height) * width
    peak = 4.0 * band
    for a, b in _distinct_groups(group_bounds, bounds):
        n = (b - a) * width
        g, chunk = n * channels, min(query_chunk, n)
        if attention_rows is None or attention_rows >= height:
            state = 2 * block * channels + g + chunk * channels  # (loaded K/V,) SDPA's output buffer and chunk
        else:
            accumulators = wide * (g + 2 * n)  # float32 output sum, running max and running sum
            # float32 score tile, plus its half-precision source, then copy for P @ V, in half precision
            tile = (wide + half) * chunk * block
            # one K/V block, the scaled query chunk, P @ V; or, at the end, the output in q's dtype
            state = accumulators + max(2 * block * channels + 2 * chunk * channels + tile, half * g)
        first, last = bisect_right(bounds, a) - 1, bisect_left(bounds, b)  # the bands that overlap [a, b)
        overlapping = pairwise(bounds[first : last + 1])
        pieces = [(min(hi, b) - max(lo, a)) * width * channels for lo, hi in overlapping if lo < b and hi > a]
        keep = g + max(p + _moments_scratch(p, channels, groups, batch, wide) for p in pieces)
        peak = max(peak, 4.0 * g, 2.0 * g + state, keep)
    return batch * (resident + peak)


def _distinct_groups(group_bounds: list[int], bounds: list[int]) -> list[tuple[int, int]]:
    """The query groups whose peaks can differ: a group's peak depends on its size and on how it straddles the
    bands, which repeats every ``band / gcd(band, group)`` groups until the (maybe shorter) last band; the groups
    of one period, and those reaching the last band, stand for all (exact, and fast for millions of rows)."""
    groups = len(group_bounds) - 1
    if groups < 2 or len(bounds) < 3:
        return list(pairwise(group_bounds))
    step, band = group_bounds[1] - group_bounds[0], bounds[1] - bounds[0]
    period = band // gcd(band, step)
    tail = -(-band // step) + 2  # the groups that may reach the last band, and the last (maybe shorter) group
    kept = {*range(min(groups, period + 1)), *range(max(0, groups - tail), groups)}
    return [(group_bounds[i], group_bounds[i + 1]) for i in sorted(kept)]
