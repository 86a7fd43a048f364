"""What a model family tells the rest of distlin: the one seam between the engine and a kind of model.

The engine core (runtime, topology, layout, exchanges, counters, the sequential band interpreter) works on row
bands of a latent and knows no model. Everything that differs between model families (which attribute of the
pipeline denoises, what its latent argument is called, how latent rows map to tokens, how its layers are split,
its VAE, its cascade sampler, its memory formula) is one :class:`Family`, registered in
:mod:`distlin.families`. Torch-free: the model-side parts are named as ``module:function`` and imported on use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from distlin.errors import UsageError


def load(target: str) -> Any:
    """The object a ``module:name`` string names (imported on first use, so this module stays torch-free)."""
    module, _, name = target.partition(":")
    return getattr(import_module(module), name)


@dataclass(frozen=True)
class Family:
    """One model family, as the engine, the planner, the run and the command line need it.

    ``denoiser``: the pipeline attribute that is called once per step (``unet``, ``transformer``);
    ``latent_argument``: its argument holding the ``(B, C, H, W)`` latent; ``residual_arguments``: conditioning
    residuals a ControlNet hands it (cut into bands when whole); ``controlnet_fits``: the denoiser config keys a
    ControlNet copies from the model it was made for (checked before anything loads); ``load_controlnet``:
    ``module:function`` loading one ControlNet that fits the denoiser, ``(source, pipe) -> model``;
    ``controlnet_pipeline``: ``module:function`` giving the pipeline variant that runs them, ``(pipe,
    controlnets) -> pipe``;
    ``row_unit(denoiser_config)``: the latent rows a band boundary must be a multiple of (2**downsamplings for a
    UNet, the patch size for a DiT);
    ``latent_factor(vae_config)``: image pixels per latent pixel; ``parallelize``: ``module:function`` making the
    pipeline's denoiser (and its ControlNets) patch-parallel, ``(pipe, config, runtime) -> handle`` with
    ``.ctx``, ``.check_size``, ``.undo``; ``parallelize_vae``: ``module:function`` giving the band-parallel
    coder, ``(vae, runtime, stats, index_limit) -> coder``; ``plan``: ``module:function`` predicting a run's
    peak memory per rank for ``--plan`` and the automatic savers, ``(arch, height, width, ranks, **options) ->``
    the planner's dict, from ``architecture(model)``: a model's configs known offline (None: not planned);
    ``savers``: the memory savers its ``plan`` reads (:data:`distlin.memory.fit.SAVERS` names), the only ones a
    run that does not fit switches on or its refusal names;
    ``sequential_vae``: whether its VAE decodes band by band through host RAM (or on the device:
    ``--vae-store``) above the size threshold, with ``sequential_coder`` (``module:function``, ``(vae, runtime,
    band_rows, store, on_done) -> coder``; empty: the AutoencoderKL interpreter of :mod:`distlin.vae.sequential`)
    and ``sequential_holds_less`` (``module:function``, ``(vae_config, band_rows, height, width, ranks) ->
    bool``: whether a band-by-band pass holds less than a rank's band-parallel decode, asked by ``auto`` above
    the threshold; empty: always); ``linfusion``: whether LinFusion layers mount on it (SANA's attention is
    linear already);
    ``hub_models``: Hub ids its presets use (with ``builtin``, the models whose rank split is checked from
    ``architecture`` before any rank starts);
    ``builtin``: offline model names, built by ``build`` (``module:function``, ``(name, seed, torch_dtype)``);
    ``call_options``: keyword arguments every pipeline call of a run adds; ``no_negative_prompt``: what the
    pipeline takes for an empty one; ``cascade``: ``module:function`` running its cascades and ``--init-image``
    (empty: Stable Diffusion's own pipelines, SDEdit or DemoFusion); ``unsupported``: features that refuse
    in one line, name → why.
    """

    name: str
    denoiser: str
    latent_argument: str
    row_unit: Callable[[dict], int]
    latent_factor: Callable[[dict], int]
    parallelize: str
    parallelize_vae: str
    residual_arguments: tuple[str, ...] = ()
    controlnet_fits: tuple[str, ...] = ()
    load_controlnet: str = "distlin.components:load_controlnet"
    controlnet_pipeline: str = "distlin.components:controlnet_pipeline"
    plan: str = ""
    savers: tuple[str, ...] = ("micro_batch", "vae_decode", "vae_attention_rows")
    architecture: Callable[[str], dict | None] = lambda model: None
    sequential_vae: bool = True
    sequential_coder: str = ""
    sequential_holds_less: str = ""
    linfusion: bool = True
    builtin: tuple[str, ...] = ()
    hub_models: tuple[str, ...] = ()
    build: str = ""
    call_options: tuple[tuple[str, Any], ...] = ()
    no_negative_prompt: str | None = None  # None lets SDXL use its zero embedding
    cascade: str = ""
    unsupported: tuple[tuple[str, str], ...] = ()

    def denoiser_of(self, pipe: Any) -> Any:
        """The pipeline's denoiser module."""
        return getattr(pipe, self.denoiser)

    def refusal(self, feature: str) -> str | None:
        """Why ``feature`` does not work with this family (one line), or None when it does."""
        return dict(self.unsupported).get(feature)

    def check_sizes(self, model: str, topology: Any, sizes: list[tuple[int, int]]) -> None:
        """Raise the one-line :class:`UsageError` of a size the ranks cannot split, for a model of this family's
        own (``builtin``, ``hub_models``) whose configs are known offline (``architecture``)."""
        listed = model.removeprefix("distlin/") in self.builtin or model in self.hub_models
        configs = self.architecture(model) if listed else None
        if configs is None:
            return
        unit, factor = self.row_unit(configs[self.denoiser]), self.latent_factor(configs["vae"])
        for height, width in sizes:
            topology.check_image(height, width, unit, factor)

    def refuse(self, feature: str, used: bool) -> None:
        """Raise the one-line :class:`UsageError` of ``feature`` when it is ``used`` and this family refuses it."""
        why = self.refusal(feature)
        if used and why is not None:
            raise UsageError(f"{self.name}: {why}")


def check_controlnet_fits(
    source: str,
    controlnet: dict[str, Any],
    denoiser: dict[str, Any],
    keys: Sequence[str],
    what: str,
) -> None:
    """The ControlNet was made for a denoiser like this one: the config ``keys`` it copies from it are equal
    (a UNet's: its widths, text width, latent channels)."""
    for key in keys:
        if key in controlnet and controlnet.get(key) != denoiser.get(key):
            mine, theirs = _as_text(controlnet[key]), _as_text(denoiser.get(key))
            raise UsageError(
                f"ControlNet {source!r} was made for another base model ({key} {mine}, the model's {what} has "
                f"{theirs}); pass a ControlNet trained for this model"
            )


def _as_text(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, list) else str(value)
