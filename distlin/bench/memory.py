"""Suite ``memory``: the planner's predicted peak memory per rank vs resolution and rank count (a PREDICTION).

For each model, size and rank count, two configurations as ``generate.py`` runs them: ``default`` (CFG
parallelism on an even rank count, the whole guidance batch per UNet call) and ``lowmem`` (no CFG
parallelism, ``--micro-batch 1 --vae-decode sequential --vae-attention-rows 64``: every rank holds 1/N of
the image and one guidance half at a time; rank 0 decodes band by band through host RAM, streaming the
mid-block keys/values from there too).
Nothing is allocated: the numbers are :func:`distlin.memory.planner.plan`'s. Where a UNet call is small
enough to trace on the meta device (``--validate-up-to``), the suite also measures its activation peak with
torch's ``MemTracker`` (:mod:`distlin.memory.measure`) and reports predicted / measured.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from distlin.bench import options
from distlin.bench.hardware import GPU_BYTES
from distlin.bench.models import model_name
from distlin.bench.report import (
    GIB,
    Record,
    SuiteResult,
    dtype_name,
    finish_axes,
    groups,
    markdown_table,
    new_figure,
    progress,
    ranks_axis,
)
from distlin.errors import UsageError
from distlin.memory.measure import measured_unet_activation_peak
from distlin.memory.planner import plan, unet_activation_elements
from distlin.models.architectures import load_architecture
from distlin.parallel.topology import LATENT_FACTOR
from distlin.settings import DTYPE_BYTES
from distlin.sizes import TIMES, format_size, parse_size

DEFAULT_DTYPE = torch.float16
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"cfg_parallel": True, "micro_batch": None},
    "lowmem": {"cfg_parallel": False, "micro_batch": 1, "vae_decode": "sequential", "vae_attention_rows": 64},
}


def size_list(text: str) -> list[tuple[int, int]]:
    """``512,1024,16384x8192``: (height, width) pairs; a number is a square side, ``WIDTHxHEIGHT`` a size."""
    sizes = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        try:
            width, height = parse_size(item) if "x" in item.lower() or TIMES in item else (int(item), int(item))
        except ValueError:  # a UsageError is one too
            raise argparse.ArgumentTypeError(
                f"expected N or WIDTHxHEIGHT pixels, comma-separated; got {text!r}"
            ) from None
        sizes.append((height, width))
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models = options.str_list()
    options.add(parser, "--models", ["full-sd15", "full-sdxl"], ["full-sd15"], "built-in models", type=models)
    sizes, quick = size_list("512,1024,2048,4096,8192,16384x8192,16384"), size_list("512,16384x8192,16384")
    options.add(parser, "--sizes", sizes, quick, "image sizes (N: square, WIDTHxHEIGHT)", type=size_list)
    options.add(parser, "--ranks", [1, 2, 4, 8], [1, 8], "rank counts", type=options.int_list)
    options.add(parser, "--validate-up-to", 1024, 512, "trace UNet calls up to this side squared, in px", type=int)
    parser.add_argument("--no-cfg", action="store_true", help="plan without classifier-free guidance")


def _validation(model: str, height: int, width: int, dtype: torch.dtype) -> float:
    """Predicted / measured UNet activation peak of one call at this size (batch 2: CFG, one rank)."""
    rows, cols = height // LATENT_FACTOR, width // LATENT_FACTOR
    measured = measured_unet_activation_peak(model, rows, cols, 2, dtype)
    unet = load_architecture(model)["unet"]
    return unet_activation_elements(unet, rows * cols, 2) * DTYPE_BYTES[dtype_name(dtype)] / measured


def measure(args: argparse.Namespace, dtype: torch.dtype) -> list[Record]:
    records = []
    for model in (model_name(m) for m in args.models):
        for height, width in args.sizes:
            traced = height * width <= args.validate_up_to**2
            ratio = _validation(model, height, width, dtype) if traced else None
            for ranks in args.ranks:
                for config, kwargs in CONFIGS.items():
                    try:
                        cfg = not args.no_cfg
                        result = plan(
                            model, height, width, ranks, dtype=dtype_name(dtype), cfg=cfg, ff_chunk=16384, **kwargs
                        )
                    except UsageError as err:  # too many ranks for this size
                        progress("memory", f"skip {model} {format_size(width, height)} on {ranks}: {err}")
                        continue
                    peak, breakdown = result["peak_bytes_per_rank"], result["breakdown"]
                    record = {"model": model, "height": height, "width": width, "ranks": ranks, "config": config}
                    record |= {**kwargs, "cfg": cfg, "prediction": True, "peak_bytes_per_rank": peak}
                    record |= {k: breakdown[k] for k in ("unet_activations", "vae_decode_activations")}
                    record |= {"vae": result["vae"], "fits_80gb": peak <= GPU_BYTES}
                    record["unet_predicted_over_measured"] = ratio if ranks == 1 and config == "default" else None
                    records.append(record)
            progress("memory", f"{model} {format_size(width, height)} planned")
    return records


def _row(model: str, height: int, width: int, points: list[Record], ranks: list[int]) -> list[str]:
    """One table row: ``default / lowmem`` GiB per rank count, and the validation ratio where traced."""
    peak = {(r["ranks"], r["config"]): f"{r['peak_bytes_per_rank'] / GIB:.1f}" for r in points}
    cells = [f"{peak.get((n, 'default'), '—')} / {peak.get((n, 'lowmem'), '—')}" for n in ranks]
    ratio = next((r["unet_predicted_over_measured"] for r in points if r["unet_predicted_over_measured"]), None)
    return [model, format_size(width, height), *cells, f"{ratio:.3f}" if ratio else "—"]


def markdown(records: list[Record], args: argparse.Namespace) -> str:
    headers = ["model", "image (w×h)", *(f"N={n} default / lowmem" for n in args.ranks), "UNet pred./meas. (N=1)"]
    rows = [_row(*key, points, args.ranks) for key, points in groups(records, ("model", "height", "width")).items()]
    fits = [
        f"{r['model']} {format_size(r['width'], r['height'])} on one GPU: {r['peak_bytes_per_rank'] / GIB:.1f} GiB "
        f"({r['config']}) — {'fits' if r['fits_80gb'] else 'does NOT fit'} 80 GB"
        for r in records
        if r["ranks"] == 1 and max(r["height"], r["width"]) >= 16384
    ]
    return "\n\n".join(
        [
            f"Predicted peak memory per rank in GiB (the planner; {'CFG' if records[0]['cfg'] else 'no CFG'}, "
            "feed-forward chunks of 16384 tokens). `default`: CFG parallelism on even rank counts, the whole "
            "guidance batch per call; `lowmem`: `--no-cfg-parallel --micro-batch 1 --vae-decode sequential "
            "--vae-attention-rows 64`. Last column: the planner's "
            "UNet activation peak over torch MemTracker's on the meta device (batch 2, one rank) where traced.",
            markdown_table(headers, rows),
            "\n".join(f"- {line}" for line in fits),
        ]
    )


def plot(records: list[Record]) -> Any:
    by_model = groups(records, ("model",))
    fig, axes = new_figure(len(by_model))
    for ax, ((model,), mine) in zip(axes, by_model.items(), strict=True):
        for ranks in dict.fromkeys(r["ranks"] for r in records):
            for config, style in (("default", "-"), ("lowmem", "--")):
                points = [r for r in mine if (r["ranks"], r["config"]) == (ranks, config)]
                if points:
                    side = [(r["height"] * r["width"]) ** 0.5 for r in points]
                    peak = [r["peak_bytes_per_rank"] / GIB for r in points]
                    ax.plot(side, peak, style, marker="o", label=f"N={ranks} {config}")
        ax.axhline(GPU_BYTES / GIB, color="gray", linewidth=1, label="80 GB")
        ranks_axis(ax)
        ax.set(yscale="log", xlabel="image side, √(h·w) px", ylabel="predicted peak per rank, GiB", title=model)
        finish_axes(ax)
    return fig


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> SuiteResult:
    records = measure(args, dtype)
    if not records:
        raise UsageError("no (size, ranks) point can be planned; pass fewer --ranks or larger --sizes")
    label = "PREDICTION: the memory planner's numbers, not measured on a GPU"
    return SuiteResult(records, markdown(records, args), plot(records), label)
