"""Every suite writes the same three files, each stating where, when and how it was measured."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

import distlin
from distlin.io import atomic_write

Record = dict[str, Any]
GIB = 2**30


def progress(suite: str, message: str) -> None:
    """One line on stderr per measured point, so long runs show where they are."""
    print(f"[{suite}] {message}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores"


def environment(device: torch.device, dtype: torch.dtype, threads: int, command: str, load: float) -> Record:
    """The fields every file carries: device, dtype, versions, thread count, date and the exact command, plus
    the 1-minute load average before the run (other processes on a shared machine skew CPU timings)."""
    env = {"device": describe_device(device), "dtype": dtype_name(dtype), "torch": torch.__version__}
    env |= {"diffusers": diffusers.__version__, "distlin": distlin.__version__, "threads": threads}
    env["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return env | {"command": command, "load_avg_before": round(load, 2)}


@dataclass
class SuiteResult:
    """What a suite measured: records (one dict each), Markdown (tables and notes), a figure, and a label that
    heads every file when the numbers are not plain measurements (projections)."""

    records: list[Record]
    markdown: str
    figure: Figure
    label: str = ""


def fmt(value: Any, digits: int = 3) -> str:
    """Floats to ``digits`` significant digits (exponent form only when huge or tiny); ``n/a`` for None."""
    if value is None:
        return "n/a"
    if not isinstance(value, float) or value.is_integer() and abs(value) < 1e6:
        return str(int(value)) if isinstance(value, float) else str(value)
    if abs(value) >= 1e6 or abs(value) < 1e-3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{max(digits - 1 - math.floor(math.log10(abs(value))), 0)}f}"


def fmt_bytes(n: float | None) -> str:
    """Decimal units (1 MB = 1e6 bytes), as published communication volumes are quoted."""
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{fmt(n / scale)} {unit}"
    return f"{n:.0f} B"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def factor(value: float | None, digits: int = 2) -> str:
    """``1.23×``, or ``n/a`` for None."""
    return "n/a" if value is None else f"{value:.{digits}f}×"


def percent(value: float | None, digits: int = 1) -> str:
    """A fraction as ``12.3%``, or ``n/a`` for None."""
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def spread(r: Record, key: str = "ms") -> str:
    """The median of a timed record with its range: ``12.3 [11.0–14.2]``."""
    return f"{fmt(r[key])} [{fmt(r['ms_min'])}–{fmt(r['ms_max'])}]"


def bullets(title: str, lines: Sequence[str]) -> list[str]:
    """``title:`` over a list of lines, or nothing when there are none (a Markdown part of a suite)."""
    return [f"{title}:\n" + "\n".join(lines)] if lines else []


def groups(records: list[Record], keys: Sequence[str]) -> dict[tuple, list[Record]]:
    """Records grouped by ``keys`` (lists made hashable), in order of first appearance."""
    out: dict[tuple, list[Record]] = {}
    for r in records:
        out.setdefault(tuple(tuple(r[k]) if isinstance(r[k], list) else r[k] for k in keys), []).append(r)
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(v if isinstance(v, str) else fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(panels: int) -> tuple[Figure, list[Any]]:
    """``panels`` axes, two per row; pyplot-free, so no display backend or global state is involved."""
    cols = min(panels, 2)
    rows = -(-panels // cols)
    fig = Figure(figsize=(6.5 * cols, 4.8 * rows + 0.6), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for extra in axes[panels:]:
        extra.set_visible(False)
    return fig, axes[:panels]


def ranks_axis(*axes: Any) -> None:
    """Rank counts on a log-2 axis with plain integer labels."""
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))


def finish_axes(*axes: Any) -> None:
    """Grid, and a legend where something is labelled."""
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


def _env_lines(env: Record) -> list[str]:
    return [
        f"device: {env['device']}; dtype {env['dtype']}; threads {env['threads']}; load average before "
        f"{env['load_avg_before']}",
        f"torch {env['torch']}, diffusers {env['diffusers']}, distlin {env['distlin']}; {env['date']}",
        f"command: {env['command']}",
    ]


def write_suite(out_dir: Path, name: str, result: SuiteResult, env: Record) -> list[Path]:
    """``name.json`` (list of records, each with ``env``), ``name.md`` and ``name.png``, written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [{**record, "env": env} for record in result.records]
    header = "\n".join(f"- {line}" for line in _env_lines(env))
    label = f"**{result.label}**\n\n" if result.label else ""
    markdown = f"# Benchmark `{name}`\n\n{label}{header}\n\n{result.markdown.strip()}\n"
    if result.label:
        result.figure.suptitle(result.label, color="darkred", fontweight="bold")
    result.figure.get_layout_engine().set(rect=(0, 0.09, 1, 0.91))
    result.figure.text(0.01, 0.01, "\n".join(_env_lines(env)), fontsize=7, family="monospace", va="bottom")
    writers: dict[str, Callable[[Path], object]] = {
        "json": lambda tmp: tmp.write_text(json.dumps(records, indent=1) + "\n"),
        "md": lambda tmp: tmp.write_text(markdown),
        "png": lambda tmp: result.figure.savefig(tmp, format="png", dpi=110),
    }
    return [atomic_write(out_dir / f"{name}.{ext}", writer) for ext, writer in writers.items()]
