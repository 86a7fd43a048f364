#!/usr/bin/env python
"""Distil LinFusion layers: ``python launch/distill.py train --preset tiny-sd15 --data DIR --out runs/x``.

Under ``torchrun --nproc-per-node N`` the ``train`` command runs data-parallel over N ranks. See ``--help``.
"""

import sys

from distlin.distill.cli import main

if __name__ == "__main__":
    sys.exit(main())
