"""The hardware the benchmarks compare against or project onto, in one place: GPU peaks and memory, the links
between GPUs, and the alpha-beta model of an exchange's time on a link. Every number here is a vendor's spec or
an assumption stated beside it, never a measurement of distlin."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from distlin.bench.accounting import TOTAL_KINDS, DryRun
from distlin.bench.timing import matmul_peak_flops

# Dense bf16/fp16 tensor-core peaks (SXM parts), FLOP/s; a CUDA device whose name holds the key in capitals has it.
GPUS = {"h100": ("H100 SXM", 989e12), "h200": ("H200 SXM", 989e12), "a100": ("A100 SXM", 312e12)}
GPU_PEAK_DTYPES = (torch.bfloat16, torch.float16)
GPU_BYTES = 80 * 10**9  # an "80 GB" H100/A100: 80e9 bytes, of which CUDA leaves the program ~79.1 GiB


@dataclass(frozen=True)
class Link:
    """Assumed per-GPU link: latency per message ``alpha_s`` and achievable bandwidth ``beta`` (bytes/s)."""

    description: str
    alpha_s: float
    beta: float


LINKS = {
    "nvlink": Link("NVLink 4 within one H100/H200 SXM node: alpha 10 us, 350 GB/s", 10e-6, 350e9),
    "pcie": Link("PCIe Gen4 x16 between GPUs: alpha 15 us, 22 GB/s", 15e-6, 22e9),
    "ib": Link(
        "InfiniBand NDR 400 Gb/s, one NIC per GPU, every exchange across nodes: alpha 25 us, 45 GB/s", 25e-6, 45e9
    ),
}


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """Peak FLOP/s to compare against, and where the number comes from: a known GPU's spec, or on a CPU the
    measured rate of a large matmul in ``dtype`` on the current threads."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (_, peak) in GPUS.items():
            if key.upper() in name and dtype in GPU_PEAK_DTYPES:
                return peak, f"{key.upper()} spec, dense bf16/fp16"
        return None, f"no known peak for {name} in {dtype}"
    size = 2048
    peak = matmul_peak_flops(device, dtype, size)
    return (
        peak,
        f"measured {size}x{size} {str(dtype).removeprefix('torch.')} matmul, threads: {torch.get_num_threads()}",
    )


def comm_seconds(dry: DryRun, ranks: int, link: Link) -> dict[str, float]:
    """Alpha-beta time of each kind of exchange in one step, from the engine's calls and bytes: all-reduce
    ``2 ceil(log2 N) alpha + 2 (N-1)/N bytes / beta``, all-gather ``(N-1) alpha + bytes / beta``, halo ``alpha``
    per buffer ``+ bytes / beta``."""
    if ranks == 1:
        return dict.fromkeys(TOTAL_KINDS, 0.0)
    calls, nbytes = dry.calls_per_step, dry.bytes_per_step
    all_reduce_alpha, all_reduce_beta = 2 * math.ceil(math.log2(ranks)), 2 * (ranks - 1) / ranks
    seconds = {
        kind: calls[kind] * all_reduce_alpha * link.alpha_s + nbytes[kind] * all_reduce_beta / link.beta
        for kind in ("attention", "groupnorm")
    }
    seconds["gather"] = calls["gather"] * (ranks - 1) * link.alpha_s + nbytes["gather"] / link.beta
    seconds["halo"] = calls["halo"] * link.alpha_s + nbytes["halo"] / link.beta
    seconds["total"] = sum(seconds.values())
    return seconds


def projected_seconds(compute_s: float, comm: dict[str, float], stale: Collection[str] = ()) -> float:
    """One step: the compute plus every synchronous exchange; the ``stale`` kinds overlap the compute."""
    hidden = sum(comm[k] for k in stale)
    return max(compute_s, hidden) + comm["total"] - hidden
