"""Predicted peak memory per rank of a patch-parallel generation, from the architecture config alone.

The model (validated against meta-tensor measurements in ``tests/test_memory.py``): peak = weights +
max(UNet activation peak, VAE-decode peak) + the full latent and image every rank holds. No-grad
activations peak in a feed-forward of a transformer level of the UNet's up path (or, with chunked
transformers, in a resnet of that level: concatenated input, its norm and SiLU, in place with
:func:`~distlin.lean.bound_memory`, and the conv output). There, per token of
that level (C channels, ``m`` the FF multiplier, ``L`` layers per block), are alive: the block's
``L+1`` skip tensors (diffusers keeps the whole tuple referenced), the caller's input (the deeper
level's C' channels), five C-wide tensors of the transformer (residual, hidden, attention output,
norm output, proj_in output) and the GEGLU's ``2mC`` projection, ``mC`` GELU and ``mC`` product; the
skips of every shallower level are alive too. With ``ff_chunk`` (the run's :func:`~distlin.lean.bound_memory`) a
transformer above that many tokens runs in token chunks end to end (:mod:`distlin.lean.transformer`):
its input, the hidden-state buffer and the output (3 C-wide tensors) plus one chunk's GEGLU working set.
A direct VAE decode peaks at its last upsampling: three tensors of the second level's width at full image
resolution (upsampled input, conv output, next resnet's norm), per band pixel.
Softmax attention is assumed to run in a fused kernel (no N x N scores), as on GPUs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

from distlin.errors import UsageError
from distlin.models.architectures import load_architecture
from distlin.parallel.topology import LATENT_FACTOR, Topology, row_unit
from distlin.settings import DTYPE_BYTES, check_vae_decode
from distlin.sizes import format_size
from distlin.thresholds import Thresholds
from distlin.vae.coders import decodes_sequentially, sequential_options


def _param_count(config: dict[str, Any]) -> int:
    """Parameters of one component, counted on the meta device (nothing allocated)."""
    return _param_count_of(json.dumps(config, sort_keys=True))


@lru_cache(maxsize=32)
def _param_count_of(config_json: str) -> int:
    from distlin.models.tiny import build_component  # here: it imports diffusers' pipelines, which print warnings

    model = build_component(json.loads(config_json))
    return sum(p.numel() for p in model.parameters())


def unet_activation_elements(unet: dict[str, Any], tokens: int, batch: int, ff_chunk: int | None = None) -> int:
    """Peak live activation elements of one UNet call on ``tokens`` level-0 tokens (see the module doc)."""
    widths = list(unet["block_out_channels"])
    layers = unet["layers_per_block"]
    layers = layers if isinstance(layers, list) else [layers] * len(widths)
    attention = ["CrossAttn" in kind for kind in unet["down_block_types"]]
    ff_mult = 4
    peak, shallower = 0.0, 0.0
    for level, (width, depth) in enumerate(zip(widths, layers, strict=True)):
        level_tokens = tokens / 4**level
        deeper = widths[min(level + 1, len(widths) - 1)]
        held = level_tokens * ((depth + 1) * width + deeper) + shallower
        # resnet: concatenated input, its norm and activation (one tensor when in place: bound_memory), conv output
        copies = 3 if ff_chunk is None else 2
        peak = max(peak, held + level_tokens * (copies * (deeper + width) + width))
        if attention[level] and (ff_chunk is None or level_tokens <= ff_chunk):
            peak = max(peak, held + (5 + 4 * ff_mult) * width * level_tokens)
        elif attention[level]:  # token-chunked transformer: input, hidden and output, plus one chunk's work
            peak = max(peak, held + 3 * width * level_tokens + (4 * ff_mult + 2) * width * ff_chunk)
        shallower += level_tokens * (depth + 1) * width
    return int(batch * peak)


def controlnet_residual_elements(unet: dict[str, Any], tokens: int, batch: int, controlnets: int = 1) -> int:
    """Elements of the residuals ``controlnets`` ControlNets hand the UNet for ``tokens`` level-0 tokens: one
    per skip connection of the UNet's encoder and one for its mid block, alive through the whole UNet call
    (with several, their running sum and one ControlNet's own)."""
    if controlnets == 0:
        return 0
    widths = list(unet["block_out_channels"])
    layers = unet["layers_per_block"]
    layers = layers if isinstance(layers, list) else [layers] * len(widths)
    levels = enumerate(zip(widths, layers, strict=True))
    skips = sum(tokens / 4**level * (depth + 1) * width for level, (width, depth) in levels)
    mid = tokens / 4 ** (len(widths) - 1) * widths[-1]
    return int(batch * (skips + mid) * min(controlnets, 2))


def vae_decode_elements(vae: dict[str, Any], pixels: int, latent_tokens: int) -> int:
    """Peak live elements of decoding a band of ``pixels`` pixels, plus the mid-block's gathered K and V."""
    widths = vae["block_out_channels"]
    second = widths[-2] if len(widths) > 1 else widths[-1]
    return int(3 * second * pixels + 2 * widths[-1] * latent_tokens)


def check_plan_inputs(
    height: int, width: int, factor: int, dtype: str, micro_batch: int | None, vae_decode: str
) -> None:
    """Every family's plan refuses the same inputs: an unknown dtype, sides that are not multiples of the
    latent ``factor``, a micro-batch under 1, an unknown VAE path."""
    if dtype not in DTYPE_BYTES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    if height % factor or width % factor:
        raise UsageError(f"{format_size(width, height)} px: both sides must be multiples of {factor}")
    if micro_batch is not None and micro_batch < 1:
        raise UsageError(f"micro_batch {micro_batch} must be at least 1")
    check_vae_decode(vae_decode)


def whole_image_terms(latent_channels: int, rows: int, cols: int, height: int, width: int) -> dict[str, int]:
    """What every rank holds whole: the latents, noise, prediction and step (float32), the gathered image."""
    return {"full_latents": 4 * latent_channels * rows * cols * 4, "full_image": 3 * height * width * 4}


def store_terms(stored: int, vae_store: str) -> dict[str, int]:
    """The sequential VAE's ``stored`` bytes on the device, or in host RAM (the image assembled there too)."""
    if vae_store == "device":
        return {"vae_store_on_device": stored}
    return {"vae_host_ram_not_on_device": stored, "full_image": 0}


def peak_bytes(breakdown: dict[str, int], denoise: int) -> int:
    """Weights + the larger of the ``denoise`` call's and the VAE's activations + what every rank holds whole."""
    weights = sum(value for key, value in breakdown.items() if key.startswith("weights_"))
    vae = breakdown["vae_decode_activations"] + breakdown.get("vae_store_on_device", 0)
    return int(weights + max(denoise, vae) + breakdown["full_latents"] + breakdown["full_image"])


def plan(
    preset_or_arch: str | dict[str, Any],
    height: int,
    width: int,
    ranks: int = 1,
    *,
    dtype: str = "float16",
    cfg: bool = True,
    cfg_parallel: bool = True,
    micro_batch: int | None = None,
    vae_attention_rows: int | None = None,
    vae_decode: str = "auto",
    thresholds: Thresholds | None = None,
    ff_chunk: int | None = None,
    extra_parameters: dict[str, int] | None = None,
    vae_fetch_ahead: bool = True,
    controlnets: int = 0,
    vae_store: str = "host",
) -> dict[str, Any]:
    """Predicted peak bytes per rank for generating ``height`` x ``width`` px on ``ranks`` ranks.

    ``preset_or_arch``: a built-in model name (``full-sd15``, ``tiny-sd15``, ...) or an architecture dict
    as :func:`load_architecture` returns. ``cfg`` doubles the UNet batch; with ``cfg_parallel`` and an
    even number of ranks the two halves run on separate rank groups (batch 1 over ``ranks/2`` bands);
    ``micro_batch`` caps the samples per UNet call (1: the guidance halves one after the other);
    ``vae_decode`` picks the VAE path (the run's rule, :func:`~distlin.vae.coders.decodes_sequentially`);
    ``vae_attention_rows`` streams the sequential decode's mid-block keys/values from host RAM. ``thresholds``
    (a run's) set the token chunk of the transformers and the sequential VAE's switch-on size and band rows;
    without them the transformers are planned unchunked (``ff_chunk`` alone sets their chunk).
    ``extra_parameters`` counts the parameters of a run's own components by name (ControlNets, an IP-Adapter's
    image encoder: :func:`component_parameters`), held on every rank beside the model's; ``controlnets``
    ControlNets add their residuals to the UNet call's activations, for the whole guidance batch (micro-batches
    bound each call, ControlNet's and UNet's, but the UNet's calls take their slices of residuals computed for
    every sample first). ``vae_fetch_ahead``: the sequential decode holds one band more on the device, where its
    copies overlap compute (a GPU; not on the CPU). A cascade's encode between stages takes the VAE path of its
    size, like the decode, and needs less on the device (tests/test_sequential_vae.py), so the decode's term
    covers it. ``vae_store``: where the sequential VAE keeps its full-size activations, ``host``
    RAM or the ``device`` (no host transfers; they then count on the device, beside the decode's bands).
    """
    chunk = thresholds.token_chunk if thresholds is not None else ff_chunk
    limits = thresholds or Thresholds()
    check_plan_inputs(height, width, LATENT_FACTOR, dtype, micro_batch, vae_decode)
    arch = load_architecture(preset_or_arch) if isinstance(preset_or_arch, str) else preset_or_arch
    size = DTYPE_BYTES[dtype]
    rows, cols = height // LATENT_FACTOR, width // LATENT_FACTOR
    unet = arch["unet"]
    topology = Topology.for_run(ranks, cfg_parallel=cfg_parallel, guidance=cfg)
    split_cfg = topology.cfg_split
    guidance_batch = 2 if cfg and not split_cfg else 1  # samples of one UNet evaluation on this rank
    batch = min(guidance_batch, micro_batch or 2)  # samples of one UNet call
    unet_tokens = topology.band_rows(rows, cols, row_unit(unet)) * cols
    sequential = decodes_sequentially(height, width, ranks, vae_decode, limits.sequential_vae_pixels)
    if sequential:
        from distlin.vae.peak import device_peak_elements

        settings = sequential_options(vae_attention_rows, limits.sequential_band_rows)
        vae_elements = device_peak_elements(
            arch["vae"], rows, cols, dtype=getattr(torch, dtype), fetch_ahead=vae_fetch_ahead, **settings
        )
    else:
        vae_band = Topology.for_run(ranks, cfg_parallel=False, guidance=False).band_rows(rows, cols, 1)
        vae_elements = vae_decode_elements(arch["vae"], vae_band * cols * LATENT_FACTOR**2, rows * cols)
    weights = {name: _param_count(config) for name, config in arch.items() if name != "scheduler"}
    weights.update(extra_parameters or {})
    breakdown = {
        **{f"weights_{name}": count * size for name, count in weights.items()},
        "unet_activations": (
            unet_activation_elements(unet, unet_tokens, batch, chunk)
            + controlnet_residual_elements(unet, unet_tokens, guidance_batch, controlnets)
        )
        * size,
        "vae_decode_activations": vae_elements * size,
        **whole_image_terms(unet["in_channels"], rows, cols, height, width),
    }
    if sequential:  # the decoder's full activations live in the store (float16), host RAM or the device:
        widths = arch["vae"]["block_out_channels"]  # at worst the last block's input and its hidden map
        breakdown.update(store_terms((widths[0] + widths[min(1, len(widths) - 1)]) * height * width * 2, vae_store))
    return {
        "peak_bytes_per_rank": peak_bytes(breakdown, breakdown["unet_activations"]),
        "ranks": ranks,
        "height": height,
        "width": width,
        "dtype": dtype,
        "cfg": cfg,
        "cfg_parallel": split_cfg,
        "ff_chunk": chunk,
        "micro_batch": micro_batch,
        "vae_attention_rows": vae_attention_rows if sequential else None,
        "unet_band_tokens": unet_tokens,
        "vae": "sequential" if sequential else ("banded" if ranks > 1 else "plain"),
        "vae_store": vae_store if sequential else None,
        "breakdown": breakdown,
    }


def ranks_needed(
    capacity_bytes: int,
    preset_or_arch: str | dict[str, Any],
    height: int,
    width: int,
    planner: Callable[..., dict[str, Any]] | None = None,
    **kw: Any,
) -> int:
    """The fewest ranks whose predicted peak fits ``capacity_bytes`` each; raises when none does. ``planner``:
    the model family's formula (its ``plan``; Stable Diffusion's by default)."""
    arch = load_architecture(preset_or_arch) if isinstance(preset_or_arch, str) else preset_or_arch
    most = height // LATENT_FACTOR
    for ranks in range(1, most + 1):
        try:
            result = (planner or plan)(arch, height, width, ranks, **kw)
        except UsageError:
            break
        if result["peak_bytes_per_rank"] <= capacity_bytes:
            return ranks
        if _held_by_every_rank(result["breakdown"]) > capacity_bytes:  # more ranks cannot help: stop searching
            break
    raise UsageError(
        f"{format_size(width, height)} px does not fit {capacity_bytes / 2**30:.1f} GiB per rank with any rank count"
    )


def _held_by_every_rank(breakdown: dict[str, int]) -> int:
    """Bytes a rank holds whatever the rank count: the weights and the full latents."""
    return sum(value for key, value in breakdown.items() if key.startswith("weights_")) + breakdown.get(
        "full_latents", 0
    )


def format_plan(result: dict[str, Any]) -> str:
    """Human-readable plan for ``--plan``: the peak per rank and what makes it up, in GiB."""
    gib = 2**30
    head = (
        f"predicted peak per rank: {result['peak_bytes_per_rank'] / gib:.2f} GiB "
        f"({format_size(result['width'], result['height'])} px, {result['ranks']} rank(s), {result['dtype']}, "
        f"cfg={'parallel' if result['cfg_parallel'] else result['cfg']}, micro_batch={result['micro_batch']}, "
        f"ff_chunk={result['ff_chunk']}, vae={result['vae']}"
        + (f", vae_attention_rows={result['vae_attention_rows']})" if result["vae_attention_rows"] else ")")
    )
    lines = [f"  {key:<24} {value / gib:9.3f} GiB" for key, value in result["breakdown"].items()]
    note = "  (UNet and VAE activations do not coexist: the peak counts the larger)"
    return "\n".join([head, *lines, note])


def component_parameters(configs: dict[str, dict[str, Any]], counts: dict[str, int] | None = None) -> dict[str, int]:
    """Parameters of each named component: from its config (counted on the meta device), or given as a count
    (a weights file read from its header)."""
    return {**{name: _param_count(config) for name, config in configs.items()}, **(counts or {})}
