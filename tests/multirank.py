"""Run a function on N gloo ranks (spawned processes, one thread each) and collect what rank 0 returns."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distlin.parallel import Runtime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(Runtime(rank=rank, world_size=world, backend="gloo"), *args)
        torch.save(result, f"{out}.{rank}")
        # No rank tears its transport down while a peer may still be reading from it (gloo aborts the process
        # when a connection closes under a pending operation).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """``fn(runtime, *args)`` on every rank; returns the list of every rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result")
        mp.start_processes(_entry, args=(world, free_port(), fn, args, out), nprocs=world, start_method="spawn")
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]
