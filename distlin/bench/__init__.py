"""Benchmarks of distlin: ``launch/bench.py SUITE`` writes ``SUITE.json``, ``SUITE.md`` and ``SUITE.png``.

Suites: ``attention`` (one self-attention layer, LinFusion vs SDPA), ``unet`` (one UNet evaluation with FLOPs
and utilisation), ``scaling`` (patch-parallel ranks spawned with torchrun), ``project`` (a labelled
PROJECTION to clusters from the engine's own dry-run byte counts). See ``launch/bench.py --help``.
"""
