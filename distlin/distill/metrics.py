"""Per-step loss records: ``log.csv`` (rewritten atomically), TensorBoard and a loss plot when installed."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from distlin.distill.losses import TERMS
from distlin.io import atomic_write

COLUMNS = ("step", *TERMS, "skipped", "lr")
# The CSV is rewritten whole (atomically) at most this often, plus at every checkpoint and at the end.
FLUSH_INTERVAL_S = 30.0


def read_log(path: Path) -> list[dict[str, float]]:
    """Rows of a ``log.csv`` as numbers (``step`` and ``skipped`` as ints)."""
    with open(path, encoding="utf-8", newline="") as f:
        return [
            {k: (int(v) if k in ("step", "skipped") else float(v)) for k, v in row.items()} for row in csv.DictReader(f)
        ]


class TrainLog:
    """The rows of this run (and those it resumed from), kept in memory and mirrored to files by rank 0."""

    def __init__(self, out: Path, rows: list[dict[str, float]], enabled: bool):
        self.path = out / "log.csv"
        self.rows = rows
        self.enabled = enabled
        self._flushed = time.monotonic()
        self._tensorboard = _tensorboard(out / "tensorboard", len(rows)) if enabled else None

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self._tensorboard is not None:
            for key in (*TERMS, "lr"):
                self._tensorboard.add_scalar(f"train/{key}", row[key], row["step"])
        if time.monotonic() - self._flushed > FLUSH_INTERVAL_S:
            self.flush()

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in row.items()})
        return buffer.getvalue()

    def flush(self) -> None:
        if self.enabled:
            text = self.csv_text()
            atomic_write(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            self._flushed = time.monotonic()

    def close(self) -> Path | None:
        """Write the CSV and the loss plot; returns the plot's path, or None without matplotlib."""
        self.flush()
        if self._tensorboard is not None:
            self._tensorboard.close()
        return plot_losses(self.rows, self.path.with_name("loss.png")) if self.enabled and self.rows else None


def _tensorboard(folder: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


def plot_losses(rows: list[dict[str, float]], path: Path) -> Path | None:
    """Each loss term against the step, log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [row["step"] for row in rows]
    for key in TERMS:
        ax.plot(steps, [row[key] for row in rows], label=key, linewidth=1)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="LinFusion distillation")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path
