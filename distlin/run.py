"""One generation, top to bottom: what the command line, the web app and the Python API all run.

:func:`prepare_pipeline` is the ordered list of rewrites applied to an unmodified diffusers pipeline (the
torchtitan ``parallelize_*`` pattern); :func:`generate` fits the run to the device, samples (one pass or a
cascade) and decodes. Nothing here parses flags or writes files: callers do (:mod:`distlin.cli.generate`).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image

import distlin
from distlin.components import (
    apply_ip_adapter,
    apply_loras,
    ip_adapter_scales,
    pipeline_for,
)
from distlin.errors import Cancelled, UsageError
from distlin.families import family_of_pipeline, load
from distlin.inputs import load_rgb
from distlin.lean import bound_memory
from distlin.loading import load_pipeline, mount_linfusion, parse_dtype
from distlin.memory.fit import check_host_memory, fit_to_capacity, host_capacity, local_ranks, saver_flags
from distlin.ops.kernels import check_kernel
from distlin.parallel.comm import CommStats
from distlin.parallel.compile import compile_unet
from distlin.parallel.pipeline import parallelize
from distlin.parallel.runtime import Runtime, init_runtime
from distlin.parallel.unet import ParallelUNet
from distlin.progress import phase, plural
from distlin.sampling.stages import Stage, StageClock
from distlin.schedulers import build_scheduler, unet_calls
from distlin.settings import RunSettings, check_sizes
from distlin.sizes import format_size
from distlin.sources import NO_LINFUSION
from distlin.vae.coders import Coder, SizedCoder, decode_latents, run_coder

# Built-in weights and fresh LinFusion layers always come from this seed, so --seed only changes the noise.
WEIGHTS_SEED = 0


@dataclass(frozen=True)
class Progress:
    """Where a generation is: ``step`` of ``steps`` UNet evaluations in cascade stage ``stage`` of ``stages``."""

    stage: int
    stages: int
    step: int
    steps: int


ProgressReport = Callable[[Progress], None]


@dataclass
class Prepared:
    """A pipeline rewritten for a run: the parallel UNet handle, the VAE coder, the exchange counters and the
    model's own scheduler (a generation may swap in another, :func:`sample`)."""

    pipe: Any
    engine: ParallelUNet
    vae: Coder  # the band-parallel coder (the family's parallelize_vae)
    unet_stats: CommStats
    vae_stats: CommStats
    key: tuple  # pipeline_key of the settings it was prepared for
    scheduler: Any = None


def pipeline_key(settings: RunSettings) -> tuple:
    """The settings a prepared pipeline depends on (a web app keeps it across requests with the same key)."""
    return (
        settings.model,
        settings.linfusion,
        settings.dtype,
        settings.device,
        settings.engine,
        settings.attention_kernel,
        settings.compile,
        settings.thresholds,
        settings.loras,
        settings.controlnet,
        settings.ip_adapter,
        settings.ip_image_encoder,
    )


def prepare_pipeline(settings: RunSettings, runtime: Runtime) -> Prepared:
    """Load the model and apply, in this order, every rewrite a run needs; each is a function applied to the
    unmodified pipeline, and none changes the image (``exact`` mode):

    1. load the diffusers pipeline on this rank's device;
    2. LinFusion replaces every self-attention (``attn1``), or softmax stays (``--linfusion none``);
    3. LoRAs (``--lora``) fused into the UNet (LinFusion layers included) and text encoders; they may also be
       loaded after patch parallelism, whose convs adopt the ones PEFT adds beside them;
    4. ControlNets (``--controlnet``, one or several): the pipeline's ControlNet variant;
    5. an IP-Adapter (``--ip-adapter``): its image encoder, and its processors on every cross-attention
       (``attn2``, token by token: nothing to exchange); the self-attention keeps LinFusion's processors;
    6. memory bounds: token-chunked transformers, in-place resnets, index-safe upsampling (UNet, ControlNets and
       VAE);
    7. patch parallelism: the UNet's convs, GroupNorms and self-attention work on row bands, then every
       ControlNet's on the same engine (its residuals come out as this rank's band);
    8. the band-parallel VAE (decode and encode between cascade stages): bands on several ranks; on one rank
       the same layers keep every kernel call below the index limit;
    9. ``--compile``: torch.compile of the UNet's pure-compute modules (feed-forwards, cross-attention,
       LinFusion's projections); the engine's exchanges stay eager (:mod:`distlin.parallel.compile`).
    """
    limits = settings.thresholds
    with phase(f"loading the model {settings.model} on {runtime.device}"):
        pipe = load_pipeline(settings.model, parse_dtype(settings.dtype), runtime.device, WEIGHTS_SEED)
    family = family_of_pipeline(pipe)
    for feature, used in (
        ("linfusion", settings.linfusion != NO_LINFUSION),
        ("compile", settings.compile),
        ("controlnet", bool(settings.controlnet)),
        ("several_controlnets", len(settings.controlnet) > 1),
        ("ip_adapter", bool(settings.ip_adapter)),
    ):
        family.refuse(feature, used)
    with phase(f"LinFusion layers ({settings.linfusion})"):
        mount_linfusion(pipe, settings.linfusion, WEIGHTS_SEED, kernel=settings.attention_kernel)
    if settings.loras:
        with phase(f"fusing {plural(len(settings.loras), 'LoRA')}"):
            apply_loras(pipe, settings.loras)
    if settings.controlnet:
        controlnets = []
        for source in settings.controlnet:
            with phase(f"loading the ControlNet {source}"):
                controlnets.append(load(family.load_controlnet)(source, pipe))
        pipe = load(family.controlnet_pipeline)(pipe, controlnets)
    if settings.ip_adapter:
        with phase(f"loading {plural(len(settings.ip_adapter), 'IP-Adapter')} and the image encoder"):
            apply_ip_adapter(pipe, settings.ip_adapters)
    with phase(f"parallelize on {plural(runtime.world_size, 'rank')} (memory bounds, bands, VAE)"):
        for model in (family.denoiser_of(pipe), pipe.vae, getattr(pipe, "controlnet", None)):
            if model is not None:
                bound_memory(model, limits.token_chunk, limits.index_limit)
        handle = parallelize(pipe, settings.engine, runtime)  # the ControlNets too; hides the bar off rank 0
        vae_stats = CommStats()
        vae = load(family.parallelize_vae)(pipe.vae, runtime, stats=vae_stats, index_limit=limits.index_limit)
    if settings.compile:
        with phase("compile (set up; the first step compiles)"):
            compile_unet(pipe.unet)
    return Prepared(pipe, handle, vae, handle.ctx.stats, vae_stats, pipeline_key(settings), pipe.scheduler)


def device_capacity(settings: RunSettings, runtime: Runtime) -> int | None:
    """Bytes a run must fit per rank: ``DISTLIN_DEVICE_MEMORY`` if set, the GPU's memory on CUDA, else None."""
    capacity = settings.thresholds.device_memory
    if capacity is None and runtime.device.type == "cuda":
        capacity = torch.cuda.get_device_properties(runtime.device).total_memory
    return capacity


def kept_or_prepared(
    prepared: Prepared | None, settings: RunSettings, runtime: Runtime, release: Callable[[], None] = lambda: None
) -> Prepared:
    """``prepared`` while its :func:`pipeline_key` is the settings', else a new pipeline, after ``release()`` (which
    may drop the caller's reference to the old one, so two large models are never held together)."""
    if prepared is not None and prepared.key == pipeline_key(settings):
        return prepared
    del prepared
    release()
    return prepare_pipeline(settings, runtime)


def held_bytes(prepared: Prepared | None, world_size: int) -> int:
    """Host RAM the prepared pipelines of this machine's ranks hold (each rank the same): their modules' weights
    on the CPU. A run reuses or frees them before it loads, so its fit counts them as available."""
    if prepared is None:
        return 0
    modules = [m for m in prepared.pipe.components.values() if isinstance(m, torch.nn.Module)]
    tensors = (t for m in modules for t in itertools.chain(m.parameters(), m.buffers()) if t.device.type == "cpu")
    return sum(t.numel() * t.element_size() for t in tensors) * local_ranks(world_size)


def fitted_settings(
    settings: RunSettings,
    runtime: Runtime,
    host_ram: Callable[[RunSettings, int], int | None] = host_capacity,
    held: Prepared | None = None,
) -> RunSettings:
    """On a GPU (or with ``DISTLIN_DEVICE_MEMORY`` set), the settings with memory savers switched on until the
    plan fits, or a one-line refusal; on a CPU, a refusal of a run the machine's RAM (``host_ram``: this
    process's view by default, given the bytes ``held`` pipelines take) cannot hold; elsewhere the settings as
    they are. ``held``: the pipeline this process holds, which the run reuses or frees before it loads. The one
    fit of a run and the web app's."""
    capacity = device_capacity(settings, runtime)
    if capacity is None:
        if runtime.device.type == "cpu":
            host = host_ram(settings, held_bytes(held, runtime.world_size))
            if host is not None:
                check_host_memory(settings, runtime.world_size, local_ranks(runtime.world_size), host)
        return settings
    return fit_to_capacity(settings, runtime.world_size, capacity, str(runtime.device))


def fit_to_device(settings: RunSettings, runtime: Runtime, held: Prepared | None = None) -> RunSettings:
    """:func:`fitted_settings` with the least RAM any rank sees (every rank refuses or none does); prints the
    savers it chose on rank 0."""
    fitted = fitted_settings(settings, runtime, lambda s, b: _agreed_host_capacity(s, runtime, b), held)
    flags = saver_flags(settings, fitted)
    if flags and runtime.is_main:
        print(f"note: to fit {runtime.device}, running with {flags} (same image)", flush=True)
    return fitted


def _agreed_host_capacity(settings: RunSettings, runtime: Runtime, held: int) -> int | None:
    """The least RAM any rank sees (:func:`host_capacity`; None: unknown), so every rank refuses or none does."""
    capacity = host_capacity(settings, held)
    if not runtime.distributed:
        return capacity
    least = torch.tensor([capacity or UNKNOWN_CAPACITY], dtype=torch.int64)
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    return None if int(least.item()) == UNKNOWN_CAPACITY else int(least.item())


UNKNOWN_CAPACITY = 2**62  # a rank that cannot read its machine's RAM sends this: it never wins the minimum


@dataclass
class Result:
    """What a generation produced: the final latents on every rank, the image on rank 0 (None elsewhere), the
    settings it ran with (memory savers included), its exchange counters and wall seconds per part (each
    stage, then ``decode``)."""

    latents: torch.Tensor
    image: Image.Image | None
    settings: RunSettings
    comm: dict[str, Any]
    metadata: dict[str, Any]
    seconds: dict[str, float]


class StepMonitor:
    """A forward hook on the UNet: reports progress on rank 0 and, when asked, stops every rank at the same
    UNet call (rank 0 decides, one broadcast of a flag per call) by raising :class:`~distlin.errors.Cancelled`."""

    def __init__(
        self,
        runtime: Runtime,
        settings: RunSettings,
        on_progress: ProgressReport | None,
        should_stop: Callable[[], bool] | None,
        stage_calls: Callable[[int], int],
    ):
        self.runtime, self.on_progress, self.should_stop = runtime, on_progress, should_stop
        self.stages = settings.stages or (Stage(settings.height, settings.width),)
        self.stage_calls = stage_calls  # UNet evaluations of a stage, by its index
        self.stage, self.calls = 0, 0

    def next_stage(self, index: int, stage: Stage, seconds: float) -> None:
        self.stage, self.calls = index + 1, 0

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.calls += 1
        if self.on_progress is not None and self.runtime.is_main:
            total = self.stage_calls(self.stage)
            self.on_progress(Progress(self.stage, len(self.stages), min(self.calls, total), total))
        if self.should_stop is None:
            return
        stop = torch.tensor([int(self.runtime.is_main and self.should_stop())], device=self.runtime.device)
        if self.runtime.distributed:
            dist.broadcast(stop, src=0)
        if stop.item():
            raise Cancelled("generation cancelled")


def denoising_steps(settings: RunSettings, index: int) -> int:
    """Denoising steps of cascade stage ``index`` (0 for one pass): all of them from noise, the last
    ``int(steps * strength)`` when refining a picture (an earlier stage's, or ``--init-image``)."""
    if index == 0 and settings.init_image is None:
        return settings.steps
    strength = settings.strength if index == 0 else settings.stages[index].strength
    return int(settings.steps * strength)


def _stage_printer(runtime: Runtime, settings: RunSettings) -> Callable[[int, Stage, float], None] | None:
    """Rank 0 prints one line per finished cascade stage: its size, steps and wall time (nothing for one pass,
    which a family's sampler may run as a one-stage cascade)."""
    if not runtime.is_main or not settings.stages:
        return None
    count = len(settings.stages)

    def report(index: int, stage: Stage, seconds: float) -> None:
        size, steps = format_size(stage.width, stage.height), plural(denoising_steps(settings, index), "step")
        print(f"stage {index + 1}/{count} {size} px, {steps}: {seconds:.1f} s", flush=True)

    return report


def metadata(settings: RunSettings, runtime: Runtime) -> dict[str, Any]:
    """What an output file records: every generation setting, where it ran, and the versions that made it."""
    import diffusers

    return {
        **settings.metadata(),
        "device": str(runtime.device),
        "world_size": runtime.world_size,
        "distlin_version": distlin.__version__,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
    }


def sample(
    prepared: Prepared,
    settings: RunSettings,
    coder: Coder,
    on_stage: Callable[[int, Stage, float], None] | None = None,
) -> torch.Tensor:
    """The final latents of one pass or of the preset's cascade (SDXL: DemoFusion-style; SD: SDEdit; between
    stages ``coder`` decodes and encodes: the run's :func:`vae_coder`, or a wrapper of it), with the scheduler
    asked for, from noise or from ``--init-image`` (inpainting where ``--mask`` is white), with a ControlNet's
    control image and an IP-Adapter's reference picture (every stage) if there are; ``on_stage`` gets each
    cascade stage's wall time as it ends."""
    pipe = prepared.pipe
    own = prepared.scheduler
    pipe.scheduler = own if settings.scheduler is None else build_scheduler(settings.scheduler, own.config)
    family = family_of_pipeline(pipe)
    family.refuse("mask", settings.mask is not None)
    common = {
        **dict(family.call_options),
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt or family.no_negative_prompt,
        "guidance_scale": settings.guidance_scale,
    }
    if "negative_prompt" not in inspect.signature(pipe.__call__).parameters:  # SANA-Sprint: guidance is an embedding
        if settings.negative_prompt:
            raise UsageError(f"{type(pipe).__name__} takes no negative prompt; drop --negative-prompt")
        del common["negative_prompt"]
    if settings.ip_image:  # the scales are per generation: a web app keeps the pipeline across scales
        pipe.set_ip_adapter_scale(ip_adapter_scales(settings.ip_adapters))
        common["ip_adapter_image"] = [load_rgb(path, "--ip-image") for path in settings.ip_image]
    if family.cascade and (settings.stages or settings.init_image is not None or settings.controlnet):
        return _family_cascade(prepared, settings, coder, on_stage, common)
    if not settings.stages:
        height, width = settings.height, settings.width
        inputs: dict[str, Any] = {"height": height, "width": width}
        if settings.init_image is not None:
            pipe = pipeline_for("image-to-image" if settings.mask is None else "inpainting", pipe)
            inputs = {
                "image": load_rgb(settings.init_image, "--init-image", (width, height)),
                "strength": settings.strength,
            }
        if settings.mask is not None:
            inputs.update(mask_image=load_rgb(settings.mask, "--mask", (width, height)), height=height, width=width)
        if settings.controlnet:
            # the image-to-image pipelines (and SANA's) take it as control_image, the others as image
            control = "control_image" if "control_image" in inspect.signature(pipe.__call__).parameters else "image"
            inputs[control] = _control_images(settings, Stage(height, width))
            inputs["controlnet_conditioning_scale"] = _control_scale(settings)
        latents = pipe(
            num_inference_steps=settings.steps,
            generator=torch.Generator(device="cpu").manual_seed(settings.seed),
            output_type="latent",
            **inputs,
            **common,
        ).images
        return latents
    from distlin.sampling.demofusion import run_demofusion
    from distlin.sampling.sdedit import run_sdedit

    cascade = {
        "on_stage": on_stage,
        "stages": settings.stages,
        "steps": settings.steps,
        "seed": settings.seed,
        "vae": coder,
    }
    first = settings.stages[0]
    if settings.controlnet:
        cascade["controls"] = [_control_images(settings, stage) for stage in settings.stages]
        cascade["control_scale"] = _control_scale(settings)
    if settings.init_image is not None:
        picture = load_rgb(settings.init_image, "--init-image", (first.width, first.height))
        cascade["init_image"] = pipe.image_processor.preprocess(picture)
    if not hasattr(pipe, "text_encoder_2"):
        return run_sdedit(pipe, **cascade, **common)
    skipped = 2**settings.init_stage  # stages before the init image's, each half the next
    native = Stage(first.height // skipped, first.width // skipped)
    return run_demofusion(pipe, native=native, handle=prepared.engine, **cascade, **common)


def _family_cascade(
    prepared: Prepared,
    settings: RunSettings,
    vae: Coder,
    on_stage: Callable[[int, Stage, float], None] | None,
    common: dict[str, Any],
) -> torch.Tensor:
    """A family's own cascade sampler: the preset's stages, or one stage refining ``--init-image`` or from noise
    (a ControlNet's run: its control image, at every stage's size, encoded by ``vae``, the run's coder)."""
    pipe = prepared.pipe
    stages = settings.stages or (Stage(settings.height, settings.width, settings.strength or 1.0),)
    init = None
    if settings.init_image is not None:
        first = stages[0]
        init = pipe.image_processor.preprocess(
            load_rgb(settings.init_image, "--init-image", (first.width, first.height))
        )
    cascade = load(family_of_pipeline(pipe).cascade)
    if settings.controlnet:
        common = {**common, "controls": [_control_images(settings, stage) for stage in stages]}
        common["controlnet_conditioning_scale"] = _control_scale(settings)
    return cascade(pipe, stages, settings.steps, settings.seed, vae, prepared.engine, on_stage, init, **common)


def _control_images(settings: RunSettings, stage: Stage) -> Any:
    """The control image at ``stage``'s size, as the ControlNet pipelines take it: one picture for one ControlNet,
    a list (in order) for several."""
    images = [load_rgb(path, "--control-image", (stage.width, stage.height)) for path in settings.control_image]
    return images[0] if len(images) == 1 else images


def _control_scale(settings: RunSettings) -> float | list[float]:
    """The conditioning scale as the ControlNet pipelines take it: a number for one ControlNet, a list for several."""
    scales = list(settings.control_scales)
    return scales[0] if len(scales) == 1 else scales


def vae_coder(prepared: Prepared, settings: RunSettings, runtime: Runtime) -> SizedCoder:
    """The run's VAE coder: what decodes and encodes, per image size, the cascade's between stages and the final
    decode (:func:`~distlin.vae.coders.run_coder`, with the model family's sequential coder if it has one)."""
    family = family_of_pipeline(prepared.pipe)
    return run_coder(
        prepared.pipe.vae,
        prepared.vae,
        runtime,
        vae_decode=settings.vae_decode,
        thresholds=settings.thresholds,
        attention_rows=settings.vae_attention_rows,
        vae_store=settings.vae_store,
        factor=family.latent_factor(prepared.pipe.vae.config),
        sequential=family.sequential_vae,
        sequential_coder=load(family.sequential_coder) if family.sequential_coder else None,
        holds_less=load(family.sequential_holds_less) if family.sequential_holds_less else None,
    )


def final_image(
    latents: torch.Tensor,
    prepared: Prepared,
    settings: RunSettings,
    runtime: Runtime,
    coder: SizedCoder,
    output_type: str = "pil",
) -> Any:
    """The run's final decode of ``latents`` with its ``coder`` (:func:`vae_coder`): the image on rank 0 (PIL, or
    with ``output_type="pt"`` RGB in [0, 1]); None elsewhere. Every rank calls it: a banded decode needs them all.
    """
    height, width = settings.height, settings.width
    if not runtime.is_main and coder.is_sequential(height, width):  # rank 0 decodes alone; banded: every rank
        return None
    image = decode_latents(prepared.pipe, latents, coder.at(height, width).decode, output_type)
    return image if runtime.is_main else None


def generate(
    settings: RunSettings,
    runtime: Runtime | None = None,
    prepared: Prepared | None = None,
    on_progress: ProgressReport | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Result:
    """One image from ``settings`` on the ranks of ``runtime`` (default: join torchrun's group, or one process).

    ``prepared`` reuses a pipeline from an earlier call with the same :func:`pipeline_key`; ``on_progress``
    (rank 0) sees every UNet evaluation; ``should_stop`` (asked on rank 0 at every UNet evaluation) cancels
    the run on every rank at the same step with :class:`~distlin.errors.Cancelled`. A cancellable run
    broadcasts rank 0's answer at every evaluation, so pass ``should_stop`` on every rank or on none (the other
    ranks' function is never asked: ``lambda: False`` will do).
    """
    check_kernel(settings.attention_kernel, settings.device)
    runtime = runtime or init_runtime(settings.backend, settings.timeout_s, settings.device)
    check_kernel(settings.attention_kernel, str(runtime.device))  # device auto: known now, before any loading
    settings = fit_to_device(settings, runtime, held=prepared)
    prepared = kept_or_prepared(prepared, settings, runtime)
    pipe, engine = prepared.pipe, prepared.engine
    warn_long_prompt(pipe, settings, runtime)
    # before any collective: every rank fails alike
    check_sizes(settings, lambda height, width: engine.check_size(height, width, settings.guidance))
    demofusion = hasattr(pipe, "text_encoder_2") and bool(settings.stages)

    def stage_calls(index: int) -> int:
        """UNet evaluations of a stage; DemoFusion evaluates twice per step above the native size (the full
        cascade's stage 0)."""
        dilated = demofusion and index + settings.init_stage > 0
        return unet_calls(settings.scheduler, denoising_steps(settings, index)) * (2 if dilated else 1)

    monitor = StepMonitor(runtime, settings, on_progress, should_stop, stage_calls)
    printer = _stage_printer(runtime, settings)

    timings: dict[str, float] = {}

    def on_stage(index: int, stage: Stage, seconds: float) -> None:
        timings[f"stage {index + 1}"] = seconds
        monitor.next_stage(index, stage, seconds)
        if printer is not None:
            printer(index, stage, seconds)

    prepared.unet_stats.reset()
    prepared.vae_stats.reset()
    hook = family_of_pipeline(pipe).denoiser_of(pipe).register_forward_hook(monitor)
    coder = vae_coder(prepared, settings, runtime)
    clock = StageClock(None)
    try:
        latents = sample(prepared, settings, coder, on_stage)
    finally:
        hook.remove()
    if not settings.stages:
        timings["stage 1"] = clock.seconds(latents)
    clock = StageClock(None)
    image = final_image(latents, prepared, settings, runtime, coder)
    timings["decode"] = clock.seconds(latents)
    denoiser = family_of_pipeline(pipe).denoiser  # "unet", "transformer": the report names the model's own part
    comm = {denoiser: prepared.unet_stats.summary(), "vae": prepared.vae_stats.totals()}
    return Result(latents, image, settings, comm, metadata(settings, runtime), timings)


def warn_long_prompt(pipe: Any, settings: RunSettings, runtime: Runtime) -> None:
    """One line on rank 0 when a prompt is longer than the text encoder reads (CLIP: 77 tokens)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or not runtime.is_main:
        return
    for name in ("prompt", "negative_prompt"):
        count = len(tokenizer(getattr(settings, name)).input_ids)
        if count > tokenizer.model_max_length:
            print(
                f"note: the {name.replace('_', ' ')} is {count} tokens; the text encoder reads the first "
                f"{tokenizer.model_max_length}, the rest is ignored",
                flush=True,
            )
