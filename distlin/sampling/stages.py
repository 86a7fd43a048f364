"""A cascade's stages: their sizes and strengths as a preset gives them, and the clock that reports each one.

Torch-free at import, so the command line validates a cascade before any heavy import.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distlin.errors import UsageError
from distlin.sizes import format_size

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Stage:
    """One resolution of the cascade; ``strength`` is ignored for the first (native, from noise) stage."""

    height: int
    width: int
    strength: float = 1.0


SD15_STAGES: tuple[Stage, ...] = (  # (height, width): LinFusion's 16K recipe, 16384 px wide
    Stage(512, 1024),
    Stage(1024, 2048, 0.4),
    Stage(2048, 4096, 0.3),
    Stage(4096, 8192, 0.2),
    Stage(8192, 16384, 0.1),
)


StageReport = Callable[[int, Stage, float], None]  # (stage index, stage, wall seconds)


class StageClock:
    """Wall time of each cascade stage, device work included, handed to ``report`` as each stage ends.

    A stage's time runs from the end of the previous one, so it includes the decode/upscale/encode between them.
    """

    def __init__(self, report: StageReport | None):
        self.report = report
        self.start = time.perf_counter()

    def seconds(self, latents: torch.Tensor) -> float:
        """Wall seconds since the clock started or last lapped, the device's queued work on ``latents`` included."""
        if latents.is_cuda:
            import torch

            torch.cuda.synchronize(latents.device)
        return time.perf_counter() - self.start

    def lap(self, index: int, stage: Stage, latents: torch.Tensor) -> None:
        if self.report is None:
            return
        seconds = self.seconds(latents)
        self.report(index, stage, seconds)
        self.start += seconds


def check_stages(stages: Sequence[Stage]) -> None:
    """At least one stage, and every refining stage's strength in (0, 1]; a UsageError names the bad one."""
    if not stages:
        raise UsageError("a cascade needs at least one stage")
    for stage in stages[1:]:
        if not 0.0 < stage.strength <= 1.0:
            size = format_size(stage.width, stage.height)
            raise UsageError(f"stage {size}: strength must be in (0, 1], got {stage.strength}")


def cascade_stages(values: dict[str, Any]) -> tuple[Stage, ...]:
    """A preset's ``cascade:`` section (a list of {height, width, strength}) rescaled so its last stage is
    ``values``' height and width, each stage half the next; empty when the preset has no cascade.

    ``values`` come from :func:`distlin.presets.load_preset`, which checks each stage's keys and types. A
    UsageError names a size that does not stay a multiple of 8 or a stage with no step.
    """
    section = values.get("cascade") or []
    stages = []
    for k, entry in enumerate(section):
        halvings = 2 ** (len(section) - 1 - k)
        height, width = values["height"] // halvings, values["width"] // halvings
        strength = float(entry.get("strength", 1.0))
        if height % 8 or width % 8 or height < 8 or width < 8:
            raise UsageError(
                f"cascade stage {k} would be {format_size(width, height)} px (not a multiple of 8): make "
                f"--width/--height multiples of {8 * 2 ** (len(section) - 1)} for a {len(section)}-stage cascade"
            )
        if k and not 0.0 < strength <= 1.0:
            raise UsageError(f"cascade stage {k} strength {strength} must be in (0, 1]; fix the preset")
        if k and int(values["steps"] * strength) < 1:
            raise UsageError(
                f"cascade stage {k} would run {values['steps']} x {strength} < 1 denoising steps; "
                f"pass --steps {math.ceil(1 / strength)} or more"
            )
        stages.append(Stage(height, width, strength))
    return tuple(stages)


INIT_IMAGE_STRENGTH = 0.75  # how far an init image is noised when neither --strength nor a cascade stage says


def stages_from_image(
    stages: tuple[Stage, ...], width: int, height: int, strength: float | None
) -> tuple[tuple[Stage, ...], float, int]:
    """A cascade that starts from a ``width`` x ``height`` picture, the strength its first stage noises it to,
    and the index of that stage in the full cascade (the earlier ones are skipped).

    The cascade begins at its first stage at or above the picture's size (the last stage if none is; the
    picture is resized to it), with ``strength`` or else that stage's own (:data:`INIT_IMAGE_STRENGTH` for the
    native stage, which has none). Without a cascade: no stages, and image-to-image at ``strength``.
    """
    if not stages:
        return (), INIT_IMAGE_STRENGTH if strength is None else strength, 0
    start = next((k for k, s in enumerate(stages) if s.width >= width and s.height >= height), len(stages) - 1)
    first = stages[start]
    if strength is None:
        strength = first.strength if start else INIT_IMAGE_STRENGTH
    return (Stage(first.height, first.width, strength), *stages[start + 1 :]), strength, start
