"""What a browser may ask for: a preset by name, the generation values the command line offers, components by
name and uploaded pictures.

A request travels to every rank as a plain dict (:meth:`GenerationRequest.to_message`), and each rank turns it
into :class:`~distlin.settings.RunSettings` with the same :func:`~distlin.settings.build_settings` as the command
line. It carries no paths: the preset must be a built-in one, LoRAs, ControlNets and the IP-Adapter are names
looked up in the operator's :class:`~distlin.app.library.ComponentLibrary`, uploaded pictures (the IP-Adapter's
reference picture among them) travel as their bytes (each rank writes them into its own private temporary folder
for the run), and the model, device and output file are the app's, never the request's. Torch-free.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, get_args, get_type_hints

from distlin.app.library import ComponentLibrary
from distlin.components import Lora
from distlin.errors import UsageError
from distlin.inputs import decode_image
from distlin.parallel.config import check_mode
from distlin.presets import builtin_preset, load_preset
from distlin.schedulers import SCHEDULERS, check_scheduler
from distlin.settings import RunSettings, build_settings
from distlin.sizes import format_size

MODEL_SCHEDULER = "model's own"  # the scheduler the model ships with (no --scheduler)
SCHEDULER_CHOICES = (MODEL_SCHEDULER, *SCHEDULERS)
PRESET_FIELDS = ("prompt", "negative_prompt", "height", "width", "steps", "guidance_scale", "seed", "mode")
UPLOADS = ("init_image", "mask", "control_image", "ip_image")  # the settings' picture fields, from uploaded bytes

# Limits that apply when the app listens beyond this machine and the operator set none.
PUBLIC_MAX_PIXELS = 2048 * 2048
PUBLIC_MAX_STEPS = 100
PUBLIC_MAX_UPLOAD_MB = 64
# What waits on the server, on every host: requests in the queue, their pictures' bytes, and Gradio's upload folder.
MAX_QUEUED = 32
MAX_QUEUED_MB = 1024
MAX_UPLOAD_FOLDER_MB = 2048


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
    loras: tuple[tuple[str, float], ...] = ()  # (a LoRA's name in the server's --components, scale), in order
    controlnet: str | None = None  # a ControlNet's name in the server's --components
    control_scale: float = 1.0
    ip_adapter: str | None = None  # an IP-Adapter's name in the server's --components
    ip_scale: float = 1.0
    strength: float | None = None  # how far init_image is noised; None: the preset's (as without --strength)
    init_image: bytes | None = None  # uploaded pictures: the files' bytes, never a path
    mask: bytes | None = None
    control_image: bytes | None = None
    ip_image: bytes | None = None  # the IP-Adapter's reference picture

    @classmethod
    def for_preset(cls, preset: str) -> GenerationRequest:
        """The preset's own values, which the page shows when a preset is chosen."""
        values = load_preset(builtin_preset(preset))
        return cls(preset=preset, **{name: values[name] for name in PRESET_FIELDS})

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> GenerationRequest:
        """Check a received dict: exactly the known fields, each of the right type, and a built-in preset."""
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(message) - names), sorted(names - set(message))
        if unknown or missing:
            raise UsageError(f"request fields: unknown {unknown}, missing {missing}")
        values = {key: _typed(key, message[key]) for key in names}
        builtin_preset(values["preset"])  # a request cannot name files on the server
        check_mode(values["mode"])
        check_scheduler(None if values["scheduler"] == MODEL_SCHEDULER else values["scheduler"])
        return cls(**values)

    def to_message(self) -> dict[str, Any]:
        """The plain dict broadcast to every rank."""
        return asdict(self)

    @contextmanager
    def settings(
        self, world_size: int, device: str | None = None, library: ComponentLibrary | None = None
    ) -> Iterator[RunSettings]:
        """The run's settings, exactly as the command line builds them for the same values, with the component
        names resolved in ``library`` and the uploaded pictures as files in a private temporary folder, which
        is removed on leaving the block (after the run, whether it finished, failed or was cancelled)."""
        with tempfile.TemporaryDirectory(prefix="distlin-uploads-") as folder:
            overrides: dict[str, Any] = {key: getattr(self, key) for key in PRESET_FIELDS}
            overrides.update(
                scheduler=None if self.scheduler == MODEL_SCHEDULER else self.scheduler,
                device=device,
                **self._components(library or ComponentLibrary()),
                **self._write_uploads(Path(folder)),
            )
            yield build_settings(self.preset, overrides, world_size)

    def check_pictures(self) -> None:
        """Decode every uploaded picture whole (UsageError naming its flag, which the page words as its field): on
        rank 0, before the request is broadcast, so a truncated file or a decompression bomb is refused there."""
        for name in UPLOADS:
            data = getattr(self, name)
            if data is not None:
                decode_image(data, f"--{name.replace('_', '-')}")

    def metadata(self) -> dict[str, Any]:
        """What a result records of the components: their names and the uploads' digests, where the run's
        metadata holds the server's paths (the operator's files, and temporary files that are gone)."""
        labels = {name: _upload_label(getattr(self, name)) for name in UPLOADS}
        return {
            **labels,
            "loras": list(self.loras),
            "controlnet": [] if self.controlnet is None else [self.controlnet],  # lists, as the command line's
            "control_image": [] if labels["control_image"] is None else [labels["control_image"]],
            "ip_adapter": [] if self.ip_adapter is None else [self.ip_adapter],
            "ip_image": [] if labels["ip_image"] is None else [labels["ip_image"]],
        }

    def _components(self, library: ComponentLibrary) -> dict[str, Any]:
        """The command line's component settings for this request's names (UsageError for a name not offered)."""
        return {
            "loras": tuple(Lora(library.lora(name), scale) for name, scale in self.loras),
            "controlnet": None if self.controlnet is None else library.controlnet(self.controlnet),
            "control_scale": None if self.controlnet is None else self.control_scale,  # paired with its ControlNet
            "ip_adapter": None if self.ip_adapter is None else library.ip_adapter(self.ip_adapter),
            "ip_scale": None if self.ip_adapter is None else self.ip_scale,  # the default 1 without an IP-Adapter
            "strength": self.strength,
        }

    def picture_bytes(self) -> int:
        """The bytes of the pictures this request carries (what it holds while it waits)."""
        return sum(len(getattr(self, name) or b"") for name in UPLOADS)

    def _write_uploads(self, folder: Path) -> dict[str, str]:
        """Each uploaded picture as a file in ``folder``; its path for the settings."""
        paths = {}
        for name in UPLOADS:
            data = getattr(self, name)
            if data is not None:
                (folder / name).write_bytes(data)
                paths[name] = str(folder / name)
        return paths


@dataclass(frozen=True)
class Limits:
    """Most pixels (of the final image) and most steps one request may ask for, and the largest file a page
    may upload (Gradio refuses a larger one while it arrives); None: no limit. Then what may wait on the server
    at once: requests in the queue, the bytes of their pictures, and the bytes in the upload folder."""

    max_pixels: int | None = None
    max_steps: int | None = None
    max_upload_mb: int | None = None
    max_queued: int = MAX_QUEUED
    max_queued_mb: int = MAX_QUEUED_MB
    max_upload_folder_mb: int = MAX_UPLOAD_FOLDER_MB

    @classmethod
    def for_host(
        cls,
        local: bool,
        max_pixels: int | None,
        max_steps: int | None,
        max_upload_mb: int | None = None,
        max_queued: int = MAX_QUEUED,
        max_queued_mb: int = MAX_QUEUED_MB,
        max_upload_folder_mb: int = MAX_UPLOAD_FOLDER_MB,
    ) -> Limits:
        """The operator's limits, or, when the app listens beyond this machine, the public defaults."""
        waiting = (max_queued, max_queued_mb, max_upload_folder_mb)
        if local:
            return cls(max_pixels, max_steps, max_upload_mb, *waiting)
        return cls(
            max_pixels or PUBLIC_MAX_PIXELS,
            max_steps or PUBLIC_MAX_STEPS,
            max_upload_mb or PUBLIC_MAX_UPLOAD_MB,
            *waiting,
        )

    def check_queue(self, waiting: list[GenerationRequest], request: GenerationRequest) -> None:
        """UsageError when ``request`` would not fit in a queue holding ``waiting``: too many requests, or too
        many bytes of pictures (a request's own beyond the whole allowance included)."""
        if len(waiting) >= self.max_queued:
            raise UsageError(
                f"{len(waiting)} requests are waiting, the most this server queues; try again once one has run"
            )
        held = sum(queued.picture_bytes() for queued in waiting) + request.picture_bytes()
        if held > self.max_queued_mb * 2**20:
            raise UsageError(
                f"the queue's pictures would take {held / 2**20:.1f} MiB, over this server's {self.max_queued_mb} MiB; "
                "try again once a request has run"
            )

    def check(self, settings: RunSettings) -> None:
        """UsageError when the settings exceed a limit."""
        pixels = settings.height * settings.width
        if self.max_pixels is not None and pixels > self.max_pixels:
            raise UsageError(
                f"{format_size(settings.width, settings.height)} is {pixels:,} pixels; this server allows at most "
                f"{self.max_pixels:,} pixels"
            )
        if self.max_steps is not None and settings.steps > self.max_steps:
            raise UsageError(f"{settings.steps} steps; this server allows at most {self.max_steps}")


def _typed(key: str, value: Any) -> Any:
    """``value`` as the field's type: whole numbers from a browser may arrive as floats (``512.0``)."""
    if key == "loras":
        return _lora_choices(value)
    kind = get_type_hints(GenerationRequest)[key]
    kinds = get_args(kind) if isinstance(kind, UnionType) else (kind,)
    if value is None and NoneType in kinds:
        return None
    return _value(key.replace("_", " "), value, kinds[0])


def _value(label: str, value: Any, kind: type) -> Any:
    if kind in (str, bytes) and isinstance(value, kind):
        return value
    if kind in (int, float) and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UsageError(f"{label} {value} must be a finite number")
        if kind is int and value != int(value):
            raise UsageError(f"{label} {value} must be a whole number")
        return kind(value)
    wanted = {str: "text", int: "a whole number", float: "a number", bytes: "an uploaded file"}[kind]
    raise UsageError(f"{label} must be {wanted}, got {_short(value)}")


def _lora_choices(value: Any) -> tuple[tuple[str, float], ...]:
    """``[[name, scale], ...]`` as a tuple of pairs (the scale's range is the command line's check)."""
    pairs = value if isinstance(value, list | tuple) else [value]
    if not all(isinstance(pair, list | tuple) and len(pair) == 2 for pair in pairs):
        raise UsageError(f"loras must be a list of [name, scale] pairs, got {_short(value)}")
    return tuple((_value("LoRA name", name, str), _value("LoRA scale", scale, float)) for name, scale in pairs)


def _upload_label(data: bytes | None) -> str | None:
    return None if data is None else f"upload sha256:{hashlib.sha256(data).hexdigest()[:16]}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
