"""What every console script shares before its own work: the name the user typed (for ``--help``'s usage line),
a parser whose errors are usage errors, and a one-line refusal when the script needs an optional extra that a
plain ``pip install distlin`` lacks."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import NoReturn

from distlin.errors import USAGE_EXIT_CODE, UsageError


def command_name() -> str:
    """The command as typed: ``distlin-bench``, ``launch/bench.py``, or ``python -m distlin.cli.generate``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name.startswith("distlin."):
        return f"python -m {spec.name}"
    typed = sys.argv[0] if sys.argv and sys.argv[0] else "distlin"
    return typed if typed.endswith(".py") and not os.path.isabs(typed) else os.path.basename(typed)


class UsageParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one line and exit code 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see --help")


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (checked without importing them)."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def require_extra(extra: str, modules: tuple[str, ...]) -> None:
    """Exit with one line naming the extra to install when any of ``modules`` is missing."""
    missing = missing_modules(modules)
    if missing:
        refuse(f"{command_name()} needs {', '.join(missing)}; install it with: pip install 'distlin[{extra}]'")


def refuse(message: str) -> NoReturn:
    """One ``error: ...`` line on stderr and the usage exit code."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)
