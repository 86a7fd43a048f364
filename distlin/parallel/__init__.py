"""Patch parallelism: row bands of the latent across ranks, exact or DistriFusion-style displaced."""

from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.context import ParallelContext
from distlin.parallel.layout import RowLayout
from distlin.parallel.pipeline import parallelize
from distlin.parallel.runtime import Runtime, init_runtime
from distlin.parallel.unet import ParallelUNet, parallelize_unet

__all__ = [
    "ParallelContext",
    "ParallelUNet",
    "PatchParallelConfig",
    "RowLayout",
    "Runtime",
    "init_runtime",
    "parallelize",
    "parallelize_unet",
]
