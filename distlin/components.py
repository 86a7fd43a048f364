"""A user's own components on top of a base model: LoRAs, a ControlNet and its control image, an init image
and an inpainting mask.

The specs and their cheap checks (files exist, a ControlNet's config fits the base UNet, image sizes) are
torch-free, so bad input fails in a fraction of a second with one line; the functions that apply them to a
loaded pipeline import diffusers when called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distlin.errors import UsageError
from distlin.sources import local_path, read_json

# UNet config keys a ControlNet copies from the UNet it was made for: equal ones mean it fits.
CONTROLNET_FIT_KEYS = ("block_out_channels", "cross_attention_dim", "in_channels", "addition_embed_type")
LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
# DemoFusion calls the UNet itself, with dilated convolutions: no ControlNet is wired into it.
SDXL_CASCADE_CONTROLNET = (
    "--controlnet with an SDXL cascade preset (DemoFusion) is not supported; use a single-size SDXL preset or the "
    "SD-1.5 cascade"
)


@dataclass(frozen=True)
class Lora:
    """One ``--lora PATH[:SCALE]``: a LoRA file (kohya or diffusers layout), folder or Hub id, and its weight."""

    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Lora:
        """``PATH`` or ``PATH:SCALE`` (a trailing ``:number``; any other colon belongs to the path)."""
        path, _, scale = text.rpartition(":")
        try:
            return cls(path, float(scale)) if path else cls(text)
        except ValueError:
            return cls(text)


def check_lora(lora: Lora) -> None:
    """An existing file or folder, or a Hub id (a name with a weights suffix is a file, never a Hub id), at a
    finite scale."""
    if not math.isfinite(lora.scale):
        raise UsageError(f"LoRA {lora.path!r}: scale {lora.scale} is not a number; pass e.g. --lora PATH:0.8")
    path = local_path(lora.path)
    if path is None and lora.path.endswith(LORA_SUFFIXES):
        path = Path(lora.path)
    if path is not None and not path.exists():
        raise UsageError(f"LoRA {lora.path!r} does not exist; fix --lora (a .safetensors file, folder or Hub id)")


def check_image(path: str, flag: str) -> tuple[int, int]:
    """The (width, height) of an image file, read from its header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(Path(path).expanduser()) as image:
            return image.size
    except FileNotFoundError:
        raise UsageError(f"{flag} {path!r} does not exist; pass an image file") from None
    except (OSError, UnidentifiedImageError) as err:
        raise UsageError(f"{flag} {path!r} is not a readable image ({err}); pass a PNG or JPEG") from None


def check_controlnet(source: str, unet: dict[str, Any] | None) -> None:
    """A ControlNet folder (or Hub id) whose config fits the base UNet's config ``unet`` (when known)."""
    path = local_path(source)
    if path is None:
        return
    if not (path / "config.json").is_file():
        raise UsageError(f"ControlNet {source!r} is not a folder with a config.json; fix --controlnet")
    config = read_json(path / "config.json", f"ControlNet {source!r}", "--controlnet")
    if unet is not None:
        check_controlnet_fits(source, config, unet)


def check_controlnet_fits(source: str, controlnet: dict[str, Any], unet: dict[str, Any]) -> None:
    """The ControlNet was made for a UNet like this one (same widths, text width, latent channels)."""
    for key in CONTROLNET_FIT_KEYS:
        if key in controlnet and controlnet.get(key) != unet.get(key):
            mine, theirs = _as_text(controlnet[key]), _as_text(unet.get(key))
            raise UsageError(
                f"ControlNet {source!r} was made for another base model ({key} {mine}, the model's UNet has "
                f"{theirs}); pass a ControlNet trained for this model"
            )


def _as_text(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, list) else str(value)


def apply_loras(pipe: Any, loras: tuple[Lora, ...]) -> None:
    """Load every LoRA (UNet and text encoders) at its scale and fuse them into the weights: no extra work per
    step. Works before and after :func:`~distlin.parallel.parallelize`; a LoRA for another base is a
    UsageError naming it, before any denoising."""
    if not loras:
        return
    names = [f"lora{index}" for index in range(len(loras))]
    for name, lora in zip(names, loras, strict=True):
        source = str(local_path(lora.path) or lora.path)
        try:
            pipe.load_lora_weights(source, adapter_name=name)
        except (ValueError, RuntimeError, KeyError, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"LoRA {lora.path!r} does not fit this model ({first}); pass a LoRA for it") from None
        if name not in {n for adapters in pipe.get_list_adapters().values() for n in adapters}:
            raise UsageError(f"LoRA {lora.path!r} matches no layer of this model; pass a LoRA for it")
    pipe.set_adapters(names, [lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go


def load_controlnet(source: str, pipe: Any) -> Any:
    """The ControlNet on the UNet's device and dtype, checked to fit it."""
    from diffusers import ControlNetModel

    try:
        controlnet = ControlNetModel.from_pretrained(str(local_path(source) or source), torch_dtype=pipe.unet.dtype)
    except (OSError, ValueError) as err:
        raise UsageError(f"ControlNet {source!r} cannot be loaded ({err}); fix --controlnet") from None
    check_controlnet_fits(source, dict(controlnet.config), dict(pipe.unet.config))
    return controlnet.to(pipe.unet.device)


def pipeline_for(task: str, pipe: Any, **components: Any) -> Any:
    """The variant of ``pipe`` (SD or SDXL, with or without ControlNet) for ``task`` — ``text-to-image``,
    ``image-to-image`` or ``inpainting`` — over the same components, plus ``components`` (a ControlNet)."""
    import diffusers

    auto = {
        "text-to-image": diffusers.AutoPipelineForText2Image,
        "image-to-image": diffusers.AutoPipelineForImage2Image,
        "inpainting": diffusers.AutoPipelineForInpainting,
    }[task]
    variant = auto.from_pipe(pipe, **components)
    variant.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))  # rank 0 only, as the pipeline
    return variant


def load_rgb(path: str, width: int, height: int) -> Any:
    """An image file as RGB at ``width`` x ``height`` (bicubic)."""
    from PIL import Image

    with Image.open(Path(path).expanduser()) as image:
        rgb = image.convert("RGB")
    return rgb if rgb.size == (width, height) else rgb.resize((width, height), Image.Resampling.BICUBIC)
