"""Typed settings of one generation, built from a preset and overrides and validated before anything heavy.

:func:`build_settings` is what the command line and the web app call: it merges a preset (built-in or a YAML
file) with the given overrides and checks every value that can be checked without torch, diffusers or the
network — sizes, steps, guidance, seed, dtype, device name, model and LinFusion sources, cascade stages, the
rank split of every stage, memory options and thresholds — so bad input costs a fraction of a second and one
line. Torch-free at import.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from distlin.components import (
    IpAdapter,
    Lora,
    check_controlnet,
    check_ip_adapter,
    check_lora,
    check_shared_image_encoder,
)
from distlin.errors import UsageError
from distlin.families import family_of_model
from distlin.inputs import check_image
from distlin.ops.kernels import check_kernel
from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.layout import TooManyRanks
from distlin.parallel.topology import Topology, row_unit
from distlin.presets import PRESET_SCHEMA, load_preset
from distlin.ranks import ranks_from_env
from distlin.sampling.stages import Stage, cascade_stages, stages_from_image
from distlin.schedulers import check_scheduler, check_steps
from distlin.sizes import check_side, format_size
from distlin.sources import check_linfusion_source, check_model_source, scheduler_config, unet_config
from distlin.thresholds import Thresholds

MAX_SEED = 2**64 - 1
# The longest side of an output: 2**20 px (a square of that side is a 3 TiB RGB image). Beyond it the memory
# planner's per-band walk would take minutes before the refusal it would come to.
MAX_SIDE = 2**20
MAX_TIMEOUT_S = 30 * 24 * 3600  # a collective's timeout: torch keeps it in milliseconds, inf or 1e300 overflow
DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
VAE_DECODES = ("auto", "direct", "sequential")
VAE_STORES = ("auto", "host", "device")  # where the sequential VAE keeps full-size activations
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def canonical_dtype(name: str) -> str:
    """``float32|float16|bfloat16`` for those names or their short forms ``fp32|fp16|bf16``."""
    if name not in DTYPE_ALIASES:
        raise UsageError(f"unknown dtype {name!r}; use float32, float16 or bfloat16 (or fp32, fp16, bf16)")
    return DTYPE_ALIASES[name]


@dataclass(frozen=True)
class RunSettings:
    """Everything one generation needs to know, validated (see :func:`build_settings`)."""

    preset: str
    model: str
    linfusion: str
    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    dtype: str  # canonical: float32, float16 or bfloat16
    device: str  # auto, cpu, mps, cuda or cuda:N
    engine: PatchParallelConfig = field(default_factory=PatchParallelConfig)
    stages: tuple[Stage, ...] = ()  # a cascade's resolutions, ending at (height, width); empty: one pass
    vae_decode: str = "auto"  # direct (plain / band-parallel), sequential (band by band via host RAM) or auto
    vae_attention_rows: int | None = None  # stream the sequential VAE's mid-block K/V from host RAM
    vae_store: str = "auto"  # the sequential VAE's activations: host RAM, the device, or auto (the device if they fit)
    attention_kernel: str = "auto"  # LinFusion attention: auto, torch or triton
    compile: bool = False  # torch.compile the UNet's pure-compute modules (distlin.parallel.compile)
    thresholds: Thresholds = field(default_factory=Thresholds)
    backend: str | None = None
    timeout_s: float = 300.0
    loras: tuple[Lora, ...] = ()  # fused into the model, in this order
    scheduler: str | None = None  # a name of distlin.schedulers.SCHEDULERS; None: the model's own
    init_image: str | None = None  # start from this picture: image-to-image, or the cascade from its size up
    strength: float | None = None  # how far the init image is noised (the first stage's strength)
    init_stage: int = 0  # the preset cascade's stage the init image starts at (``stages`` begins there)
    mask: str | None = None  # inpaint the init image where this picture is white
    controlnet: tuple[str, ...] = ()  # ControlNet folders or Hub ids; several: their residuals are summed
    control_image: tuple[str, ...] = ()  # one conditioning image per ControlNet, in order
    control_scale: tuple[float, ...] = ()  # one conditioning scale per ControlNet, or none (1 each)
    ip_adapter: tuple[str, ...] = ()  # IP-Adapters: weights files, folders or Hub ids (components.IpAdapter)
    ip_image: tuple[str, ...] = ()  # one reference picture per IP-Adapter, in order
    ip_scale: tuple[float, ...] = ()  # one scale per IP-Adapter, or none (1 each)
    ip_image_encoder: str | None = None  # their CLIP image encoder, when not in the image_encoder folder beside them

    @property
    def guidance(self) -> bool:
        """Classifier-free guidance on: the UNet sees a batch of two halves."""
        return self.guidance_scale > 1.0

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Every (height, width) the UNet denoises at: each cascade stage, or the one size."""
        return [(s.height, s.width) for s in self.stages] or [(self.height, self.width)]

    @property
    def ip_scales(self) -> tuple[float, ...]:
        """The scale of every IP-Adapter (1 where none is given)."""
        return self.ip_scale or (1.0,) * len(self.ip_adapter)

    @property
    def ip_adapters(self) -> tuple[IpAdapter, ...]:
        """Each IP-Adapter with its picture, scale and the image encoder they share, in order."""
        encoder = self.ip_image_encoder
        return tuple(
            IpAdapter(source, image, scale, encoder)
            for source, image, scale in zip(self.ip_adapter, self.ip_image, self.ip_scales, strict=True)
        )

    @property
    def control_scales(self) -> tuple[float, ...]:
        """The conditioning scale of every ControlNet (1 where none is given)."""
        return self.control_scale or (1.0,) * len(self.controlnet)

    def topology(self, world_size: int, rank: int = 0) -> Topology:
        """Which ranks share rows in this run (guidance off: every rank is a patch rank)."""
        return Topology.for_run(world_size, cfg_parallel=self.engine.cfg_parallel, guidance=self.guidance, rank=rank)

    def metadata(self) -> dict[str, Any]:
        """What an output file records of the settings (the run adds where it ran and the versions)."""
        return {
            "preset": self.preset,
            **{key: getattr(self, key) for key in PRESET_SCHEMA if hasattr(self, key)},
            "mode": self.engine.mode,
            "warmup_steps": self.engine.warmup_steps,
            "stale": ",".join(sorted(self.engine.stale)) or "none",
            "cfg_parallel": self.engine.cfg_parallel,
            "micro_batch": self.engine.micro_batch,
            "compile": self.compile,
            "stages": [{"width": s.width, "height": s.height, "strength": s.strength} for s in self.stages],
            "vae_decode": self.vae_decode,
            "vae_attention_rows": self.vae_attention_rows,
            "vae_store": self.vae_store,
            "loras": [(lora.path, lora.scale) for lora in self.loras],
            "scheduler": self.scheduler,
            "init_image": self.init_image,
            "strength": self.strength,
            "init_stage": self.init_stage,
            "mask": self.mask,
            "controlnet": list(self.controlnet),
            "control_image": list(self.control_image),
            "control_scale": list(self.control_scales),
            "ip_adapter": list(self.ip_adapter),
            "ip_image": list(self.ip_image),
            "ip_scale": list(self.ip_scales),
            "ip_image_encoder": self.ip_image_encoder,
        }


def build_settings(
    preset: str,
    overrides: Mapping[str, Any] | None = None,
    world_size: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> RunSettings:
    """The preset's values with ``overrides`` (keys of :class:`RunSettings` or of the engine config; None values
    are ignored) applied, validated for ``world_size`` ranks (default: torchrun's ``WORLD_SIZE``).

    Raises a :class:`~distlin.errors.UsageError` naming the value and the fix; imports nothing heavy.
    """
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    values = load_preset(preset)
    engine_keys = {"mode", "warmup_steps", "cfg_parallel", "micro_batch", "stale"}
    engine_values = {key: values[key] for key in ("mode", "warmup_steps", "cfg_parallel") if key in values}
    if "micro_batch" in values:
        engine_values["micro_batch"] = values["micro_batch"]
    engine_values.update({key: given.pop(key) for key in engine_keys & given.keys()})
    values.update({key: given.pop(key) for key in PRESET_SCHEMA.keys() & given.keys()})
    thresholds = Thresholds.from_env(environ)
    engine = PatchParallelConfig(**engine_values, index_limit=thresholds.index_limit)
    stages = cascade_stages(values)
    for key in ("controlnet", "control_image", "control_scale", "ip_adapter", "ip_image", "ip_scale"):  # 1 or more
        if key in given:
            given[key] = tuple(given[key]) if isinstance(given[key], (list, tuple)) else (given[key],)
    if given.get("loras"):
        given["loras"] = tuple(lora if isinstance(lora, Lora) else Lora.parse(lora) for lora in given["loras"])
    if given.get("init_image") is not None:
        width, height = check_image(given["init_image"], "--init-image")
        stages, given["strength"], given["init_stage"] = stages_from_image(stages, width, height, given.get("strength"))
    values["dtype"] = canonical_dtype(values["dtype"])
    settings = RunSettings(
        preset=preset,
        **{key: values[key] for key in PRESET_SCHEMA if key not in engine_keys},
        engine=engine,
        stages=stages,
        thresholds=thresholds,
        **given,
    )
    check_settings(settings, ranks_from_env().world_size if world_size is None else world_size)
    return settings


def check_vae_decode(vae_decode: str) -> None:
    """A known ``--vae-decode`` (the run's and the memory planner's)."""
    if vae_decode not in VAE_DECODES:
        raise UsageError(f"unknown VAE decode {vae_decode!r}; use one of {', '.join(VAE_DECODES)}")


def check_settings(settings: RunSettings, world_size: int) -> None:
    """Range checks on every value, so a bad preset file is caught as surely as a bad flag."""
    for key in ("height", "width"):
        size = getattr(settings, key)
        check_side(key, size, f"--{key}")
        if size > MAX_SIDE:
            raise UsageError(f"{key} {size} is above {MAX_SIDE} px, the largest side planned; pass a smaller --{key}")
    if settings.steps < 1:
        raise UsageError(f"steps {settings.steps} must be at least 1; pass --steps 1 or more")
    if not (math.isfinite(settings.guidance_scale) and settings.guidance_scale >= 0):
        raise UsageError(
            f"guidance scale {settings.guidance_scale} must be a number >= 0; pass e.g. --guidance-scale 7.5"
        )
    if not 0 <= settings.seed <= MAX_SEED:
        raise UsageError(f"seed {settings.seed} must be between 0 and 2**64-1; pass e.g. --seed 0")
    if not DEVICE_PATTERN.fullmatch(settings.device):
        raise UsageError(f"unknown device {settings.device!r}; use cpu, cuda, cuda:N or auto")
    check_kernel(settings.attention_kernel, settings.device)
    check_vae_decode(settings.vae_decode)
    if settings.vae_store not in VAE_STORES:
        raise UsageError(f"unknown VAE store {settings.vae_store!r}; use one of {', '.join(VAE_STORES)}")
    if settings.vae_attention_rows is not None and settings.vae_attention_rows < 1:
        raise UsageError(f"VAE attention rows {settings.vae_attention_rows} must be at least 1")
    if not 0 < settings.timeout_s <= MAX_TIMEOUT_S:
        raise UsageError(
            f"timeout {settings.timeout_s} s must be positive and at most {MAX_TIMEOUT_S} (30 days); "
            "pass e.g. --timeout-s 300"
        )
    for key in ("prompt", "negative_prompt"):
        try:
            getattr(settings, key).encode("utf-8")
        except UnicodeEncodeError as err:  # bytes the shell passed that are not UTF-8 (kept as lone surrogates)
            raise UsageError(
                f"{key.replace('_', ' ')} is not UTF-8 text (character {err.start}); pass it in UTF-8"
            ) from None
    check_model_source(settings.model)
    check_linfusion_source(settings.linfusion)
    config = unet_config(settings.model)
    check_components(settings, config)
    family_of_model(settings.model).check_sizes(settings.model, settings.topology(world_size), settings.sizes)
    if config is not None:  # the rank split of every size, from the UNet config alone
        topology = settings.topology(world_size)
        check_sizes(settings, lambda height, width: topology.check_image(height, width, row_unit(config)))


def check_sizes(settings: RunSettings, check: Callable[[int, int], object]) -> None:
    """``check(height, width)`` at every size the UNet denoises at. A cascade stage too short for the ranks is
    named, with the output height that makes it split (each stage scales with the output)."""
    for index, (height, width) in enumerate(settings.sizes):
        try:
            check(height, width)
        except TooManyRanks as err:
            if not settings.stages:
                raise
            works = math.ceil(err.min_height * settings.height / height / 8) * 8
            raise UsageError(
                f"cascade stage {index + 1} of {len(settings.stages)} is {format_size(width, height)} px, too short "
                f"to split into {err.ranks} bands (they need {err.min_height} px of height); pass --height {works} "
                "or more, or use fewer ranks"
            ) from None


def check_components(settings: RunSettings, unet: dict[str, Any] | None) -> None:
    """The user's own components: LoRA files, scheduler name, init image, strength and mask, IP-Adapter and its
    picture, ControlNets (fitting the base UNet ``unet`` when its config is known) and their control images."""
    for lora in settings.loras:
        check_lora(lora)
    check_ip_adapters(settings, unet)
    check_scheduler(settings.scheduler)
    check_steps(scheduler_config(settings.model), settings.steps, settings.scheduler)
    if settings.strength is not None:
        if settings.init_image is None:
            raise UsageError("--strength needs --init-image (the picture to start from)")
        if not 0.0 < settings.strength <= 1.0 or int(settings.steps * settings.strength) < 1:
            raise UsageError(
                f"strength {settings.strength} must be in (0, 1] and leave a step of {settings.steps}; "
                f"pass e.g. --strength 0.5 (and --steps {math.ceil(1 / max(settings.strength, 0.01))} or more)"
            )
    if settings.mask is not None:
        if settings.init_image is None:
            raise UsageError("--mask needs --init-image (the picture to inpaint where the mask is white); pass both")
        if settings.stages:
            raise UsageError(
                f"--mask inpaints in one pass, but preset {settings.preset!r} is a cascade; pass a one-pass preset "
                "(e.g. --preset tiny-sd15) or drop --mask"
            )
        check_image(settings.mask, "--mask")
    check_control(settings, unet)


def check_ip_adapters(settings: RunSettings, unet: dict[str, Any] | None) -> None:
    """IP-Adapters paired in order with their reference pictures (and scales), each checked, sharing one image
    encoder (a pipeline holds one)."""
    adapters, images, scales = settings.ip_adapter, settings.ip_image, settings.ip_scale
    if len(images) != len(adapters) or len(scales) not in (0, len(adapters)):
        raise UsageError(
            f"--ip-adapter and --ip-image go together: got {len(adapters)} --ip-adapter, {len(images)} --ip-image and "
            f"{len(scales)} --ip-scale; pass one --ip-image (and one --ip-scale, or none for 1) per --ip-adapter, in "
            "the same order"
        )
    if settings.ip_image_encoder is not None and not adapters:
        raise UsageError("--ip-image-encoder is the image encoder of an --ip-adapter; pass one with it")
    for ip_adapter in settings.ip_adapters:
        check_ip_adapter(ip_adapter, unet)
    check_shared_image_encoder(settings.ip_adapters, unet)


def _denoiser_fit(settings: RunSettings, unet: dict[str, Any] | None) -> tuple[dict[str, Any] | None, tuple, str]:
    """What a ControlNet must fit: the model's denoiser config when known offline (the UNet's, or its family's
    own denoiser's, SANA's transformer), the config keys it shares with it and the denoiser's name."""
    family = family_of_model(settings.model)
    if family.denoiser != "unet":
        unet = (family.architecture(settings.model) or {}).get(family.denoiser)
    what = "UNet" if family.denoiser == "unet" else family.denoiser
    return unet, family.controlnet_fits, what


def check_control(settings: RunSettings, unet: dict[str, Any] | None) -> None:
    """ControlNets paired in order with their control images (and scales); each control image at the output
    size, or with a cascade preset (every stage gets it resized) at the output's aspect ratio."""
    nets, images, scales = settings.controlnet, settings.control_image, settings.control_scale
    if len(images) != len(nets) or len(scales) not in (0, len(nets)):
        raise UsageError(
            f"got {len(nets)} --controlnet, {len(images)} --control-image and {len(scales)} --control-scale; "
            "pass one --control-image (and one --control-scale, or none for 1) per --controlnet, in the same order"
        )
    if not nets:
        return
    for scale in scales:
        if not (math.isfinite(scale) and scale >= 0):
            raise UsageError(f"control scale {scale} must be a number >= 0; pass e.g. --control-scale 1")
    for source in nets:
        check_controlnet(source, *_denoiser_fit(settings, unet))
    for path in images:
        width, height = check_image(path, "--control-image")
        if settings.stages and abs(width * settings.height - height * settings.width) > 0.01 * width * settings.height:
            raise UsageError(
                f"control image {path!r} is {format_size(width, height)} px, another aspect ratio than the output's "
                f"{format_size(settings.width, settings.height)}; pass a control image of the output's aspect ratio "
                "(each cascade stage gets it resized)"
            )
        if not settings.stages and (width, height) != (settings.width, settings.height):
            raise UsageError(
                f"control image {path!r} is {format_size(width, height)} px but the output is "
                f"{format_size(settings.width, settings.height)}; pass --width {width} --height {height} or a control "
                "image of the output size"
            )
