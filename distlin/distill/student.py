"""Teacher and student in one UNet: the student is the UNet with LinFusion mounted; for the teacher pass the
LinFusion layers step aside and the original softmax ``attn1`` modules are back.

One UNet instead of a second copy: the frozen weights are shared by construction, so the teacher cannot drift
and weight memory is halved (SDXL's UNet alone is 10 GB in float32). Swapping the ``attn1`` modules costs a
few attribute assignments per forward. The student stays mounted through ``backward``, which gradient
checkpointing needs: it recomputes student blocks during the backward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import cast

import torch
from torch import nn

from distlin.distill.encode import Conditioning, predict
from distlin.distill.losses import LossTerms, LossWeights, diffusion_target, distillation_loss
from distlin.errors import UsageError
from distlin.linfusion import LinFusion, self_attention_layers
from distlin.linfusion.model import Init

INITS = ("teacher", "random")  # the values of LinFusion's Init; anything else is a checkpoint


def initial_linfusion(unet: nn.Module, init: str, seed: int) -> LinFusion:
    """The starting layers: copied from the teacher, PyTorch's random init drawn from ``seed``, or a checkpoint.

    Drawn from ``seed`` under a forked RNG, so the evaluation can rebuild exactly the layers training began with.
    """
    if init in INITS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LinFusion.fresh_for(unet, init=cast(Init, init))
    try:
        linfusion = LinFusion.from_pretrained(init)
    except (OSError, ValueError) as err:
        raise UsageError(
            f"cannot load --init {init!r} ({type(err).__name__}); pass teacher, random, or a "
            "LinFusion checkpoint folder or Hub id"
        ) from None
    linfusion.check_fits(unet)
    return linfusion


@contextmanager
def captured_outputs(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Collect each module's forward output by its index in ``modules`` (call order differs from layer order:
    ``named_modules`` lists the up blocks before the mid block). The hooks are gone on exit, so a gradient-
    checkpointing recomputation during backward does not overwrite anything."""
    outputs: list[torch.Tensor | None] = [None] * len(modules)

    def store(index: int, _module: nn.Module, _args: object, output: torch.Tensor) -> None:
        outputs[index] = output

    handles = [module.register_forward_hook(partial(store, i)) for i, module in enumerate(modules)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def mounted(linfusion: LinFusion, unet: nn.Module) -> Iterator[None]:
    linfusion.mount(unet)
    try:
        yield
    finally:
        linfusion.unmount()


@contextmanager
def unmounted(linfusion: LinFusion, unet: nn.Module) -> Iterator[None]:
    linfusion.unmount()
    try:
        yield
    finally:
        linfusion.mount(unet)


class Distiller(nn.Module):
    """One distillation forward: noise the latents, run teacher then student, return the loss terms.

    LinFusion is the only registered submodule, so DDP broadcasts and all-reduces the trainable layers alone;
    the frozen UNet is held outside the module tree. Call under autocast for mixed precision.
    """

    def __init__(self, unet: nn.Module, linfusion: LinFusion, noise_scheduler: object, weights: LossWeights):
        super().__init__()
        self.linfusion = linfusion
        self._frozen = {"unet": unet}  # a plain dict: not a submodule
        self.noise_scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        self.weights = weights
        linfusion.mount(unet)

    @property
    def unet(self) -> nn.Module:
        return self._frozen["unet"]

    def forward(self, cond: Conditioning, noise: torch.Tensor, timesteps: torch.Tensor) -> LossTerms:
        noisy = self.noise_scheduler.add_noise(cond.latents, noise, timesteps)
        target = diffusion_target(self.prediction_type, self.noise_scheduler, cond.latents, noise, timesteps)
        with unmounted(self.linfusion, self.unet), torch.no_grad():
            originals = [module for _, module in self_attention_layers(self.unet)]
            with captured_outputs(originals) as teacher_features:
                teacher = predict(self.unet, noisy, timesteps, cond)
        with captured_outputs(self.linfusion.layers) as student_features:
            student = predict(self.unet, noisy, timesteps, cond)
        return distillation_loss(student, teacher, target, student_features, teacher_features, self.weights)
