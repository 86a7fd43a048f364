"""distlin: ultra-high-resolution Stable Diffusion with LinFusion linear attention, patch-parallel.

    from distlin import LinFusion, PatchParallelConfig, parallelize

Names are imported on first use, so ``import distlin`` (and the command line's input checks) stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from distlin.notices import drop_backend_notices

__version__ = "0.1.0"

drop_backend_notices()  # every entry point and the Python API import this package first

_EXPORTS = {
    "LinFusion": "distlin.linfusion",
    "LinFusionAttention": "distlin.linfusion",
    "LinFusionAttnProcessor": "distlin.linfusion",
    "PatchParallelConfig": "distlin.parallel.config",
    "Runtime": "distlin.parallel.runtime",
    "init_runtime": "distlin.parallel.runtime",
    "parallelize": "distlin.parallel.pipeline",
    "RunSettings": "distlin.settings",
    "build_settings": "distlin.settings",
    "generate": "distlin.run",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'distlin' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
