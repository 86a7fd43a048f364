"""A user's own components on top of a base model: LoRAs, a ControlNet and its control image, an IP-Adapter and
its reference image, an init image and an inpainting mask.

The specs and their cheap checks (files exist, a ControlNet's config fits the base UNet, image sizes) are
torch-free, so bad input fails in a fraction of a second with one line; the functions that apply them to a
loaded pipeline import diffusers when called.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distlin.errors import UsageError
from distlin.families.base import check_controlnet_fits
from distlin.families.sd import SD
from distlin.inputs import check_image
from distlin.notices import without_cast_notice
from distlin.sources import IMAGE_ENCODER_FOLDER, IP_ADAPTER_WEIGHTS, base_family, local_path, read_json

# UNet config keys a ControlNet copies from the UNet it was made for: equal ones mean it fits.
LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
IP_ADAPTER_SUFFIXES = (".safetensors", ".bin")


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
    if path is not None and not (path.is_file() or path.is_dir()):  # a device or FIFO would be read forever
        raise UsageError(f"LoRA {lora.path!r} is not a regular file or a folder; fix --lora (a .safetensors file)")


@dataclass(frozen=True)
class IpAdapterFiles:
    """Where diffusers' ``load_ip_adapter`` reads an IP-Adapter: a folder or Hub repo (``local`` tells which),
    the subfolder and name of its weights (its image encoder: :meth:`IpAdapter.encoder_location`)."""

    root: str
    subfolder: str
    weight_name: str
    local: bool

    @property
    def weights(self) -> Path:
        return Path(self.root, self.subfolder, self.weight_name)


@dataclass(frozen=True)
class IpAdapter:
    """``--ip-adapter ID_OR_PATH --ip-image PATH --ip-scale S``: an IP-Adapter, its reference picture and weight.

    ``ID_OR_PATH`` is one of: a weights file (``.safetensors`` or ``.bin``) on disk, its CLIP image encoder in
    the ``image_encoder`` folder beside it; ``ORG/NAME/[SUBFOLDER/]FILE.safetensors`` not on disk, that file of
    a Hub repo (image encoder in ``SUBFOLDER/image_encoder``); or a folder or Hub id laid out as h94/IP-Adapter,
    whose ``models/ip-adapter_sd15.safetensors`` (SD) or ``sdxl_models/ip-adapter_sdxl.safetensors`` (SDXL)
    is taken, with the image encoder beside it.
    """

    source: str
    image: str
    scale: float = 1.0
    image_encoder: str | None = None  # its CLIP image encoder's folder or Hub id; None: beside the weights

    def encoder_location(self, files: IpAdapterFiles) -> tuple[str, str, bool]:
        """``(folder or Hub repo, subfolder, on disk)`` of the image encoder: ``image_encoder`` (a folder, a Hub
        id, or ``ORG/NAME/SUBFOLDER`` of a Hub repo) or the ``image_encoder`` folder beside the weights."""
        if self.image_encoder is None:
            return files.root, str(Path(files.subfolder, IMAGE_ENCODER_FOLDER)), files.local
        parts = _hub_parts(self.image_encoder, slashes=1)
        if parts is None:
            return str(Path(self.image_encoder).expanduser()), "", True
        org, name, *folders = parts
        return f"{org}/{name}", "/".join(folders), False

    def files(self, family: str) -> IpAdapterFiles:
        """The files for a base of ``family`` (``sd15`` or ``sdxl``: which weights a folder or repo offers)."""
        source = self.source
        if source.endswith(IP_ADAPTER_SUFFIXES):
            parts = _hub_parts(source, slashes=2)
            if parts is None:
                path = Path(source).expanduser()
                return IpAdapterFiles(str(path.parent), "", path.name, local=True)
            org, name, *folders, weight_name = parts
            return IpAdapterFiles(f"{org}/{name}", "/".join(folders), weight_name, local=False)
        subfolder, _, weight_name = IP_ADAPTER_WEIGHTS[family].rpartition("/")
        folder = local_path(source)
        return IpAdapterFiles(str(folder or source), subfolder, weight_name, local=folder is not None)


def _hub_parts(source: str, slashes: int) -> list[str] | None:
    """``ORG``, ``NAME`` and the path inside a Hub repo that ``source`` names, or None for a path on disk: one
    that exists, starts with ``/``, ``.`` or ``~``, or has fewer than ``slashes`` slashes (a repo has an org)."""
    if Path(source).expanduser().exists() or source.startswith(("/", ".", "~")) or source.count("/") < slashes:
        return None
    return source.split("/")


def check_ip_adapter(ip_adapter: IpAdapter, unet: dict[str, Any] | None) -> None:
    """A readable reference picture, a finite scale and, on disk, the weights, the image encoder and a text
    width that fits the base UNet's config ``unet`` (when known). A Hub repo is checked when it is loaded."""
    if not math.isfinite(ip_adapter.scale):
        raise UsageError(f"IP-Adapter scale {ip_adapter.scale} is not a number; pass e.g. --ip-scale 0.6")
    check_image(ip_adapter.image, "--ip-image")
    if unet is None and not ip_adapter.source.endswith(IP_ADAPTER_SUFFIXES):
        return  # which weights a folder offers depends on the base, known once the model is loaded
    files = ip_adapter.files(base_family(unet or {}))
    if not files.local:
        check_ip_image_encoder(ip_adapter, files)
        return
    if not files.weights.is_file():
        raise UsageError(
            f"IP-Adapter {ip_adapter.source!r}: {files.weights} does not exist; pass a weights file with its "
            "image_encoder folder beside it, or a folder laid out as h94/IP-Adapter"
        )
    check_ip_image_encoder(ip_adapter, files)
    width = unet.get("cross_attention_dim") if unet is not None else None
    if isinstance(width, int) and files.weight_name.endswith(".safetensors"):
        theirs = _ip_adapter_text_width(files.weights, ip_adapter.source)
        if theirs != width:
            raise UsageError(
                f"IP-Adapter {ip_adapter.source!r} was made for another base model (text width {theirs}, the "
                f"model's UNet has {width}); pass an IP-Adapter trained for this model"
            )


def check_ip_image_encoder(ip_adapter: IpAdapter, files: IpAdapterFiles) -> None:
    """An image encoder on disk has its config.json (one on the Hub is checked when it is loaded)."""
    root, subfolder, local = ip_adapter.encoder_location(files)
    folder = Path(root, subfolder)
    if not local or (folder / "config.json").is_file():
        return
    if ip_adapter.image_encoder is None:
        raise UsageError(
            f"missing IP-Adapter image encoder: {folder} has no config.json; put the IP-Adapter's CLIP image "
            "encoder there (as in h94/IP-Adapter), or name it with --ip-image-encoder"
        )
    raise UsageError(
        f"--ip-image-encoder {ip_adapter.image_encoder}: {folder} has no config.json; pass the folder of a CLIP "
        "image encoder (e.g. h94/IP-Adapter's models/image_encoder)"
    )


ENCODER_SHAPE_KEYS = ("hidden_size", "projection_dim", "image_size", "patch_size", "num_hidden_layers")


def check_shared_image_encoder(ip_adapters: Sequence[IpAdapter], unet: dict[str, Any] | None) -> None:
    """Several IP-Adapters run with the first one's image encoder (a pipeline holds one): those whose own encoder
    is on disk must have one of the same shape (ViT-H and ViT-bigG adapters cannot be mixed)."""
    if len(ip_adapters) < 2 or ip_adapters[0].image_encoder is not None or unet is None:
        return
    shapes = {}
    for adapter in ip_adapters:
        root, subfolder, local = adapter.encoder_location(adapter.files(base_family(unet)))
        config = Path(root, subfolder, "config.json")
        if local and config.is_file():
            values = read_json(config, adapter.source, "--ip-adapter")
            shapes[adapter.source] = tuple(values.get("vision_config", values).get(key) for key in ENCODER_SHAPE_KEYS)
    if len(set(shapes.values())) > 1:
        first, *others = shapes
        other = next(name for name in others if shapes[name] != shapes[first])
        raise UsageError(
            f"IP-Adapters {first!r} and {other!r} were made for different image encoders, and a pipeline holds "
            "one; pass IP-Adapters made for the same encoder (or one --ip-image-encoder both were made for)"
        )


def _ip_adapter_text_width(path: Path, source: str) -> int:
    """The text width the IP-Adapter's first image key projection reads, from the file's header alone."""
    from safetensors import SafetensorError, safe_open

    key = "ip_adapter.1.to_k_ip.weight"
    try:
        with safe_open(str(path), "numpy") as weights:
            if key not in weights.keys():
                raise UsageError(f"IP-Adapter {source!r} has no {key}: not an IP-Adapter; fix --ip-adapter")
            return weights.get_slice(key).get_shape()[1]
    except (SafetensorError, OSError) as err:
        raise UsageError(f"IP-Adapter {source!r}: {path} is not a readable .safetensors file ({err})") from None


def check_controlnet(
    source: str, unet: dict[str, Any] | None, keys: Sequence[str] = SD.controlnet_fits, what: str = "UNet"
) -> None:
    """A ControlNet folder (or Hub id) whose config fits the base model's denoiser config ``unet`` (when known;
    ``keys``, ``what``: its family's, :func:`check_controlnet_fits`)."""
    path = local_path(source)
    if path is None:
        return
    if not (path / "config.json").is_file():
        raise UsageError(f"ControlNet {source!r} is not a folder with a config.json; fix --controlnet")
    config = read_json(path / "config.json", f"ControlNet {source!r}", "--controlnet")
    if unet is not None:
        check_controlnet_fits(source, config, unet, keys, what)


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


def apply_ip_adapter(pipe: Any, ip_adapters: IpAdapter | Sequence[IpAdapter]) -> None:
    """Load one IP-Adapter or several with diffusers' ``load_ip_adapter`` (the image encoder, of the first, or
    the one they name, their image projections and IP processors in every ``attn2``) and set their scales; pass
    the pictures as ``ip_adapter_image`` (a list, one per IP-Adapter; :func:`ip_adapter_scales` for each
    generation's scales).

    Works with LinFusion and before or after :func:`~distlin.parallel.parallelize`: every ``attn1`` keeps its
    own processor (:func:`kept_self_attention`). A load that fails is a UsageError naming the IP-Adapters.
    """
    adapters = [ip_adapters] if isinstance(ip_adapters, IpAdapter) else list(ip_adapters)
    family = base_family(dict(pipe.unet.config))
    files = [adapter.files(family) for adapter in adapters]
    try:
        if adapters[0].image_encoder is not None and getattr(pipe, "image_encoder", None) is None:
            encoder = load_image_encoder(adapters[0], files[0], pipe)
            pipe.register_modules(image_encoder=encoder)  # the loader keeps it
        with kept_self_attention(pipe.unet), without_cast_notice():  # the loader casts the UNet
            pipe.load_ip_adapter(
                [f.root for f in files],
                subfolder=[f.subfolder for f in files],
                weight_name=[f.weight_name for f in files],
                image_encoder_folder=IMAGE_ENCODER_FOLDER,
            )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        names = ", ".join(repr(adapter.source) for adapter in adapters)
        raise UsageError(f"IP-Adapter {names} cannot be loaded for this model ({first})") from None
    pipe.set_ip_adapter_scale(ip_adapter_scales(adapters))


def ip_adapter_scales(ip_adapters: Sequence[IpAdapter]) -> float | list[float]:
    """``set_ip_adapter_scale``'s argument: one IP-Adapter's scale, or the list of several's."""
    scales = [adapter.scale for adapter in ip_adapters]
    return scales[0] if len(scales) == 1 else scales


def load_image_encoder(ip_adapter: IpAdapter, files: IpAdapterFiles, pipe: Any) -> Any:
    """The CLIP image encoder ``--ip-image-encoder`` names, on the pipeline's device and in its dtype."""
    from transformers import CLIPVisionModelWithProjection

    root, subfolder, _ = ip_adapter.encoder_location(files)
    encoder = CLIPVisionModelWithProjection.from_pretrained(root, subfolder=subfolder, dtype=pipe.dtype)
    return encoder.to(pipe.device)


@contextmanager
def kept_self_attention(unet: Any) -> Iterator[None]:
    """Every ``attn1`` ends with the processor it had. diffusers' IP-Adapter loader rebuilds each processor it
    does not replace as ``type(processor)()``: LinFusion's would lose its kernel and the engine's state
    exchange, the engine's softmax one could not be built. So, meanwhile, each holds a plain one of its kind."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from distlin.linfusion.attention import LinFusionAttention, LinFusionAttnProcessor
    from distlin.linfusion.model import self_attention_layers
    from distlin.surgery import Swaps  # imports torch: imported where used, so the input checks stay torch-free

    swaps = Swaps(unet)
    for name, attn in self_attention_layers(unet):
        swaps.processor(name, LinFusionAttnProcessor() if isinstance(attn, LinFusionAttention) else AttnProcessor2_0())
    try:
        yield
    finally:
        swaps.restore()


def load_controlnet(source: str, pipe: Any) -> Any:
    """The ControlNet on the UNet's device and dtype, checked to fit it."""
    from diffusers import ControlNetModel

    try:
        controlnet = ControlNetModel.from_pretrained(str(local_path(source) or source), torch_dtype=pipe.unet.dtype)
    except (OSError, ValueError) as err:
        raise UsageError(f"ControlNet {source!r} cannot be loaded ({err}); fix --controlnet") from None
    check_controlnet_fits(source, dict(controlnet.config), dict(pipe.unet.config), SD.controlnet_fits, "UNet")
    return controlnet.to(pipe.unet.device)


def controlnet_pipeline(pipe: Any, controlnets: list[Any]) -> Any:
    """The Stable Diffusion family's ControlNet variant of ``pipe`` (several ControlNets: a MultiControlNetModel
    summing their residuals)."""
    return pipeline_for("text-to-image", pipe, controlnet=controlnets[0] if len(controlnets) == 1 else controlnets)


def pipeline_for(task: str, pipe: Any, **components: Any) -> Any:
    """The variant of ``pipe`` (SD or SDXL, with or without ControlNet) for ``task`` — ``text-to-image``,
    ``image-to-image`` or ``inpainting`` — over the same components, plus ``components`` (a ControlNet)."""
    import diffusers

    from distlin.surgery import calls_like

    auto = {
        "text-to-image": diffusers.AutoPipelineForText2Image,
        "image-to-image": diffusers.AutoPipelineForImage2Image,
        "inpainting": diffusers.AutoPipelineForInpainting,
    }[task]
    variant = calls_like(auto.from_pipe(pipe, **components), pipe)  # each call a generation, as pipe's
    variant.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))  # rank 0 only, as the pipeline
    return variant
