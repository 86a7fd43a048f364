"""What a run is doing before its first denoising step: a start line, then each slow phase with its time.

A run spends seconds (tiny models) to minutes (real weights) importing torch and diffusers, loading components,
mounting LinFusion, parallelizing and compiling before the first step shows a progress bar. Each of those is a
:func:`phase`; a phase tells the sinks registered with :func:`report_to` when it starts and how long it took
(the command line's printer on rank 0, the web app's progress display). With no sink registered (the Python
API, ranks other than 0) a phase only runs its block. Torch-free, so the start line comes before any heavy
import.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from distlin.sizes import format_size


@dataclass(frozen=True)
class PhaseEvent:
    """A phase starting (``seconds`` None) or finished after ``seconds``."""

    name: str
    seconds: float | None = None


Sink = Callable[[PhaseEvent], None]

# The sinks of this process; a sink is registered for the length of a run (:func:`report_to`).
_SINKS: list[Sink] = []


@contextmanager
def report_to(sink: Sink) -> Iterator[None]:
    """Send every phase to ``sink`` until the block ends."""
    _SINKS.append(sink)
    try:
        yield
    finally:
        _SINKS.remove(sink)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as one phase named ``name`` (what the user reads: "loading the model tiny-sd15")."""
    for sink in list(_SINKS):
        sink(PhaseEvent(name))
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    for sink in list(_SINKS):
        sink(PhaseEvent(name, seconds))


def print_phase(event: PhaseEvent) -> None:
    """The command line's sink: one line per finished phase, ``name: 1.2 s``."""
    if event.seconds is not None:
        print(f"{event.name}: {event.seconds:.1f} s", flush=True)


def plural(count: int, noun: str) -> str:
    """``1 step``, ``3 steps``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def start_line(preset: str, width: int, height: int, steps: int, ranks: int, device: str, stages: int = 0) -> str:
    """What a run is about to do, printed before anything slow."""
    cascade = f", a cascade of {plural(stages, 'stage')}" if stages else ""
    return (
        f"generating {format_size(width, height)} px from preset {preset}{cascade}: {plural(steps, 'step')}, "
        f"{plural(ranks, 'rank')}, device {device}"
    )
