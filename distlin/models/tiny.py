"""Offline model builders: diffusers pipelines with seeded random weights and real or toy architectures.

Tests and benchmarks need SD-shaped models without downloading gigabytes of weights: the ``tiny-*`` presets
run a whole pipeline in seconds on one CPU core, and the ``full-*`` presets reproduce the published SD-1.5,
SD-2.1 and SDXL architectures exactly (for memory and speed measurements), all with weights from a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    ModelMixin,
    PNDMScheduler,
    SanaControlNetModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
)

from distlin.models.architectures import (
    FULL_NAMES,
    NAME_PREFIX,
    TINY_NAMES,
    VOCAB_DIR,
    canonical_name,
    is_builtin,
    load_architecture,
)
from distlin.sources import IMAGE_ENCODER_FOLDER, IP_ADAPTER_WEIGHTS, base_family

__all__ = [
    "FULL_NAMES",
    "TINY_NAMES",
    "build_component",
    "build_controlnet",
    "build_ip_adapter",
    "build_kohya_lora",
    "build_pipeline",
    "build_unet",
    "is_builtin",
    "load_architecture",
    "load_tokenizer",
]

# Explicit allow-lists: a config's class name selects from these, never an arbitrary attribute lookup.
_DIFFUSERS_MODELS: dict[str, type[ModelMixin]] = {
    "UNet2DConditionModel": UNet2DConditionModel,
    "AutoencoderKL": AutoencoderKL,
    "ControlNetModel": ControlNetModel,
    "SanaControlNetModel": SanaControlNetModel,  # counted for the plan of a SANA run with --controlnet
}
_TRANSFORMERS_MODELS: dict[str, tuple[type[PreTrainedModel], type]] = {  # (model, its config class)
    "CLIPTextModel": (CLIPTextModel, CLIPTextConfig),
    "CLIPTextModelWithProjection": (CLIPTextModelWithProjection, CLIPTextConfig),
    "CLIPVisionModelWithProjection": (CLIPVisionModelWithProjection, CLIPVisionConfig),  # an IP-Adapter's encoder
}
_SCHEDULERS = {cls.__name__: cls for cls in (DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler)}

# Each component draws from its own seed stream: a seed's UNet is the same built alone or in a pipeline.
_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet")

# What a LoRA in kohya's layout adapts: attention projections and resnet convs (3x3, so the UNet's LoRA
# needs halos when patch-parallel), and the text encoders' attention and MLP.
_LORA_UNET_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".conv1", ".conv2")
_LORA_TEXT_TARGETS = ("_proj", ".fc1", ".fc2")

# Conditioning-image encoder widths: four levels give the latent factor 8 of the SD VAEs. The full-size
# widths are those of the released SD ControlNets.
_TINY_CONTROLNET_COND_CHANNELS = (8, 8, 16, 16)
_FULL_CONTROLNET_COND_CHANNELS = (16, 32, 96, 256)

# A tiny CLIP image encoder for the built-in IP-Adapters: 32 px pictures in 8 px patches, 32-wide embeddings.
_TINY_IMAGE_ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}
IP_TOKENS = 4  # image tokens a plain IP-Adapter projects its image embedding to (diffusers' ImageProjection)
PLUS_TOKENS, PLUS_WIDTH = 8, 32  # IP-Adapter Plus: its Resampler's queries (image tokens) and their width

Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def load_tokenizer() -> CLIPTokenizer:
    """The small byte-level CLIP tokenizer shipped with the package; needs no network or HF cache.

    Being byte-level, it encodes any text (punctuation, accents, emoji) into ids below ``len(tokenizer)``.
    """
    return CLIPTokenizer.from_pretrained(VOCAB_DIR, model_max_length=77, local_files_only=True)


def build_unet(
    name: str,
    seed: int = 0,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> UNet2DConditionModel:
    """The UNet of a built-in model, with the same weights as ``build_pipeline(name, seed).unet``.

    With ``device="meta"`` nothing is allocated, which lets tests inspect the full-size architectures cheaply.
    """
    return _build_model(load_architecture(name)["unet"], seed, "unet", torch_dtype, device)


def build_pipeline(name: str, seed: int = 0, torch_dtype: torch.dtype = torch.float32) -> Pipeline:
    """A ready-to-call pipeline with random weights; ``pipe.name_or_path`` is ``"distlin/<name>"``.

    The same ``(name, seed)`` always yields bit-identical weights (for a given torch version), whatever
    ``torch_dtype`` is: weights are drawn in float32 and then cast.
    """
    short = canonical_name(name)
    architecture = load_architecture(short)
    scheduler_config = architecture.pop("scheduler")
    scheduler = _SCHEDULERS[scheduler_config["_class_name"]].from_config(scheduler_config)
    parts = {key: _build_model(config, seed, key, torch_dtype, "cpu") for key, config in architecture.items()}
    pipe: Pipeline
    if "text_encoder_2" in parts:
        pipe = StableDiffusionXLPipeline(
            **parts,
            tokenizer=load_tokenizer(),
            tokenizer_2=load_tokenizer(),
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            **parts,
            tokenizer=load_tokenizer(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.register_to_config(_name_or_path=NAME_PREFIX + short)
    return pipe


def build_controlnet(
    name: str = "tiny-sd15", seed: int = 0, torch_dtype: torch.dtype = torch.float32
) -> ControlNetModel:
    """A ControlNet for a built-in model's UNet, with its encoder copied from ``build_unet(name, seed)``.

    A freshly initialised ControlNet has zero output convolutions, so its residuals would be identically zero
    and could not reveal a wrongly wired control path; those convolutions get random weights here instead.
    """
    short = canonical_name(name)
    unet = build_unet(short, seed)
    widths = _TINY_CONTROLNET_COND_CHANNELS if short in TINY_NAMES else _FULL_CONTROLNET_COND_CHANNELS
    with _seeded(seed, "controlnet"):  # the conditioning encoder's fresh layers too: one seed, one ControlNet
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)
        zero_convs = [
            controlnet.controlnet_cond_embedding.conv_out,
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
        ]
        for conv in zero_convs:
            conv.reset_parameters()
    return _cast(controlnet, "cpu", torch_dtype)


def build_kohya_lora(name: str = "tiny-sd15", rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA for a built-in model in kohya's layout (``lora_unet_*`` / ``lora_te1_*`` / ``lora_te2_*`` keys,
    each with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``), as ``load_lora_weights`` reads it.

    Kohya initialises ``lora_up`` to zero, which would change nothing; here both factors are random, so a
    test can see the LoRA act.
    """
    architecture = load_architecture(canonical_name(name))
    two_encoders = "text_encoder_2" in architecture
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if two_encoders else "lora_te_"}
    if two_encoders:
        prefixes["text_encoder_2"] = "lora_te2_"
    generator = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    for component, prefix in prefixes.items():
        model = build_component(architecture[component])  # on meta: only the shapes are read
        targets = _LORA_UNET_TARGETS if component == "unet" else _LORA_TEXT_TARGETS
        for module_name, module in model.named_modules():
            if not module_name.endswith(targets) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            key, shape = prefix + module_name.replace(".", "_"), module.weight.shape
            down = torch.randn(rank, *shape[1:], generator=generator) / shape[1:].numel() ** 0.5
            up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=generator) / rank**0.5
            lora.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
            lora[f"{key}.alpha"] = torch.tensor(float(rank))
    return lora


def build_ip_adapter(name: str, folder: str | Path, seed: int = 0, plus: bool = False) -> Path:
    """An IP-Adapter for a built-in model, written under ``folder`` in the h94/IP-Adapter layout; returns its
    weights file (``models/ip-adapter_sd15.safetensors`` or ``sdxl_models/ip-adapter_sdxl.safetensors``; with
    ``plus``, ``ip-adapter-plus_*``).

    The weights hold ``image_proj.*`` (plain: the image embedding to :data:`IP_TOKENS` tokens of the text width;
    ``plus``: the original Resampler, :func:`_plus_image_proj`) and, for the i-th cross-attention layer in
    ``attn_processors`` order, ``ip_adapter.{2i+1}.to_k_ip`` / ``to_v_ip`` (the keys and values of those
    tokens), as diffusers' ``load_ip_adapter`` numbers them; a tiny ``CLIPVisionModelWithProjection`` sits beside
    them in ``image_encoder``. All weights are random.
    """
    architecture = load_architecture(canonical_name(name))
    unet = build_component(architecture["unet"])  # on meta: only the shapes are read
    text_width = unet.config.cross_attention_dim
    config = CLIPVisionConfig(**_TINY_IMAGE_ENCODER)
    generator = torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=generator) / in_features**0.5

    if plus:
        weights = {f"image_proj.{key}": value for key, value in _plus_image_proj(config, text_width, linear).items()}
    else:
        weights = {
            "image_proj.proj.weight": linear(IP_TOKENS * text_width, config.projection_dim),
            "image_proj.proj.bias": torch.zeros(IP_TOKENS * text_width),
            "image_proj.norm.weight": torch.ones(text_width),
            "image_proj.norm.bias": torch.zeros(text_width),
        }
    cross = [key.removesuffix(".processor") for key in unet.attn_processors if not key.endswith("attn1.processor")]
    for index, module_name in enumerate(cross):
        width = unet.get_submodule(module_name).to_k.out_features
        for key in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{2 * index + 1}.{key}.weight"] = linear(width, text_width)
    path = Path(folder) / IP_ADAPTER_WEIGHTS[base_family(architecture["unet"])]
    if plus:
        path = path.with_name(path.name.replace("ip-adapter_", "ip-adapter-plus_"))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(config).eval()
    encoder.save_pretrained(path.parent / IMAGE_ENCODER_FOLDER)
    return path


def _plus_image_proj(
    encoder: CLIPVisionConfig, text_width: int, linear: Callable[[int, int], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """IP-Adapter Plus's image projection in its original (Resampler) names: :data:`PLUS_TOKENS` learned queries
    attending to the image encoder's penultimate hidden states through 4 layers of one 64-wide head each."""
    width, inner = PLUS_WIDTH, 64  # diffusers reads the heads as to_q's rows / 64

    def norm(prefix: str, size: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": torch.ones(size), f"{prefix}.bias": torch.zeros(size)}

    weights = {
        "latents": torch.randn(1, PLUS_TOKENS, width, generator=torch.Generator().manual_seed(1)) / width**0.5,
        "proj_in.weight": linear(width, encoder.hidden_size),
        "proj_in.bias": torch.zeros(width),
        "proj_out.weight": linear(text_width, width),
        "proj_out.bias": torch.zeros(text_width),
        **norm("norm_out", text_width),
    }
    for i in range(4):
        weights |= {**norm(f"layers.{i}.0.norm1", width), **norm(f"layers.{i}.0.norm2", width)}
        weights[f"layers.{i}.0.to_q.weight"] = linear(inner, width)
        weights[f"layers.{i}.0.to_kv.weight"] = linear(2 * inner, width)
        weights[f"layers.{i}.0.to_out.weight"] = linear(width, inner)
        weights |= norm(f"layers.{i}.1.0", width)
        weights[f"layers.{i}.1.1.weight"] = linear(4 * width, width)
        weights[f"layers.{i}.1.3.weight"] = linear(width, 4 * width)
    return weights


@contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    """Run with the global torch RNG seeded for one component, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * len(_COMPONENTS) + _COMPONENTS.index(component))
        yield


def build_component(config: dict[str, Any]) -> torch.nn.Module:
    """One model from its config (``_class_name`` or ``architectures``) on the meta device: its shapes, nothing
    allocated (for counting parameters and naming layers)."""
    with torch.device("meta"):
        return _instantiate(config).eval()


def _build_model(
    config: dict[str, Any],
    seed: int,
    component: str,
    torch_dtype: torch.dtype,
    device: str | torch.device,
) -> torch.nn.Module:
    """Instantiate one component: on meta without allocating, otherwise seeded on CPU and then moved.

    Weights are always drawn on CPU because CPU and CUDA generators give different numbers for the same seed.
    """
    on_meta = torch.device(device).type == "meta"
    with torch.device("meta") if on_meta else _seeded(seed, component):
        model = _instantiate(config)
    return _cast(model, device, torch_dtype)


def _cast(model: ModuleT, device: str | torch.device, torch_dtype: torch.dtype) -> ModuleT:
    """Move to the target device and dtype, in inference mode like a model from ``from_pretrained``.

    Calls ``nn.Module.to`` rather than ``ModelMixin.to``, which warns about fp32-pinned modules even when a
    model has none.
    """
    return torch.nn.Module.to(model, device=device, dtype=torch_dtype).eval()


def _instantiate(config: dict[str, Any]) -> torch.nn.Module:
    """Diffusers configs name their class in ``_class_name``, transformers configs in ``architectures``."""
    if "_class_name" in config:
        return _DIFFUSERS_MODELS[config["_class_name"]].from_config(config)
    model, config_class = _TRANSFORMERS_MODELS[config["architectures"][0]]
    return model(config_class.from_dict(config))
