"""Every rewrite of a model keeps its state-dict keys (so checkpoints, LoRAs and other diffusers components see the
model they expect) and is undone exactly: the same module objects and attention processors as before."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from diffusers import SanaControlNetModel, SanaControlNetPipeline, StableDiffusionControlNetPipeline
from test_sana_controlnet import CONTROLNET_KEYS
from torch import nn

from distlin import LinFusion
from distlin.components import kept_self_attention
from distlin.families.sana.family import TINY_SANA
from distlin.families.sana.tiny import build_sana_pipeline
from distlin.families.sana.vae import parallelize_dc_ae
from distlin.lean import bound_memory
from distlin.models.tiny import build_controlnet, build_pipeline
from distlin.parallel import PatchParallelConfig, Runtime, parallelize
from distlin.parallel.compile import compile_unet
from distlin.vae.parallel import parallelize_vae


def _tree(model: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """Which object sits at every module name, and which processor every attention holds."""
    modules = {name: id(m) for name, m in model.named_modules()}
    processors = {name: id(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")}
    return modules, processors


def _pipeline() -> Any:
    pipe = build_pipeline("tiny-sd15", seed=0)
    LinFusion.construct_for(pipe, load_pretrained=False)
    return pipe


def _controlnet_pipeline() -> Any:
    return StableDiffusionControlNetPipeline.from_pipe(_pipeline(), controlnet=build_controlnet("tiny-sd15"))


def _sana_pipeline() -> Any:
    return build_sana_pipeline("tiny-sana", seed=0)


def _sana_controlnet_pipeline() -> Any:
    config = {key: TINY_SANA["transformer"][key] for key in CONTROLNET_KEYS}
    controlnet = SanaControlNetModel(**config, num_layers=2)
    return SanaControlNetPipeline.from_pipe(_sana_pipeline(), controlnet=controlnet)


def _engine(pipe: Any) -> Callable[[], None]:
    return parallelize(pipe, PatchParallelConfig(), Runtime()).undo


def _kept_attention(pipe: Any) -> Callable[[], None]:
    kept = kept_self_attention(pipe.unet)
    kept.__enter__()
    return lambda: kept.__exit__(None, None, None)


def _bounds(part: str) -> Callable[[Any], Callable[[], None]]:
    return lambda pipe: bound_memory(getattr(pipe, part), 8, 1000).restore


# name: (the pipeline, the model whose keys and tree are checked, the rewrite returning its undo)
REWRITES: dict[str, tuple[Callable[[], Any], str, Callable[[Any], Callable[[], None]]]] = {
    "memory bounds of the UNet": (_pipeline, "unet", _bounds("unet")),
    "memory bounds of the VAE": (_pipeline, "vae", _bounds("vae")),
    "IP-Adapter loading's kept processors": (_pipeline, "unet", _kept_attention),
    "the patch-parallel engine": (_pipeline, "unet", _engine),
    "the engine's ControlNet": (_controlnet_pipeline, "controlnet", _engine),
    "the band-parallel VAE": (_pipeline, "vae", lambda pipe: parallelize_vae(pipe.vae, Runtime()).undo),
    "--compile": (_pipeline, "unet", lambda pipe: compile_unet(pipe.unet, "eager").restore),
    "SANA's band-parallel transformer": (_sana_pipeline, "transformer", _engine),
    "SANA's ControlNet on the transformer's engine": (_sana_controlnet_pipeline, "controlnet", _engine),
    "SANA's band-parallel DC-AE": (_sana_pipeline, "vae", lambda pipe: parallelize_dc_ae(pipe.vae, Runtime()).undo),
}


@pytest.mark.parametrize("rewrite", REWRITES, ids=list(REWRITES))
def test_every_rewrite_keeps_the_state_dict_keys_and_undo_restores_the_model(rewrite: str) -> None:
    build, part, apply = REWRITES[rewrite]
    pipe = build()
    model = getattr(pipe, part)
    keys, tree = list(model.state_dict()), _tree(model)
    undo = apply(pipe)
    assert list(model.state_dict()) == keys
    assert _tree(model) != tree or rewrite == "--compile"  # compile swaps methods, not modules
    undo()
    assert _tree(model) == tree and list(model.state_dict()) == keys


def test_a_prepared_pipeline_keeps_the_state_dict_keys_of_the_model_with_linfusion() -> None:
    """Every rewrite in the order a run applies them: the keys are the model's, LinFusion's layers included."""
    pipe = _pipeline()
    keys = {part: list(getattr(pipe, part).state_dict()) for part in ("unet", "vae")}
    undo = [bound_memory(pipe.unet, 8, 1000).restore, bound_memory(pipe.vae, 8, 1000).restore, _engine(pipe)]
    undo += [parallelize_vae(pipe.vae, Runtime()).undo, compile_unet(pipe.unet, "eager").restore]
    assert {part: list(getattr(pipe, part).state_dict()) for part in keys} == keys
    for step in reversed(undo):
        step()
    assert {part: list(getattr(pipe, part).state_dict()) for part in keys} == keys


def test_linfusion_adds_only_its_projections_and_unmount_restores_the_unet() -> None:
    pipe = build_pipeline("tiny-sd15", seed=0)
    keys, tree = list(pipe.unet.state_dict()), _tree(pipe.unet)
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    mounted = list(pipe.unet.state_dict())
    assert set(keys) <= set(mounted)
    assert {k.split(".attn1.")[1].split(".")[0] for k in set(mounted) - set(keys)} == {"to_q_", "to_k_"}
    linfusion.unmount()
    assert _tree(pipe.unet) == tree and list(pipe.unet.state_dict()) == keys
