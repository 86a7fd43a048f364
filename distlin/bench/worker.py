"""One rank of a ``scaling`` run, started by torchrun (the suite spawns it; ``launch/slurm/bench.sbatch`` too).

Every rank builds the same seeded UNet (or SANA transformer, :mod:`distlin.bench.denoisers`), then for each
setting (``exact``, ``displaced`` with each stale set of ``--stale-sets``, ``naive``; in that order, the whole
sequence ``--rounds`` times, so that a change of load touches every setting alike) parallelizes it, runs
``--warmup`` untimed steps (the synchronous warm-up of ``displaced``) and ``--steps`` timed ones with decreasing
timesteps; a step's time is the slowest rank's.
Rank 0 writes ``--result``: per setting, the step times and every rank's engine counters of each round.

    python -m torch.distributed.run --nproc_per_node N -m distlin.bench.worker --result ranks-N.json ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distlin.bench.denoisers import build_denoiser, denoiser_inputs, parallelize_denoiser, timestep
from distlin.bench.models import ATTENTIONS
from distlin.bench.options import resolve_dtype, stale_label, stale_sets, str_list
from distlin.bench.report import describe_device, dtype_name, progress
from distlin.bench.timing import synchronize
from distlin.io import atomic_write
from distlin.parallel import PatchParallelConfig, Runtime, init_runtime
from distlin.parallel.config import MODES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m distlin.bench.worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--modes", type=str_list(MODES), default=list(MODES))
    parser.add_argument("--attention", choices=ATTENTIONS, default="linear")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--cfg-parallel", action="store_true", help="split the CFG batch over two rank groups")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--stale-sets", default="every", help="displaced mode's stale sets (as the fidelity suite)")
    parser.add_argument("--rounds", type=int, default=1, help="times the whole sequence of settings runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--backend", default=None, help="default gloo on CPU, nccl on CUDA")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--result", type=Path, required=True)
    return parser.parse_args(argv)


def _slowest(values: list[float], runtime: Runtime) -> list[float]:
    """Element-wise maximum over the ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    if runtime.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _gather(obj: Any, runtime: Runtime) -> list[Any]:
    if not runtime.distributed:
        return [obj]
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


def time_mode(
    unet: Any, inputs: dict[str, Any], config: PatchParallelConfig, args: argparse.Namespace, runtime: Runtime
) -> dict[str, Any]:
    """Step wall times, process CPU times and the CPU time of the process's other threads than the one computing
    (the exchange threads: gloo's workers and socket loop) (ms, maximum over ranks) after the warm-up, and every
    rank's counters over the timed steps. CPU time well below wall time on one rank means other processes took
    cores; exchange-thread time is what the exchanges took from a rank's cores beside the blocked time."""
    handle = parallelize_denoiser(args.model, unet, config, runtime)
    timed: dict[str, list[float]] = {"step_ms": [], "cpu_ms": [], "comm_cpu_ms": []}
    try:
        with torch.inference_mode():
            for step in range(args.warmup + args.steps):
                if step == args.warmup:
                    handle.ctx.stats.reset()
                runtime.barrier()
                synchronize(runtime.device)
                start, start_cpu, start_thread = time.perf_counter(), time.process_time(), time.thread_time()
                unet(timestep=timestep(args.model, 999 - step, args.batch, runtime.device), **inputs)
                synchronize(runtime.device)
                cpu, thread = time.process_time() - start_cpu, time.thread_time() - start_thread
                wall, cpu, others = _slowest([time.perf_counter() - start, cpu, cpu - thread], runtime)
                if step >= args.warmup:
                    for samples, seconds in zip(timed.values(), (wall, cpu, others), strict=True):
                        samples.append(seconds * 1e3)
                if runtime.is_main:
                    progress("scaling", f"{runtime.world_size} rank(s), {config.mode}, step {step}: {wall:.2f} s")
        counters = _gather(handle.ctx.stats.summary(), runtime)
    finally:
        handle.undo()
    return {**timed, "counters_by_rank": counters}


def settings(args: argparse.Namespace) -> dict[str, PatchParallelConfig]:
    """Every engine setting to time, by label: exact, displaced for each stale set, naive (those in ``--modes``).

    The untimed steps are the warm-up (steps 0..W synchronous): displaced from the first timed one."""
    warmup = max(args.warmup - 1, 0)
    out = {}
    for mode in args.modes:
        for stale in stale_sets(args.stale_sets) if mode == "displaced" else [None]:
            label = mode if stale is None else f"displaced {stale_label(stale)}"
            extra = {} if stale is None else {"stale": stale}
            out[label] = PatchParallelConfig(mode, warmup_steps=warmup, cfg_parallel=args.cfg_parallel, **extra)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runtime = init_runtime(args.backend, args.timeout_s, args.device)
    dtype = resolve_dtype(args.dtype, runtime.device)
    try:
        unet = build_denoiser(args.model, args.attention, runtime.device, dtype)
        inputs = denoiser_inputs(args.model, unet, args.batch, args.height, args.width)
        if runtime.world_size == 1:
            args.modes = ["exact"]  # one rank: every mode is the same code
        configs = settings(args)
        runs: dict[str, dict[str, Any]] = {
            label: {"mode": c.mode, "stale": sorted(c.stale) if c.mode == "displaced" else None}
            for label, c in configs.items()
        }
        for _ in range(args.rounds):
            for label, config in configs.items():
                timed, run = time_mode(unet, inputs, config, args, runtime), runs[label]
                counters = timed.pop("counters_by_rank")
                for key, samples in timed.items():
                    run.setdefault(key, []).extend(samples)
                run.setdefault("counters_by_round", []).append(counters)
                run["counters_by_rank"] = counters
        result = {k: getattr(args, k) for k in ("model", "height", "width")} | {"ranks": runtime.world_size}
        result |= {k: getattr(args, k) for k in ("attention", "batch", "cfg_parallel")}
        result |= {"dtype": dtype_name(dtype), "device": describe_device(runtime.device), "backend": runtime.backend}
        result |= {"threads_per_rank": torch.get_num_threads(), "warmup": args.warmup, "rounds": args.rounds}
        result["modes"] = runs
        if runtime.is_main:
            atomic_write(args.result, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    finally:
        runtime.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
