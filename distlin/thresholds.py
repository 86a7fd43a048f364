"""The sizes above which memory-bounding mechanisms switch on, in one place, each lowerable for tests.

Every mechanism that only matters at high resolution (token-chunked transformers, row-banded kernels, the
sequential VAE decode, the automatic memory savers) switches on above one of these thresholds. Left at their
defaults a small image never reaches them; a test or a curious user lowers them with environment variables so
the same code paths run at small sizes, where the result can be compared with the plain path:

========================================  ================================================================
``DISTLIN_TOKEN_CHUNK`` (16384)           tokens per chunk of a transformer / feed-forward run in chunks
``DISTLIN_INDEX_LIMIT`` (2**31 - 1)       elements per conv / GroupNorm / upsampling kernel call
``DISTLIN_SEQUENTIAL_VAE_PIXELS`` (1M)    pixels per rank above which ``--vae-decode auto`` decodes
                                          band by band through host RAM
``DISTLIN_SEQUENTIAL_BAND_ROWS`` (16)     latent rows per band of that sequential decode
``DISTLIN_DEVICE_MEMORY`` (unset)         bytes to plan against instead of the GPU's memory; set, it makes
                                          the automatic memory savers and refusals work on any device
``DISTLIN_HOST_MEMORY`` (unset)           bytes of RAM a CPU run's ranks on this machine must fit together,
                                          instead of the machine's available memory
========================================  ================================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from distlin.errors import UsageError

INDEX_LIMIT = 2**31 - 1  # the 32-bit indexing limit of cuDNN convolutions and nearest upsampling
ENV_PREFIX = "DISTLIN_"


@dataclass(frozen=True)
class Thresholds:
    """The switch-on sizes of one run (see the module docstring for what each one does)."""

    token_chunk: int = 16384
    index_limit: int = INDEX_LIMIT
    sequential_vae_pixels: int = 1024 * 1024
    sequential_band_rows: int = 16
    device_memory: int | None = None
    host_memory: int | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and value < 1:
                raise UsageError(f"{field.name} {value} must be a positive integer")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Thresholds:
        """Defaults, overridden by ``DISTLIN_<NAME>`` variables (positive integers)."""
        values: dict[str, int] = {}
        for field in fields(cls):
            key = ENV_PREFIX + field.name.upper()
            if key not in environ:
                continue
            try:
                values[field.name] = int(environ[key])
            except ValueError:
                message = f"{key}={environ[key]!r} is not an integer; unset it or give a positive integer"
                raise UsageError(message) from None
            if values[field.name] < 1:
                raise UsageError(f"{key}={environ[key]} must be a positive integer; unset it or raise it")
        return cls(**values)
