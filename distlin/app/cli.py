"""``distlin-app`` (``launch/app.py``): the web app on one device, or on every rank of a torchrun group.

Alone it serves the page and generates on this process's device. Under ``torchrun --nproc-per-node N`` rank 0
serves the page and every other rank waits for requests, which rank 0 broadcasts and all ranks run together.
It listens on 127.0.0.1 unless ``--host`` says otherwise; there, ``--auth`` and the size and step limits apply.
``--components DIR`` offers the operator's LoRAs and ControlNets by name (:mod:`distlin.app.library`).
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from distlin.app.auth import parse_credentials
from distlin.app.library import LAYOUT, ComponentLibrary
from distlin.app.request import MAX_QUEUED, MAX_QUEUED_MB, MAX_UPLOAD_FOLDER_MB, Limits
from distlin.app.tiles import TILE_SIZE
from distlin.commands import UsageParser, command_name
from distlin.errors import USAGE_EXIT_CODE, UsageError
from distlin.presets import builtin_preset
from distlin.ranks import rank_prefix, ranks_from_env

if TYPE_CHECKING:  # imported where used: flags are checked before torch or Gradio load
    from distlin.app.coordinator import Coordinator

DEFAULT_PRESET = "tiny-sd15"
DEFAULT_PORT = 7860
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
FAILED_EXIT_CODE = 1


@dataclass(frozen=True)
class AppOptions:
    """The app's checked flags."""

    host: str
    port: int
    credentials: tuple[str, str] | None
    limits: Limits
    output_dir: Path
    preset: str
    tile_size: int
    device: str | None
    backend: str | None
    timeout_s: float
    library: ComponentLibrary


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog=command_name(), description="Web app for distlin: one device, or every rank under torchrun.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require this user and password (HTTP basic auth)")
    p.add_argument(
        "--max-pixels",
        type=int,
        help="largest final image a request may ask for, in pixels (default: none on 127.0.0.1, "
        "2048x2048 on any other --host)",
    )
    p.add_argument("--max-steps", type=int, help="most steps a request may ask for (default: none locally, else 100)")
    p.add_argument(
        "--max-upload-mb", type=int, help="largest picture a page may upload, in MiB (default: none locally, else 64)"
    )
    p.add_argument(
        "--max-queued", type=int, default=MAX_QUEUED, help=f"most requests waiting at once (default {MAX_QUEUED})"
    )
    p.add_argument(
        "--max-queued-mb",
        type=int,
        default=MAX_QUEUED_MB,
        help=f"most MiB of pictures the waiting requests hold (default {MAX_QUEUED_MB})",
    )
    p.add_argument(
        "--max-upload-folder-mb",
        type=int,
        default=MAX_UPLOAD_FOLDER_MB,
        help=f"most MiB in the upload folder, all uploads together (default {MAX_UPLOAD_FOLDER_MB})",
    )
    p.add_argument("--output-dir", default="distlin-results", help="where results go (default ./distlin-results)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"preset shown first (default {DEFAULT_PRESET})")
    p.add_argument("--tile-size", type=int, default=TILE_SIZE, help=f"viewer tile size in px (default {TILE_SIZE})")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the preset's; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--backend", choices=("nccl", "gloo"), help="process-group backend (default: nccl on CUDA)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="bound on every collective (default 300)")
    p.add_argument(
        "--components",
        metavar="DIR",
        help=f"the components the page offers by name (a request names no path): {LAYOUT}",
    )
    return p


def parse(argv: list[str] | None = None) -> AppOptions:
    args = build_parser().parse_args(argv)
    for name in ("max_pixels", "max_steps", "max_upload_mb", "max_queued", "max_queued_mb", "max_upload_folder_mb",
                 "tile_size"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value} must be at least 1")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} must be between 1 and 65535")
    builtin_preset(args.preset)
    output_dir = Path(args.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output-dir {str(output_dir)!r} is a file; pass a folder")
    return AppOptions(
        host=args.host,
        port=args.port,
        credentials=parse_credentials(args.auth) if args.auth else None,
        limits=Limits.for_host(
            args.host in LOOPBACK_HOSTS,
            args.max_pixels,
            args.max_steps,
            args.max_upload_mb,
            args.max_queued,
            args.max_queued_mb,
            args.max_upload_folder_mb,
        ),
        output_dir=output_dir,
        preset=args.preset,
        tile_size=args.tile_size,
        device=args.device,
        backend=args.backend,
        timeout_s=args.timeout_s,
        library=ComponentLibrary.scan(args.components) if args.components else ComponentLibrary(),
    )


def serve(options: AppOptions) -> int:
    """Start the ranks; rank 0 serves HTTP until Ctrl-C, the others run what it sends. Returns the exit code."""
    if ranks_from_env().is_main:  # before the imports: torch and Gradio take seconds
        print(f"starting the distlin app on http://{options.host}:{options.port} (importing torch, Gradio)", flush=True)
    from distlin.app.coordinator import Coordinator
    from distlin.app.ranks import RankChannel, serve_worker
    from distlin.app.regroup import GroupRecovery
    from distlin.app.results import ResultStore
    from distlin.app.session import GenerationSession
    from distlin.notices import quiet_third_party
    from distlin.parallel.runtime import init_runtime

    quiet_third_party()
    runtime = init_runtime(options.backend, options.timeout_s, options.device)
    recovery = GroupRecovery(runtime, options.timeout_s) if runtime.distributed else None
    session = GenerationSession(runtime, options.device, options.library, recovery)
    channel = RankChannel(runtime)
    try:
        if not runtime.is_main:
            serve_worker(channel, session)
            return 0
        store = ResultStore(options.output_dir, options.tile_size)
        coordinator = Coordinator(channel, session, store, options.limits, idle_message_s=options.timeout_s / 4)
        return _serve_http(coordinator, options)
    finally:
        runtime.shutdown()


def _serve_http(coordinator: Coordinator, options: AppOptions) -> int:
    from distlin.app.uploads import private_upload_folder

    with private_upload_folder():  # before the page's blocks: they keep Gradio's upload folder from their start
        return _serve_page(coordinator, options)


def _serve_page(coordinator: Coordinator, options: AppOptions) -> int:
    from distlin.app.page import CSS, AppPage
    from distlin.app.server import build_server, http_server

    page = AppPage(coordinator, options.preset).build()
    limits = options.limits
    app = build_server(
        page, coordinator.store, options.credentials, CSS, limits.max_upload_mb, limits.max_upload_folder_mb
    )
    server = http_server(app, options.host, options.port)

    def run_ranks() -> None:
        coordinator.serve()
        server.should_exit = True  # the rank group failed: stop serving a page that cannot generate

    ranks = threading.Thread(target=run_ranks, name="distlin-ranks")
    ranks.start()
    if options.host not in LOOPBACK_HOSTS and options.credentials is None:
        print(f"note: listening on {options.host} without --auth: anyone who reaches it can generate", flush=True)
    print(
        f"distlin app on http://{options.host}:{options.port} ({coordinator.session.runtime.world_size} rank(s)); "
        f"results in {coordinator.store.root}; {coordinator.session.library.describe()}",
        flush=True,
    )
    try:
        server.run()
    finally:
        coordinator.close()
        ranks.join()
    if coordinator.failure is not None:
        print(f"error: {coordinator.failure}", file=sys.stderr)
        return FAILED_EXIT_CODE
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse, then serve; bad input is one ``error: ...`` line and exit code 2."""
    try:
        return serve(parse(argv))
    except UsageError as err:
        print(f"error: {rank_prefix()}{err}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except KeyboardInterrupt:
        return 130


def entry_point() -> NoReturn:
    """``distlin-app`` once :func:`distlin.app.entry_point` found the web stack installed."""
    sys.exit(main())
