"""The ``LinFusion`` container: one LinFusion layer per UNet self-attention, in the released checkpoint format.

Saved with diffusers' ``save_pretrained`` as ``config.json`` (``_class_name: LinFusion`` and ``modules_list``)
plus ``diffusion_pytorch_model.safetensors`` whose keys are ``{i}.to_q.weight`` ... for the i-th ``attn1``
layer of the UNet in ``named_modules()`` order. Loading goes through diffusers, so hub ids, the user's HF
cache and offline mode behave as for any diffusers model.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from torch import nn

from distlin.errors import UsageError
from distlin.linfusion.attention import LinFusionAttention
from distlin.surgery import Swaps

# Base models whose released LinFusion checkpoint is known, by the pipeline's ``_name_or_path``.
CHECKPOINT_FOR_BASE: dict[str, str] = {
    "runwayml/stable-diffusion-v1-5": "Yuanshi/LinFusion-1-5",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "Yuanshi/LinFusion-1-5",
    "Lykon/dreamshaper-8": "Yuanshi/LinFusion-1-5",
    "SG161222/Realistic_Vision_V4.0_noVAE": "Yuanshi/LinFusion-1-5",
    "stabilityai/stable-diffusion-2-1": "Yuanshi/LinFusion-2-1",
    "stabilityai/stable-diffusion-xl-base-1.0": "Yuanshi/LinFusion-XL",
}

Init = Literal["teacher", "random"]


def self_attention_layers(unet: nn.Module) -> list[tuple[str, Attention]]:
    """The UNet's self-attention layers (names containing ``attn1``) in ``named_modules()`` order."""
    return [
        (name, module)
        for name, module in unet.named_modules()
        if name.split(".")[-1] == "attn1" and isinstance(module, Attention)
    ]


def checkpoint_for(pipeline: Any) -> str:
    """The released LinFusion checkpoint for a pipeline's base model, or a clear error."""
    name = getattr(getattr(pipeline, "config", None), "_name_or_path", None) or getattr(pipeline, "name_or_path", None)
    if name in CHECKPOINT_FOR_BASE:
        return CHECKPOINT_FOR_BASE[name]
    raise UsageError(
        f"no released LinFusion checkpoint is known for base model {name!r}; "
        "pass pretrained_model_name_or_path=<hub id or local dir> (or load_pretrained=False to build fresh layers)"
    )


class LinFusion(ModelMixin, ConfigMixin):
    """LinFusion layers for one UNet, mountable in place of its ``attn1`` modules and removable again."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, modules_list: list[dict[str, Any]]):
        super().__init__()
        for i, spec in enumerate(modules_list):
            self.add_module(str(i), LinFusionAttention(spec["dim_n"], spec["heads"], spec.get("projection_mid_dim")))
        # A plain object holding the UNet and its original layers: never submodules (or checkpoint keys) of this one.
        self._mounted: Swaps | None = None

    @property
    def layers(self) -> list[LinFusionAttention]:
        return [self.get_submodule(str(i)) for i in range(len(self.config.modules_list))]

    @classmethod
    def specs_for(cls, unet: nn.Module, projection_mid_dim: int | None = None) -> list[dict[str, Any]]:
        """``modules_list`` describing fresh LinFusion layers for every ``attn1`` of ``unet``."""
        return [
            {
                "module_name": name,
                "dim_n": attn.query_dim,
                "heads": attn.heads,
                "projection_mid_dim": projection_mid_dim,
            }
            for name, attn in self_attention_layers(unet)
        ]

    @classmethod
    def fresh_for(cls, unet: nn.Module, init: Init = "teacher", projection_mid_dim: int | None = None) -> LinFusion:
        """New layers for ``unet``: ``teacher`` copies its attn1 projections (P_q, P_k start at zero), ``random``
        keeps PyTorch's default init as the released training code does."""
        if init not in ("teacher", "random"):
            raise UsageError(f"unknown LinFusion init {init!r}; use 'teacher' or 'random'")
        model = cls(cls.specs_for(unet, projection_mid_dim))
        if init == "teacher":
            for layer, (_, teacher) in zip(model.layers, self_attention_layers(unet), strict=True):
                layer.copy_projections_from(teacher)
                layer.zero_projections()
        return model

    def check_fits(self, unet: nn.Module) -> None:
        """Raise one clear error naming the first layer where this checkpoint and the UNet disagree."""
        targets = self_attention_layers(unet)
        specs = self.config.modules_list
        for i, (spec, (name, attn)) in enumerate(zip(specs, targets, strict=False)):
            if spec["dim_n"] != attn.query_dim or spec["heads"] != attn.heads:
                raise UsageError(
                    f"LinFusion checkpoint layer {i} has dim {spec['dim_n']} and {spec['heads']} heads but UNet "
                    f"layer {name} has dim {attn.query_dim} and {attn.heads} heads; use the checkpoint made "
                    "for this base model"
                )
        if len(specs) != len(targets):
            i = min(len(specs), len(targets))
            missing = (
                f"UNet layer {targets[i][0]} has no checkpoint layer"
                if len(specs) < len(targets)
                else f"checkpoint layer {i} ({specs[i].get('module_name')}) has no UNet self-attention layer"
            )
            raise UsageError(
                f"LinFusion checkpoint has {len(specs)} layers but the UNet has {len(targets)} self-attention "
                f"layers; first mismatch at layer {i}: {missing}; use the checkpoint made for this base model"
            )

    def mount(self, unet: nn.Module) -> LinFusion:
        """Put the LinFusion layers where the UNet's ``attn1`` modules are (every other state-dict key stays, and
        those of ``attn1`` gain LinFusion's projections); :meth:`unmount` puts the originals back."""
        if self._mounted is not None:
            raise RuntimeError("this LinFusion is already mounted; unmount() it first")
        self.check_fits(unet)
        param = next(unet.parameters())
        nn.Module.to(self, device=param.device, dtype=param.dtype)  # ModelMixin.to warns needlessly here
        self._mounted = Swaps(unet)
        for layer, (name, _) in zip(self.layers, self_attention_layers(unet), strict=True):
            self._mounted.module(name, layer)
        return self

    def unmount(self) -> None:
        """Put the original attention modules back: the UNet then computes exactly what it did before."""
        if self._mounted is not None:
            self._mounted.restore()
            self._mounted = None

    @classmethod
    def construct_for(
        cls,
        pipeline: Any = None,
        unet: nn.Module | None = None,
        load_pretrained: bool = True,
        pretrained_model_name_or_path: str | None = None,
        init: Init = "teacher",
        projection_mid_dim: int | None = None,
        **load_kwargs: Any,
    ) -> LinFusion:
        """Build or load LinFusion for ``pipeline`` (or a bare ``unet``) and mount it; returns the container.

        Without a path, the pipeline's base model id picks the released checkpoint.
        """
        unet = unet if unet is not None else getattr(pipeline, "unet", None)
        if unet is None:
            raise UsageError("LinFusion.construct_for needs pipeline=<diffusers pipeline> or unet=<UNet>")
        if load_pretrained:
            path = pretrained_model_name_or_path or checkpoint_for(pipeline)
            model = cls.from_pretrained(path, **load_kwargs)
        else:
            model = cls.fresh_for(unet, init=init, projection_mid_dim=projection_mid_dim)
        return model.mount(unet)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("LinFusion is a container: mount() it on a UNet and call the UNet")
