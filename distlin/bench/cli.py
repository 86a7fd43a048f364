"""``distlin-bench SUITE [--out DIR] [--quick] [options]`` (``launch/bench.py``): run one benchmark suite and write
its three files."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from types import ModuleType

import torch

from distlin.bench import attention, cascade, fidelity, gpu, memory, options, project, sana, scaling, unet
from distlin.bench.report import environment, write_suite
from distlin.commands import command_name
from distlin.errors import USAGE_EXIT_CODE, UsageError
from distlin.parallel.runtime import resolve_device

SUITES: dict[str, ModuleType] = {
    "attention": attention,
    "unet": unet,
    "scaling": scaling,
    "project": project,
    "cascade": cascade,
    "memory": memory,
    "gpu": gpu,
    "fidelity": fidelity,
    "sana": sana,
}

POSITIVE = ("threads", "warmup", "repeats", "steps", "batch", "heads")  # counts, where a suite has them


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (default runs/bench)")
    common.add_argument("--quick", action="store_true", help="small sizes: under a minute on a 2-core CPU")
    threads = "torch threads (per rank in scaling); default 1, as the CPU targets are stated"
    common.add_argument("--threads", type=int, default=1, help=threads)
    common.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    dtype = "float32, float16 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA; bfloat16 for project)"
    common.add_argument("--dtype", default=None, help=dtype)
    common.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    parser = argparse.ArgumentParser(prog=command_name(), description=__doc__)
    suites = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, module in SUITES.items():
        doc, raw = module.__doc__ or "", argparse.RawDescriptionHelpFormatter
        module.add_arguments(
            suites.add_parser(name, parents=[common], help=doc.split("\n", 1)[0], description=doc, formatter_class=raw)
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns 0, or 2 after a one-line error for bad input."""
    command = shlex.join([sys.executable, *sys.argv] if argv is None else ["launch/bench.py", *argv])
    args = options.resolve_quick(build_parser().parse_args(argv))
    module = SUITES[args.suite]
    load = os.getloadavg()[0]
    try:
        for name in POSITIVE:
            value = getattr(args, name, None)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be at least 1, got {value}")
        device = resolve_device(args.device)
        dtype = options.resolve_dtype(args.dtype, device, getattr(module, "DEFAULT_DTYPE", None))
        torch.set_num_threads(args.threads)
        result = module.run(args, device, dtype)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT_CODE
    paths = write_suite(
        args.out, args.suite, result, environment(device, dtype, torch.get_num_threads(), command, load)
    )
    print(result.markdown)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def entry_point() -> None:
    """Console script ``distlin-bench``."""
    sys.exit(main())
