"""The high-resolution paths of generate.py: cascade presets end to end and the offline memory plan."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from distlin.cli.generate import main, parse
from distlin.errors import USAGE_EXIT_CODE, UsageError
from distlin.run import fit_to_device

PLAN_FIELDS = {"peak_bytes_per_rank", "ranks", "height", "width", "dtype", "breakdown"}


def test_cascade_preset_reaches_its_final_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c.png"
    assert main(["--preset", "tiny-sd15-cascade", "--steps", "3", "--output", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (384, 256)
    assert image.text["preset"] == "tiny-sd15-cascade"
    timings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stage ")]
    assert [line.split(":")[0] for line in timings] == [
        "stage 1/3 96×64 px, 3 steps",
        "stage 2/3 192×128 px, 1 step",
        "stage 3/3 384×256 px, 1 step",
    ]


def test_tiff_output_is_tiled_and_carries_the_metadata(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    out = tmp_path / "x.tiff"
    assert main(["--preset", "tiny-sd15", "--output", str(out)]) == 0
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert page.shape == (128, 192, 3) and page.is_tiled and tif.is_bigtiff
        assert json.loads(page.description)["preset"] == "tiny-sd15"


def test_plan_is_offline_and_writes_the_documented_fields(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "plan.json"
    args = ["--preset", "sd15", "--height", "16384", "--width", "16384", "--plan", "--plan-ranks", "8"]
    assert main([*args, "--plan-json", str(path)]) == 0
    plan = json.loads(path.read_text())
    assert PLAN_FIELDS <= plan.keys()
    assert (plan["ranks"], plan["height"], plan["width"], plan["dtype"]) == (8, 16384, 16384, "float16")
    assert plan["peak_bytes_per_rank"] == max(
        plan["breakdown"]["unet_activations"], plan["breakdown"]["vae_decode_activations"]
    ) + sum(
        v
        for k, v in plan["breakdown"].items()
        if k not in ("unet_activations", "vae_decode_activations", "vae_host_ram_not_on_device")
    )
    assert "predicted peak per rank" in capsys.readouterr().out


def test_micro_batch_flag_halves_the_planned_unet_activations(tmp_path: Path) -> None:
    args = ["--preset", "sd15-16k-square", "--plan", "--plan-ranks", "1"]
    plans = []
    for extra in ([], ["--micro-batch", "1"]):
        path = tmp_path / f"plan{len(extra)}.json"
        assert main([*args, *extra, "--plan-json", str(path)]) == 0
        plans.append(json.loads(path.read_text()))
    stacked, halves = (p["breakdown"]["unet_activations"] for p in plans)
    assert 2 * halves == stacked and plans[1]["micro_batch"] == 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--preset", "tiny-sd15-cascade", "--height", "200"], "multiple of 8"),
        (["--preset", "tiny-sd15-cascade", "--height", "264"], "multiples of 32 for a 3-stage cascade"),
        (["--preset", "tiny-sd15-cascade", "--steps", "2"], "pass --steps 3 or more"),
        (["--preset", "tiny-sd15", "--plan", "--plan-ranks", "0"], "--plan-ranks 0"),
        (["--preset", "tiny-sd15", "--micro-batch", "0"], "micro_batch 0"),
        (["--preset", "tiny-sd15", "--vae-attention-rows", "0"], "VAE attention rows 0"),
        (["--preset", "tiny-sd15", "--model", "stabilityai/some-unknown-model", "--plan"], "no offline architecture"),
    ],
)
def test_bad_high_resolution_input_is_one_line_and_exit_2(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "x.png"
    assert main([*args, "--output", str(out)]) == USAGE_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


class _GpuRuntime:
    """Just what the device-fit check reads of a runtime: a CUDA device, the rank count."""

    device = torch.device("cuda", 0)
    is_main = True

    def __init__(self, world_size: int):
        self.world_size = world_size


@pytest.mark.parametrize(
    ("ranks", "gib", "outcome"),
    [
        (1, 80, (None, "auto", None)),  # 62 GiB planned: fits as it is
        (1, 40, (1, "auto", None)),  # the guidance halves one after the other: 32 GiB
        (8, 10, (1, "sequential", 64)),  # rank 0's VAE decode streams 8 GiB of mid-block keys/values instead
        (1, 20, "at least 3 ranks with --micro-batch 1 --vae-decode sequential --vae-attention-rows 64"),
    ],
)
def test_a_run_is_fitted_to_the_gpu_or_refused(
    monkeypatch: pytest.MonkeyPatch, ranks: int, gib: float, outcome: object
) -> None:
    """SD-1.5 at 16384² with CFG: memory savers switch on until the plan fits, else one line says what would."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(total_memory=gib * 2**30))
    settings = parse(["--preset", "sd15-16k-square"])[1]
    if isinstance(outcome, str):
        with pytest.raises(UsageError, match=outcome):
            fit_to_device(settings, _GpuRuntime(ranks))
    else:
        fitted = fit_to_device(settings, _GpuRuntime(ranks))
        assert (fitted.engine.micro_batch, fitted.vae_decode, fitted.vae_attention_rows) == outcome


def test_a_kept_pipeline_is_not_counted_twice_against_the_machines_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    """A web app keeps its pipeline between requests: the machine's free RAM no longer includes those weights while
    the plan does, so a second request that fits once they are counted as available is run, not refused."""
    from distlin.memory.fit import plan_run
    from distlin.parallel.runtime import Runtime
    from distlin.run import fitted_settings, generate, held_bytes, prepare_pipeline

    settings = parse(["--preset", "tiny-sd15", "--device", "cpu"])[1]
    runtime = Runtime(device=torch.device("cpu"))
    prepared = prepare_pipeline(settings, runtime)
    needed, held = plan_run(settings, 1)["peak_bytes_per_rank"], held_bytes(prepared, 1)
    assert 0 < held < needed
    # what the machine shows with the pipeline loaded: enough once its weights count as available, not without
    monkeypatch.setattr("distlin.memory.fit.available_host_memory", lambda: needed - held // 2)
    with pytest.raises(UsageError, match="on the CPU needs a predicted"):
        fitted_settings(settings, runtime)
    assert fitted_settings(settings, runtime, held=prepared) == settings
    assert generate(settings, runtime, prepared).image.size == (192, 128)
