"""Benchmarks of distlin: ``launch/bench.py SUITE`` writes ``SUITE.json``, ``SUITE.md`` and ``SUITE.png``.

Suites: ``attention`` (one self-attention layer, LinFusion vs SDPA), ``unet`` (one UNet evaluation with FLOPs
and utilisation), ``scaling`` (patch-parallel ranks spawned with torchrun), ``project`` (a labelled
PROJECTION to clusters from the engine's own dry-run byte counts), ``cascade`` (time per stage of the 16K
cascade), ``memory`` (the planner's PREDICTED peak per rank vs resolution and ranks). See ``launch/bench.py --help``.
"""
