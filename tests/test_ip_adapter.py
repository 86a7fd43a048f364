"""An IP-Adapter (diffusers' ``load_ip_adapter``) on the patch-parallel engine, SD-1.5 and SDXL, with LinFusion
or softmax attention: two gloo ranks give what one process gives (exact mode), loading it keeps every
self-attention's processor, and bad input is one clear line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from component_jobs import HEIGHT, WIDTH
from ip_adapter_jobs import many
from multirank import run_ranks
from PIL import Image

from distlin import LinFusion
from distlin.cli import generate as cli
from distlin.components import IpAdapter, IpAdapterFiles, apply_ip_adapter
from distlin.errors import UsageError
from distlin.models.tiny import build_ip_adapter, build_pipeline
from distlin.parallel import PatchParallelConfig, Runtime, parallelize
from distlin.settings import build_settings
from distlin.sources import IMAGE_ENCODER_FOLDER, base_family

TOL = 1e-5  # relative to the latents' largest magnitude: fp32 round-off
BASE = {"height": HEIGHT, "width": WIDTH, "steps": 2, "guidance_scale": 5.0, "cfg_parallel": False}
CHUNKED = {"DISTLIN_TOKEN_CHUNK": "16"}  # every transformer above 16 tokens runs in chunks
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A folder laid out as h94/IP-Adapter with tiny SD-1.5 and SDXL IP-Adapters, and two reference pictures."""
    root = tmp_path_factory.mktemp("ip-adapter")
    paths = {"folder": str(root / "h94")}
    paths["sd15"] = str(build_ip_adapter("tiny-sd15", paths["folder"]))
    paths["sdxl"] = str(build_ip_adapter("tiny-sdxl", paths["folder"]))
    lonely, encoder = root / "lonely", root / "encoders" / "clip"  # the weights alone, their encoder elsewhere
    lonely.mkdir()
    shutil.copy(paths["sd15"], lonely)
    shutil.copytree(Path(paths["sd15"]).parent / IMAGE_ENCODER_FOLDER, encoder)
    paths["lonely-sd15"], paths["encoder"] = str(lonely / Path(paths["sd15"]).name), str(encoder)
    paths["second"] = str(build_ip_adapter("tiny-sd15", root / "second", seed=1))  # other weights, same encoder
    paths["plus"] = str(build_ip_adapter("tiny-sd15", root / "plus", plus=True))  # a Resampler image projection
    for name, seed in (("red.png", 1), ("noise.png", 2)):
        pixels = torch.rand(50, 40, 3, generator=torch.Generator().manual_seed(seed))
        Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(root / name)
        paths[name] = str(root / name)
    return paths


def cases(files: dict[str, str], world: int) -> dict[str, tuple[str, tuple]]:
    """Every case, by name; one list for one process group."""
    ip = {"ip_adapter": files["folder"], "ip_image": files["red.png"], "ip_scale": 0.7}
    sd15 = IpAdapter(files["sd15"], files["red.png"], 0.7)
    # Two reference pictures one after the other on one prepared pipeline; micro-batches of one sample cut the
    # image embeddings like the text's.
    pictures = [{}, {"ip_image": files["noise.png"]}]
    # The SD-1.5 cascade's first stage (64 px) is one 8-row unit: on 2 ranks the guidance halves split instead.
    cascade = {**ip, "height": 256, "width": 128, "steps": 3, "cfg_parallel": True}
    two = {"ip_adapter": [files["folder"], files["second"]], "ip_image": [files["red.png"], files["noise.png"]]}
    out = {
        "sd15-chunked": ("run", ("tiny-sd15", {**BASE, **ip}, pictures, CHUNKED)),
        "sdxl": ("run", ("tiny-sdxl", {**BASE, **ip, "micro_batch": 1}, pictures)),
        "loaded-after-parallelize": ("api", (sd15, "after")),
        "loaded-before-parallelize": ("api", (sd15, "before")),
        "softmax-loaded-after-parallelize": ("api", (sd15, "after", False)),
        "sd15-cascade": ("run", ("tiny-sd15-cascade", cascade, [{}])),
        "sdxl-cascade": ("run", ("tiny-sdxl-cascade", {**cascade, "steps": 4, "cfg_parallel": False}, [{}])),
        # Two at once, the second at scale 0.5 and then 0 (one prepared pipeline: the scales are per generation).
        "two": ("run", ("tiny-sd15", {**BASE, **two}, [{"ip_scale": [0.7, 0.5]}, {"ip_scale": [0.7, 0.0]}])),
        "plus": ("run", ("tiny-sd15", {**BASE, **ip, "ip_adapter": files["plus"]}, [{}])),
    }
    if world == 1:  # properties of the image itself, on one process
        out["sd15"] = ("run", ("tiny-sd15", {**BASE, **ip}, pictures))
        out["without"] = ("api", (None, "before"))
        out["scale-0"] = ("api", (IpAdapter(files["sd15"], files["red.png"], 0.0), "before"))
        elsewhere = IpAdapter(files["lonely-sd15"], files["red.png"], 0.7, image_encoder=files["encoder"])
        out["encoder-elsewhere"] = ("api", (elsewhere, "before"))
    return out


def results(files: dict[str, str], world: int) -> dict[str, object]:
    """Every case's result on ``world`` ranks (one: this process), by name; every rank holds rank 0's latents."""
    named = cases(files, world)
    if world == 1:
        return dict(zip(named, many(Runtime(), list(named.values())), strict=True))
    ranks = run_ranks(world, many, list(named.values()))
    for mine, *theirs in zip(*ranks, strict=True):
        assert all(torch.equal(_latents(mine), _latents(other)) for other in theirs)
    return dict(zip(named, ranks[0], strict=True))


@pytest.fixture(scope="module")
def single(files: dict[str, str]) -> dict[str, object]:
    return results(files, 1)


@pytest.fixture(scope="module")
def two_ranks(files: dict[str, str]) -> dict[str, object]:
    return results(files, 2)


def _latents(result: object) -> torch.Tensor:
    """The latents of a case: one per generation, or (latents, processors kept) of an API case."""
    return torch.stack(list(result)) if isinstance(result, list) else result[0]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return (a - b).abs().max().item() <= tol * b.abs().max().item()


@pytest.mark.parametrize(
    "name",
    [
        "sd15-chunked",
        "sdxl",
        "loaded-after-parallelize",
        "loaded-before-parallelize",
        "softmax-loaded-after-parallelize",
        "two",
        "plus",
    ],
)
def test_two_ranks_equal_one_process(single, two_ranks, name: str) -> None:
    assert _close(_latents(two_ranks[name]), _latents(single[name]))


@pytest.mark.parametrize("name", ["sd15-cascade", "sdxl-cascade"])
def test_a_cascade_on_two_ranks_equals_one_process(single, two_ranks, name: str) -> None:
    # Between stages the band-parallel VAE sums over the whole image in fp32, as in tests/test_highres.py.
    assert torch.isfinite(_latents(single[name])).all()
    torch.testing.assert_close(_latents(two_ranks[name]), _latents(single[name]), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "name", ["loaded-after-parallelize", "loaded-before-parallelize", "softmax-loaded-after-parallelize"]
)
def test_loading_keeps_every_self_attention_processor(single, two_ranks, name: str) -> None:
    """LinFusion's processors, and the engine's (its state all-reduce, its K/V gather for softmax) after."""
    assert single[name][1] and two_ranks[name][1]


def test_loading_after_parallelize_equals_loading_before(single) -> None:
    assert _close(single["loaded-after-parallelize"][0], single["loaded-before-parallelize"][0])


def test_the_chunked_transformers_pass_the_image_embeddings_on(single) -> None:
    assert _close(_latents(single["sd15-chunked"]), _latents(single["sd15"]))


def test_an_ip_adapter_steers_the_image_and_scale_0_is_the_image_without_it(single) -> None:
    without = single["without"][0]
    with_it = single["loaded-before-parallelize"][0]
    assert (with_it - without).abs().max().item() > 0.05 * without.abs().max().item()
    assert _close(single["scale-0"][0], without)
    first, second = single["sd15"]  # another reference picture, another image
    assert (first - second).abs().max().item() > 0.01 * first.abs().max().item()


def test_an_image_encoder_elsewhere_gives_the_image_of_one_beside_the_weights(single, files, tmp_path, capsys) -> None:
    """``--ip-image-encoder``: h94's SDXL vit-h weights use the encoder of its ``models`` folder, for example."""
    assert _close(single["encoder-elsewhere"][0], single["loaded-before-parallelize"][0])
    flags = ["--ip-adapter", files["lonely-sd15"], "--ip-image", files["red.png"], "--ip-image-encoder"]
    flags += [files["encoder"], "--steps", "1", "--output", str(tmp_path / "ip.png"), "--plan"]
    assert cli.main(flags) == 0
    assert "ip_image_encoder" in capsys.readouterr().out  # the planner counts the encoder's weights


def test_an_image_encoder_is_located_on_disk_or_on_the_hub(files) -> None:
    weights = IpAdapter(files["folder"], "x").files("sd15")
    assert IpAdapter(files["folder"], "x").encoder_location(weights) == (files["folder"], "models/image_encoder", True)
    named = IpAdapter(files["folder"], "x", image_encoder=files["encoder"]).encoder_location(weights)
    assert named == (files["encoder"], "", True)
    hub = IpAdapter(files["folder"], "x", image_encoder="h94/IP-Adapter/models/image_encoder").encoder_location(weights)
    assert hub == ("h94/IP-Adapter", "models/image_encoder", False)


def test_two_ip_adapters_steer_together_and_a_second_at_scale_0_changes_nothing(single) -> None:
    both, second_off = single["two"]
    first_alone = single["sd15"][0]
    assert _close(second_off, first_alone)
    assert (both - first_alone).abs().max().item() > 0.01 * first_alone.abs().max().item()


def test_ip_adapter_plus_steers_through_its_resampler(single) -> None:
    """IP-Adapter Plus (image tokens from the encoder's hidden states through a Resampler) loads from its original
    layout and steers otherwise than the plain IP-Adapter given the same picture and scale."""
    plus, plain = single["plus"][0], single["sd15"][0]
    assert torch.isfinite(plus).all()
    assert (plus - plain).abs().max().item() > 0.01 * plain.abs().max().item()


def test_id_or_path_names_a_file_a_hub_file_or_an_h94_layout(files) -> None:
    sd15 = Path(files["sd15"])
    assert IpAdapter(files["sd15"], "x").files("sdxl") == IpAdapterFiles(str(sd15.parent), "", sd15.name, True)
    assert IpAdapter(files["folder"], "x").files("sdxl") == IpAdapterFiles(
        files["folder"], "sdxl_models", "ip-adapter_sdxl.safetensors", True
    )
    assert IpAdapter("h94/IP-Adapter", "x").files("sd15") == IpAdapterFiles(
        "h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors", False
    )
    hub_file = IpAdapter("h94/IP-Adapter/sdxl_models/ip-adapter_sdxl_vit-h.safetensors", "x").files("sdxl")
    assert hub_file == IpAdapterFiles("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl_vit-h.safetensors", False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ip_adapter": "NO_ENCODER"}, "missing IP-Adapter image encoder: "),
        ({"ip_image": "missing.png"}, "--ip-image 'missing.png' does not exist"),
        ({"ip_adapter": None}, "--ip-adapter and --ip-image go together: got 0 --ip-adapter, 1 --ip-image and 0"),
        ({"ip_adapter": "SDXL"}, "was made for another base model (text width 64, the model's UNet has 32)"),
        ({"ip_adapter": "EMPTY"}, "ip-adapter_sd15.safetensors does not exist"),
        ({"ip_scale": float("nan")}, "IP-Adapter scale nan is not a number"),
        ({"ip_image_encoder": "EMPTY"}, "--ip-image-encoder EMPTY_PATH: EMPTY_PATH has no config.json"),
        ({"ip_image_encoder": "clip"}, "--ip-image-encoder clip: clip has no config.json"),
        ({"ip_adapter": None, "ip_image": None, "ip_image_encoder": "EMPTY"}, "--ip-image-encoder is the image "),
        ({"ip_adapter": ["FOLDER", "FOLDER"]}, "got 2 --ip-adapter, 1 --ip-image and 0 --ip-scale; pass one"),
        (
            {"ip_adapter": ["FOLDER", "OTHER_ENCODER"], "ip_image": ["RED", "RED"]},
            "were made for different image encoders",
        ),
    ],
)
def test_bad_ip_adapter_input_is_one_usage_error(files, tmp_path: Path, overrides: dict, message: str) -> None:
    no_encoder = tmp_path / "no-encoder" / "models"
    no_encoder.mkdir(parents=True)
    shutil.copy(files["sd15"], no_encoder)
    (tmp_path / "empty").mkdir()
    other_encoder = tmp_path / "other-encoder"  # the same IP-Adapter with a wider image encoder
    shutil.copytree(Path(files["sd15"]).parent, other_encoder)
    config = other_encoder / IMAGE_ENCODER_FOLDER / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": ', '"hidden_size": 1'))
    paths = {"NO_ENCODER": str(no_encoder.parent), "SDXL": files["sdxl"], "EMPTY": str(tmp_path / "empty")}
    paths |= {"FOLDER": files["folder"], "RED": files["red.png"], "OTHER_ENCODER": str(other_encoder / "x.safetensors")}
    shutil.move(other_encoder / Path(files["sd15"]).name, other_encoder / "x.safetensors")

    def given_value(value: object) -> object:
        if isinstance(value, list):
            return [paths.get(item, item) for item in value]
        return paths.get(value, value) if isinstance(value, str) else value

    given = {key: given_value(value) for key, value in overrides.items()}
    settings = {**BASE, "ip_adapter": files["folder"], "ip_image": files["red.png"], **given}
    message = message.replace("EMPTY_PATH", paths["EMPTY"])
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_settings("tiny-sd15", settings, world_size=1)


def test_an_ip_adapter_for_another_base_is_one_usage_error_in_the_python_api(files) -> None:
    with pytest.raises(UsageError, match="cannot be loaded for this model"):
        apply_ip_adapter(build_pipeline("tiny-sd15"), IpAdapter(files["sdxl"], files["red.png"]))


def test_a_missing_image_encoder_is_one_line_and_exit_2(files, tmp_path: Path, capsys) -> None:
    weights = tmp_path / "lonely.safetensors"
    shutil.copy(files["sd15"], weights)
    assert cli.main(["--ip-adapter", str(weights), "--ip-image", files["red.png"], "--output", "x.png"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: missing IP-Adapter image encoder: "), lines


def test_the_command_line_runs_an_ip_adapter(files, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    flags = ["--ip-adapter", files["folder"], "--ip-image", files["red.png"], "--ip-scale", "0.5"]
    command = [sys.executable, str(REPO / "launch" / "generate.py"), *flags, "--steps", "2", "--output", "ip.png"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "ip.png") as image:
        text = dict(image.text)
    assert (text["ip_adapter"], text["ip_image"], text["ip_scale"]) == (
        str([files["folder"]]),
        str([files["red.png"]]),
        "[0.5]",
    )


def test_diffusers_own_loader_after_parallelize_is_one_clear_error_not_another_image(files) -> None:
    """diffusers' ``load_ip_adapter`` rebuilds every self-attention processor, dropping the engine's exchange:
    the next UNet call says so (on every rank alike) instead of silently giving another image."""
    pipe = build_pipeline("tiny-sd15")
    LinFusion.construct_for(pipe, load_pretrained=False, init="random")
    parallelize(pipe, PatchParallelConfig("exact", cfg_parallel=False), Runtime())
    located = IpAdapter(files["sd15"], files["red.png"]).files(base_family(dict(pipe.unet.config)))
    pipe.load_ip_adapter(
        located.root, subfolder=located.subfolder, weight_name=located.weight_name,
        image_encoder_folder=IMAGE_ENCODER_FOLDER,
    )  # fmt: skip
    with pytest.raises(UsageError, match="was replaced after parallelize .* distlin.components.apply_ip_adapter"):
        picture = Image.open(files["red.png"])
        pipe("a lighthouse", height=HEIGHT, width=WIDTH, num_inference_steps=1, ip_adapter_image=picture)
