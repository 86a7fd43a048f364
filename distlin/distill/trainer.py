"""The training loop: frozen teacher, trainable LinFusion layers, data-parallel over ranks (DDP) with gradient
accumulation, mixed precision, checkpoints every ``save_every`` steps and exact resumption.

``plan_run`` does every check that needs no weights (identically on every rank, before the process group
starts), so bad input costs a second; ``train`` does the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler
from diffusers.utils import logging as diffusers_logging
from huggingface_hub.utils import disable_progress_bars
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from distlin.distill.cache import CachedSamples, cached_conditioning, check_cache_fits, read_manifest
from distlin.distill.checkpoint import (
    CONFIG_FILE,
    LINFUSION_DIR,
    LOG_FILE,
    checkpoint_step,
    checkpoints,
    load_state,
    read_config,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from distlin.distill.config import TrainConfig, autocast, check_resumable
from distlin.distill.data import ImageSamples, ImageSource, open_source
from distlin.distill.encode import Encoders, load_frozen_pipeline
from distlin.distill.losses import TERMS
from distlin.distill.metrics import TrainLog, read_log
from distlin.distill.sampling import BatchLayout, MicroBatchSampler, holdout_keys, noise_and_timesteps
from distlin.distill.student import Distiller, initial_linfusion
from distlin.errors import UsageError
from distlin.io import atomic_write
from distlin.linfusion import LinFusion
from distlin.parallel.runtime import Runtime
from distlin.sizes import format_size


@dataclass
class RunPlan:
    """A checked ``train`` command: the data listed, the split made, the checkpoint to resume found."""

    config: TrainConfig
    layout: BatchLayout
    keys: list[str]
    train_indices: list[int]
    holdout: list[str]
    source: ImageSource | None
    manifest: dict[str, Any] | None
    resume_from: Path | None


def plan_run(config: TrainConfig, world_size: int) -> RunPlan:
    layout = BatchLayout(config.batch_size, config.grad_accum, world_size)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {config.out!r} is a file; pass a folder")
    resume_from = resolve_resume(out, config.resume) if config.resume else None
    done = checkpoint_step(resume_from) if resume_from else None
    if done is not None and config.max_steps < done:
        raise UsageError(
            f"--max-steps {config.max_steps} is below step {done} of {resume_from}; pass --max-steps {done} or more"
        )
    if resume_from is None and ((out / LOG_FILE).exists() or checkpoints(out)):
        raise UsageError(
            f"--out {config.out!r} already holds a training run; pass --resume latest to continue it, or a new --out"
        )
    manifest = source = None
    if config.cache:
        manifest = read_manifest(config.cache)
        check_cache_fits(manifest, config.cache, config.model, config.resolution or manifest["resolution"], config.crop)
        keys = [item["key"] for item in manifest["items"]]
    else:
        source = open_source(config.data)
        keys = source.keys
    # Where eval finds the images, whatever the folder eval runs in.
    data = str(Path(config.data).expanduser().resolve()) if config.data else manifest["data"]
    config = dataclasses.replace(config, data=data)
    if config.holdout >= len(keys):
        raise UsageError(
            f"--holdout {config.holdout} leaves none of the {len(keys)} images for training; pass "
            f"--holdout {max(0, min(8, len(keys) - 1))} or fewer"
        )
    held = holdout_keys(keys, config.holdout)
    held_set = set(held)
    train_indices = [i for i, key in enumerate(keys) if key not in held_set]
    return RunPlan(config, layout, keys, train_indices, held, source, manifest, resume_from)


def _native_resolution(pipe: Any) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


class Trainer:
    """Owns the models, optimizer and data of one run on one rank."""

    def __init__(self, plan: RunPlan, runtime: Runtime):
        cfg = plan.config
        self.plan, self.cfg, self.runtime = plan, cfg, runtime
        self.out = Path(cfg.out)
        device = runtime.device
        pipe = load_frozen_pipeline(cfg.model, device)
        self.resolution = cfg.resolution or (plan.manifest or {}).get("resolution") or _native_resolution(pipe)
        unet = pipe.unet.requires_grad_(False)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # With a cache the VAE and text encoders are not needed: keeping no reference to the pipeline frees them.
        self.encoders = None if plan.manifest else Encoders(pipe, device)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.record = cfg.record(self.resolution, plan.holdout, plan.keys)
        self.start_step, self.skipped, rows = 0, 0, []
        if plan.resume_from:
            check_resumable(read_config(plan.resume_from), self.record, str(plan.resume_from))
            linfusion = LinFusion.from_pretrained(plan.resume_from / LINFUSION_DIR)
            linfusion.check_fits(unet)
            rows = read_log(plan.resume_from / LOG_FILE)
        else:
            linfusion = initial_linfusion(unet, cfg.init, cfg.seed)
        self.linfusion = linfusion.requires_grad_(True)
        self.distiller = Distiller(unet, linfusion, noise_scheduler, cfg.loss_weights)
        self.model: torch.nn.Module = self.distiller
        if runtime.distributed:
            self.model = DistributedDataParallel(self.distiller, device_ids=[device] if device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(linfusion.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
        if plan.resume_from:
            self._restore(load_state(plan.resume_from))
        self.log = TrainLog(self.out, rows[: self.start_step], enabled=runtime.is_main)

    def _restore(self, state: dict[str, Any]) -> None:
        self.start_step, self.skipped = state["step"], state["skipped"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["grad_scaler"])
        rng = state["rng"]
        set_rng_state(rng[self.runtime.rank] if len(rng) == self.runtime.world_size else rng[0], self.runtime.device)

    def _dataset(self) -> torch.utils.data.Dataset:
        plan, cfg = self.plan, self.cfg
        if plan.manifest is not None:
            return CachedSamples(cfg.cache, plan.manifest, plan.train_indices, cfg.seed)
        return ImageSamples(plan.source, plan.train_indices, self.resolution, cfg.crop, cfg.seed)

    def _micro_step(self, batch: dict[str, Any], sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its loss terms (detached)."""
        device, cfg = self.runtime.device, self.cfg
        cond = self.encoders.encode(batch) if self.encoders else cached_conditioning(batch, device)
        positions = batch["position"].tolist()
        noise, timesteps = noise_and_timesteps(
            cfg.seed, "train", positions, cond.latents.shape[1:], self.num_train_timesteps
        )
        no_sync = self.model.no_sync() if self.runtime.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            with autocast(device, cfg.mixed_precision):
                terms = self.model(cond, noise.to(device), timesteps.to(device))
            self.scaler.scale(terms.total / cfg.grad_accum).backward()
        return terms.detached()

    def _optimizer_step(self) -> None:
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.linfusion.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """Mean loss terms over ranks (each already the mean of its micro-batches), summed skip counts."""
        if self.runtime.distributed:
            stats = stats.to(self.runtime.device)
            dist.all_reduce(stats)
            stats[: len(TERMS)] /= self.runtime.world_size
        return stats.cpu()

    def save(self, step: int) -> None:
        """A collective: every rank contributes its RNG state; rank 0 writes."""
        rng = rng_state(self.runtime.device)
        states = [rng]
        if self.runtime.distributed:
            states = [None] * self.runtime.world_size
            dist.all_gather_object(states, rng)
        if self.runtime.is_main:
            state = {
                "step": step,
                "data_position": step * self.cfg.batch_size,
                "skipped": self.skipped,
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "grad_scaler": self.scaler.state_dict(),
                "rng": states,
            }
            self.log.flush()
            save_checkpoint(self.out, step, self.linfusion, state, self.record, self.log.csv_text())
        self.runtime.barrier()

    def run(self) -> None:
        cfg, runtime, plan = self.cfg, self.runtime, self.plan
        if runtime.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(self.record, indent=1) + "\n"))
            layers = len(self.linfusion.layers)
            params = sum(p.numel() for p in self.linfusion.parameters())
            print(
                f"distilling {layers} LinFusion layers ({params:,} parameters) of {cfg.model} at "
                f"{format_size(self.resolution, self.resolution)}: global batch {cfg.batch_size} = "
                f"{runtime.world_size} rank(s) x {cfg.grad_accum} accumulation x {plan.layout.micro_batch}; "
                f"{len(plan.train_indices)} training images, {len(plan.holdout)} held out",
                flush=True,
            )
        sampler = MicroBatchSampler(plan.layout, runtime.rank, self.start_step, cfg.max_steps)
        loader = torch.utils.data.DataLoader(
            self._dataset(), batch_sampler=sampler, num_workers=cfg.workers, pin_memory=runtime.device.type == "cuda"
        )
        batches = iter(loader)
        bar = tqdm(total=cfg.max_steps, initial=self.start_step, unit="step", disable=not runtime.is_main)
        started = time.perf_counter()
        for step in range(self.start_step, cfg.max_steps):
            lr = self.lr_scheduler.get_last_lr()[0]
            terms, skipped = torch.zeros(len(TERMS)), 0
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                skipped += int(batch["skipped"].sum())
                terms += self._micro_step(batch, sync=micro == cfg.grad_accum - 1).cpu() / cfg.grad_accum
            self._optimizer_step()
            stats = self._reduce(torch.cat([terms, torch.tensor([float(skipped)])]))
            self.skipped += int(stats[-1])
            losses = dict(zip(TERMS, stats[:-1].tolist(), strict=True))
            row = {"step": step, **losses, "skipped": self.skipped, "lr": lr}
            self.log.append(row)
            bar.update()
            bar.set_postfix(loss=f"{row['loss']:.4g}", kd=f"{row['loss_kd']:.3g}", feat=f"{row['loss_feat']:.3g}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
                self.save(step + 1)
        bar.close()
        elapsed = time.perf_counter() - started
        if runtime.is_main:
            self._finish(elapsed)

    def _finish(self, elapsed: float) -> None:
        steps = self.cfg.max_steps - self.start_step
        plot = self.log.close()
        if steps:
            print(
                f"trained steps {self.start_step}..{self.cfg.max_steps} in {elapsed:.1f} s "
                f"({1000 * elapsed / steps:.0f} s per 1k steps)"
            )
        if self.skipped:
            print(f"skipped {self.skipped} unreadable image reads")
        print(f"wrote {self.out / LOG_FILE}" + (f" and {plot}" if plot else ""))
        print(f"latest checkpoint: {checkpoints(self.out)[-1]}")


def train(plan: RunPlan, runtime: Runtime) -> None:
    """Run (or continue) the planned training on this rank."""
    if not runtime.is_main:  # loading bars from every rank would interleave with rank 0's
        disable_progress_bars()
        diffusers_logging.disable_progress_bar()
    Trainer(plan, runtime).run()
