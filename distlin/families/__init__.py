"""The model families distlin parallelizes, one registry line each (:class:`~distlin.families.base.Family`).

Adding a family: a folder ``distlin/families/<name>/`` with its ``Family`` (torch-free) and its model-side
modules, and one line in :data:`FAMILIES`. Torch-free: nothing here imports torch or diffusers.
"""

from __future__ import annotations

from typing import Any

from distlin.families.base import Family, load
from distlin.families.sana.family import SANA
from distlin.families.sd import SD

FAMILIES: dict[str, Family] = {family.name: family for family in (SD, SANA)}

# Pipeline and denoiser class names of each family (diffusers' own), so a loaded pipeline finds its family.
_CLASS_PREFIXES = {"Sana": "sana"}

__all__ = [
    "FAMILIES",
    "Family",
    "family_of_builtin",
    "family_of_class",
    "family_of_model",
    "family_of_pipeline",
    "load",
]


def family_of_model(model: str) -> Family:
    """The family of a model name before anything loads: a built-in name or a Hub id a family lists, else
    Stable Diffusion."""
    return family_of_builtin(model) or next((f for f in FAMILIES.values() if model in f.hub_models), SD)


def family_of_builtin(model: str) -> Family | None:
    """The family whose offline builder makes ``model`` (``tiny-sana``, with or without ``distlin/``), or None."""
    short = model.removeprefix("distlin/")
    return next((family for family in FAMILIES.values() if short in family.builtin), None)


def family_of_class(class_name: str | None) -> Family:
    """The family of a diffusers pipeline or denoiser class name (Stable Diffusion when none other claims it)."""
    for prefix, name in _CLASS_PREFIXES.items():
        if class_name and class_name.startswith(prefix):
            return FAMILIES[name]
    return SD


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded diffusers pipeline."""
    return family_of_class(type(pipe).__name__)
