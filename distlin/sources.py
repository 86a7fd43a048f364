"""Where a model or a LinFusion checkpoint comes from, checked cheaply before anything heavy is imported.

A source is a built-in model name, a local folder or a Hugging Face Hub id. These checks read only small JSON
files (a folder's marker file, the UNet's config), never weights, and import neither torch nor diffusers, so a
typo or a damaged folder costs a fraction of a second; loading itself is :mod:`distlin.loading`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from distlin.errors import UsageError
from distlin.models.architectures import is_builtin, load_architecture

# LinFusion sources that are not a checkpoint: keep the softmax attention, or build new layers.
NO_LINFUSION, FRESH_LINFUSION = "none", "fresh"

# Where an IP-Adapter's weights sit in a folder or Hub repo laid out as h94/IP-Adapter, by base family; its CLIP
# image encoder is the IMAGE_ENCODER_FOLDER beside the weights.
IP_ADAPTER_WEIGHTS = {"sd15": "models/ip-adapter_sd15.safetensors", "sdxl": "sdxl_models/ip-adapter_sdxl.safetensors"}
IMAGE_ENCODER_FOLDER = "image_encoder"

# Hub ids of base models whose architecture ships in configs/architectures (for offline memory plans).
ARCHITECTURE_FOR_MODEL: dict[str, str] = {
    "runwayml/stable-diffusion-v1-5": "full-sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "full-sd15",
    "Lykon/dreamshaper-8": "full-sd15",
    "SG161222/Realistic_Vision_V4.0_noVAE": "full-sd15",
    "stabilityai/stable-diffusion-2-1": "full-sd21",
    "stabilityai/stable-diffusion-xl-base-1.0": "full-sdxl",
}


def local_path(source: str) -> Path | None:
    """The folder ``source`` names, or None if it is a Hub id.

    Hub ids look like relative paths (``org/name``), so an existing path wins, and anything a Hub id cannot be
    (absolute, ``./``, ``~``, more than one slash) is a path even when it does not exist.
    """
    path = Path(source).expanduser()
    if path.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1:
        return path
    return None


def read_json(path: Path, what: str, flag: str) -> dict[str, Any]:
    """A JSON object from ``path``; a UsageError naming the file and what is wrong with it otherwise."""
    if path.exists() and not path.is_file():  # a FIFO would block, a device be read forever
        raise UsageError(f"{what}: {path} is not a regular file; restore the file or fix {flag}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"{what}: cannot read {path} ({err.strerror}); fix its permissions or {flag}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{what}: {path} is not valid JSON ({err}); restore the file or fix {flag}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what}: {path} holds {type(data).__name__}, not a JSON object; restore the file")
    return data


def _check_source(source: str, what: str, flag: str, marker: str) -> dict[str, Any] | None:
    """A local folder must hold ``marker`` as a JSON object (returned); anything else must be a Hub id."""
    path = local_path(source)
    if path is None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(source)
        except HFValidationError:
            raise UsageError(
                f"{what} {source!r} is neither a folder nor a Hugging Face Hub id (org/name); fix {flag}"
            ) from None
        return None
    if not path.is_dir():
        raise UsageError(f"{what} folder {source!r} does not exist; fix {flag} (a folder or a Hub id)")
    if not os.access(path / marker, os.R_OK):
        raise UsageError(f"{what} folder {source!r} has no readable {marker}; pass the folder that holds it")
    return read_json(path / marker, f"{what} folder {source!r}", flag)


def check_model_source(model: str) -> None:
    """Reject a model that is not built in, a diffusers folder or a Hub id, before loading anything."""
    if not is_builtin(model):
        index = _check_source(model, "model", "--model", "model_index.json")
        if index is not None and "unet" not in index:
            raise UsageError(f"model folder {model!r}: model_index.json names no unet; pass a Stable Diffusion folder")


def check_linfusion_source(linfusion: str) -> None:
    """Reject a LinFusion source that is not ``none``/``fresh``, a checkpoint folder or a Hub id."""
    if linfusion in (NO_LINFUSION, FRESH_LINFUSION):
        return
    config = _check_source(linfusion, "LinFusion checkpoint", "--linfusion", "config.json")
    if config is not None and not isinstance(config.get("modules_list"), list):
        raise UsageError(
            f"LinFusion checkpoint folder {linfusion!r}: config.json has no modules_list; "
            "it is not a LinFusion checkpoint (pass one, or --linfusion fresh or none)"
        )


def unet_config(model: str) -> dict[str, Any] | None:
    """The UNet's config from a built-in name, a local folder or the Hugging Face cache (no network, no weights),
    or None when it cannot be read that cheaply (then the engine checks sizes once the model is loaded)."""
    return _component_config(model, "unet", "config.json")


def scheduler_config(model: str) -> dict[str, Any] | None:
    """The model's own scheduler config, read as cheaply as :func:`unet_config` (None when it cannot be)."""
    return _component_config(model, "scheduler", "scheduler_config.json")


def _component_config(model: str, component: str, file: str) -> dict[str, Any] | None:
    """``component``'s config from the built-in architectures, a local folder's ``component/file`` or the cache."""
    name = model if is_builtin(model) else ARCHITECTURE_FOR_MODEL.get(model)
    if name is not None:
        return load_architecture(name).get(component)
    path = local_path(model)
    if path is not None:
        config_path = path / component / file
        return read_json(config_path, f"model folder {model!r}", "--model") if config_path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, f"{component}/{file}")
    if not isinstance(cached, str):
        return None
    return read_json(Path(cached), f"model {model!r} in the Hugging Face cache", "--model")


def architecture_of(model: str) -> dict[str, Any] | None:
    """The architecture configs of a built-in or well-known model, without touching the network."""
    if is_builtin(model):
        return load_architecture(model)
    name = ARCHITECTURE_FOR_MODEL.get(model)
    return load_architecture(name) if name else None


def base_family(unet: dict[str, Any]) -> str:
    """``sdxl`` for a UNet conditioned on SDXL's pooled text and size ids, else ``sd15`` (SD-1.x and 2.x)."""
    return "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd15"


def safetensors_parameters(path: Path) -> int:
    """Elements of every tensor in a ``.safetensors`` file, from its JSON header alone (8-byte length, then
    the header): nothing loaded."""
    with path.open("rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
