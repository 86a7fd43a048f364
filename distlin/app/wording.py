"""The command line's refusals as the page says them: its fields' names where a message names a flag, and no
path on the server.

The checks are the command line's (one rule, one place: :func:`distlin.settings.build_settings`), so their
messages name flags ("pass e.g. --height 96") and files ("--mask '/tmp/distlin-uploads-x/mask'"); on the page the
user has a height field and an uploaded picture, and the server's folders are none of a user's business.
"""

from __future__ import annotations

import re

from distlin.app.request import UPLOADS  # each upload's file name on a rank's disk

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
# An absolute path, quoted as the command line quotes it, or bare (not inside a word, a fraction or a URL), and
# the flag that names it, if one does.
_PATH = re.compile(r"(?:--([a-z][a-z0-9-]*) )?(?:'(/[^']*)'|\"(/[^\"]*)\"|(?<![\w.:/~])(/[^\s'\",;()]+))")


def field_label(flag: str) -> str:
    """The page's name for a flag given without its dashes: ``init-image`` -> ``init image``."""
    return FIELD_LABELS.get(flag, flag.replace("-", " "))


def in_field_terms(message: str) -> str:
    """``pass e.g. --height 96`` -> ``set height to e.g. 96``; any other ``--flag`` -> its field's name; a path
    -> ``the uploaded mask`` (an upload's file on a rank) or ``a file on the server``."""
    message = _PATH.sub(lambda m: _path_terms(m[1], m[2] or m[3] or m[4]), message)
    message = _PASS.sub(lambda m: f"set {field_label(m[2])} to {m[1] or ''}{m[3]}", message)
    return _FLAG.sub(lambda m: field_label(m[1]), message)


def _path_terms(flag: str | None, path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if name in UPLOADS:
        return f"the uploaded {field_label(name.replace('_', '-'))}"
    return f"{field_label(flag)} (a file on the server)" if flag else "a file on the server"
