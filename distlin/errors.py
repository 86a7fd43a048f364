"""The one exception type for bad user input: the CLI prints it as one line and exits with code 2."""

from __future__ import annotations

USAGE_EXIT_CODE = 2
NON_FINITE_EXIT_CODE = 3  # a non-finite prediction stopped every rank
LOST_RANK_EXIT_CODE = 4  # another rank died or exceeded --timeout-s
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C or SIGTERM


class UsageError(ValueError):
    """Bad input the user can fix. The message is one line naming the value and the fix."""


class Cancelled(Exception):
    """A generation stopped on request (the web app's cancel), on every rank at the same UNet step."""


def is_lost_rank(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank died or exceeded the group's timeout."""
    import torch.distributed as dist

    if isinstance(err, dist.DistBackendError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection closed", "timed out", "peer")
    )
