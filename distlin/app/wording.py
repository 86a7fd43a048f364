"""The command line's refusals as the page says them: its fields' names where a message names a flag.

The checks are the command line's (one rule, one place: :func:`distlin.settings.build_settings`), so their
messages name flags ("pass e.g. --height 96"); on the page the user has a height field, not a flag.
"""

from __future__ import annotations

import re

# Flags whose page field is labelled otherwise than the flag's words ("--init-image" is the "init image" field).
FIELD_LABELS = {
    "ip-image": "IP-Adapter reference picture",
    "ip-adapter": "IP-Adapter",
    "ip-scale": "IP-Adapter scale",
    "controlnet": "ControlNet",
    "lora": "LoRAs",
    "preset": "preset",
}
_PASS = re.compile(r"pass (e\.g\. )?--([a-z][a-z0-9-]*) ([^\s;,()]+)")
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def field_label(flag: str) -> str:
    """The page's name for a flag given without its dashes: ``init-image`` -> ``init image``."""
    return FIELD_LABELS.get(flag, flag.replace("-", " "))


def in_field_terms(message: str) -> str:
    """``pass e.g. --height 96`` -> ``set height to e.g. 96``; any other ``--flag`` -> its field's name."""
    message = _PASS.sub(lambda m: f"set {field_label(m[2])} to {m[1] or ''}{m[3]}", message)
    return _FLAG.sub(lambda m: field_label(m[1]), message)
