"""Failures end fast and cleanly: every rank stops, nothing half-written, one message naming the cause."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distlin.models.tiny import build_pipeline
from distlin.parallel import PatchParallelConfig, Runtime, parallelize
from distlin.parallel.unet import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]
GENERATE = str(ROOT / "launch" / "generate.py")


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--standalone",
        GENERATE,
        *args,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_non_finite_prediction_stops_at_the_first_step_with_advice() -> None:
    pipe = build_pipeline("tiny-sd15")
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    parallelize(pipe, PatchParallelConfig(), Runtime())
    with pytest.raises(NonFiniteError, match=r"step 0 .*bfloat16 or float32"):
        pipe("x", height=64, width=64, num_inference_steps=3, output_type="latent")


def test_too_many_ranks_fails_on_every_rank_within_seconds(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    start = time.monotonic()
    proc = subprocess.run(
        torchrun(3, "--preset", "tiny-sd15", "--height", "64", "--output", str(out)),
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # Every rank runs the same check before loading weights; torchrun may stop the others before they print.
    assert errors and all("at most 1 rank works" in line for line in errors), proc.stderr[-2000:]
    assert time.monotonic() - start < 60
    assert not out.exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--height", "100"], "height 100 is not a positive multiple of 8"),
        (["--linfusion", "/nonexistent/linfusion"], "/nonexistent/linfusion"),
        (["--preset", "tiny-sd15-cascade", "--steps", "1"], "denoising steps"),
    ],
)
def test_bad_input_on_two_ranks_is_one_line_exit_2_and_no_file(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "x.png"
    start = time.monotonic()
    proc = subprocess.run(
        torchrun(2, *args, "--output", str(out)), capture_output=True, text=True, env=env(), timeout=120
    )
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(needle in line for line in errors), proc.stderr[-2000:]
    assert time.monotonic() - start < 60
    assert not list(tmp_path.iterdir())


def test_a_killed_rank_stops_the_others_and_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    proc = subprocess.Popen(
        torchrun(
            2, "--preset", "tiny-sd15", "--steps", "400", "--no-cfg-parallel", "--timeout-s", "30", "--output", str(out)
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
        start_new_session=True,
    )
    try:
        # Wait until sampling runs (rank 0's progress bar moves), then kill rank 1 outright.
        deadline = time.monotonic() + 90
        seen = ""
        while "it/s" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.read1(4096).decode() if hasattr(proc.stdout, "read1") else proc.stdout.read(64)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2, children
        killed_at = time.monotonic()
        os.kill(int(sorted(children, key=int)[1]), signal.SIGKILL)
        proc.wait(timeout=60)
        assert time.monotonic() - killed_at < 60
        assert proc.returncode != 0
        assert not out.exists()
        assert not list(tmp_path.iterdir()), "no temporary file is left behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
