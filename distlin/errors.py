"""The one exception type for bad user input: the CLI prints it as one line and exits with code 2."""

from __future__ import annotations

USAGE_EXIT_CODE = 2


class UsageError(ValueError):
    """Bad input the user can fix. The message is one line naming the value and the fix."""


class Cancelled(Exception):
    """A generation stopped on request (the web app's cancel), on every rank at the same UNet step."""
