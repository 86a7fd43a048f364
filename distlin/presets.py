"""Presets: YAML files giving every default of a generation (model, LinFusion layers, prompt, size, steps,
dtype, device and the engine settings), so a command line only names what it changes.

Built-in presets live in the repository's top-level ``configs/*.yaml``, which a wheel installs as
``distlin/configs``; a path to a user's own ``.yaml`` file is validated the same way. Torch-free, so a bad preset
is reported before any heavy import.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from distlin.errors import UsageError


def _config_dir() -> Path:
    """The built-in presets: ``distlin/configs`` in an installed wheel, else a checkout's top-level ``configs/``."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


CONFIG_DIR = _config_dir()

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
# The keys of one cascade stage: its size (rescaled so the last stage is the output's) and how far it noises the
# previous stage's image (default 1).
STAGE_SCHEMA: dict[str, type] = {"height": int, "width": int, "strength": float}
STAGE_REQUIRED = ("height", "width")


def list_presets() -> list[str]:
    """Names of the presets in ``configs/``, sorted."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def builtin_preset(name: str) -> str:
    """``name`` if it is a built-in preset's; anything else, a path included, is refused with the list."""
    if name not in list_presets():
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    return name


def preset_path(name: str) -> Path:
    """The YAML file of a built-in preset name, or of a user's preset path (ending in .yaml or .yml)."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UsageError(f"preset file {name!r} does not exist; pass an existing .yaml file or a built-in preset")
        return path
    path = CONFIG_DIR / f"{name}.yaml"
    if Path(name).name != name or not path.is_file():
        raise UsageError(
            f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}, or pass a path to a .yaml file"
        )
    return path


def load_preset(name: str) -> dict[str, Any]:
    """The preset's settings: every key of :data:`PRESET_SCHEMA`, optionally those of :data:`OPTIONAL_SCHEMA`,
    rightly typed. ``name`` is a built-in preset or a path to a YAML file."""
    path = preset_path(name)
    try:
        preset = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UsageError(f"cannot read preset file {path}: {type(err).__name__}; fix or restore it") from None
    if not isinstance(preset, dict):
        raise UsageError(f"preset file {path} is not a mapping of settings; fix or restore it")
    preset = checked_values(preset, PRESET_SCHEMA, OPTIONAL_SCHEMA, f"preset file {path}")
    stages = []
    for k, stage in enumerate(preset.get("cascade") or []):
        where = f"preset file {path}: cascade stage {k}"
        if not isinstance(stage, dict):
            raise UsageError(f"{where} must be a mapping of height, width (and strength), not {stage!r}; fix it")
        stages.append(checked_values(stage, {key: STAGE_SCHEMA[key] for key in STAGE_REQUIRED}, STAGE_SCHEMA, where))
    if stages:
        preset["cascade"] = stages
    return preset


def checked_values(
    values: dict[str, Any], required: dict[str, type], optional: dict[str, type], where: str
) -> dict[str, Any]:
    """``values`` with every key of ``required``, none outside it and ``optional`` (the closest known key
    suggested for a typo), each value of its type; a copy in which an int where a float is due is a float."""
    known = {**required, **optional}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            raise UsageError(f"{where}: unknown key {key!r} ({hint}); fix the file")
    missing = [key for key in required if key not in values]
    if missing:
        raise UsageError(f"{where}: missing keys {missing}; fix the file")
    typed = dict(values)
    for key, kind in known.items():
        if key not in values:
            continue
        value = values[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            typed[key] = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UsageError(f"{where}: {key} must be {kind.__name__}, not {value!r}; fix it")
    return typed
