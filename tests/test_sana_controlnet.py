"""A SANA ControlNet on the row bands of SANA's transformer: a run with ``--controlnet`` (a local folder in
diffusers' layout), in one pass, from an init image or through the cascade, gives one process's image on
several ranks, and the ControlNet does steer it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SanaControlNetModel
from multirank import run_ranks
from PIL import Image

from distlin.errors import UsageError
from distlin.families.sana.family import TINY_SANA

CONTROLNET_KEYS = (
    "in_channels",
    "out_channels",
    "num_attention_heads",
    "attention_head_dim",
    "num_cross_attention_heads",
    "cross_attention_head_dim",
    "cross_attention_dim",
    "caption_channels",
    "mlp_ratio",
    "sample_size",
    "patch_size",
)


def build_controlnet(folder: Path, **changes: int) -> Path:
    """A tiny-sana ControlNet saved as diffusers saves one, random weights; its zero-initialised input and output
    layers drawn too, so its residuals are not zero."""
    config = {key: TINY_SANA["transformer"][key] for key in CONTROLNET_KEYS} | {"num_layers": 2, **changes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        controlnet = SanaControlNetModel(**config).eval()
        for layer in (controlnet.input_block, *controlnet.controlnet_blocks):
            torch.nn.init.normal_(layer.weight, std=0.3)
    controlnet.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sana-controlnet")
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "control.png")
    return {"controlnet": str(build_controlnet(root / "controlnet")), "control_image": str(root / "control.png")}


def latents(runtime, overrides: dict, preset: str = "tiny-sana") -> torch.Tensor:
    """tiny-sana's final latents through the Python API (``generate``), as a run makes them."""
    from distlin import build_settings, generate

    settings = build_settings(preset, {"steps": 2, **overrides}, runtime and runtime.world_size)
    return generate(settings, runtime).latents


def runs(inputs: dict[str, str]) -> list[tuple[dict, str]]:
    """Every rank a band of both guidance halves, then each rank one half (the control latent split with it);
    from the control image as init image; the three-stage cascade (the control image at each stage's size)."""
    control = {key: (value,) for key, value in inputs.items()}
    return [
        ({**control, "cfg_parallel": False}, "tiny-sana"),
        ({**control, "cfg_parallel": True}, "tiny-sana"),
        ({**control, "init_image": inputs["control_image"], "strength": 0.6}, "tiny-sana"),
        ({**control, "steps": 3}, "tiny-sana-cascade"),
    ]


def on_ranks(runtime, inputs: dict[str, str]) -> list[torch.Tensor]:
    return [latents(runtime, overrides, preset) for overrides, preset in runs(inputs)]


def test_a_sana_controlnet_on_two_ranks_gives_the_one_process_latents(inputs) -> None:
    ranked = run_ranks(2, on_ranks, inputs)[0]
    for (overrides, preset), latent in zip(runs(inputs), ranked, strict=True):
        torch.testing.assert_close(latent, latents(None, overrides, preset), rtol=0, atol=1e-5)
    control = {key: (value,) for key, value in inputs.items()}
    assert (latents(None, control) - latents(None, {})).abs().max() > 1e-2  # the ControlNet steers the image


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"controlnet_twice": True}, "takes one ControlNet; pass one --controlnet"),
        ({"attention_head_dim": 4}, "attention_head_dim 4, the model's transformer has 8"),
    ],
)
def test_what_a_sana_controlnet_cannot_do_refuses_in_one_line(inputs, tmp_path, overrides, message) -> None:
    control = {key: (value,) for key, value in inputs.items()}
    if overrides.pop("controlnet_twice", False):
        control = {key: value * 2 for key, value in control.items()}
    if overrides:  # a ControlNet for another model: refused from its config, before anything loads
        from distlin import build_settings

        control["controlnet"] = (str(build_controlnet(tmp_path / "other", **overrides)),)
        with pytest.raises(UsageError, match=message):
            build_settings("tiny-sana", control, 1)
        return
    with pytest.raises(UsageError, match=message):
        latents(None, control)


def test_a_controlnet_left_whole_hands_each_band_its_own_tokens() -> None:
    """A ControlNet the engine does not split (added after ``parallelize``) returns the whole image's tokens; the
    transformer's band takes its rows of them, and a band's residuals pass as they are."""
    from distlin.families.sana.transformer import band_tokens
    from distlin.parallel.layout import RowLayout

    layout = RowLayout(16, 12, 2, 2, 32)  # 16 latent rows, patch size 2: 8 token rows of 6, 4 per band
    whole = torch.arange(48.0).reshape(1, 48, 1)
    assert band_tokens(whole, layout, 1, 6).flatten().tolist() == list(range(24, 48))
    band = whole[:, 24:]
    assert band_tokens(band, layout, 1, 6) is band
    with pytest.raises(ValueError, match="neither the image's 48 nor this band's 24"):
        band_tokens(whole[:, :30], layout, 1, 6)


def test_the_plan_of_a_sana_run_counts_its_controlnet(inputs) -> None:
    from distlin import build_settings
    from distlin.memory.fit import plan_run

    control = {key: (value,) for key, value in inputs.items()}
    plain, controlled = (plan_run(build_settings("tiny-sana", extra), 1) for extra in ({}, control))
    added = controlled["breakdown"].keys() - plain["breakdown"].keys()
    assert added == {"weights_controlnet", "controlnet_residuals"}
    assert controlled["peak_bytes_per_rank"] > plain["peak_bytes_per_rank"]


def test_the_control_image_is_encoded_by_the_runs_coder_then_the_vae_is_as_before() -> None:
    """SanaControlNetPipeline encodes its control image with ``vae.encode`` itself: inside a run that is the run's
    band-parallel (or band-by-band) coder, never a whole-image encode on every rank."""
    from types import SimpleNamespace

    from diffusers import AutoencoderDC

    from distlin.families.sana.sdedit import encoding_through

    vae = AutoencoderDC.from_config(TINY_SANA["vae"])
    marker = torch.zeros(1, 8, 2, 3)
    coder = SimpleNamespace(encode=lambda image: SimpleNamespace(mean=marker))
    with encoding_through(vae, coder):
        assert vae.encode(torch.zeros(1, 3, 8, 12)).latent is marker
    assert "encode" not in vae.__dict__ and vae.encode(torch.zeros(1, 3, 8, 12)).latent.shape == (1, 8, 2, 3)
