"""The LinFusion container: loads the released checkpoint layout, mounts one layer per UNet self-attention,
saves in that same layout, explains mismatches, and unmounts without a trace."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.attention_processor import Attention
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from distlin.errors import UsageError
from distlin.linfusion import LinFusion, LinFusionAttention
from distlin.linfusion.model import checkpoint_for
from distlin.models.tiny import build_unet

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PER_LAYER_KEYS = [
    "to_q.weight",
    "to_k.weight",
    "to_v.weight",
    "to_out.0.weight",
    "to_out.0.bias",
    *(f"{p}.{i}.{w}" for p in ("to_q_", "to_k_") for i in (0, 1, 3) for w in ("weight", "bias")),
]


# ---------------------------------------------------------------------------------------------------
# helpers


def attn1_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's self-attention modules in named_modules() order (independent of the library's helper)."""
    return [(name, mod) for name, mod in unet.named_modules() if name.endswith(".attn1")]


def official_specs(unet: nn.Module, mid: int | None) -> list[dict[str, Any]]:
    return [
        {
            "module_name": name,
            "dim_n": attn.to_q.weight.shape[1],
            "heads": attn.heads,
            "projection_mid_dim": mid,
        }
        for name, attn in attn1_layers(unet)
    ]


def official_key_set(n_layers: int) -> set[str]:
    return {f"{i}.{key}" for i in range(n_layers) for key in PER_LAYER_KEYS}


def write_official_checkpoint(folder: Path, specs: list[dict], seed: int = 0) -> dict[str, torch.Tensor]:
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` as the released checkpoints are."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float, offset: float = 0.0) -> torch.Tensor:
        return (offset + scale * torch.randn(*shape, generator=g)).contiguous()

    tensors: dict[str, torch.Tensor] = {}
    for i, spec in enumerate(specs):
        c = spec["dim_n"]
        m = c if spec["projection_mid_dim"] is None else spec["projection_mid_dim"]
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            tensors[f"{i}.{name}.weight"] = rand(c, c, scale=1 / math.sqrt(c))
        tensors[f"{i}.to_out.0.bias"] = rand(c, scale=0.1)
        for p in ("to_q_", "to_k_"):
            tensors[f"{i}.{p}.0.weight"] = rand(m, c, scale=1 / math.sqrt(c))
            tensors[f"{i}.{p}.0.bias"] = rand(m, scale=0.1)
            tensors[f"{i}.{p}.1.weight"] = rand(m, scale=0.1, offset=1.0)
            tensors[f"{i}.{p}.1.bias"] = rand(m, scale=0.1)
            tensors[f"{i}.{p}.3.weight"] = rand(c, m, scale=1 / math.sqrt(m))
            tensors[f"{i}.{p}.3.bias"] = rand(c, scale=0.1)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME))
    config = {"_class_name": "LinFusion", "_diffusers_version": "0.30.0", "modules_list": specs}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return tensors


def unet_inputs(unet: nn.Module, seed: int = 0) -> dict[str, Any]:
    """Deterministic inputs for any UNet2DConditionModel config (SD-1.5-like or SDXL-like)."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    size = 4 * 2 ** (len(cfg.block_out_channels) - 1)
    cross = cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    inputs: dict[str, Any] = {
        "sample": torch.randn(1, cfg.in_channels, size, size, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 7, cross, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, text_dim, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    return inputs


def run_unet(unet: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def layer_weights(tensors: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    prefix = f"{i}."
    return {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}


def assert_unet_untouched(unet: nn.Module) -> None:
    assert not any(isinstance(m, LinFusionAttention) for m in unet.modules())


@pytest.fixture(params=["sd-2level", "tiny-sd15", "tiny-sdxl"])
def small_unet(request: pytest.FixtureRequest) -> nn.Module:
    if request.param == "sd-2level":
        return request.getfixturevalue("sd_unet")
    torch.manual_seed(0)
    return build_unet(request.param, seed=0).eval()


# ---------------------------------------------------------------------------------------------------
# Loading the released checkpoint layout


@pytest.mark.parametrize("mid", [None, 8], ids=["mid=null", "mid=8"])
def test_hand_written_official_checkpoint_loads_and_computes_linfusion(
    tmp_path: Path, sd_unet: nn.Module, naive_linfusion, mid: int | None
):
    specs = official_specs(sd_unet, mid)
    folder = tmp_path / "LinFusion-test"
    tensors = write_official_checkpoint(folder, specs)

    model = LinFusion.construct_for(unet=sd_unet, pretrained_model_name_or_path=str(folder))

    mounted = attn1_layers(sd_unet)
    assert len(mounted) == len(specs) == len(model.layers)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, (_, layer) in enumerate(mounted):
        assert isinstance(layer, LinFusionAttention) and layer is model.layers[i]

        def hook(module, args, kwargs, output, i=i):
            captured[i] = (kwargs.get("hidden_states", args[0] if args else None), output)

        layer.register_forward_hook(hook, with_kwargs=True)
    run_unet(sd_unet, unet_inputs(sd_unet))

    assert sorted(captured) == list(range(len(specs)))  # every mounted layer ran inside the UNet
    for i, (x, out) in captured.items():
        expected = naive_linfusion(x, layer_weights(tensors, i), specs[i]["heads"], mid)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5, msg=f"layer {i}")


def test_loaded_parameters_are_the_checkpoint_tensors(tmp_path: Path, sd_unet: nn.Module):
    specs = official_specs(sd_unet, 8)
    tensors = write_official_checkpoint(tmp_path, specs, seed=3)
    model = LinFusion.construct_for(unet=sd_unet, pretrained_model_name_or_path=str(tmp_path))
    state = model.state_dict()
    assert set(state) == set(tensors) == official_key_set(len(specs))
    for key, tensor in tensors.items():
        assert torch.equal(state[key], tensor), key


# ---------------------------------------------------------------------------------------------------
# Saving: same layout, lossless round trip


def test_save_pretrained_round_trip_is_lossless_in_the_official_layout(tmp_path: Path, sd_unet: nn.Module):
    inputs = unet_inputs(sd_unet)
    model = LinFusion.construct_for(unet=sd_unet, load_pretrained=False, init="random", projection_mid_dim=8)
    with_original = run_unet(sd_unet, inputs)
    model.save_pretrained(str(tmp_path))
    model.unmount()

    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert set(f.keys()) == official_key_set(len(attn1_layers(sd_unet)))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "LinFusion"
    assert config["modules_list"] == official_specs(sd_unet, 8)

    loaded = LinFusion.from_pretrained(str(tmp_path))
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert set(loaded_state) == set(original_state)
    for key, tensor in original_state.items():
        assert torch.equal(loaded_state[key], tensor), key

    loaded.mount(sd_unet)
    assert torch.equal(run_unet(sd_unet, inputs), with_original)


# ---------------------------------------------------------------------------------------------------
# Mismatches are one clear error naming the first mismatching layer


def _mutate(specs: list[dict[str, Any]], kind: str) -> tuple[list[dict[str, Any]], int]:
    """A wrong checkpoint for the UNet described by ``specs`` and the index of its first mismatching layer."""
    specs = [dict(s) for s in specs]
    if kind == "fewer-layers":
        return specs[:-1], len(specs) - 1
    if kind == "more-layers":
        return [*specs, {**specs[-1], "module_name": "extra.attn1"}], len(specs)
    if kind == "wrong-dim":  # layer 2 is 64 wide with 4 heads; 48 is still divisible by 4
        specs[2]["dim_n"] = 48
        return specs, 2
    if kind == "wrong-heads":
        specs[1]["heads"] *= 2
        return specs, 1
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["fewer-layers", "more-layers", "wrong-dim", "wrong-heads"])
def test_mismatching_checkpoint_is_a_usage_error_naming_the_first_mismatching_layer(
    tmp_path: Path, sd_unet: nn.Module, kind: str
):
    specs = official_specs(sd_unet, None)
    assert specs[2]["dim_n"] == 64 and specs[2]["heads"] == 4 and specs[1]["heads"] == 4
    wrong, first_bad = _mutate(specs, kind)
    write_official_checkpoint(tmp_path, wrong)

    with pytest.raises(UsageError) as excinfo:
        LinFusion.construct_for(unet=sd_unet, pretrained_model_name_or_path=str(tmp_path))

    message = str(excinfo.value)
    assert "\n" not in message
    bad_name = (wrong if kind == "more-layers" else specs)[first_bad]["module_name"]
    pattern = rf"\blayer {first_bad}\b|{re.escape(bad_name)}"
    assert re.search(pattern, message), f"message does not name layer {first_bad}: {message}"
    assert_unet_untouched(sd_unet)


# ---------------------------------------------------------------------------------------------------
# Which checkpoint: explicit path, or the released one for a known base model


@pytest.mark.parametrize("base", ["someone/unknown-model", "/local/models/my-sd", None])
def test_construct_for_unknown_base_without_path_asks_for_pretrained_model_name_or_path(
    sd_unet: nn.Module, base: str | None
):
    pipe = SimpleNamespace(unet=sd_unet, config=FrozenDict({"_name_or_path": base}))
    with pytest.raises(UsageError, match="pretrained_model_name_or_path") as excinfo:
        LinFusion.construct_for(pipe)
    if base is not None:
        assert base in str(excinfo.value)
    assert_unet_untouched(sd_unet)


@pytest.mark.parametrize(
    "base,checkpoint",
    [
        ("runwayml/stable-diffusion-v1-5", "Yuanshi/LinFusion-1-5"),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "Yuanshi/LinFusion-1-5"),
        ("Lykon/dreamshaper-8", "Yuanshi/LinFusion-1-5"),
        ("SG161222/Realistic_Vision_V4.0_noVAE", "Yuanshi/LinFusion-1-5"),
        ("stabilityai/stable-diffusion-2-1", "Yuanshi/LinFusion-2-1"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "Yuanshi/LinFusion-XL"),
    ],
)
def test_known_base_models_map_to_their_released_checkpoint(base: str, checkpoint: str):
    assert checkpoint_for(SimpleNamespace(config=FrozenDict({"_name_or_path": base}))) == checkpoint


def test_construct_for_loads_the_released_checkpoint_of_the_pipelines_base_model(
    sd_unet: nn.Module, monkeypatch: pytest.MonkeyPatch
):
    requested: list[str] = []

    def fake_from_pretrained(cls, path: str, **kwargs: Any) -> LinFusion:
        requested.append(path)
        return cls.fresh_for(sd_unet)

    monkeypatch.setattr(LinFusion, "from_pretrained", classmethod(fake_from_pretrained))
    config = FrozenDict({"_name_or_path": "runwayml/stable-diffusion-v1-5"})
    pipe = SimpleNamespace(unet=sd_unet, config=config)
    model = LinFusion.construct_for(pipe)
    assert requested == ["Yuanshi/LinFusion-1-5"]
    assert [layer for _, layer in attn1_layers(sd_unet)] == model.layers


# ---------------------------------------------------------------------------------------------------
# Fresh layers (distillation start): one per self-attention, teacher or random init, removable


def test_fresh_layers_replace_exactly_the_self_attention_layers(small_unet: nn.Module):
    originals = attn1_layers(small_unet)
    cross = [mod for name, mod in small_unet.named_modules() if name.endswith(".attn2")]
    assert originals

    model = LinFusion.construct_for(unet=small_unet, load_pretrained=False)

    mounted = attn1_layers(small_unet)
    assert len(model.layers) == len(originals) == len(mounted)
    for (name, original), (mounted_name, layer), own in zip(originals, mounted, model.layers, strict=True):
        assert mounted_name == name and layer is own and isinstance(layer, LinFusionAttention)
        assert layer.to_q.weight.shape == original.to_q.weight.shape and layer.heads == original.heads
    assert [mod for name, mod in small_unet.named_modules() if name.endswith(".attn2")] == cross
    assert not any(isinstance(mod, LinFusionAttention) for mod in cross)


def test_teacher_init_copies_attn1_projections_and_zeroes_the_residual_mlps(small_unet: nn.Module):
    teachers = [attn for _, attn in attn1_layers(small_unet)]
    model = LinFusion.construct_for(unet=small_unet, load_pretrained=False, init="teacher")
    for layer, teacher in zip(model.layers, teachers, strict=True):
        for name in ("to_q", "to_k", "to_v"):
            assert torch.equal(getattr(layer, name).weight, getattr(teacher, name).weight)
        assert torch.equal(layer.to_out[0].weight, teacher.to_out[0].weight)
        assert torch.equal(layer.to_out[0].bias, teacher.to_out[0].bias)
        for proj in (layer.to_q_, layer.to_k_):
            assert not proj[-1].weight.any() and not proj[-1].bias.any()
            assert proj[0].weight.any()  # only the last Linear is zeroed
        x = torch.randn(1, 5, layer.to_q.weight.shape[1])
        assert not layer.to_q_(x).any() and not layer.to_k_(x).any()  # q_in = k_in = x at the start


def test_random_init_differs_from_the_teacher(small_unet: nn.Module):
    teachers = [attn for _, attn in attn1_layers(small_unet)]
    model = LinFusion.construct_for(unet=small_unet, load_pretrained=False, init="random")
    for layer, teacher in zip(model.layers, teachers, strict=True):
        for name in ("to_q", "to_k", "to_v"):
            assert not torch.equal(getattr(layer, name).weight, getattr(teacher, name).weight)
        assert not torch.equal(layer.to_out[0].weight, teacher.to_out[0].weight)
        assert layer.to_q_[-1].weight.any() and layer.to_k_[-1].weight.any()


def test_unknown_init_is_a_usage_error(sd_unet: nn.Module):
    with pytest.raises(UsageError, match="init"):
        LinFusion.construct_for(unet=sd_unet, load_pretrained=False, init="zeros")
    assert_unet_untouched(sd_unet)


def test_projection_mid_dim_is_used_and_recorded(sd_unet: nn.Module):
    model = LinFusion.construct_for(unet=sd_unet, load_pretrained=False, projection_mid_dim=8)
    assert all(layer.to_q_[0].out_features == layer.to_k_[0].out_features == 8 for layer in model.layers)
    assert [spec["projection_mid_dim"] for spec in model.config.modules_list] == [8] * len(model.layers)


def test_unmount_restores_bit_identical_unet_outputs(small_unet: nn.Module):
    inputs = unet_inputs(small_unet)
    before = run_unet(small_unet, inputs)
    originals = [mod for _, mod in attn1_layers(small_unet)]

    model = LinFusion.construct_for(unet=small_unet, load_pretrained=False)
    with_linfusion = run_unet(small_unet, inputs)
    assert not torch.allclose(with_linfusion, before)  # the mounted layers are really used

    model.unmount()
    assert [mod for _, mod in attn1_layers(small_unet)] == originals
    assert all(type(mod) is Attention for mod in originals)
    assert torch.equal(run_unet(small_unet, inputs), before)

    model.mount(small_unet)  # mount/unmount can be repeated
    assert torch.equal(run_unet(small_unet, inputs), with_linfusion)


def test_mounted_layers_follow_the_unet_dtype(sd_unet: nn.Module):
    sd_unet.to(torch.bfloat16)
    model = LinFusion.construct_for(unet=sd_unet, load_pretrained=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
