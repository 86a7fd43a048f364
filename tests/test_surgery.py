"""Every rewrite of a model keeps its state-dict keys (so checkpoints, LoRAs and other diffusers components see the
model they expect) and is undone exactly: the same module objects and attention processors as before."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from torch import nn

from distlin import LinFusion
from distlin.components import kept_self_attention
from distlin.lean import bound_memory
from distlin.models.tiny import build_pipeline
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


def _engine(pipe: Any) -> Callable[[], None]:
    return parallelize(pipe, PatchParallelConfig(), Runtime()).undo


def _kept_attention(pipe: Any) -> Callable[[], None]:
    kept = kept_self_attention(pipe.unet)
    kept.__enter__()
    return lambda: kept.__exit__(None, None, None)


REWRITES: dict[str, tuple[str, Callable[[Any], Callable[[], None]]]] = {
    "memory bounds of the UNet": ("unet", lambda pipe: bound_memory(pipe.unet, 8, 1000).restore),
    "memory bounds of the VAE": ("vae", lambda pipe: bound_memory(pipe.vae, 8, 1000).restore),
    "IP-Adapter loading's kept processors": ("unet", _kept_attention),
    "the patch-parallel engine": ("unet", _engine),
    "the band-parallel VAE": ("vae", lambda pipe: parallelize_vae(pipe.vae, Runtime()).undo),
    "--compile": ("unet", lambda pipe: compile_unet(pipe.unet, "eager").restore),
}


@pytest.mark.parametrize("rewrite", REWRITES, ids=list(REWRITES))
def test_every_rewrite_keeps_the_state_dict_keys_and_undo_restores_the_model(rewrite: str) -> None:
    pipe = _pipeline()
    part, apply = REWRITES[rewrite]
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
