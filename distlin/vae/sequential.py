"""Exact SD VAE decode (and encode) on one device, one row band at a time: device memory bounded whatever the
image size.

A 16384x8192 decode holds 256-channel full-resolution activations (68 GB each in fp16): no GPU fits the
plain ``vae.decode``, and diffusers' ``enable_tiling()`` normalises every tile with its own GroupNorm
statistics, which shows as tone seams. Here the decoder is interpreted layer by layer instead: the current
activation is a list of row bands on a ``store`` device (host RAM by default) and each primitive streams
the bands through the ``compute`` device:

* a convolution takes each band plus the halo rows of its neighbours (``halo_rows``), zero rows only at
  the image border; the pointwise ops before it (GroupNorm + activation, ``post_quant_conv``, the nearest
  x2 upsampling) run on the fetched rows, so their outputs are never stored;
* a GroupNorm is two passes: float64 moments of every band summed (``group_moments``), then each band
  normalised with the global moments (``normalize_with``). The first pass is fused into whichever
  primitive produced the activation (moments of each band as it leaves ``compute``), which saves one
  store-to-compute transfer of the activation per GroupNorm;
* the mid-block attention is exact global softmax attention at latent resolution. By default the keys and
  values of all bands sit on ``compute`` (2·(H/8)·(W/8)·512 values: 8 GiB fp16 at 16384x16384) while the
  queries go band by band, ``query_chunk`` at a time, through fused SDPA. With ``attention_rows=r`` K and V
  go to the store instead, band by band (in the compute dtype), and the queries go ``r`` latent rows at a
  time: each query group streams K/V back in blocks of ``r`` rows, merged exactly by an online softmax
  (:mod:`distlin.ops.softmax_attention`). ``compute`` then holds one query group, its float32 accumulators,
  one K/V block and a ``query_chunk`` x ``r·W/8`` score tile; the price is ``(H/8)/r`` passes over K/V from
  store to compute (host-to-device traffic ``(H/8)/r · 2·(H/8)·(W/8)·512`` values, 16 x 8 GiB for r=128 at
  16384x16384) and an unfused softmax.

The result equals ``vae.decode(latents).sample`` up to float round-off. Peak ``compute`` memory is a few
bands plus the attention's working set; the store holds about
two full activations (see ``docs/HIGHRES.md``); :mod:`distlin.vae.peak` predicts the ``compute`` peak.
Modules are recognised by the class they compute (:func:`~distlin.surgery.original_type`), so the
memory-bounding twins of :mod:`distlin.lean` and the engine's banded layers are decoded like the originals.
:func:`encode_sequential` walks the encoder with the same primitives (its stride-2 downsamplers are banded
convolutions too), for the encode between cascade stages. Anything this interpreter does not know (SpatialNorm
decoders, attention up-blocks, transposed-conv upsamplers, mixed-dtype weights, ...) raises
:class:`UnsupportedDecoderError` before any work is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from itertools import pairwise

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import Decoder, DiagonalGaussianDistribution, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from distlin.errors import UsageError
from distlin.ops.group_norm import group_moments, normalize_with
from distlin.ops.halo import conv_out_size, halo_rows
from distlin.ops.softmax_attention import softmax_attention
from distlin.sizes import format_size
from distlin.surgery import original_type
from distlin.vae.transfer import Fetch, HostStore, ahead

POINTWISE_ACTIVATIONS = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU)
Pre = Callable[[torch.Tensor], torch.Tensor]


class UnsupportedDecoderError(UsageError):
    """The decoder contains a module the band interpreter does not model; running it would be silently wrong."""


class Bands:
    """One activation as row bands on the store: band ``r`` holds rows ``bounds[r]:bounds[r + 1]``.

    Bands are released (set to ``None``) as soon as no later band needs them, so the store holds roughly
    the input and the output of the current layer rather than every activation. ``moments`` maps a group
    count to the float64 GroupNorm moments of the whole activation, summed by its producer.
    """

    def __init__(
        self, parts: list[torch.Tensor | None], bounds: list[int], moments: dict[int, torch.Tensor] | None = None
    ):
        self.parts, self.bounds, self.moments = parts, bounds, moments or {}

    def rows(self, lo: int, hi: int) -> list[torch.Tensor]:
        """Rows ``lo:hi`` (inside the image) as views of the bands they cross, in order, on the store."""
        return [
            part[:, :, max(lo, a) - a : min(hi, b) - a]
            for part, (a, b) in zip(self.parts, pairwise(self.bounds), strict=True)
            if a < hi and b > lo
        ]

    def take(self, r: int) -> torch.Tensor:
        """Band ``r``, released from the store (its last reader is the caller)."""
        part, self.parts[r] = self.parts[r], None
        return part

    def release_before(self, row: int) -> None:
        """Release the bands ending at or before row ``row``: no later reader reaches them."""
        for r, end in enumerate(self.bounds[1:]):
            if end <= row:
                self.parts[r] = None


def _summed(total: dict[int, torch.Tensor], band: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """GroupNorm moments by group count: ``total`` with a band's added."""
    return {**total, **{g: total[g] + m if g in total else m for g, m in band.items()}}


class _Streamer:
    """Moves bands between the store and the compute device (:class:`HostStore`) and runs the decoder primitives
    on them; the convolutions fetch band ``r + 1`` while band ``r`` computes (:func:`ahead`)."""

    def __init__(
        self,
        compute: torch.device,
        dtype: torch.dtype,
        store: torch.device,
        store_dtype: torch.dtype,
        groups: frozenset[int],
        query_chunk: int,
        attention_rows: int | None,
    ):
        self.compute, self.dtype, self.store, self.store_dtype = compute, dtype, store, store_dtype
        self.groups, self.query_chunk, self.attention_rows = groups, query_chunk, attention_rows
        self.host = HostStore(compute, store)

    def load(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """Stored rows (``Bands.rows``, or one band) on compute, ready to use."""
        return self.host.load(pieces, self.dtype)

    def save(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.host.save(t, dtype or self.store_dtype)

    def bands(self, t: torch.Tensor, rows: int) -> Bands:
        """The input ``t`` on the store, in bands of ``rows`` rows (the last one shorter)."""
        height = t.shape[-2]
        bounds = [*range(0, height, rows), height]
        return Bands([self.save(t[:, :, a:b]) for a, b in pairwise(bounds)], bounds)

    def keep(self, out: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """A finished band to the store, and its GroupNorm moments (of the stored values) by group count, for the
        producer to sum (:func:`_summed`)."""
        out = out.to(self.store_dtype)
        moments = {g: group_moments(out, g) for g in self.groups if out.shape[1] % g == 0}
        return self.save(out), moments

    @staticmethod
    def norm_act(x: Bands, norm: nn.GroupNorm, act: nn.Module) -> Pre:
        """GroupNorm (global statistics) fused with the activation, for the next conv to apply on its rows."""
        moments = x.moments[norm.num_groups]
        return lambda t: act(normalize_with(t, moments, norm))

    def conv(
        self,
        x: Bands,
        conv: nn.Conv2d,
        pre: Pre | None = None,
        upsample: bool = False,
        residual: tuple[Bands, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
        consume: bool = False,
        pad: tuple[int, int, int, int] | None = None,
    ) -> Bands:
        """The convolution of ``upsample?(pre(x))``, band by band with exact halos.

        ``pre`` (pointwise) and the nearest x2 ``upsample`` run on the fetched rows before the zero padding,
        which exists only at the image border. ``residual = (skip, add)`` finishes band ``r`` on compute as
        ``add(out, band r of skip)``, that band taken from the store. With ``consume`` the input bands are
        released once the following bands' halos no longer reach them. Where copies overlap compute, band
        ``r + 1``'s rows are fetched before band ``r`` computes (``HostStore.lookahead``); band ``r``'s skip
        band once its convolution is queued (on CUDA both copies run during the convolution). ``pad`` (left,
        right, top, bottom) replaces the conv's own symmetric padding: the encoder's stride-2 downsampler pads only
        right and bottom. Band ``r``'s output rows are its input rows over the stride (bands start on multiples of
        it).
        """
        f = 2 if upsample else 1
        bounds = [f * b for b in x.bounds]
        height, stride = bounds[-1], conv.stride[0]
        left, right, pad_top, pad_bottom = pad or (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0])
        k, d = conv.kernel_size[0], conv.dilation[0]
        out_bounds = [b // stride for b in bounds[:-1]] + [conv_out_size(height, k, stride, pad_top, pad_bottom, d)]
        needs = halo_rows(tuple(bounds), tuple(out_bounds), k, stride, pad_top, d)
        parts: list[torch.Tensor | None] = []
        moments: dict[int, torch.Tensor] = {}

        def fetch(r: int) -> Fetch:
            lo_in, hi_in = max(bounds[r] - needs[r][0], 0), min(bounds[r + 1] + needs[r][1], height)
            return self.host.fetch(x.rows(lo_in // f, (hi_in - 1) // f + 1), self.dtype)

        for r, rows in ahead(len(needs), fetch, self.host.lookahead):
            top, bottom = needs[r]
            lo, hi = bounds[r] - top, bounds[r + 1] + bottom
            lo_in, hi_in = max(lo, 0), min(hi, height)
            src_lo = lo_in // f
            t = rows.get()
            del rows  # compute memory: only ``t`` refers to the fetched rows, so ``pre`` can free them
            if pre is not None:
                t = pre(t)
            if upsample:
                t = F.interpolate(t, scale_factor=2.0, mode="nearest")[:, :, lo_in - f * src_lo : hi_in - f * src_lo]
            t = F.pad(t, (left, right, lo_in - lo, hi - hi_in))
            out = F.conv2d(t, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
            del t  # compute memory (see device_peak_elements): the padded input is dead during post and keep
            if residual is not None:
                skip, add = residual
                out = add(out, self.host.load([skip.take(r)], self.dtype))
            kept, band = self.keep(out)
            parts.append(kept)
            moments = _summed(moments, band)
            del out  # ... and this band's output while the next band is fetched
            if consume and r + 1 < len(needs):
                x.release_before(max(bounds[r + 1] - needs[r + 1][0], 0) // f)
        return Bands(parts, out_bounds, moments)

    def resnet(self, x: Bands, block: ResnetBlock2D) -> Bands:
        """norm1 → act → conv1 → norm2 → act → conv2, plus the (1x1) shortcut, over ``output_scale_factor``."""
        h = self.conv(x, block.conv1, self.norm_act(x, block.norm1, block.nonlinearity))
        shortcut = block.conv_shortcut if block.conv_shortcut is not None else nn.Identity()

        def add(out: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
            return (shortcut(skip) + out) / block.output_scale_factor

        pre = self.norm_act(h, block.norm2, block.nonlinearity)
        return self.conv(h, block.conv2, pre, residual=(x, add), consume=True)

    def attention(self, x: Bands, attn: Attention) -> Bands:
        """Exact softmax self-attention over the whole map: K and V of every band, then the queries.

        With ``attention_rows`` None, K and V of all tokens stay on compute (one block: fused SDPA) and the
        queries go band by band. Otherwise K and V go to the store band by band, and the queries go
        ``attention_rows`` latent rows at a time, each group streaming K/V back in blocks of as many rows.
        """
        norm = attn.group_norm

        def tokens(t: torch.Tensor) -> torch.Tensor:
            if norm is not None:
                t = normalize_with(t, x.moments[norm.num_groups], norm)
            return t.flatten(2).transpose(1, 2)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        def keys_values(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = tokens(self.load([part]))
            return attn.to_k(t), attn.to_v(t)

        batch, width, height = x.parts[0].shape[0], x.parts[0].shape[-1], x.bounds[-1]
        if self.attention_rows is None:
            groups = list(pairwise(x.bounds))
            k, v = (
                torch.empty(batch, height * width, proj.out_features, device=self.compute, dtype=self.dtype)
                for proj in (attn.to_k, attn.to_v)
            )
            for part, (a, b) in zip(x.parts, pairwise(x.bounds), strict=True):
                k[:, a * width : b * width], v[:, a * width : b * width] = keys_values(part)
            kv = heads(k), heads(v)
            blocks = [lambda: kv]
        else:
            groups = list(pairwise([*range(0, height, self.attention_rows), height]))

            # Stored as (B, 1, rows, W*C) views of the token-major projections, so Bands.rows cuts contiguous
            # blocks across band borders. In the compute dtype, not store_dtype: a float16 store would round
            # K/V once more and make the result depend on attention_rows, and the store's peak is set by the
            # full-resolution activations (128-256 channels x 64 pixels per latent pixel, K/V: 2 x 512).
            def saved_keys_values(part: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return tuple(
                    self.save(t.reshape(batch, 1, -1, width * t.shape[-1]), self.dtype) for t in keys_values(part)
                )

            stored = [Bands(list(parts), x.bounds) for parts in zip(*map(saved_keys_values, x.parts), strict=True)]

            def block(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
                k, v = (self.load(kv_bands.rows(a, b)).reshape(batch, (b - a) * width, -1) for kv_bands in stored)
                return heads(k), heads(v)

            blocks = [partial(block, a, b) for a, b in groups]

        def attend(a: int, b: int) -> torch.Tensor:
            """Output rows ``a:b``, residual included."""
            residual = self.load(x.rows(a, b))
            q = heads(attn.to_q(tokens(residual)))
            out = softmax_attention(q, blocks, attn.scale, self.query_chunk)
            out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))
            out = out.transpose(1, 2).reshape(residual.shape)
            if attn.residual_connection:
                out = out + residual
            return out / attn.rescale_output_factor

        pieces: list[list[torch.Tensor]] = [[] for _ in x.parts]
        moments: dict[int, torch.Tensor] = {}
        for a, b in groups:
            out = attend(a, b)
            for r, (lo, hi) in enumerate(pairwise(x.bounds)):
                if lo < b and hi > a:
                    kept, band = self.keep(out[:, :, max(lo, a) - a : min(hi, b) - a])
                    pieces[r].append(kept)
                    moments = _summed(moments, band)
            del out  # not alive on compute while the next group is computed
            x.release_before(b)
        for p in pieces:
            self.host.ready(p)  # joined on the host below
        return Bands([torch.cat(p, dim=2) if len(p) > 1 else p[0] for p in pieces], x.bounds, moments)


def _check(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise UnsupportedDecoderError(
            f"the sequential VAE does not support {where}: {what}; use vae.decode or parallelize_vae for this VAE"
        )


def _check_type(module: nn.Module, cls: type, where: str) -> None:
    """``module`` computes ``cls``'s function: an instance of it or one of its twins (same parameters)."""
    _check(original_type(module) is cls, where, f"expected a {cls.__name__}, got {type(module).__name__}")


def _check_conv(conv: nn.Module | None, where: str, kernel: int | None = None) -> None:
    """A zero-padded, stride-1 conv whose output has the input's size (every VAE decoder conv)."""
    _check(isinstance(conv, nn.Conv2d), where, f"expected an nn.Conv2d, got {conv!r}")
    k, p, d = conv.kernel_size, conv.padding, conv.dilation
    _check(
        conv.padding_mode == "zeros"
        and not isinstance(p, str)
        and conv.stride == (1, 1)
        and all(2 * p[i] == d[i] * (k[i] - 1) for i in range(2))
        and (kernel is None or k == (kernel, kernel)),
        where,
        f"needs a stride-1, zero-padded, same-size{'' if kernel is None else f' {kernel}x{kernel}'} conv, got {conv!r}",
    )


def _check_norm_act(norm: nn.Module, act: nn.Module, where: str) -> None:
    _check(isinstance(norm, nn.GroupNorm), f"{where} norm", f"only GroupNorm is modelled, got {type(norm).__name__}")
    _check(isinstance(act, POINTWISE_ACTIVATIONS), f"{where} activation", f"not a known pointwise one: {act!r}")


def _check_resnet(block: nn.Module, where: str) -> None:
    _check_type(block, ResnetBlock2D, where)
    _check(
        block.time_emb_proj is None and block.time_embedding_norm in ("default", "group"),
        where,
        "time-embedding conditioning",
    )
    _check(block.upsample is None and block.downsample is None, where, "resampling inside the resnet")
    _check(not block.training or block.dropout.p == 0, where, "active dropout (call vae.eval())")
    _check_norm_act(block.norm1, block.nonlinearity, where)
    _check_norm_act(block.norm2, block.nonlinearity, where)
    _check_conv(block.conv1, f"{where}.conv1")
    _check_conv(block.conv2, f"{where}.conv2")
    if block.conv_shortcut is not None:
        _check_conv(block.conv_shortcut, f"{where}.conv_shortcut", kernel=1)


def _check_attention(attn: nn.Module, where: str) -> None:
    _check_type(attn, Attention, where)
    _check(
        attn.spatial_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
        and attn.norm_cross is None
        and attn.added_kv_proj_dim is None
        and not attn.is_cross_attention,
        where,
        "spatial norm, q/k norm or cross-attention",
    )
    _check(attn.group_norm is None or isinstance(attn.group_norm, nn.GroupNorm), where, "a non-GroupNorm group_norm")
    _check(not attn.training or attn.to_out[1].p == 0, where, "active dropout (call vae.eval())")


def _check_weights(module: nn.Module, where: str) -> None:
    dtypes = {p.dtype for p in module.parameters()}
    _check(len(dtypes) == 1, where, f"weights in mixed dtypes {sorted(map(str, dtypes))} (upcast variant)")


def _check_mid_block(mid: nn.Module, where: str) -> None:
    _check_type(mid, UNetMidBlock2D, where)
    for j, block in enumerate(mid.resnets):
        _check_resnet(block, f"{where}.resnets[{j}]")
    for j, attn in enumerate(mid.attentions):
        if attn is not None:
            _check_attention(attn, f"{where}.attentions[{j}]")


def check_supported(vae: nn.Module) -> None:
    """Raise :class:`UnsupportedDecoderError` unless every module of ``vae``'s decode path is modelled."""
    decoder = vae.decoder
    _check_type(decoder, Decoder, "vae.decoder")
    _check_weights(decoder, "vae.decoder")
    if vae.post_quant_conv is not None:
        _check_conv(vae.post_quant_conv, "vae.post_quant_conv", kernel=1)
    _check_conv(decoder.conv_in, "decoder.conv_in")
    _check_mid_block(decoder.mid_block, "decoder.mid_block")
    for i, up in enumerate(decoder.up_blocks):
        where = f"decoder.up_blocks[{i}]"
        _check_type(up, UpDecoderBlock2D, where)
        for j, block in enumerate(up.resnets):
            _check_resnet(block, f"{where}.resnets[{j}]")
        for j, sampler in enumerate(up.upsamplers or []):
            _check(
                original_type(sampler) is Upsample2D
                and sampler.use_conv
                and not sampler.use_conv_transpose
                and sampler.interpolate
                and sampler.norm is None,
                f"{where}.upsamplers[{j}]",
                "only nearest x2 interpolation followed by a conv is modelled",
            )
            _check_conv(sampler.conv, f"{where}.upsamplers[{j}].conv")
    _check_norm_act(decoder.conv_norm_out, decoder.conv_act, "decoder.conv_norm_out")
    _check_conv(decoder.conv_out, "decoder.conv_out")


def check_supported_encoder(vae: nn.Module) -> None:
    """Raise :class:`UnsupportedDecoderError` unless every module of ``vae``'s encode path is modelled."""
    encoder = vae.encoder
    _check_type(encoder, Encoder, "vae.encoder")
    _check_weights(encoder, "vae.encoder")
    _check_conv(encoder.conv_in, "encoder.conv_in")
    for i, down in enumerate(encoder.down_blocks):
        where = f"encoder.down_blocks[{i}]"
        _check_type(down, DownEncoderBlock2D, where)
        for j, block in enumerate(down.resnets):
            _check_resnet(block, f"{where}.resnets[{j}]")
        for j, sampler in enumerate(down.downsamplers or []):
            conv = sampler.conv
            _check(
                original_type(sampler) is Downsample2D
                and sampler.use_conv
                and sampler.norm is None
                and isinstance(conv, nn.Conv2d)
                and conv.kernel_size == (3, 3)
                and conv.stride == (2, 2)
                and conv.dilation == (1, 1)
                and conv.padding_mode == "zeros"
                and conv.padding in ((0, 0), (1, 1)),
                f"{where}.downsamplers[{j}]",
                "only a stride-2 3x3 conv, zero-padded right and bottom or on every side, is modelled",
            )
    _check_mid_block(encoder.mid_block, "encoder.mid_block")
    _check_norm_act(encoder.conv_norm_out, encoder.conv_act, "encoder.conv_norm_out")
    _check_conv(encoder.conv_out, "encoder.conv_out")
    if vae.quant_conv is not None:
        _check_conv(vae.quant_conv, "vae.quant_conv", kernel=1)


def _downsample_padding(sampler: nn.Module) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of an encoder downsampler: diffusers pads ``padding=0`` ones
    right and bottom only."""
    p = sampler.conv.padding[0]
    return (0, 1, 0, 1) if p == 0 else (p, p, p, p)


def _streamer(
    coder: nn.Module,
    compute: torch.device | str | None,
    store: torch.device | str,
    store_dtype: torch.dtype | None,
    band_rows: int,
    query_chunk: int,
    attention_rows: int | None,
) -> _Streamer:
    """The streamer for ``coder`` (the VAE's decoder or encoder), its arguments checked."""
    if band_rows < 1 or query_chunk < 1:
        raise UsageError(f"band_rows={band_rows}, query_chunk={query_chunk}: both must be at least 1")
    if attention_rows is not None and attention_rows < 1:
        raise UsageError(
            f"attention_rows={attention_rows}: must be at least 1, or None to keep all keys/values on compute"
        )
    weight = coder.conv_in.weight
    compute = torch.device(compute) if compute is not None else weight.device
    if compute != weight.device:
        raise UsageError(f"compute={compute} but the VAE's weights are on {weight.device}: move the VAE to {compute}")
    groups = frozenset(m.num_groups for m in coder.modules() if isinstance(m, nn.GroupNorm))
    return _Streamer(
        compute, weight.dtype, torch.device(store), store_dtype or weight.dtype, groups, query_chunk, attention_rows
    )


def _mid_block(run: _Streamer, x: Bands, mid: nn.Module) -> Bands:
    x = run.resnet(x, mid.resnets[0])
    for attn, block in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            x = run.attention(x, attn)
        x = run.resnet(x, block)
    return x


def _report(run: _Streamer, start: float, on_done: Callable[[int, float], None] | None) -> None:
    """``on_done(bytes copied, seconds)``, once every copy and kernel has finished."""
    if on_done is not None:
        if run.compute.type == "cuda":
            torch.cuda.synchronize(run.compute)
        run.host.finish()
        on_done(run.host.moved, time.perf_counter() - start)


@torch.no_grad()
def decode_sequential(
    vae: nn.Module,
    latents: torch.Tensor,
    band_rows: int,
    store: torch.device | str = "cpu",
    compute: torch.device | str | None = None,
    store_dtype: torch.dtype | None = None,
    query_chunk: int = 4096,
    attention_rows: int | None = None,
    on_done: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """``vae.decode(latents).sample`` computed ``band_rows`` latent rows at a time on ``compute``.

    ``latents`` are unscaled, as for ``vae.decode`` (the pipeline divides by ``scaling_factor`` first).
    Activations live on ``store`` in ``store_dtype`` (default: the decoder's dtype; float16 halves host
    RAM at a small precision cost); ``compute`` defaults to, and must equal, the device of the VAE's
    weights. The image comes back on ``store`` in the decoder's dtype. ``vae.enable_tiling()`` is ignored:
    this is its exact replacement. ``attention_rows`` (latent rows) streams the mid-block attention's keys
    and values from ``store`` instead of keeping them all on ``compute`` (see the module docstring).
    ``on_done(bytes, seconds)`` receives the bytes copied between store and compute and the decode's wall time.
    """
    start = time.perf_counter()
    check_supported(vae)
    decoder = vae.decoder
    run = _streamer(decoder, compute, store, store_dtype, band_rows, query_chunk, attention_rows)
    x = run.bands(latents, band_rows)

    x = run.conv(x, decoder.conv_in, pre=vae.post_quant_conv)
    x = _mid_block(run, x, decoder.mid_block)
    for up in decoder.up_blocks:
        for block in up.resnets:
            x = run.resnet(x, block)
        for sampler in up.upsamplers or []:
            x = run.conv(x, sampler.conv, upsample=True, consume=True)
    pre = run.norm_act(x, decoder.conv_norm_out, decoder.conv_act)
    x = run.conv(x, decoder.conv_out, pre=pre, consume=True)
    run.host.ready(x.parts)
    image = torch.cat(x.parts, dim=2).to(run.dtype)
    _report(run, start, on_done)
    return image


@torch.no_grad()
def encode_sequential(
    vae: nn.Module,
    image: torch.Tensor,
    band_rows: int,
    store: torch.device | str = "cpu",
    compute: torch.device | str | None = None,
    store_dtype: torch.dtype | None = None,
    query_chunk: int = 4096,
    attention_rows: int | None = None,
    on_done: Callable[[int, float], None] | None = None,
) -> DiagonalGaussianDistribution:
    """``vae.encode(image).latent_dist`` computed ``band_rows`` latent rows (``8 * band_rows`` pixel rows) at a
    time on ``compute``, the activations on ``store``: what a cascade needs between stages at 16K, where the
    encoder's full-resolution maps (128 channels per pixel) do not fit a GPU.

    The same interpreter as :func:`decode_sequential` (same arguments), walking the encoder: its stride-2
    downsamplers are banded convolutions whose output bands are the input bands halved. ``image`` (values in
    [-1, 1]) may be on any device; its sides must be multiples of 8. The posterior comes back on ``compute``.
    """
    start = time.perf_counter()
    check_supported_encoder(vae)
    encoder = vae.encoder
    run = _streamer(encoder, compute, store, store_dtype, band_rows, query_chunk, attention_rows)
    height, width = image.shape[-2:]
    factor = 2 ** sum(len(down.downsamplers or []) for down in encoder.down_blocks)
    if height % factor or width % factor:
        size = format_size(width, height)
        raise UsageError(f"image of {size} px: both sides must be multiples of {factor} to encode")
    x = run.bands(image, band_rows * factor)

    x = run.conv(x, encoder.conv_in, consume=True)
    for down in encoder.down_blocks:
        for block in down.resnets:
            x = run.resnet(x, block)
        for sampler in down.downsamplers or []:
            x = run.conv(x, sampler.conv, consume=True, pad=_downsample_padding(sampler))
    x = _mid_block(run, x, encoder.mid_block)
    pre = run.norm_act(x, encoder.conv_norm_out, encoder.conv_act)
    x = run.conv(x, encoder.conv_out, pre=pre, consume=True)
    if vae.quant_conv is not None:  # 1x1, at latent resolution: one more cheap pass
        x = run.conv(x, vae.quant_conv, consume=True)
    moments = run.load(list(x.parts))
    _report(run, start, on_done)
    return DiagonalGaussianDistribution(moments)
