"""Suite ``unet``: one UNet evaluation (CFG batch), LinFusion vs softmax self-attention, across resolutions.

FLOPs are counted with ``torch.utils.flop_counter`` on a meta copy of the model (matmuls and convolutions, the
bulk of the work; elementwise ops are not counted), so they are exact at any size without allocating it.
Utilisation is achieved FLOP/s over the device peak: the spec of known GPUs (dense bf16/fp16 tensor cores) or,
on CPU, the measured FLOP/s of a large matmul in the run's dtype and thread count. Sizes predicted to exceed
``--max-call-s`` (from the FLOPs and the rate of the last measured size) are skipped and listed.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import torch

from distlin.bench import options
from distlin.bench.hardware import device_peak
from distlin.bench.models import ATTENTIONS, build, count_flops, model_name, mount_fresh_linfusion, unet_inputs
from distlin.bench.report import Record, SuiteResult, finish_axes, fmt, markdown_table, new_figure, progress
from distlin.bench.timing import peak_memory_mb, time_calls
from distlin.sizes import format_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add(
        parser,
        "--models",
        ["full-sd15", "full-sdxl"],
        ["tiny-sd15", "tiny-sdxl"],
        "built-in models",
        type=options.str_list(),
    )
    options.add(parser, "--height", [256, 512], [64, 128], "image heights in pixels", type=options.int_list)
    parser.add_argument("--width", type=options.int_list, default=None, help="image widths (default: the heights)")
    parser.add_argument(
        "--attention",
        type=options.str_list(ATTENTIONS),
        default=list(ATTENTIONS),
        help="self-attention kinds (default linear,softmax)",
    )
    parser.add_argument("--batch", type=int, default=2, help="batch size; 2 is one CFG step (default 2)")
    options.add(parser, "--repeats", 3, 2, "timed calls per size", type=int)
    parser.add_argument(
        "--max-call-s", type=float, default=120.0, help="skip sizes predicted to take longer per call (default 120)"
    )


def measure(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[list[Record], str]:
    peak, source = device_peak(device, dtype)
    records: list[Record] = []
    for model in map(model_name, args.models):
        meta = build(model, "softmax", "meta", dtype)
        unet = build(model, "softmax", device, dtype)
        for attention in args.attention:
            layers = [mount_fresh_linfusion(m) for m in (meta, unet)] if attention == "linear" else []
            rate: float | None = None  # achieved FLOP/s at the last measured size
            for height, width in options.sizes(args):
                flops = count_flops(meta, height, width, args.batch)
                base = {
                    "model": model,
                    "attention": attention,
                    "height": height,
                    "width": width,
                    "batch": args.batch,
                    "tflop": flops / 1e12,
                    "peak_tflop_s": peak and peak / 1e12,
                }
                predicted = flops / (rate or (peak or float("inf")) * 0.5)
                if predicted > args.max_call_s:
                    records.append(
                        {
                            **base,
                            "ms": None,
                            "skipped": f"predicted {predicted:.0f} s per call > --max-call-s {args.max_call_s:g}",
                        }
                    )
                    continue
                call = partial(unet, timestep=999, return_dict=False, **unet_inputs(unet, args.batch, height, width))
                with torch.inference_mode():
                    memory = peak_memory_mb(call, device)
                    for _ in range(args.warmup - 1):
                        call()
                    timing = time_calls(call, device, args.repeats).fields()
                rate = flops / (timing["ms"] / 1e3)
                progress("unet", f"{model} {attention} {format_size(width, height)}: {timing['ms']:.0f} ms")
                records.append(
                    {
                        **base,
                        **timing,
                        "peak_mb": memory,
                        "achieved_tflop_s": rate / 1e12,
                        "utilisation": peak and rate / peak,
                        "skipped": None,
                    }
                )
            for layer in layers:
                layer.unmount()
        del unet, meta
    return records, source


def _speedup(records: list[Record], r: Record) -> float | None:
    """Softmax time over LinFusion time at the same model and size (LinFusion rows only)."""
    if r["attention"] != "linear" or r["ms"] is None:
        return None
    for other in records:
        same = all(other[k] == r[k] for k in ("model", "height", "width", "batch"))
        if same and other["attention"] == "softmax" and other["ms"] is not None:
            return other["ms"] / r["ms"]
    return None


def markdown(records: list[Record], args: argparse.Namespace, source: str) -> str:
    rows = []
    for r in sorted(records, key=lambda r: (r["model"], r["height"] * r["width"], r["attention"])):
        gain = _speedup(records, r)
        ms = "skipped" if r["ms"] is None else f"{fmt(r['ms'])} [{fmt(r['ms_min'])}–{fmt(r['ms_max'])}]"
        util = r.get("utilisation")
        rows.append(
            [
                r["model"],
                format_size(r["width"], r["height"]),
                r["attention"],
                ms,
                fmt(r.get("cpu_ms")),
                "" if gain is None else f"{gain:.2f}×",
                fmt(r["tflop"]),
                fmt(r.get("achieved_tflop_s")),
                "n/a" if util is None else f"{100 * util:.1f}%",
                fmt(r.get("peak_mb")),
            ]
        )
    headers = [
        "model",
        "image",
        "attention",
        "ms [min–max]",
        "CPU ms",
        "speed-up vs softmax",
        "TFLOP",
        "TFLOP/s",
        "utilisation",
        "MiB",
    ]
    skipped = [
        f"- {r['model']} {r['attention']} at {format_size(r['width'], r['height'])}: {r['skipped']}"
        for r in records
        if r["skipped"]
    ]
    parts = [
        f"One UNet call, batch {args.batch}, random weights; median of {args.repeats} calls after {args.warmup} "
        "warm-up; CPU ms: process CPU time (on a shared CPU, well below the wall time means other processes took "
        f"the cores). TFLOP counted on the meta device (matmul and convolution FLOPs). Peak: {source}. MiB: peak "
        "memory of one call above the weights (CPU: resident set).",
        markdown_table(headers, rows),
    ]
    if skipped:
        parts.append("Skipped:\n" + "\n".join(skipped))
    return "\n\n".join(parts)


def plot(records: list[Record]) -> Any:
    fig, (times, utils) = new_figure(2)
    for model in dict.fromkeys(r["model"] for r in records):
        for attention, style in zip(ATTENTIONS, ("-o", "--s"), strict=True):
            rs = [r for r in records if r["model"] == model and r["attention"] == attention and r["ms"] is not None]
            if not rs:
                continue
            pixels = [r["height"] * r["width"] for r in rs]
            times.plot(pixels, [r["ms"] for r in rs], style, label=f"{model} {attention}")
            if rs[0]["utilisation"] is not None:
                utils.plot(pixels, [100 * r["utilisation"] for r in rs], style, label=f"{model} {attention}")
    times.set(xscale="log", yscale="log", xlabel="image pixels", ylabel="ms per UNet call", title="UNet evaluation")
    utils.set(xscale="log", xlabel="image pixels", ylabel="% of device peak", title="utilisation")
    finish_axes(times, utils)
    return fig


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> SuiteResult:
    records, source = measure(args, device, dtype)
    return SuiteResult(records, markdown(records, args, source), plot(records))
