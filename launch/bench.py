#!/usr/bin/env python
"""Run a benchmark suite: ``python launch/bench.py attention --quick --out runs/bench``. See ``--help``."""

import sys

from distlin.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
