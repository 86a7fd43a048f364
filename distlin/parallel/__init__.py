"""Patch parallelism: row bands of the latent across ranks, exact or DistriFusion-style displaced.

Names are imported on first use, so the torch-free parts (config, layout, topology) stay cheap to import.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ParallelContext": "distlin.parallel.context",
    "ParallelControlNet": "distlin.parallel.controlnet",
    "ParallelUNet": "distlin.parallel.unet",
    "PatchParallelConfig": "distlin.parallel.config",
    "RowLayout": "distlin.parallel.layout",
    "compile_unet": "distlin.parallel.compile",
    "Runtime": "distlin.parallel.runtime",
    "Topology": "distlin.parallel.topology",
    "init_runtime": "distlin.parallel.runtime",
    "parallelize": "distlin.parallel.pipeline",
    "parallelize_controlnet": "distlin.parallel.controlnet",
    "parallelize_unet": "distlin.parallel.unet",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'distlin.parallel' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
