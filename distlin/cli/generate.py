"""``distlin-generate`` (``launch/generate.py``): one image from a preset, on one device or patch-parallel under
``torchrun``. Parsing, outputs and exit codes only; the run itself is :func:`distlin.run.generate`.

Every check that needs no weights runs before torch or diffusers is imported, identically on every rank, so a
typo costs a fraction of a second. Bad input ends with one ``error: ...`` line on stderr and exit code 2;
Ctrl-C (or SIGTERM) ends with exit code 130 and leaves no partial file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from distlin.cli.launcher import run_ranks
from distlin.commands import UsageParser, command_name
from distlin.errors import (
    INTERRUPTED_EXIT_CODE,
    LOST_RANK_EXIT_CODE,
    NON_FINITE_EXIT_CODE,
    USAGE_EXIT_CODE,
    Cancelled,
    UsageError,
    is_lost_rank,
)
from distlin.io import IMAGE_SUFFIXES, atomic_write, check_output_path
from distlin.parallel.config import BACKENDS, MODES
from distlin.presets import list_presets
from distlin.progress import phase, print_phase, report_to, start_line
from distlin.ranks import rank_prefix, ranks_from_env
from distlin.schedulers import SCHEDULERS
from distlin.settings import VAE_DECODES, VAE_STORES, RunSettings, build_settings
from distlin.sizes import format_size

DEFAULT_PRESET = "tiny-sd15"


@dataclass(frozen=True)
class Outputs:
    """Where a run's files go, checked writable before any work."""

    image: Path
    latents: Path | None
    report_comm: bool
    comm_json: Path | None
    plan_json: Path | None


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(
        prog=command_name(),
        description="Generate one image with LinFusion linear attention, patch-parallel under torchrun. "
        "The preset gives every default; flags override it.",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="start N ranks on this machine (torchrun underneath) once every input check has passed for N ranks, "
        "so a refused input is one line and no rank starts",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no start line and no times of the phases before the first step (results and errors still print)",
    )
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"one of: {', '.join(list_presets())}, or a path to your own .yaml preset (default {DEFAULT_PRESET})",
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
    gen.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale, >= 0 (<= 1: off)")
    gen.add_argument("--seed", type=int, help="seed of the initial noise (the same on every rank)")
    gen.add_argument("--dtype", help="float32, float16 or bfloat16 (fp32, fp16, bf16)")
    gen.add_argument("--device", help="auto, cpu, cuda or cuda:N (under torchrun cuda is cuda:LOCAL_RANK)")
    own = p.add_argument_group("your components")
    own.add_argument(
        "--lora",
        dest="loras",
        action="append",
        metavar="PATH[:SCALE]",
        help="a LoRA (kohya or diffusers .safetensors, folder or Hub id) fused at SCALE (default 1); repeatable",
    )
    own.add_argument("--scheduler", help=f"sampler: {', '.join(SCHEDULERS)} (default: the model's own)")
    own.add_argument(
        "--init-image",
        metavar="PATH",
        help="start from this picture: image-to-image at the output size, or a cascade preset from the first "
        "stage at or above the picture's size",
    )
    own.add_argument(
        "--strength",
        type=float,
        help="how far --init-image is noised, in (0, 1] (default 0.75, or the cascade stage's own)",
    )
    own.add_argument(
        "--mask",
        metavar="PATH",
        help="inpaint --init-image where this picture is white (one pass, not with a cascade preset)",
    )
    own.add_argument(
        "--controlnet",
        metavar="PATH",
        action="append",
        help="a ControlNet folder or Hub id for this base model; repeatable (their residuals are summed)",
    )
    own.add_argument(
        "--control-image",
        metavar="PATH",
        action="append",
        help="the conditioning image of each --controlnet, in order: at the output size, or with a cascade preset "
        "at the output's aspect ratio (resized per stage)",
    )
    own.add_argument(
        "--control-scale",
        type=float,
        action="append",
        help="the conditioning scale of each --controlnet, in order (default 1 each)",
    )
    own.add_argument(
        "--ip-adapter",
        metavar="ID_OR_PATH",
        action="append",
        help="an IP-Adapter: a .safetensors file with its image_encoder folder beside it, ORG/NAME/SUBFOLDER/FILE "
        "on the Hub, or a folder or Hub id laid out as h94/IP-Adapter (e.g. h94/IP-Adapter); repeatable, each "
        "with its --ip-image (several share the first one's image encoder)",
    )
    own.add_argument(
        "--ip-image", metavar="PATH", action="append", help="the reference picture of each --ip-adapter, in order"
    )
    own.add_argument(
        "--ip-scale",
        type=float,
        metavar="S",
        action="append",
        help="how much each --ip-adapter's picture steers, in order (0: none; default 1 each)",
    )
    own.add_argument(
        "--ip-image-encoder",
        metavar="ID_OR_PATH",
        help="the IP-Adapters' CLIP image encoder when it is not the image_encoder folder beside their weights: a "
        "folder, a Hub id or ORG/NAME/SUBFOLDER (e.g. h94/IP-Adapter/models/image_encoder for the SDXL vit-h files)",
    )
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
        help="print rank 0's communication counters by kind (UNet per step, VAE in total); also to JSON if given",
    )
    eng = p.add_argument_group("engine (default: the preset's)")
    eng.add_argument(
        "--mode",
        choices=MODES,
        help="exact: equals one device; displaced: DistriFusion-style stale exchanges after the warm-up; "
        "naive: no exchange (comparison only)",
    )
    eng.add_argument(
        "--warmup-steps",
        type=int,
        metavar="W",
        help="displaced mode: steps 0..W run synchronously (W + 1 steps, as DistriFusion counts warmup_steps); "
        "stale exchanges start at step W + 1",
    )
    eng.add_argument(
        "--stale",
        metavar="KINDS",
        help="displaced mode: which exchanges reuse last step's result, a comma list of attention, groupnorm, halo "
        "(or all, none); default attention: the tiny attention state is displaced, the halos and GroupNorm "
        "moments stay exact (the most fidelity per hidden exchange, see docs/RESULTS.md)",
    )
    eng.add_argument(
        "--cfg-parallel",
        action=argparse.BooleanOptionalAction,
        help="with guidance on and an even world size, denoise the two guidance halves on two rank groups "
        "(with guidance off every rank always takes a band)",
    )
    eng.add_argument(
        "--micro-batch",
        type=int,
        metavar="N",
        help="run the UNet on at most N samples at a time; 1 evaluates the guidance halves one after the "
        "other: half the activation memory, same image (default: the preset's, else the whole batch)",
    )
    eng.add_argument(
        "--attention-kernel",
        default="auto",
        help="LinFusion attention ops: triton (fused kernels, CUDA), torch, or auto (triton on CUDA; default)",
    )
    eng.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the UNet's pure-compute layers (feed-forwards, cross-attention, LinFusion's "
        "projections; the exchanges stay eager): same image, faster steps after a first step that compiles",
    )
    eng.add_argument("--backend", choices=BACKENDS, help="process-group backend (default: nccl on CUDA, else gloo)")
    eng.add_argument(
        "--timeout-s",
        type=float,
        default=300.0,
        help="bound on every collective, so a dead rank fails the others (default 300)",
    )
    mem = p.add_argument_group(
        "memory plan",
        "thresholds that switch memory savers on by themselves are environment variables: DISTLIN_TOKEN_CHUNK, "
        "DISTLIN_INDEX_LIMIT, DISTLIN_SEQUENTIAL_VAE_PIXELS, DISTLIN_SEQUENTIAL_BAND_ROWS, DISTLIN_DEVICE_MEMORY, "
        "DISTLIN_HOST_MEMORY "
        "(see docs/HIGHRES.md)",
    )
    mem.add_argument(
        "--vae-decode",
        choices=VAE_DECODES,
        default="auto",
        help="direct: plain VAE on one rank, band-parallel on several; sequential: rank 0 decodes band by band "
        "with the activations in host RAM (least device memory); auto: sequential above 1024x1024 px per rank "
        "or when the device needs it",
    )
    mem.add_argument(
        "--vae-store",
        choices=VAE_STORES,
        default="auto",
        help="where a band-by-band VAE keeps its full-size activations: host RAM (least device memory), the device "
        "(no host transfers), or auto: the device when they fit beside the rest",
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
    return p


# Flags that map one to one onto RunSettings / engine fields (argparse dest == field name).
SETTING_FLAGS = (
    "model", "linfusion", "prompt", "negative_prompt", "height", "width", "steps", "guidance_scale", "seed", "dtype",
    "device", "mode", "warmup_steps", "stale", "cfg_parallel", "micro_batch", "attention_kernel", "compile", "backend",
    "timeout_s", "vae_decode", "vae_attention_rows", "vae_store", "loras", "scheduler", "init_image", "strength",
    "mask", "controlnet", "control_image", "control_scale", "ip_adapter", "ip_image", "ip_scale", "ip_image_encoder",
)  # fmt: skip


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, RunSettings, Outputs]:
    """Parse and validate everything that can be checked without loading weights or starting ranks."""
    args = build_parser().parse_args(argv)
    if args.nproc_per_node is not None and (args.nproc_per_node < 1 or ranks_from_env().launched):
        raise UsageError(
            f"--nproc-per-node {args.nproc_per_node}: give a positive rank count, and not under torchrun "
            "(torchrun --nproc-per-node already starts the ranks)"
        )
    world = args.nproc_per_node or ranks_from_env().world_size
    if args.plan_ranks is not None and args.plan_ranks < 1:
        raise UsageError(f"--plan-ranks {args.plan_ranks} must be at least 1")
    planned_world = args.plan_ranks or world if args.plan else world
    settings = build_settings(args.preset, {key: getattr(args, key) for key in SETTING_FLAGS}, planned_world)
    name = Path(args.preset).stem if args.preset.endswith((".yaml", ".yml")) else args.preset
    outputs = Outputs(
        image=check_output_path(args.output or f"{name}.png", IMAGE_SUFFIXES),
        latents=_optional_output(args.save_latents, ".safetensors"),
        report_comm=args.report_comm is not None,
        comm_json=_optional_output(args.report_comm or None, ".json"),
        plan_json=_optional_output(args.plan_json, ".json"),
    )
    return args, settings, outputs


def _optional_output(path: str | None, suffix: str) -> Path | None:
    return None if path is None else check_output_path(path, suffix)


def print_plan(settings: RunSettings, outputs: Outputs, ranks: int) -> None:
    """``--plan``: the prediction only, offline, nothing loaded."""
    from distlin.memory.fit import plan_run
    from distlin.memory.planner import format_plan

    result = plan_run(settings, ranks)
    if result is None:
        raise UsageError(
            f"no offline architecture for model {settings.model!r}; plan with a preset's model "
            "(sd15, sd21, sdxl, sana-1k, sana-4k, full-*, tiny-*)"
        )
    print(format_plan(result))
    if outputs.plan_json:
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(outputs.plan_json, lambda tmp: tmp.write_text(text))
        print(f"wrote {outputs.plan_json}")


def announce(args: argparse.Namespace, settings: RunSettings) -> None:
    """The start line, on rank 0 and once (not again in the ranks ``--nproc-per-node`` starts)."""
    if args.quiet or not _is_rank0() or _started_by_nproc_per_node():
        return
    ranks = args.nproc_per_node or ranks_from_env().world_size
    steps, stages = settings.steps, len(settings.stages)
    print(start_line(args.preset, settings.width, settings.height, steps, ranks, settings.device, stages), flush=True)


def run(settings: RunSettings, outputs: Outputs, quiet: bool = False) -> None:
    """Start the ranks, generate, and write the outputs on rank 0; rank 0 prints each slow phase before the
    first step with its time, unless ``quiet``."""
    with ExitStack() as stack:
        if not quiet and _is_rank0():
            stack.enter_context(report_to(print_phase))
        with phase("imports (torch, diffusers)"):
            from distlin.io import save_image, save_latents
            from distlin.notices import quiet_third_party
            from distlin.parallel.runtime import init_runtime
            from distlin.run import generate

            quiet_third_party()
        with phase("process group") if ranks_from_env().world_size > 1 else nullcontext():
            runtime = init_runtime(settings.backend, settings.timeout_s, settings.device)
        stack.callback(runtime.shutdown)
        if not runtime.is_main:
            _silence_progress()
        result = generate(settings, runtime)
        if runtime.is_main:
            save_image(outputs.image, result.image, result.metadata)
            print(f"wrote {outputs.image} ({format_size(result.image.width, result.image.height)})")
            if outputs.latents:
                save_latents(outputs.latents, result.latents)
                print(f"wrote {outputs.latents} (latents {tuple(result.latents.shape)})")
            if outputs.report_comm:
                report = json.dumps(result.comm, indent=2)
                print(f"communication of rank 0 (world size {runtime.world_size}):\n{report}")
                if outputs.comm_json:
                    atomic_write(outputs.comm_json, lambda tmp: tmp.write_text(report + "\n"))
                    print(f"wrote {outputs.comm_json}")


def start_ranks(ranks: int, argv: list[str]) -> int:
    """Run ``ranks`` ranks of this same command (without the flag) on this machine; their exit code."""
    from distlin.parallel.runtime import rank_environment  # imports torch: only once every check has passed

    # one OpenMP thread: torchrun's default for several ranks, without its banner
    env = rank_environment(dict(os.environ), threads=1)
    sys.stdout.flush()
    return run_ranks(ranks, argv, env)


def _is_rank0() -> bool:
    """Rank 0 of a torchrun group, or a single process (known before torch is imported)."""
    return ranks_from_env().is_main


def _started_by_nproc_per_node() -> bool:
    """A rank ``--nproc-per-node`` started (it meets the others through its file store): the launching process
    has printed the start line already, and says ``interrupted`` once for all its ranks."""
    return ranks_from_env().rendezvous_file is not None


def _silence_progress() -> None:
    """Loading and sampling bars from every rank would interleave; only rank 0 shows them."""
    import diffusers
    from huggingface_hub.utils import disable_progress_bars

    diffusers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0; 2 bad input; 3 non-finite; 4 lost rank; 130 interrupted)."""
    # transformers' notices a user cannot act on (optional torchvision, over-long prompts: see warn_long_prompt)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        args, settings, outputs = parse(argv)
        if args.plan:
            print_plan(settings, outputs, args.plan_ranks or args.nproc_per_node or ranks_from_env().world_size)
            return 0
        announce(args, settings)
        if args.nproc_per_node is not None:
            return start_ranks(args.nproc_per_node, sys.argv[1:] if argv is None else argv)
        else:
            run(settings, outputs, args.quiet)
    except UsageError as err:
        # Every rank reports: torchrun stops the others as soon as one exits, possibly before rank 0 could.
        print(f"error: {rank_prefix()}{err}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except (KeyboardInterrupt, Cancelled):
        if _is_rank0() or not _started_by_nproc_per_node():  # --nproc-per-node: one line for all its ranks
            print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Exception as err:  # noqa: BLE001 - the two kinds of run failure a user can act on, else re-raised
        code = _failure_code(err)
        if code is None:
            raise
        print(f"error: {_failure_message(err, code)}", file=sys.stderr)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _failure_code(err: BaseException) -> int | None:
    from distlin.parallel.unet import NonFiniteError

    if isinstance(err, NonFiniteError):
        return NON_FINITE_EXIT_CODE
    return LOST_RANK_EXIT_CODE if is_lost_rank(err) else None


def _failure_message(err: BaseException, code: int) -> str:
    if code == NON_FINITE_EXIT_CODE:
        return str(err)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"lost contact with another rank (it died, or exceeded --timeout-s): {first}; "
        "the launcher's last lines (torchrun's summary, or --nproc-per-node's) name the rank that failed first"
    )


def _interrupt(signum: int, frame: object) -> NoReturn:
    """Ctrl-C, or SIGTERM (torchrun stopping the other ranks, a scheduler cancelling the job), unwinds as a
    KeyboardInterrupt: temp files are removed and the process group is destroyed. Later signals are ignored so
    they cannot interrupt that cleanup with a traceback (Ctrl-C reaches every rank of --nproc-per-node twice:
    from the terminal and from the launcher)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def entry_point() -> NoReturn:
    """Console script ``distlin-generate``."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
