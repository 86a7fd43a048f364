"""Ultra-high resolution: band-parallel VAE, memory-bounded UNet execution and the SDEdit cascade."""

from distlin.highres.cascade import SD15_STAGES, Stage, load_stages, run_cascade
from distlin.highres.chunking import (
    ChunkedFeedForward,
    IndexSafeUpsample2D,
    RowChunkedConv2d,
    bound_memory,
    disable_ff_chunking,
    enable_conv_chunking,
    enable_ff_chunking,
)
from distlin.highres.vae import ParallelVAE, parallelize_vae

__all__ = [
    "SD15_STAGES",
    "ChunkedFeedForward",
    "IndexSafeUpsample2D",
    "ParallelVAE",
    "RowChunkedConv2d",
    "Stage",
    "bound_memory",
    "disable_ff_chunking",
    "enable_conv_chunking",
    "enable_ff_chunking",
    "load_stages",
    "parallelize_vae",
    "run_cascade",
]
