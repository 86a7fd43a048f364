"""Suites that measure several ranks start them the one way: ``torchrun --standalone`` on this machine."""

from __future__ import annotations

import os
import subprocess
import sys

from distlin.bench.report import progress
from distlin.parallel.runtime import rank_environment

# Variables of an enclosing torchrun that must not leak into the one a suite starts.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_ranks(suite: str, ranks: int, module: str, args: list[str], threads: int, timeout_s: float) -> None:
    """``python -m module *args`` on ``ranks`` local ranks of ``threads`` threads each; raises when it fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command += ["-m", module, *args]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(rank_environment({}, threads))  # the setting stated, whatever the caller's shell has
    progress(suite, f"{ranks} rank(s): {' '.join(command)}")
    done = subprocess.run(command, env=env, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{suite} run on {ranks} ranks failed with exit code {done.returncode}")
