"""Suite ``fidelity``: how far each engine setting's image is from one device, next to what it costs at 16K.

For every case (built-in SD-1.x model, size, steps of its own scheduler, guidance 7.5), self-attention kind (LinFusion
``linear``, or the base model's ``softmax``) and number of ranks N, the suite spawns one torchrun launch of N
gloo ranks (CFG parallelism off: every rank owns rows of the whole batch) that generates the image once per
setting: ``exact``, ``naive``, and ``displaced`` for every stale set and warm-up. Each setting's pipeline is
prepared, sampled and decoded as a run does it (:func:`distlin.bench.models.run_pipeline`, :func:`distlin.run.sample`,
:func:`distlin.run.final_image`: memory bounds, the engine, the band-parallel VAE), and its image is compared
with the image of one process in exact mode, computed here first the same way: PSNR over RGB in [0, 1] (before
8-bit quantisation) and the largest error in 8-bit levels. Always on CPU in float32, whatever ``--device`` and
``--dtype`` say: what is measured is the exchange schedule, not the device.

Next to each row, the ``project`` suite's PROJECTION of that setting at 16384x16384 on 8 GPUs (full-size SD-1.5
with LinFusion, bf16, ``--link``): compute plus synchronous exchanges, the stale ones hidden behind compute.
Worker specs and results stay in ``OUT/fidelity-workers``.

The rank side: ``python -m torch.distributed.run --nproc_per_node N -m distlin.bench.fidelity --spec SPEC.json``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distlin.bench import options
from distlin.bench.accounting import dry_run
from distlin.bench.hardware import GPUS, LINKS, comm_seconds, projected_seconds
from distlin.bench.launch import run_ranks
from distlin.bench.models import build, run_pipeline
from distlin.bench.options import EVERYTHING, stale_label, stale_sets
from distlin.bench.report import (
    Record,
    SuiteResult,
    bullets,
    finish_axes,
    fmt,
    groups,
    markdown_table,
    met,
    new_figure,
    percent,
    progress,
)
from distlin.io import atomic_write
from distlin.parallel import init_runtime
from distlin.parallel.config import DEFAULT_STALE
from distlin.parallel.runtime import Runtime
from distlin.run import Prepared, final_image, sample, vae_coder
from distlin.settings import RunSettings
from distlin.sizes import format_size
from distlin.sources import FRESH_LINFUSION, NO_LINFUSION

PROMPT = "a red cube on a wooden table"
GUIDANCE = 7.5
LINFUSION = {"linear": FRESH_LINFUSION, "softmax": NO_LINFUSION}
# The ``project`` suite's defaults: its target point (SD-1.5 at 16384², 8 GPUs), CFG batch, H100 at 50 % MFU.
PROJECTION = {"model": "full-sd15", "size": 16384, "ranks": 8, "batch": 2, "dtype": torch.bfloat16, "mfu": 0.5}
PROJECTION_GPU = "h100"
# DistriFusion's corrected asynchronous GroupNorm, warm-up 4, on the protocol case (issue #13), dB.
DISTRIFUSION_DB = {2: 71.4, 4: 66.4}
TARGET_GAIN_DB, TARGET_EFFICIENCY_POINTS = 10.0, 2.0
EXACT = {"mode": "exact", "stale": [], "warmup_steps": None}


@dataclass(frozen=True)
class Case:
    """One generation: a built-in SD-1.x pipeline (seed 0) at a size, with ``steps`` of the model's own scheduler
    (DDIM for tiny-sd15, PNDM for full-sd15)."""

    model: str
    height: int
    width: int
    steps: int


CASES = {
    "protocol": Case("tiny-sd15", 512, 512, 20),  # issue #13's measurement protocol
    "tiny": Case("tiny-sd15", 320, 192, 20),  # the tests' size: five 8-row units, uneven bands on 3 ranks
    "full": Case("full-sd15", 256, 256, 4),  # the published SD-1.5 architecture, small and short
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cases = "; ".join(f"{k} = {v.model} {format_size(v.width, v.height)}, {v.steps} steps" for k, v in CASES.items())
    options.add(
        parser, "--cases", ["protocol", "tiny"], ["tiny"], f"cases: {cases}", type=options.str_list(tuple(CASES))
    )
    options.add(parser, "--ranks", [2, 3, 4], [2], "numbers of ranks", type=options.int_list)
    kinds = options.str_list(tuple(LINFUSION))
    options.add(parser, "--attention", list(LINFUSION), ["linear"], "self-attention kinds", type=kinds)
    warmup = "displaced warm-up W (steps 0..W synchronous)"
    options.add(parser, "--warmup-steps", [1, 2, 3, 4, 5], [1], warmup, type=options.int_list)
    quick = f"{stale_label(DEFAULT_STALE)},{stale_label(EVERYTHING)}"
    stale = "stale sets of displaced mode: every (all non-empty ones), or a comma list such as halo,attention+groupnorm"
    options.add(parser, "--stale-sets", "every", quick, stale)
    options.add(parser, "--steps", None, 4, "denoising steps instead of each case's own", type=int)
    link = "link of the projection (default nvlink)"
    parser.add_argument("--link", choices=tuple(LINKS), default="nvlink", help=link)
    options.add_timeout(parser)


def engine_settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every engine setting of one launch: exact, naive, then displaced for each stale set and warm-up."""
    displaced = itertools.product(stale_sets(args.stale_sets), args.warmup_steps)
    return [EXACT, {**EXACT, "mode": "naive"}] + [
        {"mode": "displaced", "stale": sorted(stale), "warmup_steps": warmup} for stale, warmup in displaced
    ]


def case_pipeline(
    case: Case, attention: str, steps: int, setting: dict[str, Any], runtime: Runtime
) -> tuple[Prepared, RunSettings]:
    """The case's pipeline for one engine ``setting`` on ``runtime``'s ranks, fitted and prepared as a run does it
    (CFG parallelism off: every rank owns rows of the whole batch)."""
    engine = {"mode": setting["mode"], "stale": setting["stale"], "warmup_steps": setting["warmup_steps"] or 0}
    prepared, settings = run_pipeline(
        case.model,
        runtime.device,
        torch.float32,
        preset="tiny-sd15",
        runtime=runtime,
        linfusion=LINFUSION[attention],
        prompt=PROMPT,
        negative_prompt="",
        height=case.height,
        width=case.width,
        steps=steps,
        guidance_scale=GUIDANCE,
        seed=0,
        cfg_parallel=False,
        **engine,
    )
    prepared.pipe.set_progress_bar_config(disable=True)  # one line per setting is enough
    return prepared, settings


@torch.inference_mode()
def generate(prepared: Prepared, settings: RunSettings, runtime: Runtime) -> torch.Tensor | None:
    """One generation as a run samples and decodes it: RGB in [0, 1] before 8-bit quantisation, on rank 0 (None
    elsewhere; every rank must call it)."""
    coder = vae_coder(prepared, settings, runtime)
    return final_image(sample(prepared, settings, coder), prepared, settings, runtime, coder, output_type="pt")


def compare(image: torch.Tensor, reference: torch.Tensor) -> dict[str, float | None]:
    """PSNR in dB (None when identical) and the largest error in 8-bit levels."""
    mse, largest = float(((image - reference) ** 2).mean()), float((image - reference).abs().max())
    return {"psnr_db": None if mse == 0 else 10 * math.log10(1 / mse), "max_error_levels": 255 * largest}


def worker(spec: dict[str, Any]) -> None:
    """One rank: generate every setting's image; rank 0 compares each with the reference and writes the result."""
    torch.set_num_threads(spec["threads"])
    runtime = init_runtime("gloo", spec["timeout_s"], "cpu")
    try:
        case, steps = Case(**spec["case"]), spec["steps"]
        reference = torch.load(spec["reference"]) if runtime.is_main else None
        results = []
        for setting in spec["settings"]:
            prepared, settings = case_pipeline(case, spec["attention"], steps, setting, runtime)
            start = time.perf_counter()
            image = generate(prepared, settings, runtime)
            seconds = time.perf_counter() - start
            del prepared
            gc.collect()  # the engine's hooks hold the pipeline in cycles; the next setting's fit reads free RAM
            if runtime.is_main:
                results.append(r := {**setting, **compare(image, reference), "seconds": seconds})
                where = f"{spec['name']} {spec['attention']} N={runtime.world_size} {label(r)} W={r['warmup_steps']}"
                progress("fidelity", f"{where}: {db(r['psnr_db'])} dB, {seconds:.1f} s")
        if runtime.is_main:
            payload = {**spec, "ranks": runtime.world_size, "results": results}
            atomic_write(spec["result"], lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n"))
    finally:
        runtime.shutdown()


def projection(link: str) -> dict[str, Any]:
    """Compute and per-kind exchange seconds of one step at 16K on 8 GPUs (the ``project`` suite's model)."""
    unet = build(PROJECTION["model"], "linear", "meta", PROJECTION["dtype"])
    size, n, batch = PROJECTION["size"], PROJECTION["ranks"], PROJECTION["batch"]
    rate = GPUS[PROJECTION_GPU][1] * PROJECTION["mfu"]
    dry, single = dry_run(unet, size, size, n, batch), dry_run(unet, size, size, 1, batch)
    return {"compute_s": dry.flops / rate, "single_s": single.flops / rate, "comm_s": comm_seconds(dry, n, LINKS[link])}


def projected(setting: dict[str, Any], attention: str, cost: dict[str, Any]) -> dict[str, float | None]:
    """Projected ms per step and efficiency at 16K on 8 GPUs; LinFusion only, and naive is not a usable mode."""
    if attention != "linear" or setting["mode"] == "naive":
        return {"projected_ms_per_step": None, "projected_efficiency": None}
    seconds = projected_seconds(cost["compute_s"], cost["comm_s"], setting["stale"])
    efficiency = cost["single_s"] / (PROJECTION["ranks"] * seconds)
    return {"projected_ms_per_step": 1e3 * seconds, "projected_efficiency": efficiency}


def measure(args: argparse.Namespace) -> list[Record]:
    folder = args.out / "fidelity-workers"
    folder.mkdir(parents=True, exist_ok=True)
    cost = projection(args.link)
    about = f"{PROJECTION['model']} {PROJECTION['size']}² on {PROJECTION['ranks']} GPUs, {args.link}"
    records: list[Record] = []
    for name, attention in itertools.product(args.cases, args.attention):
        case = CASES[name]
        steps = args.steps or case.steps
        reference_path = folder / f"reference-{name}-{attention}.pt"
        one = Runtime(device=torch.device("cpu"))
        torch.save(generate(*case_pipeline(case, attention, steps, EXACT, one), one), reference_path)
        gc.collect()  # free this process's pipeline before the ranks load theirs
        for n in args.ranks:
            spec = {"name": name, "case": asdict(case), "steps": steps, "attention": attention}
            spec |= {"settings": engine_settings(args), "reference": str(reference_path)}
            spec |= {"result": str(folder / f"{name}-{attention}-{n}.json"), "threads": args.threads}
            spec["timeout_s"] = args.timeout_s
            spec_path = folder / f"{name}-{attention}-{n}.spec.json"
            spec_path.write_text(json.dumps(spec, indent=1) + "\n")
            run_ranks("fidelity", n, "distlin.bench.fidelity", ["--spec", str(spec_path)], args.threads, args.timeout_s)
            result = json.loads(Path(spec["result"]).read_text())
            for row in result["results"]:
                sync_steps = steps if row["mode"] == "exact" else min(steps, (row["warmup_steps"] or 0) + 1)
                record = {"case": name, **asdict(case), "steps": steps, "guidance": GUIDANCE, "attention": attention}
                record |= {"ranks": n, **row, "synchronous_steps": 0 if row["mode"] == "naive" else sync_steps}
                records.append({**record, **projected(row, attention, cost), "projection": about})
    return records


def label(r: Record) -> str:
    return r["mode"] if r["mode"] != "displaced" else f"displaced {stale_label(frozenset(r['stale']))}"


def db(value: float | None) -> str:
    return "identical" if value is None else f"{value:.1f}"


def main_warmup(records: list[Record]) -> int:
    """The warm-up the trade-off table shows: 4 (the protocol's) when measured, else the largest."""
    warmups = {r["warmup_steps"] for r in records if r["mode"] == "displaced"}
    return 4 if 4 in warmups or not warmups else max(warmups)


def markdown(records: list[Record]) -> str:
    w = main_warmup(records)
    parts = [
        "Decoded image of N gloo ranks (all ranks split the image; CFG parallelism off) vs one process in exact "
        "mode, each prepared, sampled and decoded as a run does it: PSNR over RGB in [0, 1] and largest error in "
        "8-bit levels. The model's own scheduler, guidance 7.5, seed 0, float32, random weights (LinFusion layers "
        "`fresh`). `displaced` with warm-up W runs steps 0…W synchronously (W + 1 steps). Projection (LinFusion "
        "rows): the `project` suite's alpha-beta model for "
        f"{records[0]['projection']}, stale exchanges hidden behind the compute — a PROJECTION, not a measurement."
    ]
    for (name, attention), group in groups(records, ("case", "attention")).items():
        r0 = group[0]
        ranks = sorted({r["ranks"] for r in group})
        rows = []
        for rs in groups([r for r in group if r["warmup_steps"] in (None, w)], ("mode", "stale")).values():
            by_n = {r["ranks"]: r for r in rs}
            last = by_n[max(by_n)]
            rows.append(
                [label(last), *(db(by_n[n]["psnr_db"]) if n in by_n else "n/a" for n in ranks)]
                + [fmt(last["max_error_levels"]), fmt(last["projected_ms_per_step"])]
                + [percent(last["projected_efficiency"], 2)]
            )
        parts.append(
            f"**{name}**: {r0['model']} {format_size(r0['width'], r0['height'])}, {r0['steps']} steps, {attention} "
            f"self-attention; displaced warm-up {w}:"
        )
        headers = ["setting", *(f"PSNR dB, {n} ranks" for n in ranks), f"max error (levels), {ranks[-1]} ranks"]
        parts.append(markdown_table([*headers, "projected ms/step", "projected efficiency"], rows))
        warmups = sorted({r["warmup_steps"] for r in group if r["mode"] == "displaced"})
        if len(warmups) > 1:
            n = ranks[-1]
            sweep = groups([r for r in group if r["mode"] == "displaced" and r["ranks"] == n], ("stale",))
            rows = [
                [
                    stale_label(frozenset(key[0])),
                    *(db(r["psnr_db"]) for r in sorted(rs, key=lambda r: r["warmup_steps"])),
                ]
                for key, rs in sweep.items()
            ]
            parts.append(f"PSNR dB vs warm-up W on {n} ranks ({name}, {attention}):")
            parts.append(markdown_table(["stale", *(f"W={v}" for v in warmups)], rows))
    parts += _targets(records)
    return "\n\n".join(parts)


def _find(records: list[Record], stale: frozenset[str], ranks: int, warmup: int) -> Record | None:
    point = ("displaced", stale, ranks, warmup)
    return next(
        (r for r in records if (r["mode"], frozenset(r["stale"]), r["ranks"], r["warmup_steps"]) == point), None
    )


def _targets(records: list[Record]) -> list[str]:
    """Issue #13's benchmark targets on the protocol case, when this run measured them."""
    lines = []
    for attention in ("linear", "softmax"):
        protocol = [r for r in records if r["case"] == "protocol" and r["attention"] == attention]
        for n, reference in DISTRIFUSION_DB.items():
            r = _find(protocol, EVERYTHING, n, 4)
            if r is not None and r["psnr_db"] is not None:
                lines.append(
                    f"- {attention}, everything stale, W=4, {n} ranks: {db(r['psnr_db'])} dB (DistriFusion's corrected "
                    f"GroupNorm {reference} dB: {met(r['psnr_db'] >= reference)})"
                )
        everything, default = _find(protocol, EVERYTHING, 4, 4), _find(protocol, DEFAULT_STALE, 4, 4)
        if everything and default and everything["psnr_db"] and default["psnr_db"]:
            gain = default["psnr_db"] - everything["psnr_db"]
            line = (
                f"- {attention}, default stale set ({stale_label(DEFAULT_STALE)}) vs everything stale, W=4, 4 ranks: "
                f"{gain:+.1f} dB (target ≥ +{TARGET_GAIN_DB:g} dB: {met(gain >= TARGET_GAIN_DB)})"
            )
            if default["projected_efficiency"] is not None:
                points = 100 * (everything["projected_efficiency"] - default["projected_efficiency"])
                line += (
                    f"; projected efficiency {percent(default['projected_efficiency'], 2)} vs "
                    f"{percent(everything['projected_efficiency'], 2)} ({points:.2f} points, target ≤ "
                    f"{TARGET_EFFICIENCY_POINTS:g}: {met(points <= TARGET_EFFICIENCY_POINTS)})"
                )
            lines.append(line)
    return bullets("Targets (issue #13, protocol case)", lines)


def plot(records: list[Record]) -> Any:
    fig, (tradeoff, sweep) = new_figure(2)
    w = main_warmup(records)
    linear = [r for r in records if r["attention"] == "linear" and r["projected_efficiency"] is not None]
    if linear:
        name, n = linear[0]["case"], max(r["ranks"] for r in linear)
        for r in linear:
            if r["case"] == name and r["ranks"] == n and r["warmup_steps"] in (None, w) and r["psnr_db"] is not None:
                tradeoff.plot(100 * r["projected_efficiency"], r["psnr_db"], "o")
                tradeoff.annotate(label(r).removeprefix("displaced "), (100 * r["projected_efficiency"], r["psnr_db"]))
        xlabel = f"projected efficiency, {linear[0]['projection']} (%)"
        ylabel, title = f"PSNR vs one device (dB), {name}, {n} ranks", f"fidelity vs cost (LinFusion, warm-up {w})"
        tradeoff.set(xlabel=xlabel, ylabel=ylabel, title=title)
    displaced = [r for r in records if r["mode"] == "displaced" and r["psnr_db"] is not None]
    if displaced:
        name, attention = displaced[0]["case"], displaced[0]["attention"]
        mine = [r for r in displaced if (r["case"], r["attention"]) == (name, attention)]
        n = max(r["ranks"] for r in mine)
        # Against the warm-up on the most ranks when several warm-ups were measured, else against the ranks.
        x = "warmup_steps" if len({r["warmup_steps"] for r in mine}) > 1 else "ranks"
        if x == "warmup_steps":
            mine = [r for r in mine if r["ranks"] == n]
        for key, rs in groups(mine, ("stale",)).items():
            rs = sorted(rs, key=lambda r: r[x])
            sweep.plot([r[x] for r in rs], [r["psnr_db"] for r in rs], "-o", label=stale_label(frozenset(key[0])))
        fixed = f"{n} ranks" if x == "warmup_steps" else f"warm-up {mine[0]['warmup_steps']}"
        xlabel = "warm-up W (W + 1 synchronous steps)" if x == "warmup_steps" else "ranks"
        sweep.set(xlabel=xlabel, ylabel="PSNR vs one device (dB)", title=f"{name}, {attention}, {fixed}")
    finish_axes(tradeoff, sweep)
    return fig


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> SuiteResult:
    """Spawn one torchrun launch per case, attention and rank count (CPU, gloo, float32)."""
    records = measure(args)
    return SuiteResult(records, markdown(records), plot(records))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distlin.bench.fidelity", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True, help="what to run, written by the suite")
    worker(json.loads(parser.parse_args(argv).spec.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
