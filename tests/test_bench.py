"""Benchmark suites at tiny sizes: each writes its three files with the documented fields; the dry-run byte
counts the projections rely on equal the real engine's counters on 2 gloo ranks. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from distlin.bench.accounting import LayerShapes, distrifusion_bytes, dry_run, layer_shapes
from distlin.bench.cli import main
from distlin.bench.models import build
from distlin.parallel import PatchParallelConfig
from distlin.parallel.config import STALE_KINDS
from distlin.vae.coders import SizedCoder

KINDS = {"attention", "halo", "groupnorm", "gather", "total"}
ENV_KEYS = {"device", "dtype", "torch", "threads", "date", "command"}
TINY = {"model": "tiny-sd15", "height": 128, "width": 128}


@pytest.fixture(autouse=True)
def keep_thread_count() -> Iterator[None]:
    """The CLI sets torch's thread count for the process; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@dataclass
class Launch:
    """A worker launch in the background and the result file its rank 0 writes."""

    process: subprocess.Popen[str]
    result: Path


@pytest.fixture(scope="module")
def softmax_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launch]:
    """The softmax path on 2 gloo ranks, started first so it overlaps the in-process tests."""
    result = tmp_path_factory.mktemp("softmax") / "ranks-2.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "distlin.bench.worker", "--model", TINY["model"], "--height", str(TINY["height"]),
        "--width", str(TINY["width"]), "--attention", "softmax", "--modes", "exact", "--steps", "1",
        "--result", str(result),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    launch = Launch(
        subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), result
    )
    yield launch
    if launch.process.poll() is None:
        launch.process.kill()
    launch.process.communicate()


def run_suite(tmp_path: Path, suite: str, *args: str) -> list[dict[str, Any]]:
    """Run ``launch/bench.py SUITE --quick ...`` in-process; check the three files and the environment fields."""
    out = tmp_path / "out"
    assert main([suite, "--quick", "--out", str(out), *args]) == 0
    records = json.loads((out / f"{suite}.json").read_text())
    assert isinstance(records, list) and records
    for record in records:
        assert ENV_KEYS <= record["env"].keys()
        assert record["env"]["command"].startswith(f"launch/bench.py {suite} --quick")
    markdown = (out / f"{suite}.md").read_text()
    assert "command: launch/bench.py" in markdown and "|---|" in markdown
    assert (out / f"{suite}.png").read_bytes().startswith(b"\x89PNG")
    return records


def test_attention_suite(tmp_path: Path) -> None:
    records = run_suite(tmp_path, "attention", "--tokens", "64,256", "--channels", "64", "--repeats", "1")
    assert {r["impl"] for r in records} == {"linear", "sdpa"}
    assert {r["tokens"] for r in records} == {64, 256}
    for r in records:
        assert r["channels"] == 64 and r["ms"] > 0 and r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert "peak_mb" in r


def test_unet_suite(tmp_path: Path) -> None:
    records = run_suite(tmp_path, "unet", "--models", "tiny-sd15", "--height", "64", "--repeats", "1")
    assert {r["attention"] for r in records} == {"linear", "softmax"}
    for r in records:
        assert r["model"] == "tiny-sd15" and r["tflop"] > 0 and r["achieved_tflop_s"] > 0
        assert 0 < r["utilisation"] and r["peak_tflop_s"] > 0


def test_project_suite(tmp_path: Path) -> None:
    records = run_suite(
        tmp_path, "project", "--model", TINY["model"], "--height", str(TINY["height"]), "--ranks", "1,2",
        "--link", "nvlink",
    )  # fmt: skip
    assert "PROJECTION" in (tmp_path / "out" / "project.md").read_text()
    assert {(r["ranks"], r["mode"]) for r in records} == {(n, m) for n in (1, 2) for m in ("exact", "displaced")}
    for r in records:
        assert r["projection"] is True and r["link"] == "nvlink"
        assert KINDS == r["bytes_per_step"].keys() == r["distrifusion_bytes_per_step"].keys()
        assert r["compute_ms_per_step"] > 0 and r["projected_ms_per_step"] >= r["compute_ms_per_step"]
        assert 0 < r["efficiency"] <= 1.0 + 1e-9
    two = next(r for r in records if r["ranks"] == 2)
    assert 0 < two["bytes_per_step"]["total"] < two["distrifusion_bytes_per_step"]["total"]


def test_cascade_suite_times_the_runs_cascade(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each stage is timed as a run samples it: every later stage starts by decoding the previous stage's latents
    with the run's VAE coder (:func:`distlin.run.vae_coder`), and that decode is the stage's decode time."""
    decoded: list[tuple[int, ...]] = []
    real_decode = SizedCoder.decode

    def decode(coder: SizedCoder, latents: torch.Tensor) -> torch.Tensor:
        decoded.append(tuple(latents.shape[-2:]))
        return real_decode(coder, latents)

    monkeypatch.setattr(SizedCoder, "decode", decode)
    records = run_suite(tmp_path, "cascade")  # the tiny-sd15-cascade preset: 64x96 -> 128x192 -> 256x384
    assert decoded == [(8, 12), (16, 24)] * 2  # latents of stages 0 and 1; a warm-up cascade, then a timed one
    assert [(r["stage"], r["height"], r["width"]) for r in records] == [(0, 64, 96), (1, 128, 192), (2, 256, 384)]
    for r in records:
        assert r["unet_calls"] > 0 and r["ms"] >= r["unet_ms"] > 0
        assert (r["decode_ms"] > 0) == (r["stage"] > 0)


def test_scaling_suite_and_dry_run_equals_real_counters(tmp_path: Path, softmax_worker: Launch) -> None:
    """Every stale set is timed beside exact, interleaved over rounds, and reports what it hides: exactly the
    bytes of its stale kinds. The spawned 2-rank run's counters (rank 1) are what the dry run on meta counts."""
    records = run_suite(
        tmp_path, "scaling", "--ranks", "1,2", "--modes", "exact,displaced", "--stale-sets", "attention,all",
        "--steps", "1", "--rounds", "2",
    )  # fmt: skip
    settings = {(r["ranks"], r["setting"]) for r in records}
    assert settings == {(1, "exact"), (2, "exact"), (2, "displaced attention"), (2, "displaced all")}
    for r in records:
        assert {"model", "height", "width", "ranks", "mode", "ms_per_step", "speedup", "efficiency"} <= r.keys()
        assert KINDS == r["bytes_per_step"].keys() == r["distrifusion_bytes_per_step"].keys()
        assert KINDS == r["hidden_bytes_per_step"].keys() == r["wait_ms_per_step"].keys()
        assert KINDS == r["launch_ms_per_step"].keys()
        assert (r["launch_ms_per_step"]["total"] > 0) == (r["ranks"] > 1)  # where the time goes: launch, then wait
        assert r["rounds"] == 2 and r["steps"] == 2 and r["vs_exact"] > 0
        assert r["comm_cpu_ms_per_step"] is not None and r["comm_cpu_ms_per_step"] <= r["cpu_ms_per_step"]
        assert r["cpu_speedup"] > 0 and r["cpu_vs_exact"] > 0  # the ratios in CPU time, robust to a shared machine
        hidden = {k for k in STALE_KINDS if r["hidden_bytes_per_step"][k]}
        assert hidden == set(r["stale"] or ()) and r["hidden_bytes_per_step"]["gather"] == 0
        for kind in hidden:
            assert r["hidden_bytes_per_step"][kind] == r["bytes_per_step"][kind]
    assert "displaced all on 2 ranks" not in (tmp_path / "out" / "scaling.md").read_text()  # targets: 1024² only
    meta = build(TINY["model"], "linear", "meta")
    dry = dry_run(meta, TINY["height"], TINY["width"], 2)
    for r in records:
        if r["ranks"] == 2:
            assert r["bytes_per_step"] == dry.bytes_per_step
            assert r["calls_per_step"] == dry.calls_per_step
    displaced = PatchParallelConfig(mode="displaced", warmup_steps=1, cfg_parallel=False)
    assert dry_run(meta, TINY["height"], TINY["width"], 2, config=displaced, steps=2) == dry

    output, _ = softmax_worker.process.communicate(timeout=300)
    assert softmax_worker.process.returncode == 0, output
    real = json.loads(softmax_worker.result.read_text())["modes"]["exact"]["counters_by_rank"][1]
    dry = dry_run(build(TINY["model"], "softmax", "meta"), TINY["height"], TINY["width"], 2)
    assert real["bytes_per_step"] == dry.bytes_per_step and real["calls_per_step"] == dry.calls_per_step
    assert dry.bytes_per_step["attention"] > 0


def test_distrifusion_volume_follows_its_scheme() -> None:
    """One of each exchange, 4 ranks, 2-byte elements: all-gathers deliver the other 3 ranks' pieces."""
    shapes = LayerShapes(attention=[(2, 64, 32)], halo=[(2, 16, 1, 8)], groupnorm=[(2, 4)], output=(2, 4, 8, 8))
    got = distrifusion_bytes(shapes, ranks=4, element_size=2)
    expected = {
        "attention": 3 * 2 * 16 * 2 * 32 * 2,  # K and V of a quarter of the tokens
        "halo": 3 * 2 * 16 * 2 * 1 * 8 * 2,  # one boundary row at each end of a band
        "groupnorm": 3 * 2 * 2 * 4 * 2,  # E[x] and E[x^2] per group
        "gather": 3 * 2 * 4 * 2 * 8 * 2,  # a quarter of the output rows
    }
    assert got == {**expected, "total": sum(expected.values())}


def test_distrifusion_volume_matches_its_published_figure() -> None:
    """SDXL at 1024², 8 GPUs with the CFG batch split (batch 1 per image), fp16: the DistriFusion paper reports
    0.42 GB of communication per step (/work/shared/ANCHORS.md)."""
    shapes = layer_shapes(build("sdxl", "softmax", "meta", torch.float16), 1024, 1024, batch=1)
    total = distrifusion_bytes(shapes, ranks=8, element_size=2)["total"]
    assert abs(total / 0.42e9 - 1) < 0.02


def test_memory_suite(tmp_path: Path) -> None:
    records = run_suite(tmp_path, "memory", "--sizes", "512,1024x256", "--ranks", "1,2")
    table = (tmp_path / "out" / "memory.md").read_text()
    assert "PREDICTION" in table
    assert "| 1024×256 |" in table and "(w×h)" in table  # sizes written width first, as typed
    assert {(r["height"], r["width"], r["ranks"], r["config"]) for r in records} == {
        (h, w, n, c) for h, w in ((512, 512), (256, 1024)) for n in (1, 2) for c in ("default", "lowmem")
    }
    for r in records:
        assert r["prediction"] is True and r["peak_bytes_per_rank"] > r["unet_activations"] > 0
        if r["ranks"] == 2 and r["config"] == "lowmem":  # half the image and one guidance half per rank
            one = next(o for o in records if (o["height"], o["ranks"], o["config"]) == (r["height"], 1, "default"))
            assert r["unet_activations"] < one["unet_activations"] / 2
    ratios = [r["unet_predicted_over_measured"] for r in records if r["unet_predicted_over_measured"] is not None]
    assert len(ratios) == 2 and all(abs(x - 1) <= 0.2 for x in ratios)  # traced on meta at both sizes


def test_gpu_suite_end_to_end_part_measures_the_cli_generation(tmp_path: Path) -> None:
    """The gpu suite's end-to-end part runs the command line's own generation and records every stage, the
    decode and the planner's prediction for the settings it ran with (device memory only on CUDA)."""
    from distlin.bench.gpu import generation_markdown, measure_generation

    record = measure_generation("tiny-sd15-cascade", {"steps": 3}, torch.device("cpu"))
    assert list(record["part_seconds"]) == ["stage 1", "stage 2", "stage 3", "decode"]
    assert record["seconds"] >= sum(record["part_seconds"].values()) > 0
    assert record["planned_gib"] > 0 and record["host_rss_gib"] > 0 and record["peak_gib"] is None
    assert "stage 3" in generation_markdown(record)


def test_gpu_suite_sana_part_runs_sana_end_to_end() -> None:
    """The gpu suite's SANA part (full-sana at 4096x4096 on a GPU) runs the command line's generation; here
    tiny-sana on the CPU."""
    from distlin.bench.gpu import measure_sana, sana_markdown

    record = measure_sana("tiny-sana", "tiny-sana", "96x64", torch.device("cpu"))
    assert record["section"] == "sana" and (record["width"], record["height"]) == (96, 64)
    assert record["planned_gib"] > 0 and record["seconds"] >= sum(record["part_seconds"].values()) > 0
    assert "SANA end to end" in sana_markdown(record)


def test_fidelity_suite(tmp_path: Path) -> None:
    """Every displaced setting measured against one process; exact at round-off, the default closer than all-stale."""
    records = run_suite(tmp_path, "fidelity")
    by_setting = {(r["mode"], tuple(r["stale"])): r for r in records if r["ranks"] == 2}
    exact, naive = by_setting[("exact", ())], by_setting[("naive", ())]
    default = by_setting[("displaced", ("attention",))]
    everything = by_setting[("displaced", ("attention", "groupnorm", "halo"))]
    assert exact["psnr_db"] is None or exact["psnr_db"] > 100
    assert naive["psnr_db"] < everything["psnr_db"] < default["psnr_db"]
    assert all(0 < r["projected_efficiency"] <= 1 + 1e-9 for r in (exact, default, everything))


def test_gpu_suite_compile_and_vae_parts_run_on_cpu() -> None:
    """The gpu suite's ``--compile`` and channels_last comparisons and sequential-VAE transfer rate, at tiny size
    on the CPU (``aot_eager``: inductor's code generation is minutes on 2 cores; on a GPU the suite uses inductor)."""
    from distlin.bench.gpu import compile_vae_markdown, measure_compile, measure_memory_format, measure_sequential_vae

    cpu = torch.device("cpu")
    compiled = measure_compile("tiny-sd15", 128, cpu, torch.float32, repeats=1, backend="aot_eager")
    assert compiled["modules"] > 0 and compiled["eager_ms"] > 0 and compiled["compiled_ms"] > 0
    assert compiled["max_rel_error"] <= 1e-5
    vae = measure_sequential_vae("tiny-sd15", 128, 4, cpu, torch.float32)
    assert vae["gb_moved"] > 0 and vae["gb_s"] == pytest.approx(vae["gb_moved"] / vae["seconds"])
    layout = measure_memory_format("tiny-sd15", 128, cpu, torch.float32, repeats=1)
    assert layout["nchw_ms"] > 0 and layout["channels_last_ms"] > 0 and layout["max_rel_error"] <= 1e-5
    text = compile_vae_markdown([compiled, layout, vae])
    assert "`--compile`" in text and "channels_last" in text and "GB/s" in text


def test_gpu_suite_keeps_measuring_after_a_part_fails(tmp_path: Path) -> None:
    """A GPU is lent for minutes: a part that fails is one line in ``gpu.md`` and the next part still runs, and
    the suite's JSON holds what was measured so far after every part (what a run stopped at its limit leaves)."""
    from argparse import Namespace

    from distlin.bench.gpu import markdown, run_parts

    checkpoint = tmp_path / "gpu.json"
    vae: dict[str, Any] = {"section": "vae", "model": "full-sd15", "width": 4096, "height": 4096, "band_rows": 64}
    vae |= {"gb_moved": 96.0, "seconds": 12.0, "gb_s": 8.0}
    on_disk: list[Any] = []

    def failing() -> list[dict[str, Any]]:
        on_disk.append(json.loads(checkpoint.read_text()))
        raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore detail")

    records = run_parts({"vae": lambda: [vae], "generation": failing, "compile": lambda: []}, checkpoint)
    assert on_disk == [[vae]]
    assert [r["section"] for r in records] == ["vae", "error"]
    assert json.loads(checkpoint.read_text()) == records
    text = markdown(records, Namespace())
    assert "(8 GB/s)" in text
    assert "- generation: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB\n" in text
    assert "more detail" not in text and text.rstrip().endswith("were not part of this run")


def test_gpu_suite_unet_part_measures_the_unet_as_a_run_makes_it_and_survives_a_failing_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The unet part runs the UNet prepared by :func:`distlin.run.prepare_pipeline`, as generate does (memory bounds
    with the run's thresholds: at 16384² a plain UNet's upsampling exceeds a CUDA kernel's index limit); a size that
    still fails is one skipped row naming the error, and the other sizes are measured (here on CPU, CUDA's memory
    calls stubbed)."""
    from argparse import Namespace

    import distlin.run
    from distlin.bench import gpu

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**40, 2**40))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 2**30)
    monkeypatch.setattr(gpu, "device_peak", lambda device, dtype: (1e12, "a test peak"))
    monkeypatch.setenv("DISTLIN_TOKEN_CHUNK", "16")
    bounded: list[int] = []
    real_bound = distlin.run.bound_memory
    monkeypatch.setattr(
        distlin.run, "bound_memory", lambda m, chunk, limit: [bounded.append(chunk), real_bound(m, chunk, limit)]
    )
    real_count = gpu.count_flops

    def count_flops(meta: Any, height: int, width: int, batch: int) -> float:
        if height == 256:
            raise RuntimeError("upsample_nearest2d: output exceeds INT_MAX\nmore detail")
        return real_count(meta, height, width, batch)

    monkeypatch.setattr(gpu, "count_flops", count_flops)
    args = Namespace(model="tiny-sd15", sizes=[256, 128, 192], warmup=1, repeats=1)
    records = gpu.measure_unet(args, torch.device("cpu"), torch.float32)
    assert bounded == [16, 16]  # the UNet and the VAE, with the run's token chunk
    assert [(r["height"], r["batch"]) for r in records] == [(128, 2), (192, 2), (256, 2)]
    assert all(r["ms"] > 0 and r["utilisation"] > 0 and r["skipped"] is None for r in records[:2])
    skipped = records[2]["skipped"]
    assert skipped.startswith("RuntimeError at batch 2 (planned ") and skipped.endswith("exceeds INT_MAX")


def test_sana_suite_counts_one_state_per_layer_whatever_the_size(tmp_path: Path) -> None:
    """SANA-1600M on meta tensors: the attention bytes per step are 20 layers x B·h·(d+1)·d float32 at every size,
    and far below Ulysses' all-to-alls."""
    records = run_suite(tmp_path, "sana", "--height", "1024,2048", "--ranks", "8")
    assert [r["engine"]["attention"] for r in records] == [20 * 2 * 70 * 33 * 32 * 4] * 2
    assert all(r["engine"]["total"] < r["ulysses_total"] for r in records)
