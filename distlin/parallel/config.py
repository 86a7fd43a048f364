"""User-facing settings of the patch-parallel engine."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from distlin.errors import UsageError
from distlin.thresholds import INDEX_LIMIT

Mode = Literal["exact", "displaced", "naive"]
MODES: tuple[str, ...] = ("exact", "displaced", "naive")
BACKENDS: tuple[str, ...] = ("nccl", "gloo")  # torch.distributed process-group backends a run may use
# Exchanges displaced mode can take from the previous step: the self-attention exchange (LinFusion's state, or
# the other bands' K/V with softmax attention), the GroupNorm moments and the convolution halo rows.
STALE_KINDS: tuple[str, ...] = ("attention", "groupnorm", "halo")
# A stale attention exchange costs the least fidelity (~86 dB PSNR from one device on 4 ranks, against ~69 dB
# with everything stale) and is the big exchange with softmax attention (K/V); stale GroupNorm moments and halos
# cost 7-17 dB more for under 1.5 points of projected efficiency at 16K on 8 GPUs (docs/RESULTS.md, section 7).
DEFAULT_STALE: frozenset[str] = frozenset({"attention"})


def check_mode(mode: str) -> None:
    """A UsageError listing the modes, unless ``mode`` is one."""
    if mode not in MODES:
        raise UsageError(f"unknown parallel mode {mode!r}; use one of {', '.join(MODES)}")


def parse_stale(names: str | Iterable[str]) -> frozenset[str]:
    """The set of stale exchanges from names or a comma list (``"halo,groupnorm"``; ``"all"``; ``"none"``)."""
    if isinstance(names, str):
        text = names.strip()
        if text in ("all", "none"):
            return frozenset(STALE_KINDS if text == "all" else ())
        names = [n.strip() for n in text.split(",") if n.strip()]
    stale = frozenset(names)
    unknown = sorted(stale - set(STALE_KINDS))
    if unknown:
        raise UsageError(
            f"unknown stale exchange {', '.join(map(repr, unknown))}; use a comma list of "
            f"{', '.join(STALE_KINDS)}, or all, or none"
        )
    return stale


@dataclass(frozen=True)
class PatchParallelConfig:
    """How the latent is split and how exchanges are scheduled.

    ``exact``: every exchange is synchronous (equals one device). ``displaced`` (DistriFusion): UNet steps
    ``0 … warmup_steps`` of a generation are synchronous, i.e. ``warmup_steps + 1`` of them, as DistriFusion
    counts its ``warmup_steps``; from step ``warmup_steps + 1`` on, the exchanges named in ``stale`` (a subset
    of ``attention``, ``groupnorm``, ``halo``; a comma list, ``all`` or ``none`` are accepted too) use the
    previous step's values while this step's travel asynchronously, and the others stay synchronous.
    ``naive``: no exchange at all (independent bands, for comparison only). ``cfg_parallel`` splits the
    classifier-free-guidance batch over two rank groups when the world size is even. ``check_finite``
    stops at the first step whose prediction holds NaN/Inf. ``micro_batch`` runs the UNet on at most that
    many samples at a time (after the CFG split): ``1`` evaluates the two guidance halves one after the other,
    which halves the activation memory of a one-group run at the same result and the same FLOPs.
    ``index_limit``: the most elements any conv or GroupNorm kernel call sees (larger inputs run in row bands,
    exactly); 2**31 - 1 by default, the 32-bit indexing limit; lower it to exercise the banded path.
    """

    mode: Mode = "exact"
    warmup_steps: int = 4
    cfg_parallel: bool = True
    stale: frozenset[str] = DEFAULT_STALE
    attention_chunk: int | None = 65536
    check_finite: bool = True
    micro_batch: int | None = None
    index_limit: int = INDEX_LIMIT

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if self.warmup_steps < 0:
            raise UsageError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise UsageError(f"micro_batch {self.micro_batch} must be at least 1 (or None for the whole batch)")
        if self.index_limit < 1:
            raise UsageError(f"index_limit {self.index_limit} must be at least 1 element")
        object.__setattr__(self, "stale", parse_stale(self.stale))

    def is_stale(self, kind: str) -> bool:
        """Whether exchanges of ``kind`` may reuse last step's result (after the warm-up, in displaced mode)."""
        return self.mode == "displaced" and kind in self.stale
