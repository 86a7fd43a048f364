"""Benchmarks of distlin: ``launch/bench.py SUITE`` writes ``SUITE.json``, ``SUITE.md`` and ``SUITE.png``.

Suites: ``attention`` (one self-attention layer, LinFusion vs SDPA), ``unet`` (one UNet evaluation with FLOPs
and utilisation), ``scaling`` (patch-parallel ranks spawned with torchrun), ``project`` (a labelled
PROJECTION to clusters from the engine's own dry-run byte counts), ``cascade`` (time per stage of the 16K
cascade as a run samples it), ``memory`` (the planner's PREDICTED peak per rank vs resolution and ranks),
``fidelity`` (PSNR of every mode against one plain process), ``sana`` (SANA's exchanges), ``gpu`` (the CUDA fast
path). See ``launch/bench.py --help``.

Shared by the suites: ``hardware`` (GPU peaks and memory, links, the alpha-beta model of an exchange), ``timing``,
``models`` (built-in models, their inputs and FLOPs, and :func:`~distlin.bench.models.run_pipeline`: a pipeline
fitted and prepared as a run does it), ``denoisers``, ``options``, ``report``, ``accounting`` (the engine's dry
run), ``launch``. The ``gpu`` suite's UNet, layout, VAE and compile parts and its end-to-end parts, and the
``cascade`` suite (the run's own sampler, :func:`distlin.run.sample`, with the run's VAE coder,
:func:`distlin.run.vae_coder`), go through :func:`distlin.run.prepare_pipeline`. The others cannot, or measure
something else on purpose: ``project``, ``memory`` and ``sana`` allocate nothing (meta tensors or formulas);
``attention`` times one layer; ``unet`` compares LinFusion with softmax on the architecture's own UNet, mounting
and unmounting the layers on one set of weights (a prepared pipeline holds one attention, so the comparison would
load the model twice), and a prepared UNet carries the run's memory bounds (resnets with in-place activations at
every size), which is not the UNet whose time and memory docs/RESULTS.md reports (the ``gpu`` suite's ``unet``
part times the prepared one); ``fidelity`` compares every engine setting with one plain process, parallelizing
and undoing one loaded pipeline per setting (a prepared pipeline holds one engine setting and would reload the
model for each); ``scaling``'s ranks time the engine alone on a denoiser (a UNet or SANA's transformer).
"""
