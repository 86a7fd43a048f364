"""``--nproc-per-node N``: N ranks of one command on this machine, started and watched by this process.

What torchrun would do for one node, minus what a single machine does not need and with what a user of one does:
the ranks meet through a file store in a private temporary folder (no port to collide on, e.g. two runs both on
29500, and nothing listening beyond this machine; gloo's own connections stay on the loopback interface), Ctrl-C
ends every rank and exits with 130 without a traceback, and a rank that dies or hangs ends the run with the exit
code of the first rank to fail, the others stopped once they have had ``--timeout-s`` to say why. Torch-free.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from distlin.errors import INTERRUPTED_EXIT_CODE, LOST_RANK_EXIT_CODE
from distlin.ranks import RENDEZVOUS_ENV

# After the first rank fails, how long the others get to stop by themselves (and print why) before being killed:
# a rank blocked in a collective with a dead or stopped peer times out within this of the first.
GRACE_S = 15.0
LOOPBACK = "lo"


def rank_command(argv: list[str]) -> list[str]:
    """This command for one rank: ``argv`` without ``--nproc-per-node``."""
    rest, skip = [], False
    for arg in argv:
        if skip or arg == "--nproc-per-node":
            skip = not skip
            continue
        if not arg.startswith("--nproc-per-node="):
            rest.append(arg)
    return [sys.executable, "-m", "distlin.cli.generate", *rest]


def rank_env(base: dict[str, str], rank: int, ranks: int, store: Path) -> dict[str, str]:
    """The environment of rank ``rank`` of ``ranks``: torchrun's variables, the file store, loopback-only gloo."""
    env = dict(base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks))
    env.update(GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(ranks), **{RENDEZVOUS_ENV: str(store)})
    if Path("/sys/class/net", LOOPBACK).exists():
        env.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK)
    return env


def run_ranks(ranks: int, argv: list[str], env: dict[str, str]) -> int:
    """Start ``ranks`` ranks of this command, wait for them, and return the run's exit code."""
    folder = Path(tempfile.mkdtemp(prefix="distlin-ranks-"))  # 0700: only this user reaches the store
    command = rank_command(argv)
    processes: list[subprocess.Popen[bytes]] = []
    interrupted = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        for process in processes:  # Ctrl-C reaches the ranks too (one process group); kill or SIGTERM may not
            if process.poll() is None:
                process.send_signal(signal.SIGINT)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(ranks):
            rank_environ = rank_env(env, rank, ranks, folder / "store")
            processes.append(subprocess.Popen(command, env=rank_environ, preexec_fn=_end_with_parent))  # noqa: S603, PLW1509
        return _watch(processes, lambda: interrupted)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)


def _watch(processes: list[subprocess.Popen[bytes]], interrupted: Callable[[], bool]) -> int:
    """Wait for every rank; the exit code of the first to fail (130 once interrupted). After the first failure
    (or the interrupt) a stopped rank is killed at once, the others :data:`GRACE_S` later."""
    first_failure: tuple[int, int] | None = None  # (rank, exit code)
    since: float | None = None  # when the first rank failed, or the run was interrupted
    while True:
        codes = [process.poll() for process in processes]
        if first_failure is None:
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            first_failure = failed[0] if failed else None
        if since is None and (first_failure is not None or interrupted()):
            since = time.monotonic()
        if all(code is not None for code in codes):
            break
        if since is not None:
            late = time.monotonic() - since > GRACE_S
            for rank, process in enumerate(processes):
                if process.poll() is None and (late or _stopped(process.pid)):
                    process.kill()
                    process.wait()
                    if not interrupted():
                        why = "did not stop" if late else "was stopped"
                        after = f" after rank {first_failure[0]} failed" if first_failure else ""
                        print(f"error: rank {rank} {why}{after}; killed it", file=sys.stderr, flush=True)
        time.sleep(0.1)
    if interrupted():
        return INTERRUPTED_EXIT_CODE
    if first_failure is None:
        return 0
    rank, code = first_failure
    if code < 0:  # killed by a signal: the others lost it
        print(f"error: rank {rank} was killed ({signal.Signals(-code).name})", file=sys.stderr, flush=True)
        return LOST_RANK_EXIT_CODE
    return code


def _end_with_parent() -> None:
    """In a rank, before it runs: on Linux, receive SIGTERM when the launcher dies, even by SIGKILL (a job
    scheduler's), so no orphaned rank keeps computing and writes its file after the run was stopped."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1  # noqa: N806 - <sys/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, a debugger): it will never reach its timeout by itself."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")
