"""The memory planner's predictions against meta-tensor measurements of the real UNet call."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionModelWithProjection

from distlin.errors import UsageError
from distlin.memory import format_plan, plan, ranks_needed
from distlin.memory.fit import fit_to_capacity, plan_run
from distlin.memory.measure import measured_unet_activation_peak
from distlin.memory.planner import controlnet_residual_elements, unet_activation_elements
from distlin.models.tiny import build_controlnet, build_ip_adapter, load_architecture
from distlin.settings import DTYPE_BYTES as DTYPES
from distlin.settings import build_settings


@pytest.mark.parametrize(
    ("name", "rows", "cols", "batch", "dtype"),
    [
        ("full-sd15", 64, 64, 2, "float16"),
        ("full-sd15", 64, 64, 1, "float16"),  # one guidance half at a time (micro_batch=1)
        ("full-sd15", 32, 128, 1, "float32"),  # a band: 32 rows of a 128-wide latent
        ("full-sd21", 48, 64, 2, "float16"),
    ],
)
def test_unet_activation_prediction_within_20_percent(name: str, rows: int, cols: int, batch: int, dtype: str) -> None:
    measured = measured_unet_activation_peak(name, rows, cols, batch, getattr(torch, dtype))
    predicted = unet_activation_elements(load_architecture(name)["unet"], rows * cols, batch) * DTYPES[dtype]
    assert abs(predicted / measured - 1) <= 0.2


@pytest.mark.parametrize(
    ("name", "rows", "cols", "batch", "chunk"), [("full-sd15", 64, 64, 2, 512), ("full-sdxl", 128, 128, 1, 1024)]
)
def test_bounded_memory_prediction_within_20_percent(name: str, rows: int, cols: int, batch: int, chunk: int) -> None:
    """generate.py's bound_memory (token-chunked transformers, in-place resnet activations): the peak moves to an
    up-block resnet and shrinks; the planner follows it."""
    unet = load_architecture(name)["unet"]
    bounded = measured_unet_activation_peak(name, rows, cols, batch, torch.float16, ff_chunk=chunk)
    predicted = unet_activation_elements(unet, rows * cols, batch, ff_chunk=chunk) * 2
    assert abs(predicted / bounded - 1) <= 0.2
    assert bounded < measured_unet_activation_peak(name, rows, cols, batch, torch.float16)


@pytest.mark.parametrize(
    ("name", "rows", "cols", "batch", "residual_batch"),
    [
        ("full-sd15", 64, 64, 2, 2),
        ("full-sdxl", 64, 64, 1, 1),
        ("full-sd15", 64, 64, 1, 2),  # micro_batch=1: each call takes its half of both halves' residuals
    ],
)
def test_controlnet_residuals_prediction_within_20_percent(
    name: str, rows: int, cols: int, batch: int, residual_batch: int
) -> None:
    """A ControlNet runs before the UNet call and its residuals live through it: the planner adds them, for
    every sample of the guidance batch."""
    unet = load_architecture(name)["unet"]
    measured = measured_unet_activation_peak(
        name, rows, cols, batch, torch.float16, controlnet=True, residual_batch=residual_batch
    )
    tokens = rows * cols
    residuals = controlnet_residual_elements(unet, tokens, residual_batch)
    predicted = unet_activation_elements(unet, tokens, batch) + residuals
    assert abs(predicted * 2 / measured - 1) <= 0.2, (predicted * 2, measured)
    assert measured > measured_unet_activation_peak(name, rows, cols, batch, torch.float16)


def test_planned_controlnet_residuals_are_the_guidance_batchs_with_micro_batches() -> None:
    """Micro-batches halve the UNet call's activations but not the residuals computed before it."""
    whole, halves = (plan("full-sd15", 4096, 4096, 1, controlnets=1, micro_batch=m) for m in (None, 1))
    plain = plan("full-sd15", 4096, 4096, 1, micro_batch=1)
    unet = load_architecture("full-sd15")["unet"]
    residuals = controlnet_residual_elements(unet, 512 * 512, 2) * 2
    assert halves["breakdown"]["unet_activations"] == plain["breakdown"]["unet_activations"] + residuals
    assert halves["breakdown"]["unet_activations"] < whole["breakdown"]["unet_activations"]


def test_plan_shrinks_with_ranks_and_reports_breakdown() -> None:
    one = plan("full-sd15", 16384, 8192, 1)
    eight = plan("full-sd15", 16384, 8192, 8)
    assert eight["peak_bytes_per_rank"] < one["peak_bytes_per_rank"]
    assert eight["cfg_parallel"] and eight["breakdown"]["unet_activations"] * 7 < one["breakdown"]["unet_activations"]
    assert {"ranks", "height", "width", "dtype", "breakdown"} <= set(one)
    assert "GiB" in format_plan(one)


def test_micro_batch_of_one_halves_the_unet_activations() -> None:
    stacked = plan("full-sd15", 16384, 16384, 1, cfg=True)
    halves = plan("full-sd15", 16384, 16384, 1, cfg=True, micro_batch=1)
    assert 2 * halves["breakdown"]["unet_activations"] == stacked["breakdown"]["unet_activations"]
    assert halves["peak_bytes_per_rank"] < stacked["peak_bytes_per_rank"]
    with pytest.raises(UsageError, match="micro_batch 0"):
        plan("full-sd15", 1024, 1024, micro_batch=0)


def test_ranks_needed_and_bad_input() -> None:
    need = ranks_needed(80 * 2**30, "full-sd15", 4096, 4096)
    assert plan("full-sd15", 4096, 4096, need)["peak_bytes_per_rank"] <= 80 * 2**30
    with pytest.raises(UsageError):
        plan("full-sd15", 1000, 1001)
    with pytest.raises(UsageError):
        ranks_needed(2**20, "full-sd15", 16384, 16384)


def test_a_runs_own_controlnets_and_ip_adapter_count_in_the_plan(tmp_path) -> None:
    """Their weights sit on every rank beside the model's: the plan counts each parameter, read offline from
    their configs and the IP-Adapter file's header."""
    build_controlnet("tiny-sd15").save_pretrained(tmp_path / "cn")
    build_controlnet("tiny-sd15", seed=1).save_pretrained(tmp_path / "cn-2")
    weights = build_ip_adapter("tiny-sd15", tmp_path / "h94")
    Image.new("RGB", (64, 128)).save(tmp_path / "c.png")
    pictures = {"control_image": [str(tmp_path / "c.png")] * 2, "ip_image": str(tmp_path / "c.png")}
    overrides = {"height": 128, "width": 64, "controlnet": [str(tmp_path / "cn"), str(tmp_path / "cn-2")]}
    overrides.update(pictures, ip_adapter=str(tmp_path / "h94"))
    plain = plan_run(build_settings("tiny-sd15", {"height": 128, "width": 64}, 1), 1)
    result = plan_run(build_settings("tiny-sd15", overrides, 1), 1)
    size = 4  # tiny-sd15 runs in float32

    def count(model) -> int:
        return sum(p.numel() for p in model.parameters()) * size

    encoder = CLIPVisionModelWithProjection.from_pretrained(weights.parent / "image_encoder")
    expected = {
        "weights_controlnet": count(build_controlnet("tiny-sd15")),
        "weights_controlnet1": count(build_controlnet("tiny-sd15", seed=1)),
        "weights_ip_image_encoder": count(encoder),
        "weights_ip_adapter": sum(t.numel() for t in load_file(weights).values()) * size,
    }
    assert {key: result["breakdown"][key] for key in expected} == expected
    assert result["peak_bytes_per_rank"] == plain["peak_bytes_per_rank"] + sum(expected.values())


def test_a_vae_store_on_the_device_moves_the_full_size_activations_there() -> None:
    """The sequential VAE's store on the device: no host RAM for it and no host transfers, its bytes (and the
    image) counted on the device instead."""
    host, device = (plan("full-sd15", 8192, 16384, 1, vae_decode="sequential", vae_store=s) for s in ("host", "device"))
    stored = host["breakdown"]["vae_host_ram_not_on_device"]
    assert (
        device["breakdown"]["vae_store_on_device"] == stored and "vae_host_ram_not_on_device" not in device["breakdown"]
    )
    vae = device["breakdown"]["vae_decode_activations"] + stored
    assert vae > device["breakdown"]["unet_activations"]  # at 16384x8192 the store sets the peak
    image = device["breakdown"]["full_image"]
    assert (
        device["peak_bytes_per_rank"] - host["peak_bytes_per_rank"]
        == vae + image - host["breakdown"]["unet_activations"]
    )


@pytest.mark.parametrize(("gib", "store"), [(140, "device"), (80, "host")])
def test_auto_puts_the_vae_store_on_the_device_where_it_fits(gib: int, store: str) -> None:
    """SD-1.5 at 16384x8192 on one GPU: an H200's 140 GiB hold the store beside the rest, an 80 GB GPU's do not."""
    settings = build_settings("sd15-16k", {"model": "full-sd15", "linfusion": "fresh", "device": "cpu"}, 1)
    assert fit_to_capacity(settings, 1, gib * 2**30, "cuda:0").vae_store == store
    forced = build_settings("sd15-16k", {"model": "full-sd15", "linfusion": "fresh", "vae_store": "host"}, 1)
    assert fit_to_capacity(forced, 1, gib * 2**30, "cuda:0").vae_store == "host"  # what the user set stays
