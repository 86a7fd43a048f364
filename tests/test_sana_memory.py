"""SANA's memory formula (the family's ``plan``) against meta-tensor measurements of the real modules, and
``--plan`` and the automatic fit for SANA models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from distlin.cli.generate import main
from distlin.errors import UsageError
from distlin.families.sana.family import architecture
from distlin.families.sana.memory import (
    activation_elements,
    band_decode_pixels,
    decode_elements,
    measured_activation_peak,
    measured_band_decode_peak,
    measured_decode_peak,
)
from distlin.memory.fit import fit_to_capacity, plan_run, saver_flags
from distlin.settings import build_settings

SANA_4K = "Efficient-Large-Model/Sana_1600M_4Kpx_BF16_diffusers"


@pytest.mark.parametrize(
    ("rows", "cols", "batch", "dtype"),
    [(32, 32, 2, torch.bfloat16), (48, 32, 1, torch.float32)],  # a band: 48 token rows of a 32-wide grid
)
def test_sana_1600m_transformer_activations_within_20_percent(rows: int, cols: int, batch: int, dtype) -> None:
    transformer = architecture(SANA_4K)["transformer"]
    measured = measured_activation_peak(transformer, rows, cols, batch, dtype)
    predicted = activation_elements(transformer, rows * cols, batch) * dtype.itemsize
    assert abs(predicted / measured - 1) <= 0.2, (predicted, measured)


@pytest.mark.parametrize(("rows", "cols", "dtype"), [(8, 8, torch.bfloat16), (6, 8, torch.float32)])
def test_sana_dc_ae_decode_within_20_percent(rows: int, cols: int, dtype) -> None:
    vae = architecture(SANA_4K)["vae"]
    measured = measured_decode_peak(vae, rows, cols, dtype)
    predicted = decode_elements(vae, rows * cols * 32**2, dtype.itemsize) * dtype.itemsize
    assert abs(predicted / measured - 1) <= 0.2, (predicted, measured)


@pytest.mark.parametrize(("rows", "band_rows", "dtype"), [(64, 16, torch.bfloat16), (96, 8, torch.float32)])
def test_sana_dc_ae_band_by_band_within_20_percent(rows: int, band_rows: int, dtype) -> None:
    """Above the size threshold a band's peak is its rows plus the margins its last level still carries."""
    vae = architecture(SANA_4K)["vae"]
    measured = measured_band_decode_peak(vae, rows, 8, band_rows, dtype)
    predicted = decode_elements(vae, band_decode_pixels(vae, band_rows, 8 * 32), dtype.itemsize) * dtype.itemsize
    assert abs(predicted / measured - 1) <= 0.2, (predicted, measured)


def test_above_the_threshold_the_planned_dc_ae_peak_does_not_grow_with_the_height() -> None:
    plans = [
        plan_run(build_settings("sana-4k", {"height": side, "vae_decode": "sequential"}, 1), 1) for side in (4096, 8192)
    ]
    assert plans[0]["vae"] == "sequential" and plans[0]["vae_store"] == "host"
    assert plans[0]["breakdown"]["vae_decode_activations"] == plans[1]["breakdown"]["vae_decode_activations"]
    assert plans[1]["breakdown"]["vae_host_ram_not_on_device"] == 3 * 8192 * 4096 * 2


def test_plan_for_sana_shrinks_with_ranks_and_names_its_parts(tmp_path: Path, capsys) -> None:
    path = tmp_path / "plan.json"
    argv = ["--preset", "sana-4k", "--vae-decode", "direct", "--plan", "--plan-ranks", "8", "--plan-json", str(path)]
    assert main(argv) == 0
    eight = json.loads(path.read_text())
    assert "predicted peak per rank" in capsys.readouterr().out
    one = plan_run(build_settings("sana-4k", {"vae_decode": "direct"}, 1), 1)
    assert eight["peak_bytes_per_rank"] < one["peak_bytes_per_rank"]
    assert (one["vae"], eight["vae"]) == ("plain", "banded")
    assert {"weights_transformer", "weights_text_encoder", "transformer_activations"} <= eight["breakdown"].keys()
    # the guidance halves on two groups of 4 ranks: one sample over a quarter of the tokens each
    ratio = one["breakdown"]["transformer_activations"] / eight["breakdown"]["transformer_activations"]
    assert ratio == 8
    assert one["breakdown"]["vae_decode_activations"] == 8 * eight["breakdown"]["vae_decode_activations"]


def test_the_fit_refuses_a_sana_run_too_large_for_the_device_naming_a_rank_count() -> None:
    settings = build_settings("sana-4k", {"vae_decode": "direct"}, 1)
    peak = plan_run(settings, 1)["peak_bytes_per_rank"]
    fitted = fit_to_capacity(settings, 1, peak, "cuda:0")
    assert replace(fitted, vae_store=settings.vae_store) == settings  # it fits: no saver switched on
    with pytest.raises(UsageError, match=r"use at least \d+ ranks"):
        fit_to_capacity(settings, 1, peak // 2, "cuda:0")


def test_a_sana_run_that_does_not_fit_is_fitted_and_advised_with_savers_sana_has_only() -> None:
    """The AutoencoderKL's ``--vae-attention-rows`` has nothing to stream in a DC-AE: never switched on, never
    named."""
    settings = build_settings("sana-4k", {"vae_decode": "direct"}, 1)
    peak = plan_run(settings, 1)["peak_bytes_per_rank"]
    with pytest.raises(UsageError, match=r"use at least 4 ranks with --micro-batch 1 \(see --plan\)$"):
        fit_to_capacity(settings, 1, peak // 2, "cuda:0")
    one_k = build_settings("sana-1k", {}, 1)
    fitted = fit_to_capacity(one_k, 1, plan_run(one_k, 1)["peak_bytes_per_rank"] - 1, "cuda:0")
    assert saver_flags(one_k, fitted) == "--micro-batch 1 --vae-decode sequential"


@pytest.mark.parametrize(("ranks", "path"), [(1, "sequential"), (8, "banded")])
def test_auto_decodes_sana_4k_the_way_that_holds_less_and_the_run_agrees(ranks: int, path: str) -> None:
    """Above the size threshold, band by band on rank 0 recomputes its neighbours' rows: 20 latent rows at once
    for SANA-1600M, more than the 16 a rank decodes band-parallel at 4096² on 8 ranks, so ``auto`` keeps that
    decode there; the planner and the run's coder take the same rule (``sequential_holds_less``)."""
    from types import SimpleNamespace

    from distlin.families import FAMILIES, load
    from distlin.parallel.runtime import Runtime
    from distlin.vae.coders import run_coder

    plans = {
        vae_decode: plan_run(build_settings("sana-4k", {"vae_decode": vae_decode}, ranks), ranks)
        for vae_decode in ("auto", "direct", "sequential")
    }
    assert plans["auto"]["vae"] == path
    assert plans["auto"]["peak_bytes_per_rank"] == min(plan["peak_bytes_per_rank"] for plan in plans.values())
    sana = FAMILIES["sana"]
    vae = SimpleNamespace(config=architecture(SANA_4K)["vae"])
    coder = run_coder(
        vae,
        direct=None,
        runtime=Runtime(world_size=ranks),
        factor=32,
        sequential_coder=lambda *args: object(),  # not built: only the choice is asked
        holds_less=load(sana.sequential_holds_less),
    )
    assert coder.is_sequential(4096, 4096) is (path == "sequential")
    if ranks == 1:  # more ranks do not shrink a band-by-band pass, but the band-parallel decode on 8 fits
        capacity = (
            plans["auto"]["peak_bytes_per_rank"] + plan_run(build_settings("sana-4k", {}, 8), 8)["peak_bytes_per_rank"]
        ) // 2
        with pytest.raises(UsageError, match="use at least 8 ranks"):
            fit_to_capacity(build_settings("sana-4k", {}, 1), 1, capacity, "cuda:0")
