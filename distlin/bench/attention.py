"""Suite ``attention``: one whole self-attention layer as the UNet runs it, LinFusion vs softmax (SDPA).

``linear`` is :class:`~distlin.linfusion.LinFusionAttention` with its Q/K MLPs; ``sdpa`` is the diffusers
``Attention`` SD uses for ``attn1`` with ``AttnProcessor2_0`` (torch's scaled_dot_product_attention). Both get
``(batch, tokens, C)`` hidden states with random weights. Sizes that would exceed ``--max-call-s`` (predicted
from the previous size: quadratic for SDPA, linear for LinFusion) or the free memory are skipped and listed.
"""

from __future__ import annotations

import argparse
import math
from functools import partial
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from distlin.bench import options
from distlin.bench.report import (
    Record,
    SuiteResult,
    bullets,
    factor,
    finish_axes,
    fmt,
    markdown_table,
    met,
    new_figure,
    progress,
    spread,
)
from distlin.bench.timing import time_call
from distlin.linfusion import LinFusionAttention
from distlin.memory.fit import available_host_memory

IMPLS = ("linear", "sdpa")
COST_EXPONENT = {"linear": 1, "sdpa": 2}  # how the time of each grows with tokens, for skipping sizes
FIT_RANGE = (4096, 16384)
TARGET = {"channels": 320, "tokens": 16384, "speedup": 12.0, "exponent": 1.15}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add(parser, "--channels", [320, 640], [320], "layer widths C", type=options.int_list)
    tokens = [1024, 4096, 16384, 65536, 262144]
    options.add(parser, "--tokens", tokens, tokens[:3], "token counts (h*w)", type=options.int_list)
    parser.add_argument("--heads", type=int, default=8, help="attention heads, SD-1.5's 8 (default 8)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    options.add(parser, "--repeats", 5, 3, "timed calls per size", type=int)
    parser.add_argument(
        "--max-call-s", type=float, default=60.0, help="skip sizes predicted to take longer per call (default 60)"
    )


def build_layer(impl: str, channels: int, heads: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The layer with seed-0 weights, in inference mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if impl == "linear":
            layer: nn.Module = LinFusionAttention(channels, heads)
        else:
            layer = Attention(query_dim=channels, heads=heads, dim_head=channels // heads, bias=False, out_bias=True)
            layer.set_processor(AttnProcessor2_0())
    return layer.to(device=device, dtype=dtype).eval()


def why_skip(impl: str, tokens: int, last: Record | None, max_call_s: float, device: torch.device) -> str | None:
    """A reason to skip ``tokens`` predicted from the last measured size, or None to measure it."""
    if last is None:
        return None
    ratio = tokens / last["tokens"]
    predicted_s = last["ms"] / 1e3 * ratio ** COST_EXPONENT[impl]
    if predicted_s > max_call_s:
        return f"predicted {predicted_s:.0f} s per call > --max-call-s {max_call_s:g}"
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_host_memory() or math.inf
    free /= 2**20
    if last["peak_mb"] is not None and last["peak_mb"] * ratio > 0.8 * free:
        return f"predicted {last['peak_mb'] * ratio:.0f} MiB > 80% of the {free:.0f} MiB free"
    return None


def measure(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Record]:
    records: list[Record] = []
    for channels in args.channels:
        for impl in IMPLS:
            layer = build_layer(impl, channels, args.heads, device, dtype)
            last: Record | None = None
            for tokens in sorted(args.tokens):
                base = {"impl": impl, "tokens": tokens, "channels": channels, "heads": args.heads, "batch": args.batch}
                reason = why_skip(impl, tokens, last, args.max_call_s, device)
                if reason is not None:
                    records.append({**base, "ms": None, "peak_mb": None, "skipped": reason})
                    continue
                call = partial(layer, torch.randn(args.batch, tokens, channels, device=device, dtype=dtype))
                with torch.inference_mode():
                    last = {**base, **time_call(call, device, args.warmup, args.repeats), "skipped": None}
                progress("attention", f"{impl} C={channels} {tokens} tokens: {last['ms']:.1f} ms")
                records.append(last)
                del call
    return records


def fit_exponent(records: list[Record], impl: str, channels: int, key: str = "ms") -> float | None:
    """Least-squares slope of log(time) against log(tokens) over the measured sizes in ``FIT_RANGE``."""
    points = [
        (math.log(r["tokens"]), math.log(r[key]))
        for r in records
        if r["impl"] == impl and r["channels"] == channels and r["ms"] and FIT_RANGE[0] <= r["tokens"] <= FIT_RANGE[1]
    ]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def _find(records: list[Record], impl: str, tokens: int, channels: int) -> Record | None:
    for r in records:
        if (r["impl"], r["tokens"], r["channels"]) == (impl, tokens, channels) and r["ms"] is not None:
            return r
    return None


def speedup(records: list[Record], tokens: int, channels: int, key: str = "ms") -> float | None:
    """SDPA time over LinFusion time (``key``: ``ms`` wall-clock or ``cpu_ms`` process CPU time)."""
    lin, sdpa = _find(records, "linear", tokens, channels), _find(records, "sdpa", tokens, channels)
    return sdpa[key] / lin[key] if lin and sdpa else None


def markdown(records: list[Record], args: argparse.Namespace, device: torch.device) -> str:
    rows = []
    for channels in args.channels:
        for tokens in sorted(args.tokens):
            lin, sdpa = _find(records, "linear", tokens, channels), _find(records, "sdpa", tokens, channels)
            rows.append(
                [tokens, channels, *("skipped" if r is None else spread(r) for r in (lin, sdpa))]
                + [factor(speedup(records, tokens, channels, key), 1) for key in ("ms", "cpu_ms")]
                + [fmt(lin and lin["peak_mb"]), fmt(sdpa and sdpa["peak_mb"])]
            )
    headers = ["tokens", "C", "linear ms [min–max]", "sdpa ms [min–max]", "speed-up", "speed-up (CPU time)"]
    headers += ["linear MiB", "sdpa MiB"]
    parts = [
        f"Whole self-attention layer (projections included), batch {args.batch}, {args.heads} heads; median of "
        f"{args.repeats} calls after {args.warmup} warm-up. MiB: peak memory of one call above what was held "
        "before it (CPU: resident set).",
        markdown_table(headers, rows),
    ]
    exponents = [
        [impl, channels, *(fmt(fit_exponent(records, impl, channels, key)) for key in ("ms", "cpu_ms"))]
        for channels in args.channels
        for impl in IMPLS
    ]
    parts += [
        f"Scaling exponent (log-log least-squares fit of time against tokens, {FIT_RANGE[0]} to {FIT_RANGE[1]}):",
        markdown_table(["impl", "C", "exponent", "exponent (CPU time)"], exponents),
    ]
    parts += bullets(
        "Skipped",
        [f"- {r['impl']} at {r['tokens']} tokens, C={r['channels']}: {r['skipped']}" for r in records if r["skipped"]],
    )
    if device.type == "cpu" and torch.get_num_threads() == 1:
        parts += _targets(records)
    return "\n\n".join(parts)


def _targets(records: list[Record]) -> list[str]:
    """The CPU targets (1 thread, C=320), on wall-clock time and, for contention, on process CPU time."""
    lines = []
    for key, label in (("ms", "wall-clock"), ("cpu_ms", "CPU time")):
        s = speedup(records, TARGET["tokens"], TARGET["channels"], key)
        e = fit_exponent(records, "linear", TARGET["channels"], key)
        if s is None or e is None:
            continue
        lines.append(
            f"- {label}: speed-up at {TARGET['tokens']} tokens {s:.1f}× (target ≥ {TARGET['speedup']:g}×: "
            f"{met(s >= TARGET['speedup'])}); linear exponent {e:.2f} (target ≤ "
            f"{TARGET['exponent']}: {met(e <= TARGET['exponent'])})"
        )
    return bullets(f"Targets (CPU, 1 thread, C={TARGET['channels']})", lines)


def plot(records: list[Record], args: argparse.Namespace) -> Any:
    fig, (times, gains) = new_figure(2)
    for channels in args.channels:
        for impl, marker in zip(IMPLS, "os", strict=True):
            rs = [r for r in records if r["impl"] == impl and r["channels"] == channels and r["ms"] is not None]
            if rs:
                err = [[r["ms"] - r["ms_min"] for r in rs], [r["ms_max"] - r["ms"] for r in rs]]
                x, y = [r["tokens"] for r in rs], [r["ms"] for r in rs]
                times.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=f"{impl} C={channels}")
        pairs = [(t, speedup(records, t, channels)) for t in sorted(args.tokens)]
        pairs = [(t, s) for t, s in pairs if s is not None]
        if pairs:
            gains.plot(*zip(*pairs, strict=True), marker="o", label=f"C={channels}")
    times.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per call (median, min–max)")
    times.set_title("self-attention layer")
    gains.set(xscale="log", xlabel="tokens", ylabel="SDPA time / LinFusion time", title="speed-up of LinFusion")
    finish_axes(times, gains)
    return fig


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> SuiteResult:
    records = measure(args, device, dtype)
    return SuiteResult(records, markdown(records, args, device), plot(records, args))
