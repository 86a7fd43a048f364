"""``launch/distill.py train|eval|cache``: distil LinFusion layers for a Stable Diffusion UNet, evaluate a
checkpoint against its teacher, or precompute the frozen encoders' outputs.

``train`` runs on one device or data-parallel under ``torchrun``; ``eval`` and ``cache`` run in one process.
Bad input ends with one ``error: ...`` line on stderr and exit code 2, raised identically on every rank before
the process group starts; Ctrl-C ends with exit code 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distlin.commands import UsageParser, command_name
from distlin.distill.cache import MANIFEST, write_cache
from distlin.distill.config import MIXED_PRECISION, TrainConfig
from distlin.distill.data import CROPS, open_source
from distlin.distill.encode import Encoders, load_frozen_pipeline
from distlin.distill.evaluate import DEFAULT_SCALES, evaluate, markdown_table
from distlin.distill.trainer import plan_run, train
from distlin.errors import USAGE_EXIT_CODE, UsageError
from distlin.loading import check_model_source
from distlin.parallel.runtime import BACKENDS, init_runtime, resolve_device
from distlin.presets import list_presets, load_preset
from distlin.ranks import rank_prefix, ranks_from_env
from distlin.sizes import check_side, format_size

INTERRUPTED_EXIT_CODE = 130
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)}


def _model_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", help=f"take the model of a preset: {', '.join(list_presets())}")
    group.add_argument("--model", help="built-in (tiny-sd15, tiny-sdxl, full-*), diffusers folder or Hub id")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N (under torchrun cuda is cuda:LOCAL_RANK)")


def _resolution_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resolution",
        type=int,
        help="square training size in pixels, a multiple of 8 (default: the model's native size, or the cache's)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog=command_name(), description="Distil LinFusion layers for any Stable Diffusion UNet.")
    commands = p.add_subparsers(dest="command", required=True, metavar="{train,eval,cache}")

    t = commands.add_parser("train", help="train LinFusion layers (one process, or DDP under torchrun)")
    _model_arguments(t)
    t.add_argument(
        "--data",
        help="folder of images with captions (.txt beside each, or metadata.jsonl/.csv with "
        "file_name,text), or a datasets.save_to_disk folder",
    )
    t.add_argument("--cache", help="a folder made by the cache command: latents and text embeddings precomputed")
    t.add_argument("--out", required=True, help="run folder: log.csv, loss.png, checkpoint-STEP/")
    _resolution_argument(t)
    t.add_argument("--crop", choices=CROPS, default=_DEFAULTS["crop"], help="square crop (default center)")
    t.add_argument(
        "--batch-size",
        type=int,
        default=_DEFAULTS["batch_size"],
        help="global batch: split over ranks and --grad-accum steps (default %(default)s)",
    )
    t.add_argument("--grad-accum", type=int, default=_DEFAULTS["grad_accum"], help="micro-batches per step")
    t.add_argument("--lr", type=float, default=_DEFAULTS["lr"], help="AdamW learning rate (default %(default)s)")
    t.add_argument("--weight-decay", type=float, default=_DEFAULTS["weight_decay"], help="default %(default)s")
    t.add_argument(
        "--warmup-steps",
        type=int,
        default=_DEFAULTS["warmup_steps"],
        help="linear learning-rate warm-up, then constant (default %(default)s)",
    )
    t.add_argument("--max-steps", type=int, default=_DEFAULTS["max_steps"], help="default %(default)s")
    t.add_argument(
        "--save-every",
        type=int,
        default=_DEFAULTS["save_every"],
        help="checkpoint every N steps and at the end (default %(default)s)",
    )
    t.add_argument("--resume", metavar="CHECKPOINT|latest", help="continue a run exactly from a checkpoint")
    t.add_argument(
        "--init",
        default=_DEFAULTS["init"],
        metavar="teacher|random|PATH",
        help="starting layers: copies of the teacher's projections, random, or a LinFusion checkpoint",
    )
    t.add_argument("--seed", type=int, default=_DEFAULTS["seed"], help="data order, crops, timesteps, noise, init")
    t.add_argument(
        "--lambda-noise",
        type=float,
        default=_DEFAULTS["lambda_noise"],
        help="weight of the loss against the true noise (default %(default)s; 0 when the teacher is no denoiser, "
        "as with the random-weight tiny models)",
    )
    t.add_argument(
        "--lambda-kd",
        type=float,
        default=_DEFAULTS["lambda_kd"],
        help="weight of the output distillation loss (default %(default)s)",
    )
    t.add_argument(
        "--lambda-feat",
        type=float,
        default=_DEFAULTS["lambda_feat"],
        help="weight of the attention feature loss (default %(default)s)",
    )
    t.add_argument("--mixed-precision", choices=tuple(MIXED_PRECISION), default=_DEFAULTS["mixed_precision"])
    t.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (default: no clipping)")
    t.add_argument(
        "--holdout",
        type=int,
        default=_DEFAULTS["holdout"],
        help="images kept out of training for eval (default %(default)s)",
    )
    t.add_argument("--workers", type=int, default=_DEFAULTS["workers"], help="data loader processes per rank")
    t.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute UNet blocks in the backward pass: less activation memory, more compute",
    )
    t.add_argument("--backend", choices=BACKENDS, help="process-group backend (default: nccl on CUDA, else gloo)")
    t.add_argument("--timeout-s", type=float, default=1800.0, help="bound on every collective (default 1800)")
    t.set_defaults(run=_train)

    e = commands.add_parser("eval", help="student vs teacher relative MSE at 1x, 2x, 4x the training size")
    e.add_argument("--checkpoint", required=True, help="a checkpoint-STEP folder")
    e.add_argument("--data", help="images to evaluate on (default: the run's held-out images)")
    e.add_argument("--max-items", type=int, default=16, help="images taken from --data (default %(default)s)")
    e.add_argument(
        "--scales",
        type=int,
        nargs="+",
        default=list(DEFAULT_SCALES),
        help="multiples of the training size (default 1 2 4)",
    )
    e.add_argument("--timesteps", type=int, default=4, help="noise levels per image, evenly spaced (default 4)")
    e.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score the layers training started from (default on)",
    )
    e.add_argument("--mixed-precision", choices=tuple(MIXED_PRECISION), default="no")
    e.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    e.set_defaults(run=_eval)

    c = commands.add_parser("cache", help="precompute VAE latents and text embeddings of a data folder")
    _model_arguments(c)
    c.add_argument("--data", required=True, help="folder of images with captions (as for train)")
    c.add_argument("--out", required=True, help="new cache folder")
    _resolution_argument(c)
    c.add_argument("--batch-size", type=int, default=16, help="images encoded at once (default %(default)s)")
    c.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default %(default)s)")
    c.add_argument("--workers", type=int, default=2, help="image decoding processes (default %(default)s)")
    c.set_defaults(run=_cache)
    return p


def _model(args: argparse.Namespace) -> str:
    if args.model is None and args.preset is None:
        raise UsageError("no model; pass --preset NAME (e.g. tiny-sd15, sd15, sdxl) or --model ID")
    model = args.model or load_preset(args.preset)["model"]
    check_model_source(model)
    return model


def _single_process(command: str) -> None:
    if ranks_from_env().world_size > 1:
        raise UsageError(f"{command} runs in one process; launch it with python, not torchrun")


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")


def _train(args: argparse.Namespace) -> Callable[[], None]:
    values = {name: getattr(args, name) for name in _DEFAULTS if name != "model"}
    config = TrainConfig(model=_model(args), **values)
    resolve_device(args.device)
    if args.timeout_s <= 0:
        raise UsageError(f"--timeout-s {args.timeout_s} must be positive seconds")
    plan = plan_run(config, ranks_from_env().world_size)

    def run() -> None:
        runtime = init_runtime(args.backend, args.timeout_s, args.device)
        try:
            train(plan, runtime)
        finally:
            runtime.shutdown()

    return run


def _eval(args: argparse.Namespace) -> Callable[[], None]:
    _single_process("eval")
    _positive(args, "max_items", "timesteps")
    if min(args.scales) < 1:
        raise UsageError(f"--scales {args.scales} must be positive multiples of the training size, e.g. 1 2 4")
    checkpoint = Path(args.checkpoint)
    device = resolve_device(args.device)

    def run() -> None:
        report = evaluate(
            checkpoint,
            device,
            args.data,
            args.max_items,
            tuple(args.scales),
            args.timesteps,
            args.baseline,
            args.mixed_precision,
        )
        print(markdown_table(report), end="")
        print(f"wrote {checkpoint / 'eval.json'} and {checkpoint / 'eval.md'}")

    return run


def _cache(args: argparse.Namespace) -> Callable[[], None]:
    _single_process("cache")
    _positive(args, "batch_size", "shard_size")
    model = _model(args)
    source = open_source(args.data)
    out = Path(args.out)
    if (out / MANIFEST).exists():
        raise UsageError(f"--out {args.out!r} already holds a cache; pass a new folder")
    if args.resolution is not None:
        check_side("--resolution", args.resolution, "--resolution")
    device = resolve_device(args.device)

    def run() -> None:
        pipe = load_frozen_pipeline(model, device)
        resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        manifest = write_cache(
            source, Encoders(pipe, device), out, model, resolution, args.batch_size, args.shard_size, args.workers
        )
        print(
            f"cached {len(manifest['items'])} images at {format_size(resolution, resolution)} in {out}"
            + (f" (skipped {manifest['skipped']} unreadable)" if manifest["skipped"] else "")
        )

    return run


def parse(argv: list[str] | None = None) -> Callable[[], None]:
    """Parse and check everything that needs no weights; returns the command to run."""
    args: Any = build_parser().parse_args(argv)
    return args.run(args)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for bad input, 130 when interrupted)."""
    prefix = rank_prefix()  # torchrun says the rank; the process group starts later
    try:
        try:
            command = parse(argv)
        except UsageError:
            if prefix:  # the same check failed on every rank: rank 0 says it once
                return USAGE_EXIT_CODE
            raise
        command()
    except UsageError as err:
        print(f"error: {prefix}{err}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return 0


def entry_point() -> None:
    """Console script ``distlin-distill``."""
    sys.exit(main())
