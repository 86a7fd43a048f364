#!/usr/bin/env python
"""The web app: ``python launch/app.py`` (one device) or ``torchrun --nproc-per-node N launch/app.py``.

Open http://127.0.0.1:7860; see ``--help`` and docs/APP.md.
"""

from distlin.app import entry_point

if __name__ == "__main__":
    entry_point()
