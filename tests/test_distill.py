"""launch/distill.py on the offline tiny-sd15 model: it learns, resumes exactly, gives the same parameters on
2 gloo ranks as on 1, writes checkpoints LinFusion loads, and rejects bad input in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from distlin.distill import cli
from distlin.distill.data import open_source
from distlin.distill.losses import diffusion_target
from distlin.distill.metrics import read_log
from distlin.distill.sampling import BatchLayout
from distlin.linfusion import LinFusion, self_attention_layers
from distlin.models.tiny import build_pipeline

REPO = Path(__file__).resolve().parents[1]
DISTILL = str(REPO / "launch" / "distill.py")
WEIGHTS = "diffusion_pytorch_model.safetensors"
# A handful of images at a tiny size: 64 px is an 8x8 latent for tiny-sd15.
BASE = "train --preset tiny-sd15 --resolution 64 --workers 0".split()
# The random-weight teacher is no denoiser, so the noise term would pull the student away from it: the
# convergence run distils the teacher alone (lambda_noise 0), from random layers so there is much to learn.
LEARN = [
    *BASE,
    *"--data clean --out learn --init random --lr 2e-3 --lambda-noise 0 --batch-size 4 --holdout 2 "
    "--max-steps 200 --save-every 200".split(),
]
# Runs to compare exactly: the data hold a corrupt image, so skipping it must also be deterministic.
SHORT = [*BASE, *"--data with-corrupt --init random --batch-size 4 --holdout 0 --save-every 2".split()]
JOBS: dict[str, list[list[str]]] = {
    "learn": [LEARN, "eval --checkpoint learn/checkpoint-200".split()],
    "straight": [[*SHORT, "--out", "straight", "--max-steps", "4"]],
    "resumed": [
        [*SHORT, "--out", "resumed", "--max-steps", "2"],
        [*SHORT, "--out", "resumed", "--max-steps", "4", "--resume", "latest"],
    ],
    "two-ranks": [["--torchrun", *SHORT, "--out", "two-ranks", "--max-steps", "4"]],
    "no-caption": [[*BASE, "--data", "no-caption", "--out", "x"]],
}


def write_images(folder: Path, count: int, seed: int) -> None:
    """Smooth random patterns of assorted (non-square) sizes, each with a caption."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(64, 120, size=2))
        y, x = np.mgrid[0:h, 0:w] / 16.0
        phases = rng.uniform(0, 6.3, size=3)
        rgb = np.stack([np.sin(x * (c + 1) + y + p) for c, p in enumerate(phases)], axis=-1)
        Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8)).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"pattern {i}")


def run_distill(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """One command in a fresh process on one thread (OMP_NUM_THREADS=1 is torch.set_num_threads(1) at start-up),
    offline, outside any torchrun; ``--torchrun`` first launches it on 2 gloo ranks instead."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launcher = [sys.executable]
    if args[0] == "--torchrun":
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        args = args[1:]
    return subprocess.run([*launcher, DISTILL, *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=300)


def run_job(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Commands in order, stopping at the first that fails."""
    done = []
    for args in commands:
        done.append(run_distill(args, cwd))
        if done[-1].returncode:
            break
    return done


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    write_images(root / "clean", 10, seed=0)
    write_images(root / "with-corrupt", 8, seed=1)
    (root / "with-corrupt" / "img03.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    write_images(root / "no-caption", 2, seed=2)
    (root / "no-caption" / "img01.txt").unlink()
    return root


@pytest.fixture(scope="module")
def jobs(workdir: Path) -> Iterator[dict[str, Future[list[subprocess.CompletedProcess[str]]]]]:
    """All launcher runs start together (2 cores; most of each is start-up or waiting on another rank)."""
    with ThreadPoolExecutor(max_workers=len(JOBS)) as pool:
        yield {name: pool.submit(run_job, commands, workdir) for name, commands in JOBS.items()}


def finished(jobs: dict[str, Future[list[subprocess.CompletedProcess[str]]]], name: str) -> None:
    for done in jobs[name].result():
        assert done.returncode == 0, f"{done.args}\n{done.stderr[-3000:]}"


def params(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoint-{step}" / "linfusion" / WEIGHTS)


def test_training_lowers_kd_and_feature_losses_and_eval_error(jobs, workdir: Path) -> None:
    """Measured here (200 steps): mean L_kd of the first 10 steps / of the last 10 about 26, L_feat about 20;
    eval relative MSE 65-100 times below the random init's at 1x, 2x and 4x. Asserted with margin: 10."""
    finished(jobs, "learn")
    rows = read_log(workdir / "learn" / "log.csv")
    assert [row["step"] for row in rows] == list(range(200))
    for term in ("loss_kd", "loss_feat"):
        first = np.mean([row[term] for row in rows[:10]])
        last = np.mean([row[term] for row in rows[-10:]])
        assert first / last > 10, (term, first, last)
    assert (workdir / "learn" / "loss.png").stat().st_size > 0
    report = json.loads((workdir / "learn" / "checkpoint-200" / "eval.json").read_text())
    assert [row["scale"] for row in report["rows"]] == [1, 2, 4]
    assert len(report["images"]) == 2  # the held-out ones
    for row in report["rows"]:
        assert row["student_rel_mse"] < row["init_rel_mse"] / 10, row
    table = (workdir / "learn" / "checkpoint-200" / "eval.md").read_text()
    assert "| 4x | 256×256 | 32×32 |" in table


def test_resume_continues_exactly(jobs, workdir: Path) -> None:
    finished(jobs, "straight")
    finished(jobs, "resumed")
    straight, resumed = params(workdir / "straight", 4), params(workdir / "resumed", 4)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert (workdir / "straight" / "log.csv").read_text() == (workdir / "resumed" / "log.csv").read_text()
    state = torch.load(workdir / "resumed" / "checkpoint-2" / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["data_position"] == 8
    assert {"optimizer", "lr_scheduler", "grad_scaler", "rng"} <= state.keys()


def test_corrupt_image_is_skipped_and_counted(jobs, workdir: Path) -> None:
    finished(jobs, "straight")
    (done,) = jobs["straight"].result()
    assert "skipping unreadable image 'img03.png'" in done.stderr
    rows = read_log(workdir / "straight" / "log.csv")
    assert rows[-1]["skipped"] >= 1  # 4 steps x 4 samples = 2 epochs of 8 images: read at least once


def test_two_ranks_match_one_rank_with_twice_the_batch(jobs, workdir: Path) -> None:
    """2 gloo ranks x 2 samples vs 1 rank x 4. Adam divides by the gradient's size, so it magnifies float noise
    where a gradient is mathematically zero (q/k of layers that see one token at 64 px): hence the default lr and
    an absolute tolerance (measured: 3e-6)."""
    finished(jobs, "straight")
    finished(jobs, "two-ranks")
    one, two = params(workdir / "straight", 4), params(workdir / "two-ranks", 4)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
    rows_one, rows_two = read_log(workdir / "straight" / "log.csv"), read_log(workdir / "two-ranks" / "log.csv")
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a["skipped"] == b["skipped"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_checkpoint_loads_with_construct_for(jobs, workdir: Path) -> None:
    finished(jobs, "straight")
    pipe = build_pipeline("tiny-sd15", seed=0)
    folder = workdir / "straight" / "checkpoint-4" / "linfusion"
    linfusion = LinFusion.construct_for(pipe, pretrained_model_name_or_path=str(folder))
    mounted = [module for _, module in self_attention_layers(pipe.unet)]
    assert mounted == linfusion.layers
    saved = load_file(folder / WEIGHTS)
    assert all(torch.equal(value, linfusion.state_dict()[key]) for key, value in saved.items())
    out = pipe(prompt="x", height=64, width=64, num_inference_steps=1, output_type="latent").images
    assert torch.isfinite(out).all()


def test_bad_input_exits_2_with_one_line(jobs) -> None:
    (done,) = jobs["no-caption"].result()
    assert done.returncode == 2
    assert_one_error_line(done.stderr, "'img01.png'")


def assert_one_error_line(stderr: str, value: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if "torchvision" not in line]  # transformers' notice
    assert len(lines) == 1 and lines[0].startswith("error: ") and value in lines[0], stderr


BAD_INPUTS = [
    (["--data", "missing", "--out", "o"], "'missing'"),
    (["--data", "empty", "--out", "o"], "no images"),
    (["--data", "clean", "--out", "o", "--batch-size", "6", "--grad-accum", "4"], "--batch-size 8"),
    (["--data", "clean", "--out", "o", "--holdout", "10"], "--holdout 10"),
    (["--data", "clean", "--out", "o", "--resume", "latest"], "no checkpoint"),
    (["--data", "clean", "--out", "o", "--resolution", "60"], "--resolution 60"),
    (["--data", "clean", "--out", "o", "--lr", "0"], "--lr 0"),
    (["--data", "clean", "--out", "o", "--mixed-precision", "fp8"], "'fp8'"),
    (["--out", "o"], "--data"),
]


@pytest.mark.parametrize(("args", "value"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_train_input_in_process(args, value, workdir: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(workdir)
    (workdir / "empty").mkdir(exist_ok=True)
    assert cli.main(["train", "--preset", "tiny-sd15", *args]) == 2
    assert_one_error_line(capsys.readouterr().err, value)
    assert not (workdir / "o").exists()


def test_batch_must_divide_across_ranks(workdir: Path, monkeypatch, capsys) -> None:
    """Checked from torchrun's WORLD_SIZE before the process group starts."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert cli.main(["train", "--model", "tiny-sd15", "--data", "clean", "--out", "o", "--batch-size", "6"]) == 2
    assert_one_error_line(capsys.readouterr().err, "world size 4")


def test_other_bad_inputs(jobs, workdir: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(workdir)
    finished(jobs, "straight")
    cases = [
        (["train", "--data", "clean", "--out", "o"], "--preset"),
        (["train", "--preset", "tiny-sd15", "--data", "clean", "--out", "straight"], "--resume latest"),
        (["eval", "--checkpoint", "straight/checkpoint-4"], "--holdout 0"),
        (["eval", "--checkpoint", "nowhere"], "train_config.json"),
        (["cache", "--preset", "tiny-sd15", "--data", "no-caption", "--out", "c"], "'img01.png'"),
    ]
    for args, value in cases:
        assert cli.main(args) == 2, args
        assert_one_error_line(capsys.readouterr().err, value)


def test_captions_from_metadata_files(tmp_path: Path) -> None:
    for name, text in (
        ("metadata.jsonl", '{"file_name": "a.png", "text": "red"}\n'),
        ("metadata.csv", "file_name,text\na.png,red\n"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        Image.new("RGB", (8, 8)).save(folder / "a.png")
        (folder / name).write_text(text)
        source = open_source(folder)
        assert source.keys == ["a.png"] and source.caption(0) == "red"


def test_hf_dataset_folder(tmp_path: Path) -> None:
    import datasets

    images = [Image.new("RGB", (16, 12), (i * 40, 0, 0)) for i in range(3)]
    datasets.Dataset.from_dict(
        {"image": images, "text": ["a", "b", "c"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    ).save_to_disk(str(tmp_path / "hf"))
    source = open_source(tmp_path / "hf")
    assert source.keys == ["0", "1", "2"] and source.caption(2) == "c"
    assert source.open(1).size == (16, 12)


def test_batch_layout_shards_like_one_rank() -> None:
    """Every position of a global batch lands on exactly one rank and micro-batch, whatever the split."""
    one = BatchLayout(12, 1, 1).micro_batches(step=3, rank=0)
    for world, accum in ((2, 1), (3, 2), (2, 3)):
        layout = BatchLayout(12, accum, world)
        parts = [mb for rank in range(world) for mb in layout.micro_batches(3, rank)]
        assert all(len(mb) == layout.micro_batch for mb in parts)
        assert sorted(p for mb in parts for p in mb) == one[0]


def test_v_prediction_target() -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type="v_prediction")
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(diffusion_target("v_prediction", scheduler, x0, noise, t), expected)
    assert diffusion_target("epsilon", scheduler, x0, noise, t) is noise
