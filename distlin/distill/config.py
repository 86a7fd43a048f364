"""The settings of a distillation run, their range checks, and which of them a resumed run must keep."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from distlin.distill.data import CROPS
from distlin.distill.losses import LossWeights
from distlin.errors import UsageError
from distlin.sizes import check_side

MIXED_PRECISION: dict[str, torch.dtype | None] = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}

# Settings that shape the trajectory of the parameters: a resumed run must keep them to continue exactly.
# Paths (data, cache, out), step counts, device and workers may change; the data must hold the same items.
TRAJECTORY = (
    "model",
    "resolution",
    "crop",
    "batch_size",
    "grad_accum",
    "lr",
    "weight_decay",
    "warmup_steps",
    "init",
    "seed",
    "lambda_noise",
    "lambda_kd",
    "lambda_feat",
    "mixed_precision",
    "grad_clip",
    "holdout_keys",
    "items_digest",
)


@dataclass(frozen=True)
class TrainConfig:
    """One ``train`` command line. ``resolution`` None means the model's native size (or the cache's)."""

    model: str
    out: str
    data: str | None = None
    cache: str | None = None
    resolution: int | None = None
    crop: str = "center"
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    max_steps: int = 10_000
    save_every: int = 1000
    resume: str | None = None
    init: str = "teacher"
    seed: int = 0
    lambda_noise: float = 1.0
    lambda_kd: float = 0.5
    lambda_feat: float = 0.5
    mixed_precision: str = "no"
    grad_clip: float | None = None
    holdout: int = 8
    workers: int = 2
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.data is None and self.cache is None:
            raise UsageError("no training data; pass --data DIR (images with captions) or --cache DIR")
        if self.resolution is not None:
            check_side("--resolution", self.resolution, "--resolution")
        if self.crop not in CROPS:
            raise UsageError(f"--crop {self.crop!r} is unknown; use {' or '.join(CROPS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UsageError(f"--mixed-precision {self.mixed_precision!r} is unknown; use no, fp16 or bf16")
        _at_least(self, ("max_steps", "save_every"), 1)
        _at_least(self, ("warmup_steps", "holdout", "workers", "seed"), 0)
        for name in ("lr", "weight_decay", "lambda_noise", "lambda_kd", "lambda_feat"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or (name == "lr" and value == 0):
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} {value} must be a finite number {'> 0' if name == 'lr' else '>= 0'}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise UsageError(f"--grad-clip {self.grad_clip} must be > 0 (leave it out for no clipping)")

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(self.lambda_noise, self.lambda_kd, self.lambda_feat)

    def record(self, resolution: int, holdout_keys: list[str], keys: list[str]) -> dict[str, Any]:
        """What ``train_config.json`` holds: the settings as run, the held-out keys and a digest of all keys."""
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
        return {
            **dataclasses.asdict(self),
            "resolution": resolution,
            "holdout_keys": holdout_keys,
            "items_digest": digest,
        }


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``no|fp16|bf16``; weights stay float32."""
    dtype = MIXED_PRECISION[mixed_precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _at_least(config: TrainConfig, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(config, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(config, name)} must be at least {low}")


def check_resumable(saved: dict[str, Any], now: dict[str, Any], checkpoint: str) -> None:
    """A resumed run continues exactly only with the same trajectory settings; name the first that differs."""
    for key in TRAJECTORY:
        if saved.get(key) == now.get(key):
            continue
        if key in ("items_digest", "holdout_keys"):
            raise UsageError(
                f"cannot resume from {checkpoint}: the data's items or --holdout differ from that "
                "run's; pass the same data and --holdout"
            )
        raise UsageError(
            f"cannot resume from {checkpoint}: --{key.replace('_', '-')} was {saved.get(key)!r} there "
            f"but is {now.get(key)!r} now; run with the checkpoint's settings"
        )
