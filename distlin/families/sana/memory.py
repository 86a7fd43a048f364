"""SANA's memory formula for the planner (``--plan``, the automatic savers): predicted peak bytes per rank.

peak = weights (transformer, DC-AE, Gemma-2) + max(transformer call, DC-AE decode) + the full latents and image
every rank holds, as for Stable Diffusion (:func:`distlin.memory.planner.plan`), with SANA's two working sets:

- a transformer call peaks in a block's Mix-FFN: per band token and sample, the blocks' input and output hidden
  states, the modulated norm and its channels-first copy (4 C) and the FFN's inverted conv output beside its
  SiLU, then the depthwise conv's input beside its output (4 · int(mlp_ratio · C)); SANA-1600M: 14 C. The
  linear self-attention's state does not grow with the image; the cross-attention is assumed fused (no
  token x caption scores), as on GPUs;
- a DC-AE decode peaks in a ResBlock of its last (full-resolution) level, of width ``w0``: per band pixel
  2.5 ``w0`` elements in the model dtype (input, conv output, the norm's result) plus two float32 copies of
  ``w0`` (diffusers' RMSNorm computes in float32). Band-parallel, a band is a rank's rows; band by band on
  rank 0 (above the size threshold, :mod:`distlin.families.sana.sequential`), it is ``band_rows`` latent rows
  plus the neighbours' rows the last level still needs on either side, and the decoded image sits in the store
  (host RAM, or the device with ``vae_store="device"``).

All three are validated against meta-tensor measurements of the real modules (:func:`measured_activation_peak`,
:func:`measured_decode_peak`, :func:`measured_band_decode_peak`) in ``tests/test_sana_memory.py``. This module
is the planner's (layer 5): it asks :func:`distlin.vae.coders.decodes_sequentially` (the run's rule) when the
DC-AE goes band by band, and takes the input checks and the peak's sum from :mod:`distlin.memory.planner`.
"""

from __future__ import annotations

import json
from functools import lru_cache, partial
from typing import Any

import torch
from torch import nn

from distlin.families.sana.family import dc_ae_factor, token_row_unit
from distlin.memory.planner import check_plan_inputs, peak_bytes, store_terms, whole_image_terms
from distlin.parallel.topology import Topology
from distlin.settings import DTYPE_BYTES
from distlin.thresholds import Thresholds
from distlin.vae.coders import decodes_sequentially


def activation_elements(transformer: dict[str, Any], tokens: int, batch: int) -> int:
    """Peak live activation elements of one transformer call on ``tokens`` band tokens (see the module doc)."""
    width = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    hidden = int(transformer.get("mlp_ratio", 2.5) * width)
    return int(batch * tokens * (4 * width + 4 * hidden))


def residual_elements(transformer: dict[str, Any], tokens: int, batch: int) -> int:
    """Elements of a SANA ControlNet's residuals for ``tokens`` band tokens: one ``(batch, tokens, C)`` per
    transformer block at most (a ControlNet has as many blocks or fewer; the transformer adds no more)."""
    width = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    return int(batch * tokens * width * transformer["num_layers"])


def decode_elements(vae: dict[str, Any], pixels: int, dtype_bytes: int) -> int:
    """Peak live elements (of the model dtype) of decoding a band of ``pixels`` image pixels."""
    width = vae["decoder_block_out_channels"][0]
    return int(pixels * width * (2.5 + 2 * 4 / dtype_bytes))


def _build(kind: str, config_json: str) -> nn.Module:
    """A component on the meta device (nothing allocated)."""
    config = json.loads(config_json)
    with torch.device("meta"):
        if kind == "transformer":
            from diffusers import SanaTransformer2DModel

            return SanaTransformer2DModel.from_config(config)
        if kind == "vae":
            from diffusers import AutoencoderDC

            return AutoencoderDC.from_config(config)
        from transformers import Gemma2Config, Gemma2Model

        if "vocab_size" not in config:  # tiny-sana: the package's small tokenizer sets it
            from distlin.models.tiny import load_tokenizer

            config["vocab_size"] = len(load_tokenizer())
        return Gemma2Model(Gemma2Config(**config))


@lru_cache(maxsize=16)
def _last_level_margin(vae_json: str) -> int:
    """Latent rows of neighbours a band still carries on either side through the DC-AE decoder's last level
    (:func:`~distlin.families.sana.sequential.receptive_rows` on a meta probe)."""
    from distlin.families.sana.sequential import receptive_rows, stages

    decoder = _build("vae", vae_json).decoder
    vae = json.loads(vae_json)
    _, remaining = receptive_rows(decoder, torch.empty(1, vae["latent_channels"], 2, 2, device="meta"), 1)
    return remaining[stages(decoder)[0]]


def band_decode_pixels(vae: dict[str, Any], band_rows: int, width: int) -> int:
    """Pixels of the last level of one band of ``band_rows`` latent rows decoded band by band, margins included."""
    rows = band_rows + 2 * _last_level_margin(json.dumps(vae, sort_keys=True))
    return rows * dc_ae_factor(vae) * width


def direct_decode_pixels(vae: dict[str, Any], height: int, width: int, ranks: int) -> int:
    """Pixels of the last level a rank decodes band-parallel (plain on one rank): its band of the image's rows."""
    factor = dc_ae_factor(vae)
    layout = Topology.for_run(ranks, cfg_parallel=False, guidance=False).layout(
        height // factor, width // factor, 1, factor
    )
    return max(layout.sizes()) * factor * width


def band_by_band_holds_less(vae: dict[str, Any], band_rows: int, height: int, width: int, ranks: int) -> bool:
    """The family's ``sequential_holds_less``: whether a band-by-band pass of ``band_rows`` latent rows (its
    neighbours' rows recomputed) decodes fewer pixels at once than a rank's band-parallel band. On many ranks it
    does not (SANA-1600M at 4096² on 8 ranks: 16 latent rows a rank), so ``auto`` keeps the direct decode."""
    return band_decode_pixels(vae, band_rows, width) < direct_decode_pixels(vae, height, width, ranks)


@lru_cache(maxsize=16)
def _parameters(kind: str, config_json: str) -> int:
    return sum(p.numel() for p in _build(kind, config_json).parameters())


def parameters(kind: str, config: dict[str, Any]) -> int:
    """Parameters of ``transformer``, ``vae`` or ``text_encoder``, counted on the meta device."""
    return _parameters(kind, json.dumps(config, sort_keys=True))


def plan_sana(
    arch: dict[str, Any],
    height: int,
    width: int,
    ranks: int = 1,
    *,
    dtype: str = "bfloat16",
    cfg: bool = True,
    cfg_parallel: bool = True,
    micro_batch: int | None = None,
    vae_decode: str = "auto",
    thresholds: Thresholds | None = None,
    vae_store: str = "host",
    extra_parameters: dict[str, int] | None = None,
    controlnets: int = 0,
    **_: Any,
) -> dict[str, Any]:
    """Predicted peak bytes per rank of a SANA generation of ``height`` x ``width`` px on ``ranks`` ranks, in
    the planner's layout (:func:`distlin.memory.planner.format_plan`). ``arch``: ``transformer``, ``vae`` and
    ``text_encoder`` configs. The DC-AE decodes band-parallel on every rank, or band by band on rank 0 as
    :func:`~distlin.vae.coders.decodes_sequentially` says (``thresholds``: the switch-on size and band rows), its
    image in ``vae_store``. ``extra_parameters``: the parameter counts of a run's own components (a SANA
    ControlNet's, :func:`~distlin.memory.planner.component_parameters`); with ``controlnets``, the ControlNet's
    band residuals (one per transformer block at most) stay alive through the transformer call. The planner's
    options for Stable Diffusion parts (IP-Adapters, the AutoencoderKL's attention rows) are ignored."""
    transformer, vae = arch["transformer"], arch["vae"]
    factor = dc_ae_factor(vae)
    check_plan_inputs(height, width, factor, dtype, micro_batch, vae_decode)
    size = DTYPE_BYTES[dtype]
    limits = thresholds or Thresholds()
    holds_less = partial(band_by_band_holds_less, vae, limits.sequential_band_rows)
    sequential = decodes_sequentially(height, width, ranks, vae_decode, limits.sequential_vae_pixels, holds_less)
    rows, cols = height // factor, width // factor
    topology = Topology.for_run(ranks, cfg_parallel=cfg_parallel, guidance=cfg)
    batch = min(2 if cfg and not topology.cfg_split else 1, micro_batch or 2)
    tokens = topology.layout(rows, cols, token_row_unit(transformer), factor).sizes()
    band_tokens = max(tokens) * cols // token_row_unit(transformer) ** 2
    if sequential:
        vae_pixels = band_decode_pixels(vae, limits.sequential_band_rows, width)
    else:
        vae_pixels = direct_decode_pixels(vae, height, width, ranks)
    breakdown = {
        **{f"weights_{kind}": parameters(kind, arch[kind]) * size for kind in ("transformer", "vae", "text_encoder")},
        **{f"weights_{kind}": count * size for kind, count in (extra_parameters or {}).items()},
        "transformer_activations": activation_elements(transformer, band_tokens, batch) * size,
        "vae_decode_activations": decode_elements(vae, vae_pixels, size) * size,
        **whole_image_terms(transformer["in_channels"], rows, cols, height, width),
    }
    if controlnets:
        breakdown["controlnet_residuals"] = residual_elements(transformer, band_tokens, batch) * size
    if sequential:  # the decoded bands gather in the store: host RAM, or the device
        breakdown.update(store_terms(3 * height * width * size, vae_store))
    denoise = breakdown["transformer_activations"] + breakdown.get("controlnet_residuals", 0)
    return {
        "peak_bytes_per_rank": peak_bytes(breakdown, denoise),
        "ranks": ranks,
        "height": height,
        "width": width,
        "dtype": dtype,
        "cfg": cfg,
        "cfg_parallel": topology.cfg_split,
        "ff_chunk": None,
        "micro_batch": micro_batch,
        "vae_attention_rows": None,
        "unet_band_tokens": band_tokens,
        "vae": "sequential" if sequential else ("banded" if ranks > 1 else "plain"),
        "vae_store": vae_store if sequential else None,
        "breakdown": breakdown,
    }


def _meta_peak(model: nn.Module, call: Any) -> int:
    """Peak bytes of activations (parameters excluded) of ``call()`` on meta tensors (the UNet's measurement)."""
    from distlin.memory.measure import activation_peak  # here: it loads torch's memory tracker and diffusers' UNet

    return activation_peak(model, call)


def measured_activation_peak(
    transformer: dict[str, Any], rows: int, cols: int, batch: int, dtype: torch.dtype, caption_tokens: int = 8
) -> int:
    """Measured peak activation bytes of one call of the band-parallel transformer (one rank) on a ``rows`` x
    ``cols`` latent, on meta tensors. Meta SDPA is not fused, so the caption is short: its token x caption
    scores, which a GPU's fused kernel never holds, stay negligible."""
    from distlin.families.sana.transformer import parallelize_transformer
    from distlin.parallel.config import PatchParallelConfig

    model = torch.nn.Module.to(_build("transformer", json.dumps(transformer)), dtype=dtype).eval()
    handle = parallelize_transformer(model, PatchParallelConfig(check_finite=False))
    meta: dict[str, Any] = {"device": "meta", "dtype": dtype}
    latent = torch.empty(batch, transformer["in_channels"], rows, cols, **meta)
    caption = torch.empty(batch, caption_tokens, transformer["caption_channels"], **meta)
    timestep = torch.empty(batch, device="meta")
    try:
        return _meta_peak(model, lambda: model(hidden_states=latent, encoder_hidden_states=caption, timestep=timestep))
    finally:
        handle.undo()


def measured_band_decode_peak(vae: dict[str, Any], rows: int, cols: int, band_rows: int, dtype: torch.dtype) -> int:
    """Measured peak activation bytes of the middle band's last pass of the band-by-band decode of a ``rows`` x
    ``cols`` latent (the states summed before), on meta tensors."""

    from distlin.families.sana.sequential import BandedPart

    model = torch.nn.Module.to(_build("vae", json.dumps(vae)), dtype=dtype).eval()
    latent = torch.empty(1, vae["latent_channels"], rows, cols, device="meta", dtype=dtype)
    with torch.no_grad(), BandedPart(model.decoder, latent, 1, "meta") as banded:
        bands = banded.bands(band_rows)
        banded.sum_states(bands)
        return _meta_peak(model, lambda: banded.band(*bands[len(bands) // 2]))


def measured_decode_peak(vae: dict[str, Any], rows: int, cols: int, dtype: torch.dtype) -> int:
    """Measured peak activation bytes of decoding a ``rows`` x ``cols`` latent with the DC-AE, on meta tensors."""
    model = torch.nn.Module.to(_build("vae", json.dumps(vae)), dtype=dtype).eval()
    latent = torch.empty(1, vae["latent_channels"], rows, cols, device="meta", dtype=dtype)
    return _meta_peak(model, lambda: model.decoder(latent))
