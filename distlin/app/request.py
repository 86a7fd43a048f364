"""What a browser may ask for: a preset by name and the generation values the command line offers.

A request travels to every rank as a plain dict (:meth:`GenerationRequest.to_message`), and each rank turns it
into :class:`~distlin.settings.RunSettings` with the same :func:`~distlin.settings.build_settings` as the command
line. It carries no paths: the preset must be a built-in one and the model, device and output file are the
app's, never the request's. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, get_type_hints

from distlin.errors import UsageError
from distlin.parallel.config import MODES
from distlin.presets import list_presets, load_preset
from distlin.schedulers import SCHEDULERS
from distlin.settings import RunSettings, build_settings

MODEL_SCHEDULER = "model's own"  # the scheduler the model ships with (no --scheduler)
SCHEDULER_CHOICES = (MODEL_SCHEDULER, *SCHEDULERS)

# Limits that apply when the app listens beyond this machine and the operator set none.
PUBLIC_MAX_PIXELS = 2048 * 2048
PUBLIC_MAX_STEPS = 100


@dataclass(frozen=True)
class GenerationRequest:
    """One generation as the page asks for it; field names are RunSettings / engine field names."""

    preset: str
    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    mode: str
    scheduler: str = MODEL_SCHEDULER  # a name of distlin.schedulers.SCHEDULERS, or the model's own

    @classmethod
    def for_preset(cls, preset: str) -> GenerationRequest:
        """The preset's own values, which the page shows when a preset is chosen."""
        values = {**load_preset(_builtin_preset(preset)), "scheduler": MODEL_SCHEDULER}
        return cls(preset=preset, **{f.name: values[f.name] for f in fields(cls) if f.name != "preset"})

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> GenerationRequest:
        """Check a received dict: exactly the known fields, each of the right type, and a built-in preset."""
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(message) - names), sorted(names - set(message))
        if unknown or missing:
            raise UsageError(f"request fields: unknown {unknown}, missing {missing}")
        values = {key: _typed(key, message[key]) for key in names}
        _builtin_preset(values["preset"])
        if values["mode"] not in MODES:
            raise UsageError(f"unknown mode {values['mode']!r}; use one of {', '.join(MODES)}")
        if values["scheduler"] not in SCHEDULER_CHOICES:
            raise UsageError(f"unknown scheduler {values['scheduler']!r}; use one of {', '.join(SCHEDULER_CHOICES)}")
        return cls(**values)

    def to_message(self) -> dict[str, Any]:
        """The plain dict broadcast to every rank."""
        return asdict(self)

    def settings(self, world_size: int, device: str | None = None) -> RunSettings:
        """The run's settings, exactly as the command line builds them for the same values."""
        overrides = {key: value for key, value in self.to_message().items() if key != "preset"}
        overrides["scheduler"] = None if self.scheduler == MODEL_SCHEDULER else self.scheduler
        return build_settings(self.preset, {**overrides, "device": device}, world_size)


@dataclass(frozen=True)
class Limits:
    """Most pixels (of the final image) and most steps one request may ask for; None: no limit."""

    max_pixels: int | None = None
    max_steps: int | None = None

    @classmethod
    def for_host(cls, local: bool, max_pixels: int | None, max_steps: int | None) -> Limits:
        """The operator's limits, or, when the app listens beyond this machine, the public defaults."""
        if local:
            return cls(max_pixels, max_steps)
        return cls(max_pixels or PUBLIC_MAX_PIXELS, max_steps or PUBLIC_MAX_STEPS)

    def check(self, settings: RunSettings) -> None:
        """UsageError when the settings exceed a limit."""
        pixels = settings.height * settings.width
        if self.max_pixels is not None and pixels > self.max_pixels:
            raise UsageError(
                f"{settings.width}x{settings.height} is {pixels:,} pixels; this server allows at most "
                f"{self.max_pixels:,} pixels"
            )
        if self.max_steps is not None and settings.steps > self.max_steps:
            raise UsageError(f"{settings.steps} steps; this server allows at most {self.max_steps}")


def _typed(key: str, value: Any) -> Any:
    """``value`` as the field's type: whole numbers from a browser may arrive as floats (``512.0``)."""
    kind = get_type_hints(GenerationRequest)[key]
    if kind is str and isinstance(value, str):
        return value
    if kind in (int, float) and isinstance(value, int | float) and not isinstance(value, bool):
        if kind is int and value != int(value):
            raise UsageError(f"{key.replace('_', ' ')} {value} must be a whole number")
        return kind(value)
    wanted = {str: "text", int: "a whole number", float: "a number"}[kind]
    raise UsageError(f"{key.replace('_', ' ')} must be {wanted}, got {value!r}")


def _builtin_preset(name: str) -> str:
    """A built-in preset's name; a path (a request cannot name files on the server) is refused."""
    if name not in list_presets():
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    return name
