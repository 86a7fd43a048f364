"""Benchmarks of distlin: ``launch/bench.py SUITE`` writes ``SUITE.json``, ``SUITE.md`` and ``SUITE.png``.

Suites: ``attention`` (one self-attention layer, LinFusion vs SDPA), ``unet`` (one UNet evaluation with FLOPs
and utilisation), ``scaling`` (patch-parallel ranks spawned with torchrun), ``project`` (a labelled
PROJECTION to clusters from the engine's own dry-run byte counts), ``cascade`` (time per stage of the 16K
cascade), ``memory`` (the planner's PREDICTED peak per rank vs resolution and ranks), ``fidelity`` (PSNR of every
mode against one plain process), ``sana`` (SANA's exchanges), ``gpu`` (the CUDA fast path). See
``launch/bench.py --help``.

Shared by the suites: ``hardware`` (GPU peaks and memory, links, the alpha-beta model of an exchange), ``timing``,
``models`` (built-in models, their inputs and FLOPs, and :func:`~distlin.bench.models.run_pipeline`: a pipeline
prepared as a run prepares it), ``denoisers``, ``options``, ``report``, ``accounting`` (the engine's dry run),
``launch``. The ``gpu`` suite's UNet, layout, VAE and compile parts and its end-to-end parts go through
:func:`distlin.run.prepare_pipeline`. The others cannot, or measure something else on purpose: ``project``,
``memory`` and ``sana`` allocate nothing (meta tensors or formulas); ``attention`` times one layer; ``unet``
compares LinFusion with softmax on one plain UNet; ``fidelity`` compares every engine setting with one plain
process, parallelizing and undoing one loaded pipeline per setting (a prepared pipeline holds one engine setting
and would reload the model for each); ``scaling``'s ranks time the engine alone on a denoiser (a UNet or SANA's
transformer); ``cascade`` times the plain cascade that docs/RESULTS.md reports.
"""
