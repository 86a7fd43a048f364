"""``launch/bench.py scaling`` times SANA's transformer (``tiny-sana`` here; ``full-sana``, SANA-1600M's
architecture, on an idle machine) on N ranks beside one, with the engine's counters: each self-attention's
state all-reduced and the Mix-FFN's halos, no DistriFusion comparison (a UNet's scheme)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distlin.bench.cli import main


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_scaling_suite_times_sanas_transformer_on_two_ranks_against_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["scaling", "--quick", "--model", "tiny-sana", "--height", "64", "--ranks", "1,2", "--modes", "exact"]
    assert main([*argv, "--steps", "1", "--rounds", "1", "--out", str(out)]) == 0
    records = json.loads((out / "scaling.json").read_text())
    assert [(r["model"], r["ranks"]) for r in records] == [("tiny-sana", 1), ("tiny-sana", 2)]
    two = records[1]
    assert two["ms_per_step"] > 0 and two["speedup"] > 0 and two["distrifusion_bytes_per_step"] is None
    # 2 layers, batch 2, 2 heads: a (8+1) x 8 float32 state each, all-reduced; one halo row each way per Mix-FFN
    assert two["bytes_per_step"]["attention"] == 2 * 2 * 2 * 9 * 8 * 4
    assert two["bytes_per_step"]["halo"] > 0 and two["bytes_per_step"]["groupnorm"] == 0
    assert "n/a" in (out / "scaling.md").read_text()


def test_the_scaling_suite_refuses_softmax_for_sana_in_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["scaling", "--quick", "--model", "tiny-sana", "--attention", "softmax", "--out", str(out)]) == 2
    assert "tiny-sana's self-attention is linear already; drop --attention softmax" in capsys.readouterr().err
    assert not list(out.glob("scaling*"))
