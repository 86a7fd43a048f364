"""Command-line pieces the suites share: comma lists, stale sets, and defaults that differ under ``--quick``."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distlin.errors import UsageError
from distlin.loading import parse_dtype
from distlin.parallel.config import STALE_KINDS, parse_stale

EVERYTHING = frozenset(STALE_KINDS)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def str_list(choices: tuple[str, ...] | None = None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices or ())}; got {text!r}")
        return values

    return parse


@dataclass(frozen=True)
class QuickDefault:
    """A default that ``--quick`` swaps for a smaller one; resolved after parsing."""

    normal: Any
    quick: Any


def show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def add(parser: argparse.ArgumentParser, flag: str, normal: Any, quick: Any, help: str, **kwargs: Any) -> None:
    """An option whose default depends on ``--quick``; the help says both."""
    suffix = f"default {show(normal)}" + ("" if quick == normal else f"; with --quick {show(quick)}")
    parser.add_argument(flag, default=QuickDefault(normal, quick), help=f"{help} ({suffix})", **kwargs)


def add_timeout(parser: argparse.ArgumentParser) -> None:
    """``--timeout-s`` of the suites that start ranks."""
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="limit per torchrun launch (default 3600)")


def resolve_quick(args: argparse.Namespace) -> argparse.Namespace:
    for key, value in vars(args).items():
        if isinstance(value, QuickDefault):
            setattr(args, key, value.quick if args.quick else value.normal)
    return args


def resolve_dtype(text: str | None, device: torch.device, default: torch.dtype | None = None) -> torch.dtype:
    """``--dtype``, else the suite's ``default``, else float32 on a CPU and bfloat16 on a GPU."""
    if text:
        return parse_dtype(text)
    return default or (torch.float32 if device.type == "cpu" else torch.bfloat16)


def sizes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """Pair ``--height`` with ``--width`` (a missing width means square images)."""
    widths = args.width or args.height
    if len(widths) != len(args.height):
        raise UsageError(f"--width lists {len(widths)} values but --height {len(args.height)}; pair them")
    return list(zip(args.height, widths, strict=True))


def stale_sets(text: str) -> list[frozenset[str]]:
    """``every`` (all non-empty subsets), or a comma list of sets written ``halo`` or ``attention+groupnorm``."""
    if text.strip() == "every":
        return [frozenset(c) for r in range(1, len(STALE_KINDS) + 1) for c in itertools.combinations(STALE_KINDS, r)]
    return [parse_stale(part.replace("+", ",")) for part in text.split(",") if part.strip()]


def stale_label(stale: frozenset[str]) -> str:
    return "all" if stale == EVERYTHING else "+".join(k for k in STALE_KINDS if k in stale) or "none"
