"""Suite ``cascade``: end-to-end time per stage of the cascade, sampled as a run samples it.

Stages, steps, prompt and guidance come from a preset's ``cascade:`` section (default ``sd15-16k``, LinFusion's
16K recipe; ``--quick``: ``tiny-sd15-cascade``) or ``--stages``; the weights are the built-in random ones of
``--model`` with fresh LinFusion layers (timings do not depend on weight values). One device; the pipeline is
prepared as a run prepares it (:func:`distlin.bench.models.run_pipeline`) and the cascade is the run's own
sampler (:func:`distlin.run.sample`: SDEdit for SD-1.5/2.1) with the run's VAE coder
(:func:`distlin.run.vae_coder`) between stages. Each stage's wall time, as the run reports it, is split into
UNet calls (forward hooks), VAE decode and encode (:class:`StageClock` wraps the run's coder; a stage after the
first starts with the decode of the previous stage's latents), and the rest (text encoding, scheduler, bicubic
upscale).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from distlin.bench import options
from distlin.bench.models import model_name, run_pipeline
from distlin.bench.report import Record, SuiteResult, finish_axes, fmt, markdown_table, new_figure, progress
from distlin.bench.timing import synchronize
from distlin.parallel.runtime import Runtime
from distlin.presets import load_preset
from distlin.run import sample, vae_coder
from distlin.sampling.stages import Stage
from distlin.sizes import format_size, parse_size
from distlin.vae.coders import Coder

PARTS = ("unet_ms", "decode_ms", "encode_ms")


def parse_stages(text: str) -> list[Stage]:
    """``WIDTHxHEIGHT[:strength],...`` in pixels, e.g. ``512x256,1024x512:0.4``."""
    stages = []
    for item in text.split(","):
        size, _, strength = item.strip().partition(":")
        try:
            width, height = parse_size(size, "stage")
            stages.append(Stage(height, width, float(strength) if strength else 1.0))
        except ValueError:  # a UsageError is one too
            raise argparse.ArgumentTypeError(
                f"expected WIDTHxHEIGHT[:strength],... e.g. 512x256,1024x512:0.4; got {text!r}"
            ) from None
    return stages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add(parser, "--preset", "sd15-16k", "tiny-sd15-cascade", "preset with a cascade: section")
    parser.add_argument(
        "--stages", type=parse_stages, default=None, help="WIDTHxHEIGHT[:strength],... instead of the preset's"
    )
    parser.add_argument(
        "--model",
        type=model_name,
        default=None,
        help="built-in model (default: the preset's if built-in, else full-sd15)",
    )
    parser.add_argument("--steps", type=int, default=None, help="steps of a full-strength stage (default: preset's)")
    options.add(parser, "--repeats", 1, 1, "timed cascades", type=int)


class StageClock:
    """Times one cascade stage by stage: each stage's wall time as the run reports it (:meth:`on_stage`), UNet
    calls by hooks, decode and encode by wrapping the run's VAE coder (sample with the clock as the coder)."""

    def __init__(self, unet: torch.nn.Module, coder: Coder, device: torch.device):
        self.coder, self.device = coder, device
        self.stages: list[dict[str, float]] = [self._blank()]
        self._hooks = [
            unet.register_forward_pre_hook(lambda *_: self._start("unet")),
            unet.register_forward_hook(lambda *_: self._stop("unet_ms", "unet")),
        ]
        self._began: dict[str, float] = {}

    @staticmethod
    def _blank() -> dict[str, float]:
        return {"unet_calls": 0, **dict.fromkeys(PARTS, 0.0)}

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def _start(self, key: str) -> None:
        self._began[key] = self._now()

    def _stop(self, part: str, key: str) -> None:
        self.stages[-1][part] += (self._now() - self._began.pop(key)) * 1e3
        if part == "unet_ms":
            self.stages[-1]["unet_calls"] += 1

    def on_stage(self, index: int, stage: Stage, seconds: float) -> None:
        """The run's report of a finished stage: its wall time; what follows belongs to the next stage."""
        self.stages[-1]["ms"] = seconds * 1e3
        self.stages.append(self._blank())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._start("decode")
        image = self.coder.decode(latents)
        self._stop("decode_ms", "decode")
        return image

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> Any:
        self._start("encode")
        posterior = self.coder.encode(image)
        self._stop("encode_ms", "encode")
        return posterior

    def finish(self) -> list[dict[str, float]]:
        """Remove the hooks; per reported stage: ms, unet_ms, decode_ms, encode_ms, unet_calls."""
        for hook in self._hooks:
            hook.remove()
        return self.stages[:-1]


def measure(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[list[Record], str]:
    preset = load_preset(args.preset)
    model = args.model or (preset["model"] if preset["model"].startswith(("tiny-", "full-")) else "full-sd15")
    prepared, settings = run_pipeline(model, device, dtype, args.preset, args.stages, steps=args.steps)
    prepared.pipe.set_progress_bar_config(disable=True)
    coder = vae_coder(prepared, settings, Runtime(device=device))
    stages, steps = settings.stages, settings.steps
    runs = []
    for run in range(args.warmup + args.repeats):
        clock = StageClock(prepared.pipe.unet, coder, device)
        try:
            sample(prepared, settings, clock, clock.on_stage)
        finally:
            timed = clock.finish()
        progress("cascade", f"run {run}: " + ", ".join(f"{s['ms'] / 1e3:.1f} s" for s in timed))
        if run >= args.warmup:
            runs.append(timed)
    records = []
    for index, stage in enumerate(stages):
        per_run = [r[index] for r in runs]
        total = [r["ms"] for r in per_run]
        record = {
            "model": settings.model,
            "attention": "linear",
            "stage": index,
            "height": stage.height,
            "width": stage.width,
            "strength": stage.strength,
            "unet_calls": per_run[0]["unet_calls"],
            "ms": statistics.median(total),
            "ms_min": min(total),
            "ms_max": max(total),
            "repeats": len(total),
            **{part: statistics.median(r[part] for r in per_run) for part in PARTS},
        }
        record["other_ms"] = record["ms"] - sum(record[p] for p in PARTS)
        records.append(record)
    return records, f"preset {args.preset}, {steps} steps at full strength, prompt {settings.prompt!r}"


def markdown(records: list[Record], args: argparse.Namespace, setting: str) -> str:
    rows = [
        [
            r["stage"],
            format_size(r["width"], r["height"]),
            f"{r['strength']:g}",
            r["unet_calls"],
            f"{fmt(r['ms'])} [{fmt(r['ms_min'])}–{fmt(r['ms_max'])}]",
            *(fmt(r[p]) for p in (*PARTS, "other_ms")),
        ]
        for r in records
    ]
    rows.append(
        [
            "all",
            "",
            "",
            sum(r["unet_calls"] for r in records),
            fmt(sum(r["ms"] for r in records)),
            *(fmt(sum(r[p] for r in records)) for p in (*PARTS, "other_ms")),
        ]
    )
    headers = [
        "stage",
        "image",
        "strength",
        "UNet calls",
        "ms [min–max]",
        "UNet ms",
        "VAE decode ms",
        "VAE encode ms",
        "other ms",
    ]
    return "\n\n".join(
        [
            f"Cascade of {records[0]['model']} with LinFusion ({setting}), sampled as a run samples it; one device, "
            f"the run's VAE coder between stages; median of "
            f"{args.repeats} run(s) after {args.warmup} warm-up run(s). A stage after the first starts with the VAE "
            "decode of the previous stage's latents; UNet calls include CFG (batch 2).",
            markdown_table(headers, rows),
        ]
    )


def plot(records: list[Record]) -> Any:
    fig, (ax,) = new_figure(1)
    labels = [format_size(r["width"], r["height"]) for r in records]
    bottom = [0.0] * len(records)
    for part in (*PARTS, "other_ms"):
        values = [r[part] / 1e3 for r in records]
        ax.bar(labels, values, bottom=bottom, label=part.removesuffix("_ms"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(xlabel="stage (image size)", ylabel="seconds", title="SDEdit cascade: time per stage")
    finish_axes(ax)
    return fig


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> SuiteResult:
    records, setting = measure(args, device, dtype)
    return SuiteResult(records, markdown(records, args, setting), plot(records))
