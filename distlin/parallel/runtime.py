"""Process-group setup: torchrun (or any env:// launcher, or ``--nproc-per-node``'s file store) when present, a
single process otherwise."""

from __future__ import annotations

import atexit
import datetime
import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distlin.errors import UsageError
from distlin.parallel.config import BACKENDS
from distlin.ranks import ranks_from_env

# glibc hands every freed block above its mmap threshold back to the OS, so each large activation is faulted in and
# zeroed again at the next layer: full-sd15 at 512x512 on one CPU rank spent 1.6 s of 14 s per UNet call in the
# kernel (846k page faults); with these, none. glibc reads them at process start: they go into a rank's environment.
CPU_RANK_ENV: dict[str, str] = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def rank_environment(env: dict[str, str], threads: int) -> dict[str, str]:
    """``env`` for a CPU rank of ``threads`` torch threads: OpenMP sized to match (several ranks share the
    cores) and freed memory kept for reuse (:data:`CPU_RANK_ENV`); values already in ``env`` win."""
    return {"OMP_NUM_THREADS": str(threads), **CPU_RANK_ENV, **env}


@dataclass
class Runtime:
    """Who this process is. ``world_size == 1`` without a process group is the single-device fallback."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        """Destroy the process group (idempotent)."""
        if self.distributed:
            _destroy_process_group()
        self.backend = None


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``None``/``auto`` picks this rank's GPU when CUDA is available, else the CPU."""
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    elif dev.type not in ("cpu", "mps"):
        raise UsageError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or auto")
    return dev


def _destroy_process_group() -> None:
    """Destroy every group once nothing holds it. A parallelized model is cyclic garbage (its rewritten classes
    refer to themselves) whose communicators keep their groups alive; left to the interpreter's final collection,
    gloo's threads would be torn down after the interpreter and abort the process ("terminate called without an
    active exception") though the run succeeded."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def init_runtime(backend: str | None = None, timeout_s: float = 300.0, device: str | None = None) -> Runtime:
    """Join the process group started by torchrun, or return a one-process runtime.

    ``backend`` defaults to NCCL on CUDA and gloo on CPU. ``timeout_s`` bounds every collective, so
    a rank that dies makes the others fail instead of hanging.
    """
    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; use nccl or gloo")
    if timeout_s <= 0:
        raise UsageError(f"timeout must be positive seconds, got {timeout_s}")
    ranks = ranks_from_env()
    if not ranks.launched:
        return Runtime(device=resolve_device(device))
    rank, world = ranks.rank, ranks.world_size
    dev = resolve_device(device, ranks.local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise UsageError("backend nccl needs CUDA devices; use --backend gloo on CPU")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        store = ranks.rendezvous_file  # --nproc-per-node: a file store, no port (else torchrun's env://)
        dist.init_process_group(
            backend=backend,
            init_method=f"file://{store}" if store else None,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if backend == "nccl" else None,
        )
        # A script using the Python API may simply end: the group is still torn down before the interpreter
        # (gloo aborts the process when its threads outlive it).
        atexit.register(_destroy_process_group)
    return Runtime(rank=rank, world_size=world, local_rank=ranks.local_rank, device=dev, backend=backend)
