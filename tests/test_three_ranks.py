"""Three ranks — an odd count, bands of one 8-row unit each, no guidance split — with every component at once:
LoRAs, ControlNets on row bands, an IP-Adapter, schedulers, an init image and inpainting, SD-1.5 and SDXL, with
LinFusion and with softmax attention, give what one process gives (exact mode, float32 round-off)."""

from __future__ import annotations

import pytest
import torch
from component_jobs import many
from multirank import run_ranks
from PIL import Image
from safetensors.torch import save_file

from distlin.models.tiny import build_controlnet, build_ip_adapter, build_kohya_lora
from distlin.parallel import Runtime

RANKS = 3
HEIGHT, WIDTH = 192, 64  # latent 24 x 8: three 8-row units, one per rank
# Relative to the latents' largest magnitude: float32 round-off, summed over every component's exchanges and a
# multistep sampler (measured up to 1.4e-5 here; a miswired band or component differs by over 1e-1).
TOL = 5e-5
BASE = {"height": HEIGHT, "width": WIDTH, "steps": 2, "guidance_scale": 5.0, "cfg_parallel": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Local checkpoints in the official layouts and pictures at the output size: nothing is downloaded."""
    root = tmp_path_factory.mktemp("three-ranks")
    paths = {name: str(root / name) for name in ("lora", "sdxl-lora", "cn", "cn-2", "sdxl-cn", "h94")}
    save_file(build_kohya_lora("tiny-sd15", rank=2), paths["lora"] + ".safetensors")
    save_file(build_kohya_lora("tiny-sdxl", rank=2), paths["sdxl-lora"] + ".safetensors")
    for name, model, seed in (("cn", "tiny-sd15", 0), ("cn-2", "tiny-sd15", 1), ("sdxl-cn", "tiny-sdxl", 0)):
        build_controlnet(model, seed=seed).save_pretrained(paths[name])
    for model in ("tiny-sd15", "tiny-sdxl"):
        build_ip_adapter(model, paths["h94"])
    for seed, name in enumerate(("photo.png", "control.png", "control-2.png", "reference.png")):
        pixels = torch.rand(HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(seed))
        Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(root / name)
        paths[name] = str(root / name)
    mask = torch.zeros(HEIGHT, WIDTH, dtype=torch.uint8)
    mask[HEIGHT // 3 : 2 * HEIGHT // 3] = 255  # inpaint the middle rank's band
    Image.fromarray(mask.numpy()).save(root / "mask.png")
    paths["mask.png"] = str(root / "mask.png")
    return paths


def cases(files: dict[str, str]) -> dict[str, tuple[str, tuple]]:
    """Every case, by name; one list for the one 3-rank process group."""
    ip = {"ip_adapter": files["h94"], "ip_image": files["reference.png"], "ip_scale": 0.7}
    two_controls = {
        "controlnet": [files["cn"], files["cn-2"]],
        "control_image": [files["control.png"], files["control-2.png"]],
        "control_scale": [0.7, 0.5],
    }
    everything = {**BASE, **ip, **two_controls, "loras": [files["lora"] + ".safetensors:0.8"]}
    sdxl = {**BASE, **ip, "controlnet": files["sdxl-cn"], "control_image": files["control.png"]}
    return {
        # one prepared pipeline, three generations: the model's scheduler, a second-order one, from a picture
        "sd15-everything": ("run", ("tiny-sd15", everything, [{}, {"scheduler": "heun"}, _from_photo(files)])),
        "sd15-everything-softmax": ("run", ("tiny-sd15", {**everything, "linfusion": "none"}, [{}])),
        "sdxl-everything": ("run", ("tiny-sdxl", {**sdxl, "loras": [files["sdxl-lora"] + ".safetensors"]}, [{}])),
        "inpainting": ("run", ("tiny-sd15", {**BASE, **ip}, [{**_from_photo(files), "mask": files["mask.png"]}])),
        "lora-after-parallelize": ("lora", (files["lora"] + ".safetensors", "after", "no", "exact", (HEIGHT, WIDTH))),
    }


def _from_photo(files: dict[str, str]) -> dict[str, object]:
    return {"init_image": files["photo.png"], "strength": 0.6, "scheduler": "dpm++-2m-karras"}


@pytest.fixture(scope="module")
def single(files: dict[str, str]) -> dict[str, object]:
    named = cases(files)
    return dict(zip(named, many(Runtime(), list(named.values())), strict=True))


@pytest.fixture(scope="module")
def three_ranks(files: dict[str, str]) -> dict[str, object]:
    named = cases(files)
    results = run_ranks(RANKS, many, list(named.values()))
    for mine, *theirs in zip(*results, strict=True):  # every rank ends with the same latents
        assert all(_flat(mine)[i].equal(_flat(other)[i]) for other in theirs for i in range(len(_flat(mine))))
    return dict(zip(named, results[0], strict=True))


def _flat(result: object) -> list[torch.Tensor]:
    return list(result) if isinstance(result, list) else [result]


@pytest.mark.parametrize("name", ["sd15-everything", "sd15-everything-softmax", "sdxl-everything", "inpainting",
                                  "lora-after-parallelize"])  # fmt: skip
def test_three_ranks_equal_one_process(single, three_ranks, name: str) -> None:
    for mine, expected in zip(_flat(three_ranks[name]), _flat(single[name]), strict=True):
        assert torch.isfinite(expected).all()
        relative = (mine - expected).abs().max().item() / expected.abs().max().item()
        assert relative <= TOL, (name, relative)


def test_every_generation_of_the_combination_differs(single) -> None:
    """The three generations on one pipeline are different images, so "equal" above is not trivially true."""
    own, heun, photo = single["sd15-everything"]
    for a, b in ((own, heun), (own, photo), (heun, photo)):
        assert (a - b).abs().max().item() > 1e-3 * own.abs().max().item()
