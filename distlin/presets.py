"""Named presets: one YAML file per preset in the repository's ``configs/`` folder.

A preset gives every default of a generation (model, LinFusion layers, prompt, size, steps, dtype, device
and the engine settings), so a command line only names what it changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from distlin.errors import UsageError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Every key a preset must give, with the type its value must have (an int is accepted where a float is due).
PRESET_SCHEMA: dict[str, type] = {
    "model": str,
    "linfusion": str,
    "prompt": str,
    "negative_prompt": str,
    "height": int,
    "width": int,
    "steps": int,
    "guidance_scale": float,
    "seed": int,
    "dtype": str,
    "device": str,
    "mode": str,
    "warmup_steps": int,
    "cfg_parallel": bool,
}

# Keys a preset may give: ``cascade`` lists the stages of a high-resolution cascade ({height, width, strength});
# ``micro_batch`` caps the samples per UNet call (1: the guidance halves one after the other, half the memory).
OPTIONAL_SCHEMA: dict[str, type] = {"cascade": list, "micro_batch": int}


def list_presets() -> list[str]:
    """Names of the presets in ``configs/``, sorted."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset's settings: every key of :data:`PRESET_SCHEMA`, optionally those of :data:`OPTIONAL_SCHEMA`,
    rightly typed."""
    path = CONFIG_DIR / f"{name}.yaml"
    if Path(name).name != name or not path.is_file():
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    try:
        preset = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UsageError(f"cannot read preset file {path}: {type(err).__name__}; fix or restore it") from None
    if not isinstance(preset, dict):
        raise UsageError(f"preset file {path} is not a mapping of settings; fix or restore it")
    missing = [key for key in PRESET_SCHEMA if key not in preset]
    unknown = [key for key in preset if key not in PRESET_SCHEMA and key not in OPTIONAL_SCHEMA]
    if missing or unknown:
        raise UsageError(f"preset file {path}: missing keys {missing}, unknown keys {unknown}; fix the file")
    for key, kind in {**PRESET_SCHEMA, **OPTIONAL_SCHEMA}.items():
        if key not in preset:
            continue
        value = preset[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            preset[key] = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UsageError(f"preset file {path}: {key} must be {kind.__name__}, not {value!r}; fix it")
    return preset
