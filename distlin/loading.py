"""Where models come from: built-in offline pipelines, local folders or Hugging Face Hub ids.

Every way a model or a LinFusion checkpoint can be missing becomes one :class:`UsageError` line naming the
value and the fixes. Cheap ``check_*`` functions let the CLI reject bad sources before any weights load.
Diffusers' pipeline classes are imported only when a pipeline is loaded, to keep ``--help`` and errors fast.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id

from distlin.errors import UsageError
from distlin.linfusion import LinFusion
from distlin.models.architectures import is_builtin, load_architecture

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from PIL import Image

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# LinFusion sources that are not a checkpoint: keep the softmax attention, or build new layers.
NO_LINFUSION, FRESH_LINFUSION = "none", "fresh"

# Loggers whose chatter ("Couldn't connect to the Hub ...") would bury the one-line error of a failed load.
_LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub")


def parse_dtype(name: str) -> torch.dtype:
    """``float32|float16|bfloat16`` or their short forms ``fp32|fp16|bf16``."""
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; use float32, float16 or bfloat16 (or fp32, fp16, bf16)")
    return DTYPES[name]


def _local_path(source: str) -> Path | None:
    """The folder ``source`` names, or None if it is a Hub id.

    Hub ids look like relative paths (``org/name``), so an existing path wins, and anything a Hub id cannot be
    (absolute, ``./``, ``~``, more than one slash) is a path even when it does not exist.
    """
    path = Path(source).expanduser()
    if path.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1:
        return path
    return None


def _check_source(source: str, what: str, flag: str, marker: str) -> None:
    """A local folder must hold ``marker`` readably; anything else must be a well-formed Hub id."""
    path = _local_path(source)
    if path is None:
        try:
            validate_repo_id(source)
        except HFValidationError:
            raise UsageError(
                f"{what} {source!r} is neither a folder nor a Hugging Face Hub id (org/name); fix {flag}"
            ) from None
        return
    if not path.is_dir():
        raise UsageError(f"{what} folder {source!r} does not exist; fix {flag} (a folder or a Hub id)")
    if not os.access(path / marker, os.R_OK):
        raise UsageError(f"{what} folder {source!r} has no readable {marker}; pass the folder that holds it")


def check_model_source(model: str) -> None:
    """Reject a model that is not built in, a diffusers folder or a Hub id, before loading anything."""
    if not is_builtin(model):
        _check_source(model, "model", "--model", "model_index.json")


def unet_downsamplings(model: str) -> int | None:
    """The UNet's number of downsamplings from its config alone (no weights), or None if it cannot be read
    cheaply (then the engine checks the size itself once the model is loaded)."""
    if is_builtin(model):
        config = load_architecture(model)["unet"]
    else:
        from diffusers import UNet2DConditionModel

        try:
            with _held_diagnostics():
                config = UNet2DConditionModel.load_config(model, subfolder="unet")
        except Exception:  # noqa: BLE001 - any failure here just defers the check to the loaded model
            return None
    return len(config.get("block_out_channels", ())) - 1 if "block_out_channels" in config else None


# Hub ids of base models whose architecture ships in configs/architectures (for offline memory plans).
ARCHITECTURE_FOR_MODEL: dict[str, str] = {
    "runwayml/stable-diffusion-v1-5": "full-sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "full-sd15",
    "Lykon/dreamshaper-8": "full-sd15",
    "SG161222/Realistic_Vision_V4.0_noVAE": "full-sd15",
    "stabilityai/stable-diffusion-2-1": "full-sd21",
    "stabilityai/stable-diffusion-xl-base-1.0": "full-sdxl",
}


def architecture_of(model: str) -> dict[str, Any] | None:
    """The architecture configs of a built-in or well-known model, without touching the network."""
    if is_builtin(model):
        return load_architecture(model)
    name = ARCHITECTURE_FOR_MODEL.get(model)
    return load_architecture(name) if name else None


def check_linfusion_source(linfusion: str) -> None:
    """Reject a LinFusion source that is not ``none``/``fresh``, a checkpoint folder or a Hub id."""
    if linfusion not in (NO_LINFUSION, FRESH_LINFUSION):
        _check_source(linfusion, "LinFusion checkpoint", "--linfusion", "config.json")


def _not_found(what: str, source: str, err: BaseException, fallback: str) -> UsageError:
    return UsageError(
        f"cannot load {what} {source!r} ({type(err).__name__}): not a local folder, not in the Hugging Face "
        f"cache and not downloadable; pass a local folder, pre-download it into the cache with "
        f"`hf download {source}` (formerly huggingface-cli download), or {fallback}"
    )


class _Holder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _held_diagnostics() -> Iterator[None]:
    """Hold library log records and Python warnings back while loading; replay them only if it succeeds.

    A failed load is reported as one line; a successful one keeps every warning the libraries gave.
    """
    holder = _Holder()
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [holder], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved, strict=True):
            logger.handlers, logger.propagate = handlers, propagate
    for record in holder.records:
        logging.getLogger(record.name).handle(record)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def load_pipeline(model: str, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> DiffusionPipeline:
    """A built-in pipeline (weights drawn from ``seed``), or ``DiffusionPipeline.from_pretrained(model)``.

    ``from_pretrained`` honours the user's HF cache, ``HF_HOME`` and ``HF_HUB_OFFLINE``.
    """
    if is_builtin(model):
        from distlin.models.tiny import build_pipeline

        return build_pipeline(model, seed=seed, torch_dtype=dtype).to(device)
    check_model_source(model)
    from diffusers import DiffusionPipeline

    source = str(_local_path(model) or model)
    try:
        with _held_diagnostics():
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
    except OSError as err:
        raise _not_found("model", model, err, "use --preset tiny-sd15 to run offline") from None
    return pipe.to(device)


def mount_linfusion(pipe: Any, linfusion: str, seed: int = 0) -> LinFusion | None:
    """Replace the UNet's self-attention with LinFusion layers; returns the mounted container.

    ``none`` keeps softmax attention; ``fresh`` builds new layers from ``seed`` (the same on every rank, so
    patch-parallel ranks hold identical weights); anything else is a checkpoint folder or Hub id.
    """
    if linfusion == NO_LINFUSION:
        return None
    if linfusion == FRESH_LINFUSION:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LinFusion.construct_for(pipe, load_pretrained=False)
    check_linfusion_source(linfusion)
    source = str(_local_path(linfusion) or linfusion)
    try:
        with _held_diagnostics():
            return LinFusion.construct_for(pipe, pretrained_model_name_or_path=source)
    except OSError as err:
        raise _not_found("LinFusion checkpoint", linfusion, err, "pass --linfusion fresh or none") from None


@torch.no_grad()
def decode_latents(
    pipe: Any, latents: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Image.Image:
    """Decode the first latent of a batch into a PIL image with the pipeline's VAE, as diffusers would.

    Undoes the VAE's scaling (and shift, or SDXL-style per-channel mean/std), decodes in float32 where the VAE
    asks for it (``force_upcast``: the SDXL VAE overflows in float16) and applies the pipeline's watermark.
    ``decode`` replaces ``vae.decode`` (e.g. the band-parallel VAE's; then every rank must call this).
    """
    vae = pipe.vae
    config = vae.config
    upcast = vae.dtype == torch.float16 and config.get("force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    latents = latents[:1].to(device=vae.device, dtype=dtype)
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        image = decode(latents) if decode is not None else vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    return image_to_pil(pipe, image)


def image_to_pil(pipe: Any, image: torch.Tensor) -> Image.Image:
    """The first image of a ``[-1, 1]`` batch as PIL, with the pipeline's watermark if it has one."""
    watermark = getattr(pipe, "watermark", None)
    if watermark is not None:
        image = watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="pil")[0]
