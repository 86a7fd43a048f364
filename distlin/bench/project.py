"""Suite ``project``: a PROJECTION of time per UNet step on N GPUs. Nothing here is measured on a cluster.

Inputs, per model, size and N (CFG batch 2, CFG parallelism off: all N ranks split the image):

* bytes and calls per step by kind: the engine's own counters from a dry run on the meta device
  (:func:`distlin.bench.accounting.dry_run`, the middle rank of N), in ``--dtype`` (default bfloat16);
* compute: the counted FLOPs of that rank's band (halo rows included) / (GPU peak x ``--mfu``);
* every collective in an alpha-beta model, t = alpha + bytes / beta, on one ``--link`` preset:
  all-reduce (attention state, GroupNorm moments) ``2 ceil(log2 N) alpha + 2 (N-1)/N bytes / beta``;
  all-gather (output bands) ``(N-1) alpha + received bytes / beta``; halo point-to-point ``alpha`` per
  received buffer ``+ bytes / beta``.

``exact`` adds every exchange to the compute; ``displaced`` hides the exchanges its default stale set names
(``PatchParallelConfig.stale``) behind the compute (they overlap the step, as the engine launches them
asynchronously) but not the other exchanges or the output gather. Efficiency = T(1) / (N T(N)), with T(1)
the compute of the whole image on one GPU.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from distlin.bench import options
from distlin.bench.accounting import distrifusion_bytes, dry_run, layer_shapes
from distlin.bench.hardware import GPUS, LINKS, comm_seconds, projected_seconds
from distlin.bench.models import build, model_name
from distlin.bench.report import (
    Record,
    SuiteResult,
    bullets,
    dtype_name,
    finish_axes,
    fmt,
    fmt_bytes,
    groups,
    markdown_table,
    met,
    new_figure,
    percent,
    progress,
    ranks_axis,
)
from distlin.errors import UsageError
from distlin.parallel.config import STALE_KINDS, PatchParallelConfig
from distlin.sizes import format_size

DEFAULT_DTYPE = torch.bfloat16
PROJECTED_MODES = ("exact", "displaced")
POINT = ("model", "height", "width", "ranks")  # one dry run: its records differ in link and mode
TARGET = {"model": "full-sd15", "height": 16384, "ranks": 8, "bytes": 1 / 100, "attention": 1 / 1000}
TARGET |= {"link": "nvlink", "efficiency": 0.9}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models = "models (sd15, sdxl, sd21 or built-in names)"
    options.add(parser, "--model", ["sd15", "sdxl"], ["sd15"], models, type=options.str_list())
    options.add(parser, "--height", [4096, 8192, 16384], [1024, 2048], "image heights in pixels", type=options.int_list)
    parser.add_argument("--width", type=options.int_list, default=None, help="image widths (default: the heights)")
    options.add(parser, "--ranks", [1, 2, 4, 8, 16, 32, 64], [1, 2, 4, 8], "numbers of GPUs", type=options.int_list)
    links = "interconnect presets (default nvlink,pcie,ib): " + "; ".join(
        f"{k}: {v.description}" for k, v in LINKS.items()
    )
    parser.add_argument("--link", type=options.str_list(tuple(LINKS)), default=list(LINKS), help=links)
    gpu = "GPU whose dense bf16 peak sets the compute (default h100: 989 TFLOP/s)"
    parser.add_argument("--gpu", choices=tuple(GPUS), default="h100", help=gpu)
    mfu = "assumed fraction of the peak the UNet achieves (default 0.5)"
    parser.add_argument("--mfu", type=float, default=0.5, help=mfu)
    parser.add_argument("--batch", type=int, default=2, help="batch per UNet call; 2 is one CFG step (default 2)")


def project(args: argparse.Namespace, dtype: torch.dtype) -> list[Record]:
    gpu_name, peak = GPUS[args.gpu]
    rate = peak * args.mfu
    element_size = torch.empty((), dtype=dtype).element_size()
    records: list[Record] = []
    for model in map(model_name, args.model):
        unet = build(model, "linear", "meta", dtype)
        for height, width in options.sizes(args):
            shapes = layer_shapes(unet, height, width, args.batch)
            single_s = dry_run(unet, height, width, 1, args.batch).flops / rate
            for n in args.ranks:
                base = {"model": model, "height": height, "width": width, "ranks": n, "batch": args.batch}
                base |= {"dtype": dtype_name(dtype), "gpu": gpu_name, "mfu": args.mfu, "projection": True}
                try:
                    dry = dry_run(unet, height, width, n, args.batch)
                except UsageError as err:  # more ranks than the latent has row units
                    records.append({**base, "skipped": str(err)})
                    continue
                compute_s = dry.flops / rate
                megabytes = dry.bytes_per_step["total"] / 1e6
                progress("project", f"{model} {format_size(width, height)} on {n}: {megabytes:.1f} MB/step")
                for link_name in args.link:
                    comm = comm_seconds(dry, n, LINKS[link_name])
                    for mode in PROJECTED_MODES:
                        config = PatchParallelConfig(mode=mode)  # displaced: the default stale exchanges
                        stale = [kind for kind in STALE_KINDS if config.is_stale(kind)]
                        total_s = projected_seconds(compute_s, comm, stale)
                        record = {**base, "mode": mode, "link": link_name, "skipped": None}
                        record |= {"bytes_per_step": dry.bytes_per_step, "calls_per_step": dry.calls_per_step}
                        record["distrifusion_bytes_per_step"] = distrifusion_bytes(shapes, n, element_size)
                        record |= {"tflop_per_rank": dry.flops / 1e12, "compute_ms_per_step": compute_s * 1e3}
                        record["comm_ms_per_step"] = {k: v * 1e3 for k, v in comm.items()}
                        records.append(
                            record | {"projected_ms_per_step": total_s * 1e3, "efficiency": single_s / (n * total_s)}
                        )
    return records


def _ratio(ours: float, theirs: float) -> str:
    return "n/a" if not ours or not theirs else f"1/{theirs / ours:,.0f}"


def markdown(records: list[Record], args: argparse.Namespace) -> str:
    done = [r for r in records if not r["skipped"]]
    first_link = args.link[0]
    comm_rows = [
        [r["model"], format_size(r["width"], r["height"]), r["ranks"]]
        + [
            text
            for kind in ("total", "attention", "halo")
            for ours, theirs in [(r["bytes_per_step"][kind], r["distrifusion_bytes_per_step"][kind])]
            for text in (fmt_bytes(ours), fmt_bytes(theirs), *([_ratio(ours, theirs)] if kind != "halo" else []))
        ]
        for r in done
        if r["link"] == first_link and r["mode"] == "exact" and r["ranks"] > 1
    ]
    time_rows = []
    for (model, height, width, n), rs in groups(done, POINT).items():
        by = {(p["link"], p["mode"]): p for p in rs}
        cells = [by[link, mode] for link in args.link for mode in PROJECTED_MODES]
        cells = [f"{fmt(p['projected_ms_per_step'])} ({percent(p['efficiency'], 0)})" for p in cells]
        r = by[first_link, "exact"]
        time_rows.append(
            [model, format_size(width, height), n, fmt(r["tflop_per_rank"]), fmt(r["compute_ms_per_step"])] + cells
        )
    time_headers = ["model", "image", "GPUs", "TFLOP/rank", "compute ms"]
    time_headers += [f"{link} {mode} ms (eff.)" for link in args.link for mode in PROJECTED_MODES]
    comm_headers = ["model", "image", "GPUs", "distlin total", "DistriFusion total", "ratio", "distlin attention state"]
    comm_headers += ["DistriFusion K/V", "ratio", "distlin halo", "DistriFusion halo"]
    gpu_name, peak = GPUS[args.gpu]
    parts = [
        "**PROJECTION, not a measurement.** Bytes and calls are the engine's own counters from a dry run on the "
        f"meta device (middle rank; batch {args.batch}, CFG parallelism off, {records[0]['dtype']} "
        f"activations); compute = counted FLOPs of the rank's band / ({gpu_name} {peak / 1e12:.0f} TFLOP/s × "
        f"assumed MFU {args.mfu:g}); communication from an alpha-beta model of each collective. Links: "
        + "; ".join(f"`{k}` = {LINKS[k].description}" for k in args.link)
        + ".",
        "Communication per UNet step, received by one rank (distlin: engine counters; DistriFusion: its "
        "scheme for the same model, size, batch and ranks):",
        markdown_table(comm_headers, comm_rows),
        "Projected ms per UNet step (efficiency vs one GPU):",
        markdown_table(time_headers, time_rows),
    ]
    skipped = {
        f"- {r['model']} {format_size(r['width'], r['height'])} on {r['ranks']}: {r['skipped']}"
        for r in records
        if r["skipped"]
    }
    parts += bullets("Skipped", sorted(skipped))
    parts += _targets(done)
    return "\n\n".join(parts)


def _targets(done: list[Record]) -> list[str]:
    target = (TARGET["model"], TARGET["height"], TARGET["height"], TARGET["ranks"])
    points = [r for r in done if tuple(r[k] for k in POINT) == target]
    if not points:
        return []
    r = points[0]
    ours, theirs = r["bytes_per_step"], r["distrifusion_bytes_per_step"]
    total, attention = ours["total"] / theirs["total"], ours["attention"] / theirs["attention"]
    lines = [
        f"- total bytes {_ratio(ours['total'], theirs['total'])} of DistriFusion's (target ≤ 1/100: "
        f"{met(total <= TARGET['bytes'])})",
        f"- attention-state bytes {_ratio(ours['attention'], theirs['attention'])} of its K/V all-gather (target ≤ "
        f"1/1000: {met(attention <= TARGET['attention'])})",
    ]
    for p in points:
        if p["link"] == TARGET["link"]:
            lines.append(
                f"- projected efficiency, {p['mode']}, {p['link']}: {100 * p['efficiency']:.1f}% "
                f"(target ≥ 90%: {met(p['efficiency'] >= TARGET['efficiency'])}; a PROJECTION)"
            )
    return [f"Targets (SD-1.5 at {TARGET['height']}², {TARGET['ranks']} GPUs):\n" + "\n".join(lines)]


def plot(records: list[Record], args: argparse.Namespace) -> Any:
    fig, axes = new_figure(len(args.link) + 1)
    series = groups([r for r in records if not r["skipped"]], ("model", "height", "width"))
    for ax, link in zip(axes, args.link, strict=False):
        for (model, height, width), rs in series.items():
            color = None
            for mode, style in zip(PROJECTED_MODES, ("-o", ":^"), strict=True):
                mine = [r for r in rs if (r["link"], r["mode"]) == (link, mode)]
                label = f"{model} {format_size(width, height)} {mode}"
                line = ax.plot(
                    [r["ranks"] for r in mine], [100 * r["efficiency"] for r in mine], style, color=color, label=label
                )
                color = line[0].get_color()
        ax.set(xlabel="GPUs", ylabel="projected efficiency (%)", title=f"PROJECTION: {link}")
        ranks_axis(ax)
    volume = axes[-1]
    for (model, height, _), rs in series.items():
        rs = [r for r in rs if r["link"] == args.link[0] and r["mode"] == "exact" and r["ranks"] > 1]
        ranks = [r["ranks"] for r in rs]
        line = volume.plot(ranks, [r["bytes_per_step"]["total"] for r in rs], "-o", label=f"distlin {model} {height}")
        theirs = [r["distrifusion_bytes_per_step"]["total"] for r in rs]
        volume.plot(ranks, theirs, "--", color=line[0].get_color(), label=f"DistriFusion {model} {height}")
    volume.set(yscale="log", xlabel="GPUs", ylabel="bytes received per step", title="communication")
    ranks_axis(volume)
    finish_axes(*axes)
    return fig


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> SuiteResult:
    records = project(args, dtype)
    label = "PROJECTION from dry-run counters and an alpha-beta model; not measured on a cluster"
    return SuiteResult(records, markdown(records, args), plot(records, args), label)
