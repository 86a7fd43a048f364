"""Benchmarks of distlin: ``launch/bench.py SUITE`` writes ``SUITE.json``, ``SUITE.md`` and ``SUITE.png``.

Suites: ``attention`` (one self-attention layer, LinFusion vs SDPA), ``unet`` (one UNet evaluation with FLOPs
and utilisation), ``scaling`` (patch-parallel ranks spawned with torchrun), ``project`` (a labelled
PROJECTION to clusters from the engine's own dry-run byte counts), ``cascade`` (time per stage of the 16K
cascade as a run samples it), ``memory`` (the planner's PREDICTED peak per rank vs resolution and ranks),
``fidelity`` (PSNR of every mode against one process), ``sana`` (SANA's exchanges), ``gpu`` (the CUDA fast
path). See ``launch/bench.py --help``.

Shared by the suites: ``hardware`` (GPU peaks and memory, links, the alpha-beta model of an exchange), ``timing``,
``models`` (built-in models, their inputs and FLOPs, and :func:`~distlin.bench.models.run_pipeline`: a pipeline
fitted and prepared as a run does it), ``denoisers``, ``options``, ``report``, ``accounting`` (the engine's dry
run), ``launch``. Every suite that generates images builds its pipelines through :func:`distlin.run.prepare_pipeline`
(via :func:`~distlin.bench.models.run_pipeline`) and samples and decodes them as a run does: the ``gpu`` suite's
UNet, layout, VAE, compile and end-to-end parts, ``cascade`` (the run's sampler, :func:`distlin.run.sample`, and
VAE coder, :func:`distlin.run.vae_coder`) and ``fidelity`` (one prepared pipeline per engine setting, decoded by
:func:`distlin.run.final_image`). The others build no pipeline: ``project``, ``memory`` and ``sana`` allocate
nothing (meta tensors or formulas); ``attention`` times one layer; ``unet`` compares LinFusion with softmax on the
architecture's own UNet, mounting and unmounting the layers on one set of weights, without the run's memory
bounds (resnets with in-place activations at every size), as docs/RESULTS.md reports it (the ``gpu`` suite's
``unet`` part times the prepared one); ``scaling``'s ranks time the engine alone on a denoiser (a UNet or SANA's
transformer).
"""
