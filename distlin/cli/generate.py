"""``launch/generate.py``: one image from a preset, on one device or patch-parallel under ``torchrun``.

Every cheap check runs before the process group starts or any weight loads, identically on every rank, so a
typo costs a second, not a model load. Bad input ends with one ``error: ...`` line on stderr and exit code 2;
Ctrl-C ends with exit code 130 and leaves no partial file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import diffusers
import torch
import torch.distributed as dist
from PIL import Image

import distlin
from distlin.errors import USAGE_EXIT_CODE, UsageError
from distlin.highres.cascade import Stage, StageReport, run_cascade
from distlin.highres.chunking import bound_memory
from distlin.highres.demofusion import run_demofusion
from distlin.highres.sequential_vae import decode_sequential
from distlin.highres.vae import parallelize_vae
from distlin.io import IMAGE_SUFFIXES, atomic_write, check_output_path, save_image, save_latents
from distlin.loading import (
    architecture_of,
    check_linfusion_source,
    check_model_source,
    decode_latents,
    load_pipeline,
    mount_linfusion,
    parse_dtype,
    unet_downsamplings,
)
from distlin.memory.planner import (
    VAE_DECODES,
    format_plan,
    plan,
    ranks_needed,
    sequential_vae,
    sequential_vae_settings,
)
from distlin.parallel import PatchParallelConfig, Runtime, init_runtime, parallelize
from distlin.parallel.config import MODES
from distlin.parallel.layout import RowLayout
from distlin.parallel.runtime import BACKENDS, resolve_device
from distlin.parallel.unet import NonFiniteError
from distlin.presets import PRESET_SCHEMA, list_presets, load_preset

DEFAULT_PRESET = "tiny-sd15"
INTERRUPTED_EXIT_CODE = 130
NON_FINITE_EXIT_CODE = 3
LOST_RANK_EXIT_CODE = 4
# Built-in weights and fresh LinFusion layers always come from this seed, so --seed only changes the noise.
WEIGHTS_SEED = 0
MAX_SEED = 2**64 - 1
# Tokens per feed-forward chunk: the GEGLU's 8x-wide hidden activation never exceeds this many tokens.
FF_CHUNK = 16384


@dataclass(frozen=True)
class Settings:
    """A validated command line: the preset's values with the flags applied, plus where outputs go."""

    preset: str
    values: dict[str, Any]  # exactly the keys of PRESET_SCHEMA
    engine: PatchParallelConfig
    output: Path
    save_latents: Path | None
    report_comm: bool
    comm_json: Path | None
    backend: str | None
    timeout_s: float
    stages: tuple[Stage, ...] = ()  # a cascade's resolutions, ending at (height, width); empty: one pass
    plan: bool = False
    plan_ranks: int | None = None
    plan_json: Path | None = None
    vae_attention_rows: int | None = None  # stream the sequential VAE's mid-block K/V from host RAM
    vae_decode: str = "auto"  # direct (plain / band-parallel), sequential (band by band via host RAM) or auto


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one line and exit code 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="generate.py",
        description="Generate one image with LinFusion linear attention, patch-parallel under torchrun. "
        "The preset gives every default; flags override it.",
    )
    p.add_argument(
        "--preset", default=DEFAULT_PRESET, help=f"one of: {', '.join(list_presets())} (default {DEFAULT_PRESET})"
    )
    gen = p.add_argument_group("generation (default: the preset's)")
    gen.add_argument("--model", help="built-in (tiny-sd15, tiny-sdxl, full-*), diffusers folder or Hub id")
    gen.add_argument(
        "--linfusion",
        help="Hub id or folder of a LinFusion checkpoint, 'fresh' (new layers) or 'none' (keep softmax attention)",
    )
    gen.add_argument("--prompt")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--height", type=int, help="pixels, a positive multiple of 8")
    gen.add_argument("--width", type=int, help="pixels, a positive multiple of 8")
    gen.add_argument("--steps", type=int, help="denoising steps, at least 1")
    gen.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale, >= 0")
    gen.add_argument("--seed", type=int, help="seed of the initial noise (the same on every rank)")
    gen.add_argument("--dtype", help="float32, float16 or bfloat16 (fp32, fp16, bf16)")
    gen.add_argument("--device", help="auto, cpu, cuda or cuda:N (under torchrun cuda is cuda:LOCAL_RANK)")
    out = p.add_argument_group("outputs")
    out.add_argument(
        "--output",
        metavar="PATH.png",
        help="PNG path, or .tif/.tiff for a tiled BigTIFF (huge images); its folder must exist "
        "(default: ./<preset>.png)",
    )
    out.add_argument("--save-latents", metavar="PATH.safetensors", help="also write the final latents (key 'latents')")
    out.add_argument(
        "--report-comm",
        nargs="?",
        const="",
        metavar="PATH.json",
        help="print rank 0's per-step communication counters by kind; also to JSON if given",
    )
    eng = p.add_argument_group("engine (default: the preset's)")
    eng.add_argument(
        "--mode",
        choices=MODES,
        help="exact: equals one device; displaced: DistriFusion-style "
        "stale exchanges after the warm-up; naive: no exchange (comparison only)",
    )
    eng.add_argument("--warmup-steps", type=int, help="synchronous steps before displaced mode starts")
    eng.add_argument(
        "--cfg-parallel",
        action=argparse.BooleanOptionalAction,
        help="split the guidance batch over two rank groups when the world size is even",
    )
    eng.add_argument(
        "--micro-batch",
        type=int,
        metavar="N",
        help="run the UNet on at most N samples at a time; 1 evaluates the guidance halves one after the "
        "other: half the activation memory, same image (default: the preset's, else the whole batch)",
    )
    mem = p.add_argument_group("memory plan")
    mem.add_argument(
        "--vae-decode",
        choices=VAE_DECODES,
        default="auto",
        help="direct: plain VAE on one rank, band-parallel on several; sequential: rank 0 decodes band by band "
        "with the activations in host RAM (least device memory); auto: sequential above 1024x1024 px per rank "
        "or when the device needs it",
    )
    mem.add_argument(
        "--vae-attention-rows",
        type=int,
        metavar="N",
        help="when the VAE decodes band by band from host RAM, stream its mid-block keys/values from there too, "
        "N latent rows at a time (default: all on the device; chosen automatically when they do not fit)",
    )
    mem.add_argument("--plan", action="store_true", help="print the predicted peak memory per rank and exit")
    mem.add_argument("--plan-ranks", type=int, metavar="N", help="ranks to plan for (default: WORLD_SIZE or 1)")
    mem.add_argument("--plan-json", metavar="FILE.json", help="also write the plan as JSON")
    eng.add_argument(
        "--stale-attention",
        action="store_true",
        help="in displaced mode, also reuse last step's attention state (it is tiny, so it is exchanged "
        "synchronously unless this is set)",
    )
    eng.add_argument("--backend", choices=BACKENDS, help="process-group backend (default: nccl on CUDA, else gloo)")
    eng.add_argument(
        "--timeout-s",
        type=float,
        default=300.0,
        help="bound on every collective, so a dead rank fails the others (default 300)",
    )
    return p


def _check_values(values: dict[str, Any]) -> None:
    """Range checks on the merged values, so a bad preset file is caught as surely as a bad flag."""
    for key in ("height", "width"):
        size = values[key]
        if size <= 0 or size % 8:
            raise UsageError(
                f"{key} {size} is not a positive multiple of 8; pass e.g. --{key} {max(8, round(size / 8) * 8)}"
            )
    if values["steps"] < 1:
        raise UsageError(f"steps {values['steps']} must be at least 1; pass --steps 1 or more")
    guidance = values["guidance_scale"]
    if not (math.isfinite(guidance) and guidance >= 0):
        raise UsageError(f"guidance scale {guidance} must be a number >= 0; pass e.g. --guidance-scale 7.5")
    if not 0 <= values["seed"] <= MAX_SEED:
        raise UsageError(f"seed {values['seed']} must be between 0 and 2**64-1; pass e.g. --seed 0")
    parse_dtype(values["dtype"])
    resolve_device(values["device"])
    check_model_source(values["model"])
    check_linfusion_source(values["linfusion"])


def _check_split(values: dict[str, Any], engine: PatchParallelConfig, stages: tuple[Stage, ...]) -> None:
    """Refuse a size the ranks cannot split, from the UNet config alone, before any rank loads weights."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    patch_ranks = world // 2 if engine.cfg_parallel and world > 1 and world % 2 == 0 else world
    downsamplings = unet_downsamplings(values["model"])
    if downsamplings is not None:
        for height, width in [(s.height, s.width) for s in stages] or [(values["height"], values["width"])]:
            RowLayout(height // 8, width // 8, 2**downsamplings, patch_ranks)


def _cascade_stages(values: dict[str, Any]) -> tuple[Stage, ...]:
    """The preset's cascade, rescaled so its last stage is the requested size (each stage half the next)."""
    section = values.get("cascade") or []
    stages = []
    for k, entry in enumerate(section):
        if not isinstance(entry, dict) or not {"height", "width"} <= entry.keys():
            raise UsageError(f"cascade stage {k} must give height and width (and strength); fix the preset")
        halvings = 2 ** (len(section) - 1 - k)
        height, width = values["height"] // halvings, values["width"] // halvings
        strength = float(entry.get("strength", 1.0))
        if height % 8 or width % 8 or height < 8 or width < 8:
            raise UsageError(
                f"cascade stage {k} would be {width}x{height} px (not a multiple of 8): make --height/--width "
                f"multiples of {8 * 2 ** (len(section) - 1)} for a {len(section)}-stage cascade"
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


def _optional_output(path: str | None, suffix: str) -> Path | None:
    return None if path is None else check_output_path(path, suffix)


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Parse and validate everything that can be checked without loading weights or starting ranks."""
    args = build_parser().parse_args(argv)
    values = load_preset(args.preset)
    values.update({key: getattr(args, key) for key in PRESET_SCHEMA if getattr(args, key) is not None})
    _check_values(values)
    engine = PatchParallelConfig(
        mode=values["mode"],
        warmup_steps=values["warmup_steps"],
        cfg_parallel=values["cfg_parallel"],
        stale_attention=args.stale_attention,
        micro_batch=args.micro_batch if args.micro_batch is not None else values.get("micro_batch"),
    )
    stages = _cascade_stages(values)
    _check_split(values, engine, stages)
    if args.vae_attention_rows is not None:
        sequential_vae_settings(args.vae_attention_rows)  # validates it
    if args.plan_ranks is not None and args.plan_ranks < 1:
        raise UsageError(f"--plan-ranks {args.plan_ranks} must be at least 1")
    if not args.timeout_s > 0:
        raise UsageError(f"timeout {args.timeout_s} s must be positive; pass e.g. --timeout-s 300")
    return Settings(
        preset=args.preset,
        values=values,
        engine=engine,
        output=check_output_path(args.output or f"{args.preset}.png", IMAGE_SUFFIXES),
        save_latents=_optional_output(args.save_latents, ".safetensors"),
        report_comm=args.report_comm is not None,
        comm_json=_optional_output(args.report_comm or None, ".json"),
        backend=args.backend,
        timeout_s=args.timeout_s,
        stages=stages,
        plan=args.plan,
        plan_ranks=args.plan_ranks,
        plan_json=_optional_output(args.plan_json, ".json"),
        vae_attention_rows=args.vae_attention_rows,
        vae_decode=args.vae_decode,
    )


def _metadata(settings: Settings, runtime: Runtime) -> dict[str, Any]:
    """What the PNG records: every generation setting, where it ran, and the versions that made it."""
    return {
        "preset": settings.preset,
        **settings.values,
        "device": str(runtime.device),
        "world_size": runtime.world_size,
        "mode": settings.engine.mode,
        "warmup_steps": settings.engine.warmup_steps,
        "cfg_parallel": settings.engine.cfg_parallel,
        "micro_batch": settings.engine.micro_batch,
        "vae_attention_rows": settings.vae_attention_rows,
        "vae_decode": settings.vae_decode,
        "distlin_version": distlin.__version__,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
    }


def _silence_progress() -> None:
    """Download and loading progress bars from every rank would interleave; only rank 0 shows them."""
    from huggingface_hub.utils import disable_progress_bars

    diffusers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def memory_plan(settings: Settings, ranks: int) -> dict[str, Any] | None:
    """The planner's prediction for this run, or None for a model whose architecture is not known offline."""
    values = settings.values
    arch = architecture_of(values["model"])
    if arch is None:
        return None
    dtype = str(parse_dtype(values["dtype"])).removeprefix("torch.")
    cfg = values["guidance_scale"] > 1.0
    engine = settings.engine
    return plan(
        arch,
        values["height"],
        values["width"],
        ranks,
        dtype,
        cfg,
        engine.cfg_parallel,
        FF_CHUNK,
        engine.micro_batch,
        settings.vae_attention_rows,
        settings.vae_decode,
    )


def print_plan(settings: Settings) -> None:
    """``--plan``: the prediction only, offline, nothing loaded."""
    ranks = settings.plan_ranks or int(os.environ.get("WORLD_SIZE", "1"))
    result = memory_plan(settings, ranks)
    if result is None:
        raise UsageError(
            f"no offline architecture for model {settings.values['model']!r}; plan with a preset's model "
            "(sd15, sd21, sdxl, full-*, tiny-*)"
        )
    print(format_plan(result))
    if settings.plan_json:
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(settings.plan_json, lambda tmp: tmp.write_text(text))
        print(f"wrote {settings.plan_json}")


# Memory savers generate.py may switch on by itself, in this order, when a run does not fit the GPU: the
# guidance halves one after the other, the VAE decoded band by band through host RAM, then its mid-block
# keys/values streamed from there too. None changes the image; the last two cost host transfers.
SAVERS: tuple[tuple[str, Any, str], ...] = (
    ("micro_batch", 1, "--micro-batch 1"),
    ("vae_decode", "sequential", "--vae-decode sequential"),
    ("vae_attention_rows", 64, "--vae-attention-rows 64"),
)


def _saver(settings: Settings, name: str) -> Any:
    """A saver's current value; None (or ``auto``) when the user left it to generate.py."""
    value = settings.engine.micro_batch if name == "micro_batch" else getattr(settings, name)
    return None if value == "auto" else value


def _with(settings: Settings, name: str, value: Any) -> Settings:
    if name == "micro_batch":
        return replace(settings, engine=replace(settings.engine, micro_batch=value))
    return replace(settings, **{name: value})


def _fit_to_device(settings: Settings, runtime: Runtime) -> Settings:
    """On a GPU, make the run fit the planner's prediction or refuse it (on every rank alike).

    Savers of :data:`SAVERS` the user left unset are switched on one by one until the plan fits; if none
    suffices, one line says how many ranks would.
    """
    if runtime.device.type != "cuda":
        return settings
    capacity = torch.cuda.get_device_properties(runtime.device).total_memory
    result = memory_plan(settings, runtime.world_size)
    if result is None or result["peak_bytes_per_rank"] <= capacity:
        return settings
    fitted = settings
    for name, value, _ in SAVERS:
        if _saver(fitted, name) is not None:
            continue
        fitted = _with(fitted, name, value)
        planned = memory_plan(fitted, runtime.world_size)
        if planned is not None and planned["peak_bytes_per_rank"] <= capacity:
            if runtime.is_main:
                print(f"note: to fit {runtime.device}, running with {_flags(settings, fitted)} (same image)")
            return fitted
    values, engine = settings.values, fitted.engine
    kwargs = {"dtype": result["dtype"], "cfg": result["cfg"], "cfg_parallel": engine.cfg_parallel, "ff_chunk": FF_CHUNK}
    try:
        ranks = ranks_needed(
            capacity,
            architecture_of(values["model"]),
            values["height"],
            values["width"],
            micro_batch=engine.micro_batch,
            vae_attention_rows=fitted.vae_attention_rows,
            vae_decode=fitted.vae_decode,
            **kwargs,
        )
        needed = f"at least {ranks} ranks with {_flags(settings, fitted)}" if fitted != settings else f"{ranks} ranks"
    except UsageError:
        needed = "a smaller size"
    raise UsageError(
        f"predicted peak {result['peak_bytes_per_rank'] / 2**30:.1f} GiB per rank does not fit "
        f"{runtime.device} ({capacity / 2**30:.1f} GiB); use {needed} (see --plan)"
    )


def _flags(before: Settings, after: Settings) -> str:
    """The command-line flags that turn ``before``'s memory savers into ``after``'s."""
    return " ".join(flag for name, _, flag in SAVERS if _saver(before, name) != _saver(after, name))


def _stage_report(runtime: Runtime, count: int, steps: int) -> StageReport | None:
    """Rank 0 prints one line per finished cascade stage: its size, steps and wall time."""
    if not runtime.is_main:
        return None

    def report(index: int, stage: Stage, seconds: float) -> None:
        denoised = steps if index == 0 else int(steps * stage.strength)
        size = f"{stage.width}x{stage.height} px"
        print(f"stage {index + 1}/{count} {size}, {denoised} steps: {seconds:.1f} s", flush=True)

    return report


def generate(settings: Settings) -> None:
    """Start the ranks, load and parallelize the pipeline, sample, and write the outputs on rank 0."""
    values = settings.values
    runtime = init_runtime(settings.backend, settings.timeout_s, values["device"])
    try:
        settings = _fit_to_device(settings, runtime)
        if not runtime.is_main:
            _silence_progress()
        pipe = load_pipeline(values["model"], parse_dtype(values["dtype"]), runtime.device, WEIGHTS_SEED)
        mount_linfusion(pipe, values["linfusion"], WEIGHTS_SEED)
        for model in (pipe.unet, pipe.vae):  # chunked GEGLU, index-safe upsampling: no-ops at small sizes
            bound_memory(model, FF_CHUNK)
        engine = parallelize(pipe, settings.engine, runtime)  # also hides the sampling bar off rank 0
        for height, width in [(s.height, s.width) for s in settings.stages] or [(values["height"], values["width"])]:
            engine.check_size(height, width)  # before any collective: every rank fails alike
        # Several ranks decode band-parallel (exact, seam-free); one rank runs the plain VAE. Bands too large for
        # the device are decoded by rank 0 alone, band by band, with the activations in host RAM (same image).
        vae = parallelize_vae(pipe.vae, runtime) if runtime.world_size > 1 else None
        sequential = sequential_vae(values["height"], values["width"], runtime.world_size, settings.vae_decode)
        decode = vae.decode if vae is not None else None
        if sequential:
            decode = partial(
                decode_sequential, pipe.vae, store="cpu", **sequential_vae_settings(settings.vae_attention_rows)
            )
        engine.ctx.reset()
        common = {
            "prompt": values["prompt"],
            "negative_prompt": values["negative_prompt"] or None,  # None lets SDXL use its zero embedding
            "guidance_scale": values["guidance_scale"],
        }
        if settings.stages:
            run = run_demofusion if hasattr(pipe, "text_encoder_2") else run_cascade  # SDXL: DemoFusion-style
            latents = run(
                pipe,
                on_stage=_stage_report(runtime, len(settings.stages), values["steps"]),
                stages=settings.stages,
                steps=values["steps"],
                seed=values["seed"],
                vae=vae,
                handle=engine,
                **common,
            )
        else:
            latents = pipe(
                height=values["height"],
                width=values["width"],
                num_inference_steps=values["steps"],
                generator=torch.Generator(device="cpu").manual_seed(values["seed"]),
                output_type="latent",
                **common,
            ).images
        if runtime.is_main or not sequential:  # the band-parallel decode needs every rank
            image = decode_latents(pipe, latents, decode)
        if runtime.is_main:
            _write_outputs(settings, runtime, image, latents, engine.ctx.stats.summary())
    finally:
        runtime.shutdown()


def _write_outputs(
    settings: Settings, runtime: Runtime, image: Image.Image, latents: torch.Tensor, comm: dict[str, Any]
) -> None:
    save_image(settings.output, image, _metadata(settings, runtime))
    print(f"wrote {settings.output} ({image.width}x{image.height})")
    if settings.save_latents:
        save_latents(settings.save_latents, latents)
        print(f"wrote {settings.save_latents} (latents {tuple(latents.shape)})")
    if settings.report_comm:
        report = json.dumps(comm, indent=2)
        print(f"communication of rank 0 (world size {runtime.world_size}):\n{report}")
        if settings.comm_json:
            atomic_write(settings.comm_json, lambda tmp: tmp.write_text(report + "\n"))
            print(f"wrote {settings.comm_json}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for bad input, 130 when interrupted)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        settings = parse_settings(argv)
        if settings.plan:
            print_plan(settings)
        else:
            generate(settings)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return NON_FINITE_EXIT_CODE
    except dist.DistBackendError as err:
        print(f"error: {_lost_rank_message(err)}", file=sys.stderr)
        return LOST_RANK_EXIT_CODE
    except RuntimeError as err:
        if not _is_comm_failure(err):
            raise
        print(f"error: {_lost_rank_message(err)}", file=sys.stderr)
        return LOST_RANK_EXIT_CODE
    except UsageError as err:
        # Every rank reports: torchrun stops the others as soon as one exits, possibly before rank 0 could.
        rank = int(os.environ.get("RANK", "0"))
        print(f"error: {f'rank {rank}: ' if rank else ''}{err}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum: int, frame: object) -> NoReturn:
    """SIGTERM (torchrun stopping the other ranks, a scheduler cancelling the job) unwinds like Ctrl-C:
    temp files are removed and the process group is destroyed."""
    raise KeyboardInterrupt


def _is_comm_failure(err: BaseException) -> bool:
    text = str(err).lower()
    return any(word in text for word in ("gloo", "nccl", "connection closed", "timed out", "peer"))


def _lost_rank_message(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"lost contact with another rank (it died, or exceeded --timeout-s): {first}; "
        "torchrun's summary names the rank that failed first"
    )
