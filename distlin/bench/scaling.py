"""Suite ``scaling``: time per UNet step on N ranks at a fixed resolution, for each engine setting, vs one rank.

The settings are exact, displaced with every stale set of ``--stale-sets`` and naive, timed interleaved in one
launch per N (the whole sequence ``--rounds`` times), so that a change of load on a shared machine touches
every setting alike.

For each N the suite spawns ``python -m torch.distributed.run --standalone --nproc_per_node N -m
distlin.bench.worker`` (gloo on CPU, ``--threads`` torch threads per rank, OMP_NUM_THREADS to match). CFG
parallelism is off unless ``--cfg-parallel``: every rank splits the image and runs the whole CFG batch, so
the measurement is pure patch parallelism. Records carry the engine's own counters of the middle rank
(index N//2, the rank the dry run simulates) beside what DistriFusion's scheme would send for the same model,
size, batch and N (see :mod:`distlin.bench.accounting`): bytes received per step by kind, the bytes hidden
behind compute (launched asynchronously) and the milliseconds the rank was blocked waiting for exchanges.
Worker results stay in ``OUT/scaling-workers``; ``--collect DIR`` assembles results from DIR (e.g. written by
``launch/slurm/bench.sbatch``) without spawning.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from distlin.bench import options
from distlin.bench.accounting import TOTAL_KINDS, distrifusion_bytes, layer_shapes
from distlin.bench.denoisers import check_attention, denoiser_name, is_sana
from distlin.bench.launch import run_ranks
from distlin.bench.models import ATTENTIONS, build
from distlin.bench.report import (
    Record,
    SuiteResult,
    bullets,
    dtype_name,
    factor,
    finish_axes,
    fmt,
    fmt_bytes,
    markdown_table,
    met,
    new_figure,
    percent,
    ranks_axis,
    spread,
)
from distlin.errors import UsageError
from distlin.parallel.config import MODES
from distlin.sizes import format_size

# A worker result's configuration (one per suite run), and what of it every record repeats.
CONFIG_KEYS = ("model", "height", "width", "attention", "batch", "cfg_parallel", "dtype")
RECORD_KEYS = (*CONFIG_KEYS[:3], "ranks", *CONFIG_KEYS[3:], "device", "backend", "threads_per_rank", "warmup")
WORKER_OPTIONS = ("model", "height", "width", "modes", "attention", "batch", "steps", "warmup", "threads")
WORKER_OPTIONS += ("stale_sets", "rounds", "timeout_s")
# the CPU targets of issues #9 (exact) and #26 (displaced): no stale set slower than exact, everything stale 1.95x
TARGET = {"model": "full-sd15", "height": 1024, "width": 1024, "ranks": 2, "speedup": 1.8, "all_speedup": 1.95}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = "built-in model (a UNet, or full-sana)"
    options.add(parser, "--model", "full-sd15", "tiny-sd15", model, type=denoiser_name)
    options.add(parser, "--height", 1024, 128, "image height in pixels", type=int)
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the height)")
    parser.add_argument("--ranks", type=options.int_list, default=[1, 2], help="numbers of ranks (default 1,2)")
    modes = "engine modes (default exact,displaced,naive)"
    parser.add_argument("--modes", type=options.str_list(MODES), default=list(MODES), help=modes)
    options.add(parser, "--steps", 3, 2, "timed UNet steps per setting and round", type=int)
    options.add(parser, "--rounds", 2, 1, "times the sequence of settings runs (interleaved timing)", type=int)
    parser.add_argument(
        "--stale-sets",
        default="every",
        help="displaced mode's stale sets: every (default: all non-empty ones), or a comma list such as "
        "attention,halo+groupnorm,all",
    )
    parser.add_argument("--attention", choices=ATTENTIONS, default="linear", help="self-attention (default linear)")
    parser.add_argument("--batch", type=int, default=2, help="batch per UNet call; 2 is one CFG step (default 2)")
    parser.add_argument("--cfg-parallel", action="store_true", help="split the CFG batch over two rank groups")
    parser.add_argument("--backend", default=None, help="default gloo on CPU, nccl on CUDA")
    options.add_timeout(parser)
    collect = "assemble the worker results (*.json) in DIR instead of spawning workers"
    parser.add_argument("--collect", type=Path, default=None, metavar="DIR", help=collect)


def spawn(ranks: int, result: Path, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """One torchrun launch of ``ranks`` workers, each given this run's worker options; raises when it fails."""
    given = {**vars(args), "width": args.width or args.height, "device": device.type, "dtype": dtype_name(dtype)}
    given |= {"result": result, "cfg_parallel": args.cfg_parallel or None}
    worker_args = [
        text
        for name in (*WORKER_OPTIONS, "device", "dtype", "result", "cfg_parallel", "backend")
        if given[name] is not None
        for text in (f"--{name.replace('_', '-')}", *([] if given[name] is True else [options.show(given[name])]))
    ]
    run_ranks("scaling", ranks, "distlin.bench.worker", worker_args, args.threads, args.timeout_s)


def load_results(folder: Path) -> list[dict[str, Any]]:
    """Worker results in ``folder``, checked to describe one configuration."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    results = [r for r in results if "modes" in r]
    if not results:
        raise UsageError(f"no worker results (*.json with 'modes') in {str(folder)!r}")
    configs = {tuple(r[k] for k in CONFIG_KEYS) for r in results}
    if len(configs) > 1:
        raise UsageError(f"worker results in {str(folder)!r} mix configurations: {sorted(configs)}")
    return sorted(results, key=lambda r: r["ranks"])


def assemble(results: list[dict[str, Any]]) -> list[Record]:
    """One record per (ranks, setting): median step time over every round, speed-up and efficiency vs one rank,
    time relative to exact on as many ranks, counters (blocked time: the median round's)."""
    first, median = results[0], statistics.median
    dtype = getattr(torch, first["dtype"])
    shapes = None  # DistriFusion's scheme is a UNet's: none for SANA's transformer
    if not is_sana(first["model"]):
        unet = build(first["model"], first["attention"], "meta", dtype)
        shapes = layer_shapes(unet, first["height"], first["width"], first["batch"])
    element_size = torch.empty((), dtype=dtype).element_size()
    single = next((r["modes"]["exact"] for r in results if r["ranks"] == 1), None)
    base_ms, base_cpu = (median(single["step_ms"]), median(single["cpu_ms"])) if single else (None, None)
    records = []
    for result in results:
        n, exact = result["ranks"], result["modes"].get("exact")
        exact_ms, exact_cpu = (median(exact["step_ms"]), median(exact["cpu_ms"])) if exact else (None, None)
        for setting, run in result["modes"].items():
            ms, cpu, counters = median(run["step_ms"]), median(run["cpu_ms"]), run["counters_by_rank"][n // 2]
            rounds = [by_rank[n // 2] for by_rank in run.get("counters_by_round", [run["counters_by_rank"]])]
            speedup = base_ms / ms if base_ms else None
            record = {k: result[k] for k in RECORD_KEYS} | {"mode": run.get("mode", setting), "stale": run.get("stale")}
            record |= {"setting": setting, "rounds": result.get("rounds", 1), "ms_per_step": ms}
            record |= {
                "vs_exact": exact_ms / ms if exact_ms else None,
                "cpu_vs_exact": exact_cpu / cpu if exact_cpu else None,
            }
            record |= {"ms_min": min(run["step_ms"]), "ms_max": max(run["step_ms"]), "steps": len(run["step_ms"])}
            record["cpu_ms_per_step"] = cpu
            record["comm_cpu_ms_per_step"] = median(run["comm_cpu_ms"]) if run.get("comm_cpu_ms") else None
            record |= {"speedup": speedup, "cpu_speedup": base_cpu / cpu if base_cpu else None}
            record |= {"efficiency": speedup and speedup / n, "counters_rank": n // 2}
            record |= {k: counters[k] for k in ("bytes_per_step", "calls_per_step", "hidden_bytes_per_step")}
            for key in ("wait_ms_per_step", "launch_ms_per_step"):
                record[key] = {k: median(r[key][k] for r in rounds) for k in TOTAL_KINDS}
            record["distrifusion_bytes_per_step"] = shapes and distrifusion_bytes(shapes, n, element_size)
            records.append(record)
    return records


def markdown(records: list[Record]) -> str:
    r0 = records[0]
    rows = [
        [r["ranks"], r["setting"] if r["ranks"] > 1 else "(one rank)", spread(r, "ms_per_step")]
        + [fmt(r["cpu_ms_per_step"]), fmt(r["comm_cpu_ms_per_step"])]
        + [f"{factor(r['speedup'])} ({factor(r['cpu_speedup'])})", percent(r["efficiency"], 0)]
        + [f"{factor(r['vs_exact'])} ({factor(r['cpu_vs_exact'])})", fmt_bytes(r["bytes_per_step"]["total"])]
        + [fmt_bytes(r["hidden_bytes_per_step"]["total"]), fmt(r["wait_ms_per_step"]["total"])]
        + [fmt_bytes((r["distrifusion_bytes_per_step"] or {}).get("total"))]
        for r in records
    ]
    headers = ["ranks", "setting", "ms per step [min–max]", "CPU ms per step", "of which exchange threads"]
    headers += ["speed-up (CPU time)", "efficiency", "vs exact (CPU time)", "bytes/step", "of which hidden"]
    headers += ["ms blocked/step", "DistriFusion bytes/step"]
    cfg = "on (two rank groups)" if r0["cfg_parallel"] else "off (every rank splits the image, whole CFG batch)"
    parts = [
        f"{r0['model']} with {r0['attention']} self-attention at {format_size(r0['width'], r0['height'])}, "
        f"batch {r0['batch']}, {r0['dtype']}, backend {r0['backend']}, {r0['threads_per_rank']} thread(s) per rank, "
        f"CFG parallelism {cfg}. One UNet call per step; every setting in turn, {r0['rounds']} round(s) of "
        f"{r0['steps'] // r0['rounds']} timed step(s) after {r0['warmup']} warm-up step(s) each; median step; a "
        "step's time is the slowest rank's wall-clock time; CPU ms is the busiest rank's process CPU time (well "
        "below the wall time on one rank means other processes competed for the cores), of which the exchange "
        "threads' (every thread but the computing one: the backend's workers and socket loop); vs exact: exact's time "
        "over this setting's on as many ranks; in parentheses the same ratios of CPU time, which other jobs on the "
        "machine disturb far less than wall-clock time. Bytes received per UNet step by the middle rank (engine "
        "counters);"
        " hidden: launched asynchronously, waited for a step later; blocked: the middle rank's time waiting for "
        "exchanges (median round). DistriFusion's bytes computed for the same model, size, batch and ranks.",
        markdown_table(headers, rows),
    ]
    counters = {"calls": "calls_per_step", "bytes": "bytes_per_step", "launch ms": "launch_ms_per_step"}
    counters["blocked ms"] = "wait_ms_per_step"
    kinds = [
        [r["ranks"], r["setting"]]
        + [(fmt_bytes if key == "bytes_per_step" else fmt)(r[key][k]) for key in counters.values() for k in TOTAL_KINDS]
        for r in records
        if r["ranks"] > 1
    ]
    if kinds:
        parts += [
            "Engine counters per UNet step by kind (calls, bytes received, ms launching: padding, copies and handing "
            "buffers to the backend; ms blocked waiting):",
            markdown_table(["ranks", "setting", *(f"{c} {k}" for c in counters for k in TOTAL_KINDS)], kinds),
        ]
    parts += _targets(records)
    return "\n\n".join(parts)


def _targets(records: list[Record]) -> list[str]:
    """The engine issues' CPU targets, when this run is the one they are stated for."""
    r0 = records[0]
    setting = (r0["model"], r0["height"], r0["width"], r0["backend"], r0["threads_per_rank"])
    if setting != (TARGET["model"], TARGET["height"], TARGET["width"], "gloo", 1):
        return []
    lines = []
    for n in sorted({r["ranks"] for r in records if r["ranks"] > 1}):
        by_setting = {r["setting"]: r for r in records if r["ranks"] == n}
        exact = by_setting.get("exact")
        if exact is None or exact["speedup"] is None:
            continue
        if n == TARGET["ranks"]:
            for setting, target in (("exact", TARGET["speedup"]), ("displaced all", TARGET["all_speedup"])):
                if (r := by_setting.get(setting)) is not None:
                    lines.append(
                        f"- {setting} on {n} ranks: {r['speedup']:.2f}× one rank ({r['cpu_speedup']:.2f}× in CPU "
                        f"time; target ≥ {target}×: {met(r['speedup'] >= target)})"
                    )
        for r in by_setting.values():
            if r["mode"] == "displaced":
                lines.append(
                    f"- {r['setting']} on {n} ranks: {fmt(r['ms_per_step'])} ms vs exact {fmt(exact['ms_per_step'])}"
                    f" ms per step, {factor(r['cpu_vs_exact'])} exact's speed in CPU time (target ≥ exact speed: "
                    f"{met(r['vs_exact'] >= 1)})"
                )
    return bullets("Targets (CPU, gloo, 1 thread per rank)", lines)


def plot(records: list[Record]) -> Any:
    fig, (times, volume) = new_figure(2)
    single = [r for r in records if r["ranks"] == 1]
    for setting in dict.fromkeys(r["setting"] for r in records if r["ranks"] > 1):
        rs = single + [r for r in records if r["setting"] == setting and r["ranks"] > 1]
        times.plot([r["ranks"] for r in rs], [r["ms_per_step"] for r in rs], "-o", label=setting)
    multi = [r for r in records if r["ranks"] > 1 and r["mode"] != "naive"]
    ranks = sorted({r["ranks"] for r in multi})
    for label, key in (
        ("distlin (engine counters)", "bytes_per_step"),
        ("DistriFusion", "distrifusion_bytes_per_step"),
    ):
        if any(r[key] is None for r in multi):
            continue
        values = [next(r[key]["total"] for r in multi if r["ranks"] == n) for n in ranks]
        volume.plot(ranks, values, "-o", label=label)
    times.set(xlabel="ranks", ylabel="ms per UNet step (median)", title="time per step")
    scale = "log" if multi else "linear"  # one rank alone: nothing crossed
    volume.set(xlabel="ranks", ylabel="bytes received per step (middle rank)", yscale=scale, title="communication")
    ranks_axis(times, volume)
    finish_axes(times, volume)
    return fig


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> SuiteResult:
    """Spawn one torchrun launch per rank count (results kept in ``OUT/scaling-workers`` for ``--collect``)."""
    check_attention(args.model, args.attention)  # before any rank starts
    folder = args.collect
    if folder is None:
        folder = args.out / "scaling-workers"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.json"):
            stale.unlink()
        for n in args.ranks:
            spawn(n, folder / f"ranks-{n}.json", args, device, dtype)
    records = assemble(load_results(folder))
    return SuiteResult(records, markdown(records), plot(records))
