"""The memory plan a request is shown before it runs, and the refusal of one that would not fit.

The same planner and the same fit as a run (:func:`distlin.run.fitted_settings`): memory savers (same image) are
switched on when needed, and a run that no saver makes fit is refused with the planner's one-line reason.
"""

from __future__ import annotations

from distlin.memory.fit import plan_run, saver_flags
from distlin.memory.planner import format_plan
from distlin.parallel.runtime import Runtime
from distlin.run import Prepared, fitted_settings
from distlin.settings import RunSettings
from distlin.sizes import format_size


def fit_settings(settings: RunSettings, runtime: Runtime, held: Prepared | None = None) -> RunSettings:
    """The settings the run will use (savers included); UsageError with the planner's reason if none fits (on a
    CPU: if rank 0's machine cannot hold its ranks, checked again by every rank when the run starts). ``held``:
    the pipeline the ranks keep from the last request, reused or freed before this one loads."""
    return fitted_settings(settings, runtime, held=held)


def describe_plan(settings: RunSettings, fitted: RunSettings, runtime: Runtime) -> str:
    """The cascade, the predicted peak per rank and what makes it up, and the savers the fit switched on."""
    stages = " -> ".join(format_size(s.width, s.height) for s in settings.stages)
    lines = [f"cascade: on ({stages})" if stages else "cascade: off (one pass)"]
    planned = plan_run(fitted, runtime.world_size)
    lines.append(format_plan(planned) if planned else f"no offline memory plan for model {settings.model!r}")
    savers = saver_flags(settings, fitted)
    if savers:
        lines.append(f"to fit {runtime.device}, runs with {savers} (same image)")
    return "\n".join(lines)
