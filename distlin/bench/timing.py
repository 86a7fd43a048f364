"""Wall-clock timing with warm-up and repeats, peak memory of one call, and the device's measured matmul peak."""

from __future__ import annotations

import ctypes
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock time covers the kernels and not just their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Wall-clock and process CPU milliseconds of each timed repeat. Records report the wall-clock median and
    spread (min, max, quartiles) and the median CPU time: on a shared CPU, CPU time well below wall time
    shows that other processes took the cores."""

    samples_ms: list[float]
    cpu_samples_ms: list[float]

    def fields(self) -> dict[str, float | int]:
        s = sorted(self.samples_ms)
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else (s[0], s[0], s[0])
        spread = {"ms": statistics.median(s), "ms_min": s[0], "ms_max": s[-1], "ms_q1": q1, "ms_q3": q3}
        return spread | {"cpu_ms": statistics.median(self.cpu_samples_ms), "repeats": len(s)}


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int) -> Timing:
    """Time ``repeats`` calls of ``fn`` (warm-up is the caller's: it usually doubles as the memory probe)."""
    wall, cpu = [], []
    for _ in range(repeats):
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return Timing(wall, cpu)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict[str, float | None]:
    """Peak memory of the first call (a warm-up too), the other warm-ups, then the timed calls' fields."""
    peak = peak_memory_mb(fn, device)
    for _ in range(warmup - 1):
        fn()
    return {**time_calls(fn, device, repeats).fields(), "peak_mb": peak}


def _rss_mb(field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} missing from {_STATUS}")
    return int(match.group(1)) / 1024


def _release_free_heap() -> None:
    """Return freed heap pages to the OS, so memory reused from earlier calls cannot hide this call's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Extra memory at the peak of one call of ``fn`` over what was held before it, in MiB.

    CUDA: the caching allocator's peak. CPU: the resident-set high-water mark, reset through
    ``/proc/self/clear_refs`` (Linux); ``None`` where that is unavailable.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if device.type != "cpu":
        fn()
        return None
    _release_free_heap()
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets the peak RSS (VmHWM) to the current RSS
        before = _rss_mb("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return max(_rss_mb("VmHWM") - before, 0.0)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a square ``size`` matmul on the current thread count: the practical peak of a CPU."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    best = min(time_calls(lambda: torch.mm(a, b), device, repeats).samples_ms)
    return 2 * size**3 / (best / 1e3)
