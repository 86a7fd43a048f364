"""Loading a pipeline (a built-in offline one, a local folder or a Hugging Face Hub id) and its LinFusion layers
(the final latents become the image in :func:`distlin.vae.coders.decode_latents`).

Every way a model or a LinFusion checkpoint can be missing when it loads becomes one :class:`UsageError` line
naming the value and the fixes; the cheap checks made before any weights load are :mod:`distlin.sources`'.
Diffusers' pipeline classes are imported only when a pipeline is loaded, to keep ``--help`` and errors fast.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from distlin.errors import UsageError
from distlin.families import family_of_builtin, load
from distlin.linfusion import LinFusion, LinFusionAttnProcessor
from distlin.models.architectures import is_builtin
from distlin.settings import canonical_dtype
from distlin.sources import FRESH_LINFUSION, NO_LINFUSION, check_linfusion_source, check_model_source, local_path

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# Loggers whose chatter ("Couldn't connect to the Hub ...") would bury the one-line error of a failed load.
_LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub")


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``float32|float16|bfloat16`` or their short forms ``fp32|fp16|bf16``."""
    return getattr(torch, canonical_dtype(name))


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
    family = family_of_builtin(model)
    if family is not None:
        return load(family.build)(model, seed=seed, torch_dtype=dtype).to(device)
    if is_builtin(model):
        from distlin.models.tiny import build_pipeline

        return build_pipeline(model, seed=seed, torch_dtype=dtype).to(device)
    check_model_source(model)
    from diffusers import DiffusionPipeline

    source = str(local_path(model) or model)
    try:
        with _held_diagnostics():
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
    except OSError as err:
        raise _not_found("model", model, err, "use --preset tiny-sd15 to run offline") from None
    return pipe.to(device)


def mount_linfusion(pipe: Any, linfusion: str, seed: int = 0, kernel: str = "auto") -> LinFusion | None:
    """Replace the UNet's self-attention with LinFusion layers; returns the mounted container.

    ``none`` keeps softmax attention; ``fresh`` builds new layers from ``seed`` (the same on every rank, so
    patch-parallel ranks hold identical weights); anything else is a checkpoint folder or Hub id. ``kernel``
    picks the attention ops of every layer (:data:`~distlin.ops.kernels.ATTENTION_KERNELS`).
    """
    mounted = _mount(pipe, linfusion, seed)
    if mounted is not None:
        for layer in mounted.layers:
            layer.set_processor(LinFusionAttnProcessor(kernel=kernel))
    return mounted


def _mount(pipe: Any, linfusion: str, seed: int) -> LinFusion | None:
    if linfusion == NO_LINFUSION:
        return None
    if linfusion == FRESH_LINFUSION:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LinFusion.construct_for(pipe, load_pretrained=False)
    check_linfusion_source(linfusion)
    source = str(local_path(linfusion) or linfusion)
    try:
        with _held_diagnostics():
            return LinFusion.construct_for(pipe, pretrained_model_name_or_path=source)
    except OSError as err:
        raise _not_found("LinFusion checkpoint", linfusion, err, "pass --linfusion fresh or none") from None
    except (RuntimeError, ValueError) as err:  # shapes or tensors that do not fit this UNet, a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"LinFusion checkpoint {linfusion!r} does not fit {pipe.unet.__class__.__name__} of this model "
            f"({first[:200]}); pass the checkpoint made for this base model, or --linfusion fresh or none"
        ) from None
