"""Suite ``gpu``: one prepared check of the CUDA fast path, under 8 minutes on one H100/H200 (CUDA only).

Parts (:data:`PARTS`, cheapest and surest first; ``--parts`` picks some; a record's ``section`` names its part):
``environment`` (GPU, torch, CUDA, triton); ``attention`` (LinFusion's two phases, fused Triton kernels vs the
PyTorch ops on token-major ``(batch, tokens, C)`` activations: time of each phase, speed-up, largest difference
relative to the largest output, peak memory); ``blocks`` (each kernel's tiling rule vs the candidate tilings);
``unet`` (one LinFusion UNet call per size: time per CFG step, TFLOP/s against the dense fp16/bf16 peak,
``torch.cuda.max_memory_allocated`` vs the planner's weights plus UNet activations; micro-batched as
``--micro-batch 1`` does, or skipped with the reason, when the planned activations exceed the free memory);
``layout`` (NCHW vs ``channels_last``); ``vae`` (the sequential decode through host RAM: bytes, seconds, GB/s);
``compile`` (eager vs :func:`~distlin.parallel.compile.compile_unet`, first compiled call included). These take a
pipeline prepared as a run prepares it (FLOPs counted on a meta copy). ``generation`` and ``sana``:
``--preset sd15-16k`` at 16384x8192 (``full-sd15``, fresh LinFusion) and ``--preset sana-4k`` at ``--sana-size``
(``full-sana``), random weights, end to end through :func:`distlin.run.generate` as the command line runs it:
seconds per stage and decode, device and host peaks vs the planner. A part that fails is reported and the next
one runs (:func:`run_parts`).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from distlin.bench import options
from distlin.bench.hardware import device_peak
from distlin.bench.models import build, count_flops, model_name, run_pipeline, unet_inputs
from distlin.bench.report import (
    GIB,
    Record,
    SuiteResult,
    bullets,
    dtype_name,
    factor,
    finish_axes,
    fmt,
    markdown_table,
    met,
    new_figure,
    percent,
    progress,
    spread,
)
from distlin.bench.timing import peak_memory_mb, synchronize, time_calls
from distlin.errors import UsageError
from distlin.io import atomic_write
from distlin.memory.fit import plan_run, saver_flags
from distlin.memory.planner import plan
from distlin.ops.linear_attention import apply_state, check_kernel, linear_attention, partial_state, select_kernel
from distlin.parallel.compile import Backend, compile_unet
from distlin.parallel.runtime import Runtime
from distlin.run import generate
from distlin.settings import build_settings
from distlin.sizes import format_size, parse_size
from distlin.thresholds import Thresholds
from distlin.vae.coders import run_coder

DEFAULT_DTYPE = torch.float16
KERNELS = ("torch", "triton")
CFG_BATCH = 2  # samples in one UNet call of a guided step
FREE_MEMORY_SHARE = 0.9  # of the free memory, what a UNet call's predicted activations may take
PARTS = ("environment", "attention", "blocks", "unet", "layout", "vae", "generation", "sana", "compile")  # surest first
TARGET = {"tokens": 1048576, "speedup": 3.0, "side": 8192, "utilisation": 0.5, "generation_seconds": 30.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add(parser, "--channels", [320, 640, 1280], [320], "attention layer widths C", type=options.int_list)
    tokens = [16384, 65536, 262144, 1048576]
    options.add(parser, "--tokens", tokens, tokens[:2], "attention token counts", type=options.int_list)
    parser.add_argument("--heads", type=int, default=8, help="attention heads, SD-1.5's 8 (default 8)")
    parser.add_argument("--batch", type=int, default=2, help="attention batch; 2 is one CFG step (default 2)")
    parser.add_argument("--model", default="full-sd15", help="built-in UNet of the UNet part (default full-sd15)")
    sides = "square image sides in pixels for the UNet part"
    options.add(parser, "--sizes", [1024, 2048, 4096, 8192, 16384], [1024], sides, type=options.int_list)
    options.add(parser, "--repeats", 5, 3, "timed calls per measurement", type=int)
    parser.add_argument("--generation-preset", default="sd15-16k", help="preset of the end-to-end part (sd15-16k)")
    options.add(parser, "--generation-size", "16384x8192", "4096x2048", "width x height of the end-to-end part")
    options.add(parser, "--sana-size", "4096x4096", "1024x1024", "width x height of the SANA end-to-end part")
    options.add(parser, "--compile-size", 2048, 512, "square side in pixels of the eager vs --compile UNet", type=int)
    options.add(parser, "--layout-size", 4096, 512, "square side in pixels of the NCHW vs channels_last UNet", type=int)
    options.add(parser, "--vae-size", 4096, 1024, "square side in pixels of the sequential VAE decode", type=int)
    parser.add_argument("--vae-band-rows", type=int, default=64, help="latent rows per sequential VAE band (64)")
    parser.add_argument(
        "--parts",
        type=lambda text: [part for part in text.split(",") if part],
        default=list(PARTS),
        help=f"comma-separated parts to run, in their order (default all: {','.join(PARTS)})",
    )


def environment_record(device: torch.device) -> Record:
    import triton  # here: only after the suite has checked that triton is installed

    props = torch.cuda.get_device_properties(device)
    record = {"section": "environment", "gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}
    record |= {"multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / GIB}
    record |= {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}
    return record | {"auto_kernel": select_kernel("auto", torch.empty(1, device=device))}


def _median_ms(call: Any, device: torch.device, repeats: int) -> float:
    return time_calls(call, device, repeats).fields()["ms"]


def token_major_qkv(
    args: argparse.Namespace, tokens: int, channels: int, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Q, K and V: ``(B, h, N, d)`` views of random ``(B, N, C)`` activations, as the layer splits its projections."""
    heads = (args.batch, tokens, args.heads, channels // args.heads)
    x = [torch.randn(args.batch, tokens, channels, device=device, dtype=dtype) for _ in range(3)]
    return [t.view(heads).transpose(1, 2) for t in x]


def measure_attention(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Record]:
    records: list[Record] = []
    torch.manual_seed(0)
    for channels in args.channels:
        for tokens in sorted(args.tokens):
            q, k, v = token_major_qkv(args, tokens, channels, device, dtype)
            record: Record = {"section": "attention", "channels": channels, "heads": args.heads, "tokens": tokens}
            record |= {"head_dim": channels // args.heads, "batch": args.batch}
            outputs = {}
            with torch.inference_mode():
                for kernel in KERNELS:
                    whole = partial(linear_attention, q, k, v, kernel=kernel)
                    record[f"{kernel}_peak_mb"] = peak_memory_mb(whole, device)  # the first call compiles kernels
                    for _ in range(args.warmup - 1):
                        whole()
                    state = partial_state(k, v, kernel=kernel)
                    phases = {
                        "partial": partial(partial_state, k, v, kernel=kernel),
                        "apply": partial(apply_state, q, state, kernel=kernel),
                    }
                    for phase, call in phases.items():
                        record[f"{kernel}_{phase}_ms"] = _median_ms(call, device, args.repeats)
                    record[f"{kernel}_ms"] = record[f"{kernel}_partial_ms"] + record[f"{kernel}_apply_ms"]
                    outputs[kernel] = whole()
            # Close values of one dtype subtract (nearly) exactly: no float32 copies of the largest outputs.
            difference = (outputs["triton"] - outputs["torch"]).abs().max().item()
            record["max_abs_error"] = difference
            record["max_rel_error"] = difference / outputs["torch"].abs().max().float().item()
            record["speedup"] = record["torch_ms"] / record["triton_ms"]
            progress("gpu", f"attention C={channels} {tokens} tokens: {record['speedup']:.2f}x")
            records.append(record)
            del q, k, v, outputs
    return records


def measure_blocks(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Record]:
    """Each phase's kernel with every tiling of ``BLOCK_CANDIDATES`` (``APPLY_CANDIDATES`` for apply) at the largest
    token count, per width: the rule's time, the fastest tiling and its time (what to change the rule to)."""
    from distlin.ops.triton_linear_attention import (  # here: only once the suite has checked for triton
        APPLY_CANDIDATES,
        BLOCK_CANDIDATES,
        apply_state_triton,
        default_blocks,
        partial_state_triton,
    )

    records: list[Record] = []
    tokens = max(args.tokens)
    torch.manual_seed(0)
    for channels in args.channels:
        q, k, v = token_major_qkv(args, tokens, channels, device, dtype)
        head_dim = channels // args.heads
        with torch.inference_mode():
            state = partial_state_triton(k, v)
            phases = {
                "partial": (partial(partial_state_triton, k, v), BLOCK_CANDIDATES),
                "apply": (partial(apply_state_triton, q, state), APPLY_CANDIDATES),
            }
            for phase, (call, candidates) in phases.items():
                times: dict[str, float] = {}
                failed: dict[str, str] = {}  # a tiling that does not compile or launch (e.g. out of shared memory)
                rule_blocks = default_blocks(head_dim, phase)
                rule = str(rule_blocks)
                for blocks in dict.fromkeys([rule_blocks, *candidates]):
                    try:
                        for _ in range(args.warmup):
                            call(blocks=blocks)  # the first call compiles this tiling
                        times[str(blocks)] = _median_ms(partial(call, blocks=blocks), device, args.repeats)
                    except Exception as err:  # noqa: BLE001 - triton's errors are not RuntimeErrors
                        failed[str(blocks)] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"
                best = min(times, key=times.__getitem__) if times else None
                record: Record = {"section": "blocks", "channels": channels, "head_dim": head_dim, "tokens": tokens}
                record |= {"phase": phase, "rule": rule, "rule_ms": times.get(rule), "best": best}
                record |= {"best_ms": times.get(best), "times_ms": times, "failed": failed}
                progress("gpu", f"tilings C={channels} {phase}: rule {fmt(times.get(rule))} ms, best {best} "
                         f"{fmt(times.get(best))} ms, {len(failed)} failed")  # fmt: skip
                records.append(record)
        del q, k, v, state
    return records


def blocks_markdown(records: list[Record]) -> str:
    rows = [
        [r["channels"], r["head_dim"], r["tokens"], r["phase"], r["rule"], fmt(r["rule_ms"]), r["best"],
         fmt(r["best_ms"]), factor(r["rule_ms"] / r["best_ms"] if r["rule_ms"] and r["best_ms"] else None)]
        for r in records
    ]  # fmt: skip
    failures = [
        f"- C={r['channels']} {r['phase']}, {name}: {why}" for r in records for name, why in r["failed"].items()
    ]
    text = (
        "Kernel tilings (tokens per step x warps per program), each phase at the largest token count: the rule's "
        "(`default_blocks`) median ms against the fastest of `BLOCK_CANDIDATES` (`APPLY_CANDIDATES` for apply).\n\n"
        + markdown_table(["C", "d", "tokens", "phase", "rule", "rule ms", "fastest", "fastest ms", "gain"], rows)
    )
    return "\n\n".join([text, *bullets("Tilings that failed", failures)])


def planned_unet_bytes(
    model: str, side: int, batch: int, dtype: torch.dtype, thresholds: Thresholds | None = None
) -> tuple[int, int]:
    """The planner's ``(weights, UNet activations)`` in bytes for one call on one rank: the weights of every
    component a run loads (the UNet's, the text encoders', the VAE's), with the token chunk of ``thresholds`` (a
    run's; None: unchunked).

    ``micro_batch`` sets the samples per call; the VAE path does not enter the UNet's share, so the cheaper
    direct-decode plan serves.
    """
    kwargs = {"cfg": True, "micro_batch": batch, "vae_decode": "direct", "thresholds": thresholds}
    breakdown = plan(model, side, side, 1, dtype=dtype_name(dtype), **kwargs)["breakdown"]
    weights = sum(value for key, value in breakdown.items() if key.startswith("weights_"))
    return weights, breakdown["unet_activations"]


def measure_unet(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Record]:
    """Each size's UNet call as a run makes it (the pipeline of :func:`~distlin.bench.models.run_pipeline`: memory
    bounds with the run's thresholds, the engine on one rank); a size that fails is recorded as skipped, with why."""
    peak, source = device_peak(device, dtype)
    model = model_name(args.model)
    meta = build(model, "linear", "meta", dtype)
    prepared, settings = run_pipeline(model, device, dtype)
    unet, thresholds = prepared.pipe.unet, settings.thresholds
    records: list[Record] = []
    for side in sorted(args.sizes):
        free = torch.cuda.mem_get_info(device)[0]
        plans = {batch: planned_unet_bytes(model, side, batch, dtype, thresholds) for batch in (CFG_BATCH, 1)}
        fitting = [batch for batch, (_, activations) in plans.items() if activations <= FREE_MEMORY_SHARE * free]
        batch = fitting[0] if fitting else 1
        record: Record = {"section": "unet", "model": model, "height": side, "width": side, "batch": batch}
        record |= {"planned_gib": sum(plans[batch]) / GIB, "skipped": None, "peak_source": source}
        records.append(record)
        if not fitting:
            planned = plans[batch][1] / GIB
            record["skipped"] = f"planned activations {planned:.1f} GiB at batch 1 > 90% of {free / GIB:.1f} GiB free"
            continue
        torch.cuda.reset_peak_memory_stats(device)
        try:
            flops = count_flops(meta, side, side, batch)
            call = partial(unet, timestep=999, return_dict=False, **unet_inputs(unet, batch, side, side))
            with torch.inference_mode():
                for _ in range(args.warmup):
                    call()
                record["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
                timing = time_calls(call, device, args.repeats).fields()
        except RuntimeError as err:  # out of memory, or a kernel's limit: this size's line says which
            first = str(err).strip().split("\n")[0][:200]
            record["skipped"] = (
                f"{type(err).__name__} at batch {batch} (planned {record['planned_gib']:.1f} GiB): {first}"
            )
            progress("gpu", f"unet {model} {format_size(side, side)}: {record['skipped']}")
        else:
            rate = flops / (timing["ms"] / 1e3)
            record |= {**timing, "tflop": flops / 1e12, "ms_per_step": timing["ms"] * CFG_BATCH / batch}
            record |= {"achieved_tflop_s": rate / 1e12, "peak_tflop_s": peak and peak / 1e12}
            record |= {
                "utilisation": peak and rate / peak,
                "planned_over_measured": record["planned_gib"] / record["peak_gib"],
            }
            progress("gpu", f"unet {model} {format_size(side, side)} batch {batch}: {timing['ms']:.0f} ms")
        call = None
        torch.cuda.empty_cache()
    return records


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ``|a - b|`` over the largest ``|b|``."""
    return ((a - b).abs().max() / b.abs().max()).float().item()


def measure_compile(
    model: str, side: int, device: torch.device, dtype: torch.dtype, repeats: int, backend: Backend | None = None
) -> Record:
    """One UNet call (a CFG batch, LinFusion) of a run's pipeline eager, then with ``--compile``'s modules compiled
    (:func:`~distlin.parallel.compile.compile_unet` on the prepared UNet, as a run does): the time of each, the
    first compiled call (tracing and code generation) and how far the outputs are apart."""
    model = model_name(model)
    unet = run_pipeline(model, device, dtype)[0].pipe.unet
    call = partial(unet, timestep=999, return_dict=False, **unet_inputs(unet, CFG_BATCH, side, side))
    record: Record = {"section": "compile", "model": model, "height": side, "width": side, "batch": CFG_BATCH}
    with torch.inference_mode():
        eager = call()[0]
        record["eager_ms"] = _median_ms(call, device, repeats)
        record["modules"] = len(compile_unet(unet, backend))
        start = time.perf_counter()
        compiled = call()[0]
        synchronize(device)
        record["first_call_s"] = time.perf_counter() - start
        record["compiled_ms"] = _median_ms(call, device, repeats)
    record["speedup"] = record["eager_ms"] / record["compiled_ms"]
    record["max_rel_error"] = max_relative_difference(compiled, eager)
    progress("gpu", f"compile {model} {format_size(side, side)}: {record['speedup']:.2f}x")
    return record


def measure_memory_format(model: str, side: int, device: torch.device, dtype: torch.dtype, repeats: int) -> Record:
    """One UNet call (a CFG batch, LinFusion) with NCHW activations, then with the UNet and its input in
    ``channels_last`` (the layout cuDNN's half-precision convolutions prefer): the time of each and how far the
    outputs are apart; whether the engine should carry activations in that layout (a run's prepared UNet)."""
    model = model_name(model)
    unet = run_pipeline(model, device, dtype)[0].pipe.unet
    inputs = unet_inputs(unet, CFG_BATCH, side, side)
    call = partial(unet, timestep=999, return_dict=False, **inputs)
    record: Record = {"section": "layout", "model": model, "height": side, "width": side, "batch": CFG_BATCH}
    with torch.inference_mode():
        nchw = call()[0]
        record["nchw_ms"] = _median_ms(call, device, repeats)
        unet.to(memory_format=torch.channels_last)
        sample = inputs["sample"].to(memory_format=torch.channels_last)
        call = partial(unet, timestep=999, return_dict=False, **{**inputs, "sample": sample})
        channels_last = call()[0]
        record["channels_last_ms"] = _median_ms(call, device, repeats)
    record["speedup"] = record["nchw_ms"] / record["channels_last_ms"]
    record["max_rel_error"] = max_relative_difference(channels_last, nchw)
    progress("gpu", f"channels_last {model} {format_size(side, side)}: {record['speedup']:.2f}x")
    return record


def measure_sequential_vae(model: str, side: int, band_rows: int, device: torch.device, dtype: torch.dtype) -> Record:
    """The sequential decode through host RAM (the run's coder with ``--vae-decode sequential``,
    :func:`~distlin.vae.coders.run_coder`) at ``side`` px square: the bytes it moves between host and device, its
    seconds, and the achieved rate (the decode's own timing line)."""
    prepared = run_pipeline(model_name(model), device, dtype)[0]
    vae = prepared.pipe.vae
    latent = side // 8
    latents = torch.randn(1, vae.config.latent_channels, latent, latent, generator=torch.Generator().manual_seed(0))
    reported: list[tuple[str, int, float]] = []
    limits = Thresholds(sequential_band_rows=band_rows)
    coder = run_coder(vae, prepared.vae, Runtime(device=device), vae_decode="sequential", thresholds=limits,
                      report=lambda *r: reported.append(r))  # fmt: skip
    coder.decode(latents.to(device, dtype))
    _, moved, seconds = reported[0]
    record: Record = {"section": "vae", "model": model_name(model), "height": side, "width": side}
    record |= {"band_rows": band_rows, "gb_moved": moved / 1e9, "seconds": seconds, "gb_s": moved / seconds / 1e9}
    progress("gpu", f"sequential VAE {format_size(side, side)}: {record['gb_s']:.1f} GB/s")
    return record


def compile_vae_markdown(records: list[Record]) -> str:
    """The compiled UNet, the channels_last UNet and the sequential VAE's transfer rate, as lines of ``gpu.md``."""
    lines = []
    for r in records:
        if r["section"] == "compile":
            lines.append(
                f"- `--compile`, {r['model']} UNet at {format_size(r['width'], r['height'])} (batch {r['batch']}, "
                f"compiled modules: {r['modules']}): eager {fmt(r['eager_ms'])} ms, compiled "
                f"{fmt(r['compiled_ms'])} ms ({factor(r['speedup'])}); first compiled call {fmt(r['first_call_s'])} s; "
                f"largest difference {fmt(r['max_rel_error'])} of the largest output"
            )
        if r["section"] == "layout":
            lines.append(
                f"- channels_last, {r['model']} UNet at {format_size(r['width'], r['height'])} (batch {r['batch']}): "
                f"NCHW {fmt(r['nchw_ms'])} ms, channels_last {fmt(r['channels_last_ms'])} ms ({factor(r['speedup'])}); "
                f"largest difference {fmt(r['max_rel_error'])} of the largest output"
            )
        if r["section"] == "vae":
            lines.append(
                f"- Sequential VAE, {r['model']} at {format_size(r['width'], r['height'])} "
                f"({r['band_rows']}-row bands): {fmt(r['gb_moved'])} GB host<->device in {fmt(r['seconds'])} s "
                f"({fmt(r['gb_s'])} GB/s)"
            )
    return "\n".join(lines)


def targets(records: list[Record]) -> str:
    """Each target against what was measured: ``met``, ``NOT met`` or not measured."""
    lines = []
    for r in records:
        if r["section"] == "attention" and r["tokens"] == TARGET["tokens"]:
            lines.append(
                f"- attention C={r['channels']} at {r['tokens']} tokens: kernels {r['speedup']:.2f}× faster than the "
                f"PyTorch ops (target ≥ {TARGET['speedup']:g}×: {met(r['speedup'] >= TARGET['speedup'])})"
            )
        if r["section"] == "unet" and r["height"] >= TARGET["side"] and not r["skipped"] and r["utilisation"]:
            lines.append(
                f"- UNet {r['model']} at {r['height']}²: {percent(r['utilisation'])} of the dense peak (target ≥ "
                f"{percent(TARGET['utilisation'])}: {met(r['utilisation'] >= TARGET['utilisation'])})"
            )
    return "Targets:\n" + ("\n".join(lines) or "- none measured: the target sizes were not part of this run")


def environment_markdown(env: Record) -> str:
    return (
        f"{env['gpu']} (compute capability {env['compute_capability']}, {env['multiprocessors']} SMs, "
        f"{env['memory_gib']:.0f} GiB); torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}; "
        f"attention kernel auto: {env['auto_kernel']}."
    )


def attention_markdown(records: list[Record], args: argparse.Namespace) -> str:
    rows = [
        [r["channels"], r["head_dim"], r["tokens"]]
        + [fmt(r[f"{kernel}_{phase}_ms"]) for kernel in KERNELS for phase in ("partial", "apply")]
        + [factor(r["speedup"]), *(fmt(r[key]) for key in ("max_rel_error", "torch_peak_mb", "triton_peak_mb"))]
        for r in records
    ]
    headers = ["C", "d", "tokens", "torch partial ms", "torch apply ms", "triton partial ms", "triton apply ms"]
    headers += ["speed-up", "rel. error", "torch MiB", "triton MiB"]
    return (
        f"Attention: both phases of LinFusion's linear attention, batch {args.batch}, {args.heads} heads, "
        f"token-major inputs; median ms of {args.repeats} calls. Error: largest |kernels − PyTorch ops| over the "
        "largest |PyTorch ops| output. MiB: peak memory of one whole call above what was held before it.\n\n"
        + markdown_table(headers, rows)
    )


def unet_markdown(records: list[Record], args: argparse.Namespace) -> str:
    rows = [
        [format_size(r["width"], r["height"]), r["batch"], "skipped" if r["skipped"] else spread(r)]
        + [fmt(r.get(key)) for key in ("ms_per_step", "tflop", "achieved_tflop_s")]
        + [percent(r.get("utilisation")), fmt(r.get("peak_gib")), fmt(r["planned_gib"])]
        for r in records
    ]
    headers = ["image", "batch", "ms [min–max]", "ms per step", "TFLOP", "TFLOP/s", "utilisation"]
    headers += ["measured GiB", "planned GiB"]
    text = (
        f"UNet: {args.model} with LinFusion (attention kernel auto), one call of `batch` samples; median of "
        f"{args.repeats} calls after {args.warmup} warm-up; ms per step: a CFG step of {CFG_BATCH} samples. TFLOP "
        f"counted on the meta device. Peak: {records[0]['peak_source']}. Measured GiB: "
        "`torch.cuda.max_memory_allocated` during the calls; planned GiB: the memory planner's weights (every "
        "component of the prepared pipeline) plus the UNet's activations.\n\n" + markdown_table(headers, rows)
    )
    skipped = [f"- {format_size(r['width'], r['height'])}: {r['skipped']}" for r in records if r["skipped"]]
    return "\n\n".join([text, *bullets("Skipped", skipped)])


def errors_markdown(records: list[Record]) -> str:
    return bullets(
        "Parts that failed (their traceback is in the run's output)", [f"- {r['part']}: {r['error']}" for r in records]
    )[0]


SECTIONS: dict[str, Callable[..., str]] = {
    "environment": lambda rs, args: environment_markdown(rs[0]),
    "attention": attention_markdown,
    "blocks": lambda rs, args: blocks_markdown(rs),
    "unet": unet_markdown,
    "layout": lambda rs, args: compile_vae_markdown(rs),
    "vae": lambda rs, args: compile_vae_markdown(rs),
    "generation": lambda rs, args: generation_markdown(rs[0]),
    "sana": lambda rs, args: sana_markdown(rs[0]),
    "compile": lambda rs, args: compile_vae_markdown(rs),
    "error": lambda rs, args: errors_markdown(rs),
}


def markdown(records: list[Record], args: argparse.Namespace) -> str:
    """``gpu.md``: each part that ran, in order, then the parts that failed, then the targets."""
    parts = []
    for section, describe in SECTIONS.items():
        chosen = [r for r in records if r["section"] == section]
        if chosen:
            parts.append(describe(chosen, args))
    parts.append(targets(records))
    return "\n\n".join(parts)


def plot(records: list[Record]) -> Any:
    fig, (gains, utils, memory) = new_figure(3)
    attention = [r for r in records if r["section"] == "attention"]
    for channels in dict.fromkeys(r["channels"] for r in attention):
        rs = [r for r in attention if r["channels"] == channels]
        gains.plot([r["tokens"] for r in rs], [r["speedup"] for r in rs], "-o", label=f"C={channels}")
    gains.axhline(TARGET["speedup"], color="gray", linestyle=":", label="target")
    gains.set(xscale="log", xlabel="tokens", ylabel="PyTorch ops time / kernels time", title="attention kernels")
    unet = [r for r in records if r["section"] == "unet" and not r["skipped"]]
    pixels = [r["height"] * r["width"] for r in unet]
    if unet and unet[0]["utilisation"] is not None:
        utils.plot(pixels, [100 * r["utilisation"] for r in unet], "-o", label="LinFusion UNet")
    utils.axhline(100 * TARGET["utilisation"], color="gray", linestyle=":", label="target")
    utils.set(xscale="log", xlabel="image pixels", ylabel="% of dense peak", title="UNet utilisation")
    memory.plot(pixels, [r["peak_gib"] for r in unet], "-o", label="measured")
    memory.plot(pixels, [r["planned_gib"] for r in unet], "--s", label="planned")
    memory.set(xscale="log", yscale="log", xlabel="image pixels", ylabel="GiB", title="UNet peak memory")
    finish_axes(gains, utils, memory)
    return fig


def measure_generation(preset: str, overrides: dict[str, Any], device: torch.device) -> Record:
    """One generation end to end, as the command line runs it, with its time, memory and the planner's word."""
    settings = build_settings(preset, {**overrides, "device": str(device)}, world_size=1)
    progress("gpu", f"end to end: {preset} at {format_size(settings.width, settings.height)}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = generate(settings, Runtime(device=device))
    seconds = time.perf_counter() - start
    planned = plan_run(result.settings, 1)
    record = {"section": "generation", "preset": preset, "model": settings.model, "width": settings.width}
    record |= {"height": settings.height, "seconds": seconds, "part_seconds": result.seconds}
    record |= {"savers": saver_flags(settings, result.settings), "vae_store": result.settings.vae_store}
    record["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    record["host_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB
    return record | {"planned_gib": planned["peak_bytes_per_rank"] / GIB if planned else None}


def measure_sana(preset: str, model: str, size: str, device: torch.device) -> Record:
    """SANA end to end (:func:`measure_generation`): ``preset`` with ``model`` (``full-sana`` on the GPU) at ``size``
    (``WIDTHxHEIGHT``)."""
    width, height = parse_size(size, "--sana-size")
    return {**measure_generation(preset, {"model": model, "width": width, "height": height}, device), "section": "sana"}


def sana_markdown(record: Record) -> str:
    return f"SANA end to end: `--preset {record['preset']} --model {record['model']}` at {_measured(record)}."


def _measured(record: Record) -> str:
    """An end-to-end record's size, times, savers and memory, measured beside planned."""
    parts = ", ".join(f"{name} {value:.1f} s" for name, value in record["part_seconds"].items())
    ratio = record["peak_gib"] / record["planned_gib"] if record["peak_gib"] and record["planned_gib"] else None
    return (
        f"{format_size(record['width'], record['height'])}, {record['seconds']:.1f} s ({parts}); memory savers chosen: "
        f"{record['savers'] or 'none'}; sequential VAE store: {record['vae_store']}. Peak device memory "
        f"{fmt(record['peak_gib'])} GiB measured vs "
        f"{fmt(record['planned_gib'])} GiB planned (ratio {fmt(ratio)}; target within ±20 %); peak host RSS "
        f"{fmt(record['host_rss_gib'])} GiB"
    )


def generation_markdown(record: Record) -> str:
    return (
        f"End to end: `--preset {record['preset']} --model {record['model']} --linfusion fresh` at "
        f"{_measured(record)}. Target: ≤ 30 s end to end on one H200 at 16384x8192 — "
        f"{met(record['seconds'] <= TARGET['generation_seconds'])}."
    )


def run_parts(parts: dict[str, Callable[[], list[Record]]], checkpoint: Path) -> list[Record]:
    """Each part in turn. One that raises becomes an ``error`` record (its traceback on stderr) and the others
    still run: a GPU is lent for minutes, and one failure must not cost the other numbers. After every part the
    records so far are written to ``checkpoint`` (the suite's JSON, which the full result replaces at the end),
    so a run stopped at its time limit leaves what it measured."""
    records: list[Record] = []
    for name, measure in parts.items():
        try:
            records += measure()
        except UsageError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure of a part is reported, the next part runs
            traceback.print_exc()
            records.append({"section": "error", "part": name, "error": f"{type(err).__name__}: {err}".split("\n")[0]})
            progress("gpu", f"{name} failed: {records[-1]['error']}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(records, indent=1, default=str) + "\n"
        atomic_write(checkpoint, lambda tmp, text=text: tmp.write_text(text))
    return records


def generation_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` as two positive multiples of 8."""
    width, height = parse_size(text, "--generation-size")
    if width % 8 or height % 8:
        raise UsageError(f"--generation-size {text!r}: both sides must be multiples of 8, e.g. 16384x8192")
    return width, height


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> SuiteResult:
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        raise UsageError(f"--parts: no part {unknown[0]!r}; choose from {','.join(PARTS)}")
    width, height = generation_size(args.generation_size)
    if device.type != "cuda":
        raise UsageError(f"the gpu suite measures the CUDA fast path and needs a CUDA device, not {device.type}")
    check_kernel("triton")
    overrides = {"model": "full-sd15", "linfusion": "fresh", "width": width, "height": height, "dtype": "float16"}
    measures: dict[str, Callable[[], list[Record]]] = {
        "environment": lambda: [environment_record(device)],
        "attention": lambda: measure_attention(args, device, dtype),
        "blocks": lambda: measure_blocks(args, device, dtype),
        "unet": lambda: measure_unet(args, device, dtype),
        "layout": lambda: [measure_memory_format(args.model, args.layout_size, device, dtype, args.repeats)],
        "vae": lambda: [measure_sequential_vae(args.model, args.vae_size, args.vae_band_rows, device, dtype)],
        "generation": lambda: [measure_generation(args.generation_preset, overrides, device)],
        "sana": lambda: [measure_sana("sana-4k", "full-sana", args.sana_size, device)],
        "compile": lambda: [measure_compile(args.model, args.compile_size, device, dtype, args.repeats)],
    }
    parts = {name: measures[name] for name in PARTS if name in args.parts or name == "environment"}
    records = run_parts(parts, args.out / "gpu.json")
    return SuiteResult(records, markdown(records, args), plot(records))
