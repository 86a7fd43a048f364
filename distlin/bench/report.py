"""Every suite writes the same three files, each stating where, when and how it was measured."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from matplotlib.figure import Figure

import distlin
from distlin.io import atomic_write

Record = dict[str, Any]


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


def environment(device: torch.device, dtype: torch.dtype, threads: int, command: str) -> Record:
    """The fields every file carries: device, dtype, versions, thread count, date and the exact command."""
    return {
        "device": describe_device(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "distlin": distlin.__version__,
        "threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
    }


@dataclass
class SuiteResult:
    """What a suite measured: records (one dict each), Markdown (tables and notes) and a figure."""

    records: list[Record]
    markdown: str
    figure: Figure


def fmt(value: Any, digits: int = 3) -> str:
    """Floats to ``digits`` significant digits (exponent form only when huge or tiny); ``n/a`` for None."""
    if value is None:
        return "n/a"
    if not isinstance(value, float) or value == 0:
        return str(value)
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


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(v if isinstance(v, str) else fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(panels: int) -> tuple[Figure, list[Any]]:
    """A row of ``panels`` axes; pyplot-free, so no display backend or global state is involved."""
    fig = Figure(figsize=(6.5 * panels, 5.0), layout="constrained")
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def _env_lines(env: Record) -> list[str]:
    return [
        f"device: {env['device']}; dtype {env['dtype']}; threads {env['threads']}",
        f"torch {env['torch']}, diffusers {env['diffusers']}, distlin {env['distlin']}; {env['date']}",
        f"command: {env['command']}",
    ]


def write_suite(out_dir: Path, name: str, result: SuiteResult, env: Record) -> list[Path]:
    """``name.json`` (list of records, each with ``env``), ``name.md`` and ``name.png``, written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [{**record, "env": env} for record in result.records]
    header = "\n".join(f"- {line}" for line in _env_lines(env))
    markdown = f"# Benchmark `{name}`\n\n{header}\n\n{result.markdown.strip()}\n"
    result.figure.get_layout_engine().set(rect=(0, 0.09, 1, 0.91))
    result.figure.text(0.01, 0.01, "\n".join(_env_lines(env)), fontsize=7, family="monospace", va="bottom")
    writers: dict[str, Callable[[Path], object]] = {
        "json": lambda tmp: tmp.write_text(json.dumps(records, indent=1) + "\n"),
        "md": lambda tmp: tmp.write_text(markdown),
        "png": lambda tmp: result.figure.savefig(tmp, format="png", dpi=110),
    }
    return [atomic_write(out_dir / f"{name}.{ext}", writer) for ext, writer in writers.items()]
