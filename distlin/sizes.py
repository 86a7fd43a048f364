"""One way to write an image size: width × height, as the README, the presets and the output files give it.

Every message, plan, metadata line and document says ``1024×512`` for 1024 px wide and 512 px high; a size
typed on a command line may use ``x`` or ``×``. A side is a positive multiple of 8 px (:func:`check_side`).
"""

from __future__ import annotations

from distlin.errors import UsageError

TIMES = "×"


def format_size(width: int, height: int) -> str:
    """``1024×512``: width first."""
    return f"{width}{TIMES}{height}"


def parse_size(text: str, what: str = "size") -> tuple[int, int]:
    """(width, height) of ``WIDTHxHEIGHT`` (or ``WIDTH×HEIGHT``); one line naming the value otherwise."""
    parts = text.lower().replace(TIMES, "x").split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise UsageError(f"{what} {text!r} is not WIDTHxHEIGHT in pixels; write e.g. 1024x512 (1024 wide, 512 high)")
    width, height = (int(part) for part in parts)
    return width, height


def check_side(label: str, value: int, flag: str) -> None:
    """A UsageError unless ``value`` px is a positive multiple of 8, suggesting the nearest one as ``flag``."""
    if value <= 0 or value % 8:
        raise UsageError(
            f"{label} {value} is not a positive multiple of 8; pass e.g. {flag} {max(8, round(value / 8) * 8)}"
        )
