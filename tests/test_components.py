"""A user's own components — LoRA, scheduler, init image, ControlNet — on the patch-parallel engine with
LinFusion: two gloo ranks give what one process gives (exact mode), and bad input is one clear line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from component_jobs import HEIGHT, WIDTH, many
from multirank import run_ranks
from PIL import Image
from safetensors.torch import load_file, save_file

from distlin.components import Lora, apply_loras
from distlin.errors import UsageError
from distlin.models.tiny import build_controlnet, build_kohya_lora, build_pipeline
from distlin.parallel import Runtime
from distlin.schedulers import SCHEDULERS
from distlin.settings import build_settings

GENERATE = Path(__file__).resolve().parents[1] / "launch" / "generate.py"
TOL = 1e-5  # relative to the latents' largest magnitude: fp32 round-off
BASE = {"height": HEIGHT, "width": WIDTH, "steps": 2, "guidance_scale": 5.0, "cfg_parallel": False}
DISPLACED = {**BASE, "mode": "displaced", "warmup_steps": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Local checkpoints in the official layouts and pictures: nothing is downloaded."""
    root = tmp_path_factory.mktemp("components")
    names = ("lora.safetensors", "sdxl-lora.safetensors", "controlnet", "controlnet-2", "sdxl-controlnet")
    paths = {name: str(root / name) for name in names}
    save_file(build_kohya_lora("tiny-sd15", rank=2), paths["lora.safetensors"])
    save_file(build_kohya_lora("tiny-sdxl", rank=2), paths["sdxl-lora.safetensors"])
    build_controlnet("tiny-sd15").save_pretrained(paths["controlnet"])
    build_controlnet("tiny-sd15", seed=1).save_pretrained(paths["controlnet-2"])
    build_controlnet("tiny-sdxl").save_pretrained(paths["sdxl-controlnet"])
    for name, size in (("photo.png", (60, 100)), ("control.png", (WIDTH, HEIGHT)), ("control-2.png", (WIDTH, HEIGHT))):
        pixels = torch.rand(size[1], size[0], 3, generator=torch.Generator().manual_seed(len(name)))
        Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(root / name)
        paths[name] = str(root / name)
    mask = torch.zeros(HEIGHT, WIDTH, dtype=torch.uint8)
    mask[: HEIGHT // 2] = 255  # inpaint the top half
    Image.fromarray(mask.numpy()).save(root / "mask.png")
    paths["mask.png"] = str(root / "mask.png")
    return paths


def cases(files: dict[str, str], world: int) -> dict[str, tuple[str, tuple]]:
    """Every case, by name; one list for one process group. Runs of ``generate`` share one pipeline per list."""
    per_generation = [{}, *({"scheduler": name} for name in SCHEDULERS)]
    per_generation.append({"init_image": files["photo.png"], "strength": 0.6})
    per_generation.append({"init_image": files["photo.png"], "strength": 0.6, "mask": files["mask.png"]})
    control = {"controlnet": files["controlnet"], "control_image": files["control.png"]}
    two_controls = {
        "controlnet": [files["controlnet"], files["controlnet-2"]],
        "control_image": [files["control.png"], files["control-2.png"]],
        "control_scale": [0.7, 0.5],
    }
    sdxl_control = {**BASE, "controlnet": files["sdxl-controlnet"], "control_image": files["control.png"]}
    cascade = {"height": 256, "width": 128, "steps": 3, "init_image": files["photo.png"], "cfg_parallel": False}
    sdxl_cascade_control = {"steps": 4, "controlnet": files["sdxl-controlnet"], "control_image": files["control.png"]}
    from_noise_too = [{}, {"init_image": None}]  # stage 0 refines the photo, or the pipeline draws it from noise
    from_photo = {"init_image": files["photo.png"], "strength": 0.6}
    controlnet_variations = [{}, from_photo, {"scheduler": "heun"}, {**from_photo, "mask": files["mask.png"]}]
    out = {
        "lora-after-unfused": ("lora", (files["lora.safetensors"], "after", "unfuse")),
        "lora-before-fused": ("lora", (files["lora.safetensors"], "before", "fuse")),
        "per-generation": ("run", ("tiny-sd15", BASE, per_generation)),
        "controlnet": ("run", ("tiny-sd15", {**BASE, **control}, controlnet_variations)),
        "two-controlnets": ("run", ("tiny-sd15", {**BASE, **two_controls}, [{}])),
        "sdxl-controlnet": ("run", ("tiny-sdxl", sdxl_control, [{}])),
        "controlnet-banded": ("controlnet", (True,)),
        "controlnet-whole": ("controlnet", (False,)),
        "cascade-from-photo": ("run", ("tiny-sd15-cascade", cascade, [{}])),
        "cascade-controlnet": ("run", ("tiny-sd15-cascade", {**cascade, **control}, [{}])),
        "sdxl-cascade-from-photo": ("run", ("tiny-sdxl-cascade", {**cascade, "steps": 4}, [{}])),
        "sdxl-cascade-controlnet": ("run", ("tiny-sdxl-cascade", {**cascade, **sdxl_cascade_control}, from_noise_too)),
    }
    if world > 1:  # displaced: not equal to one process by design; its own properties are checked
        out["displaced-heun-twice"] = ("run", ("tiny-sd15", DISPLACED, [{"scheduler": "heun"}] * 2))
        out["displaced-controlnet"] = ("run", ("tiny-sd15", {**DISPLACED, **control}, [{"scheduler": "heun"}]))
    else:
        out["run-with-lora"] = ("run", ("tiny-sd15", {**BASE, "loras": [files["lora.safetensors"] + ":0.8"]}, [{}]))
    return out


@pytest.fixture(scope="module")
def single(files: dict[str, str]) -> dict[str, object]:
    named = cases(files, 1)
    return dict(zip(named, many(Runtime(), list(named.values())), strict=True))


@pytest.fixture(scope="module")
def two_ranks(files: dict[str, str]) -> dict[str, object]:
    named = cases(files, 2)
    results = run_ranks(2, many, list(named.values()))
    assert all(_close(a, b, 0.0) for a, b in zip(results[0], results[1], strict=True))  # every rank: same latents
    return dict(zip(named, results[0], strict=True))


def _close(a: object, b: object, tol: float = TOL) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[key], b[key], tol) for key in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    return (a - b).abs().max().item() <= tol * b.abs().max().item()


@pytest.mark.parametrize(
    "name", ["lora-after-unfused", "lora-before-fused", "per-generation", "controlnet", "two-controlnets",
             "sdxl-controlnet"]
)  # fmt: skip
def test_two_ranks_equal_one_process(single, two_ranks, name: str) -> None:
    assert _close(two_ranks[name], single[name])


@pytest.mark.parametrize("name", ["controlnet-banded", "controlnet-whole"])
def test_a_banded_or_a_whole_image_controlnet_on_two_ranks_equals_one_process(single, two_ranks, name: str) -> None:
    assert _close(two_ranks[name]["latents"], single[name]["latents"])


def test_the_controlnet_runs_on_row_bands_of_the_latent_and_of_the_control_image(single, two_ranks) -> None:
    latent_rows, pixel_rows = single["controlnet-banded"]["rows"].tolist()
    assert (latent_rows, pixel_rows) == (HEIGHT // 8, HEIGHT)
    assert two_ranks["controlnet-banded"]["rows"].tolist() == [latent_rows // 2, pixel_rows // 2]  # 1/N per rank
    assert two_ranks["controlnet-whole"]["rows"].tolist() == [latent_rows, pixel_rows]  # added after parallelize


def test_a_controlnet_changes_the_image_and_a_second_one_changes_it_again(single) -> None:
    plain, controlled, two = single["per-generation"][0], single["controlnet"][0], single["two-controlnets"][0]
    for a, b in ((controlled, plain), (two, controlled)):
        assert (a - b).abs().max().item() > 0.05 * b.abs().max().item()


def test_a_displaced_controlnet_run_is_finite_and_close(single, two_ranks) -> None:
    (displaced,), exact = two_ranks["displaced-controlnet"], single["controlnet"][2]
    assert torch.isfinite(displaced).all()
    relative = (displaced - exact).abs().max().item() / exact.abs().max().item()
    assert 0 < relative <= 2e-3, relative


@pytest.mark.parametrize(
    "name", ["cascade-from-photo", "cascade-controlnet", "sdxl-cascade-from-photo", "sdxl-cascade-controlnet"]
)
def test_a_cascade_on_two_ranks_equals_one_process(single, two_ranks, name: str) -> None:
    # Between stages the band-parallel VAE sums over the whole image in fp32, as in tests/test_highres.py.
    assert all(torch.isfinite(latents).all() for latents in single[name])
    torch.testing.assert_close(two_ranks[name], single[name], atol=1e-3, rtol=0)


def test_a_controlnet_changes_the_sdxl_cascades_image(single) -> None:
    controlled, plain = single["sdxl-cascade-controlnet"][0], single["sdxl-cascade-from-photo"][0]
    assert (controlled - plain).abs().max().item() > 0.05 * plain.abs().max().item()


def test_two_controlnets_on_the_command_line_on_two_ranks_equal_one_process(files, single, tmp_path: Path) -> None:
    argv = ["--preset", "tiny-sd15", "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", "2"]
    argv += ["--guidance-scale", "5", "--no-cfg-parallel", "--nproc-per-node", "2"]
    for net, image, scale in (("controlnet", "control.png", "0.7"), ("controlnet-2", "control-2.png", "0.5")):
        argv += ["--controlnet", files[net], "--control-image", files[image], "--control-scale", scale]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, str(GENERATE), *argv, "--output", "out.png", "--save-latents", "out.safetensors"]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert _close(load_file(tmp_path / "out.safetensors")["latents"], single["two-controlnets"][0])
    with Image.open(tmp_path / "out.png") as image:
        assert image.text["control_scale"] == "[0.7, 0.5]" and image.text["world_size"] == "2"


def test_lora_loaded_after_parallelize_equals_lora_loaded_before(single) -> None:
    assert _close(single["lora-after-unfused"], single["lora-before-fused"])


def test_a_lora_changes_the_image(single) -> None:
    with_lora, without = single["run-with-lora"][0], single["per-generation"][0]
    assert (with_lora - without).abs().max().item() > 0.05 * without.abs().max().item()


def test_ddim_is_the_tiny_models_own_and_every_other_variation_differs(single) -> None:
    own, *variations = single["per-generation"]
    names = [*SCHEDULERS, "init-image", "inpainting"]
    assert all(torch.isfinite(r).all() for r in variations)
    for name, result in zip(names, variations, strict=True):
        assert _close(result, own, 1e-3) == (name == "ddim"), name


def test_displaced_heun_is_finite_deterministic_and_close(single, two_ranks) -> None:
    first, second = two_ranks["displaced-heun-twice"]
    exact = single["per-generation"][1 + list(SCHEDULERS).index("heun")]
    assert torch.isfinite(first).all() and torch.equal(first, second)  # the second generation starts afresh
    relative = (first - exact).abs().max().item() / exact.abs().max().item()
    assert relative <= 2e-3, relative


def test_a_lora_for_another_base_is_one_usage_error(files) -> None:
    with pytest.raises(UsageError, match="does not fit this model"):
        apply_loras(build_pipeline("tiny-sd15"), (Lora(files["sdxl-lora.safetensors"]),))


def test_an_sdxl_lora_is_fused_into_unet_and_both_text_encoders(files) -> None:
    pipe = build_pipeline("tiny-sdxl")
    models = ("unet", "text_encoder", "text_encoder_2")
    before = {name: {key: w.clone() for key, w in getattr(pipe, name).state_dict().items()} for name in models}
    apply_loras(pipe, (Lora(files["sdxl-lora.safetensors"], 0.5),))
    for name, weights in before.items():
        after = getattr(pipe, name).state_dict()
        assert after.keys() == weights.keys(), f"{name} keeps no adapter layers"
        assert any(not torch.equal(after[key], value) for key, value in weights.items()), f"{name} unchanged"


def test_lora_flag_parses_path_and_scale() -> None:
    assert Lora.parse("a/b.safetensors:0.5") == Lora("a/b.safetensors", 0.5)
    assert Lora.parse("C:/loras/b.safetensors") == Lora("C:/loras/b.safetensors", 1.0)


def test_an_init_image_starts_the_cascade_at_the_first_stage_at_or_above_its_size(files) -> None:
    settings = build_settings("tiny-sd15-cascade", {"init_image": files["photo.png"], "height": 256, "width": 128})
    assert [(s.height, s.width, s.strength) for s in settings.stages] == [(128, 64, 0.6), (256, 128, 0.4)]
    assert settings.strength == 0.6 and settings.init_stage == 1


@pytest.mark.parametrize(
    ("preset", "controlnet"), [("tiny-sd15-cascade", "controlnet"), ("tiny-sdxl-cascade", "sdxl-controlnet")]
)
def test_a_cascade_control_image_needs_the_outputs_aspect_ratio(files, preset: str, controlnet: str) -> None:
    given = {"controlnet": files[controlnet], "control_image": files["photo.png"], "height": 256, "width": 128}
    message = "is 60×100 px, another aspect ratio than the output's 128×256; pass"
    with pytest.raises(UsageError, match=re.escape(message)):
        build_settings(preset, given, world_size=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scheduler": "karras"}, "unknown scheduler 'karras'; use one of ddim, pndm, euler"),
        ({"init_image": "missing.png"}, "--init-image 'missing.png' does not exist"),
        ({"loras": ["missing.safetensors"]}, "LoRA 'missing.safetensors' does not exist"),
        ({"strength": 0.5}, "--strength needs --init-image"),
        ({"mask": "PHOTO"}, "--mask needs --init-image"),
        ({"mask": "missing.png", "init_image": "PHOTO"}, "--mask 'missing.png' does not exist"),
        ({"controlnet": "CONTROLNET"}, "got 1 --controlnet, 0 --control-image and 0 --control-scale; pass one"),
        (
            {"controlnet": ["CONTROLNET", "CONTROLNET"], "control_image": ["CONTROL", "CONTROL"], "control_scale": 1.0},
            "got 2 --controlnet, 2 --control-image and 1 --control-scale",
        ),
        ({"controlnet": "CONTROLNET", "control_image": "PHOTO"}, "is 60×100 px but the output is 64×128"),
        ({"controlnet": "OTHER", "control_image": "CONTROL"}, "was made for another base model"),
    ],
)
def test_bad_components_are_one_usage_error(files, tmp_path: Path, overrides: dict, message: str) -> None:
    other = tmp_path / "other-controlnet"
    other.mkdir()
    config = json.loads((Path(files["controlnet"]) / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 7}))
    paths = {"CONTROLNET": files["controlnet"], "PHOTO": files["photo.png"], "CONTROL": files["control.png"]}
    paths["OTHER"] = str(other)
    given = {key: paths.get(value, value) if isinstance(value, str) else value for key, value in overrides.items()}
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_settings("tiny-sd15", {**BASE, **given}, world_size=1)
