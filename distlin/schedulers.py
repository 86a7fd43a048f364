"""Samplers by name (``--scheduler``): each is a diffusers scheduler class and the options that make it that
sampler, built from the model's own scheduler config so its noise schedule (betas, timestep spacing) is kept.

Torch-free at import: the command line checks a name before loading anything.
"""

from __future__ import annotations

from typing import Any

from distlin.errors import UsageError

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++-2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
SECOND_ORDER = frozenset({"heun"})  # two UNet evaluations per step, the first step excepted


def check_scheduler(name: str | None) -> None:
    """None (the model's own scheduler) or a known name; a UsageError listing the names otherwise."""
    if name is not None and name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")


def unet_calls(name: str | None, steps: int) -> int:
    """UNet evaluations of ``steps`` denoising steps with scheduler ``name`` (what a progress bar counts)."""
    return 2 * steps - 1 if name in SECOND_ORDER else steps


def build_scheduler(name: str, config: Any) -> Any:
    """Scheduler ``name`` over the noise schedule of ``config`` (a pipeline's ``scheduler.config``)."""
    import diffusers

    check_scheduler(name)
    class_name, options = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **options)
