"""User-facing settings of the patch-parallel engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distlin.errors import UsageError

Mode = Literal["exact", "displaced", "naive"]
MODES: tuple[str, ...] = ("exact", "displaced", "naive")


@dataclass(frozen=True)
class PatchParallelConfig:
    """How the latent is split and how exchanges are scheduled.

    ``exact``: every exchange is synchronous (equals one device). ``displaced``: after ``warmup_steps``
    synchronous steps, conv halos and GroupNorm statistics come from the previous step while fresh ones
    travel asynchronously (DistriFusion); ``stale_attention`` makes the attention state stale too.
    ``naive``: no exchange at all (independent bands, for comparison only). ``cfg_parallel`` splits the
    classifier-free-guidance batch over two rank groups when the world size is even. ``check_finite``
    stops at the first step whose prediction holds NaN/Inf. ``micro_batch`` runs the UNet on at most that
    many samples at a time (after the CFG split): ``1`` evaluates the two guidance halves one after the other,
    which halves the activation memory of a one-group run at the same result and the same FLOPs.
    """

    mode: Mode = "exact"
    warmup_steps: int = 4
    cfg_parallel: bool = True
    stale_attention: bool = False
    attention_chunk: int | None = 65536
    check_finite: bool = True
    micro_batch: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown parallel mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.warmup_steps < 0:
            raise UsageError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise UsageError(f"micro_batch {self.micro_batch} must be at least 1 (or None for the whole batch)")
