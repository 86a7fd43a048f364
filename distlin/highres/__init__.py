"""Ultra-high resolution: band-parallel VAE, memory-bounded UNet execution and the SDEdit cascade."""

from distlin.highres.cascade import SD15_STAGES, Stage, load_stages, run_cascade
from distlin.highres.chunking import (
    ChunkedFeedForward,
    RowChunkedConv2d,
    disable_ff_chunking,
    enable_conv_chunking,
    enable_ff_chunking,
    row_chunked_conv2d,
)
from distlin.highres.vae import ParallelVAE, parallelize_vae

__all__ = [
    "SD15_STAGES",
    "ChunkedFeedForward",
    "ParallelVAE",
    "RowChunkedConv2d",
    "Stage",
    "disable_ff_chunking",
    "enable_conv_chunking",
    "enable_ff_chunking",
    "load_stages",
    "parallelize_vae",
    "row_chunked_conv2d",
    "run_cascade",
]
