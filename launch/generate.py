#!/usr/bin/env python
"""Generate one image from a preset: ``python launch/generate.py --preset tiny-sd15 --output tiny.png``.

Under ``torchrun --nproc-per-node N`` the same command runs patch-parallel over N ranks. See ``--help``.
"""

import sys

from distlin.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
