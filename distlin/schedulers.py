"""Samplers by name (``--scheduler``): each is a diffusers scheduler class and the options that make it that
sampler, built from the model's own scheduler config so its noise schedule (betas, timestep spacing) is kept.

Torch-free at import: the command line checks a name before loading anything.
"""

from __future__ import annotations

from collections.abc import Mapping
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
# Multistep solvers divide by the gap between consecutive noise levels: at as many steps as training timesteps two
# levels coincide (measured with diffusers 0.42: DPM++ 2M and UniPC repeat a sigma at 1000 of 1000) and the latents
# become non-finite; with "leading" spacing they also place one more point than steps. So they take one step fewer.
MULTISTEP = frozenset({"DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"})
# Schedulers whose timestep_spacing is "leading" unless the config says otherwise: their timesteps are shifted up by
# steps_offset, so at as many steps as training timesteps the first is past the last (DDIM, PNDM: an IndexError).
LEADING_BY_DEFAULT = frozenset({"DDIMScheduler", "PNDMScheduler", "LCMScheduler", "DDPMScheduler"})
DIFFUSERS_TRAIN_STEPS = 1000  # diffusers' default num_train_timesteps
LCM_ORIGINAL_STEPS = 50  # diffusers' default original_inference_steps of LCMScheduler


def check_scheduler(name: str | None) -> None:
    """None (the model's own scheduler) or a known name; a UsageError listing the names otherwise."""
    if name is not None and name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")


def max_steps(config: Mapping[str, Any] | None, name: str | None = None) -> tuple[int, str]:
    """The most denoising steps scheduler ``name`` (None: the model's own, ``config["_class_name"]``) can take over
    the noise schedule ``config`` (the model's scheduler config; None: diffusers' defaults), and why."""
    config = config or {}
    kind = SCHEDULERS[name][0] if name in SCHEDULERS else str(config.get("_class_name", ""))
    train = int(config.get("num_train_timesteps", DIFFUSERS_TRAIN_STEPS))
    if kind == "LCMScheduler":
        return int(config.get("original_inference_steps", LCM_ORIGINAL_STEPS)), "LCM's original inference steps"
    spacing = config.get("timestep_spacing") or ("leading" if kind in LEADING_BY_DEFAULT else "linspace")
    offset = int(config.get("steps_offset", 0)) if spacing == "leading" else 0
    fewer = offset + (kind in MULTISTEP)
    if not fewer:
        return train, f"its {train} training timesteps"
    return train - fewer, f"{fewer} fewer than its {train} training timesteps, so the last is not passed"


def check_steps(config: Mapping[str, Any] | None, steps: int, name: str | None = None) -> None:
    """Refuse more steps than the scheduler can take (see :func:`max_steps`), before any model loads."""
    limit, why = max_steps(config, name)
    if steps > limit:
        sampler = f"scheduler {name}" if name else "the model's scheduler"
        raise UsageError(
            f"steps {steps} is more than {sampler} can take ({limit}: {why}); pass --steps {limit} or fewer"
        )


def unet_calls(name: str | None, steps: int) -> int:
    """UNet evaluations of ``steps`` denoising steps with scheduler ``name`` (what a progress bar counts)."""
    return 2 * steps - 1 if name in SECOND_ORDER else steps


def build_scheduler(name: str, config: Any) -> Any:
    """Scheduler ``name`` over the noise schedule of ``config`` (a pipeline's ``scheduler.config``)."""
    import diffusers

    check_scheduler(name)
    class_name, options = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **options)
