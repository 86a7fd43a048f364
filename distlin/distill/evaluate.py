"""How close the distilled student is to its teacher, at the training size and beyond.

For held-out images encoded at 1x, 2x and 4x the training size, noised at fixed timesteps with fixed noise,
the relative MSE ``sum |student - teacher|^2 / sum |teacher|^2`` of the UNet outputs. LinFusion claims that
layers distilled at one resolution hold at larger ones; a ratio that stays flat across scales supports it. The
same number for the layers training started from (``init``) shows what the training bought.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from distlin.distill.checkpoint import LINFUSION_DIR, checkpoint_step, read_config
from distlin.distill.config import autocast
from distlin.distill.data import UNREADABLE, ImageSource, open_source, prepare_image, warn_unreadable
from distlin.distill.encode import Encoders, load_frozen_pipeline, predict
from distlin.distill.losses import squared_error_sums
from distlin.distill.sampling import generator
from distlin.distill.student import initial_linfusion, mounted
from distlin.errors import UsageError
from distlin.io import atomic_write
from distlin.linfusion import LinFusion
from distlin.sizes import format_size

DEFAULT_SCALES = (1, 2, 4)


def eval_keys(config: dict[str, Any], source: ImageSource, data_given: bool, max_items: int) -> list[str]:
    """The run's held-out images, or the first ``max_items`` of a folder passed with ``--data``."""
    if data_given:
        return source.keys[:max_items]
    keys = config["holdout_keys"]
    if not keys:
        raise UsageError(
            "the run was trained with --holdout 0, so nothing is held out; pass --data DIR with "
            "images it did not train on"
        )
    missing = sorted(set(keys) - set(source.keys))
    if missing:
        raise UsageError(
            f"held-out image {missing[0]!r} is not in {str(source.root)!r}; pass --data with the training data folder"
        )
    return keys


class _Scorer:
    """Sums of squared student-teacher differences and of squared teacher outputs, per student."""

    def __init__(self, pipe: Any, students: dict[str, LinFusion], seed: int, mixed_precision: str):
        self.pipe, self.students, self.seed = pipe, students, seed
        self.device = pipe.unet.device
        self.encoders = Encoders(pipe, self.device)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.mixed_precision = mixed_precision

    def timesteps(self, count: int) -> list[int]:
        """``count`` timesteps evenly spread over the training range (midpoints of equal bins)."""
        total = self.scheduler.config.num_train_timesteps
        return [int((j + 0.5) * total / count) for j in range(count)]

    @torch.no_grad()
    def row(self, source: ImageSource, keys: list[str], size: int, timesteps: list[int]) -> dict[str, float | None]:
        """Relative MSE per student over ``keys`` x ``timesteps`` at ``size`` pixels."""
        sums = {name: [0.0, 0.0] for name in self.students}
        index = {key: i for i, key in enumerate(source.keys)}
        unet = self.pipe.unet
        for item, key in enumerate(keys):
            try:
                image = source.open(index[key])
            except UNREADABLE as err:
                warn_unreadable(key, err)
                continue
            pixels, time_ids = prepare_image(image, size, "center")
            batch = {"pixels": pixels[None], "caption": [source.caption(index[key])], "time_ids": time_ids[None]}
            cond = self.encoders.encode(batch)
            for j, t in enumerate(timesteps):
                draw = generator(self.seed, f"eval-{size}", item * len(timesteps) + j)
                noise = torch.randn(cond.latents.shape, generator=draw).to(self.device)
                t_batch = torch.tensor([t], device=self.device)
                noisy = self.scheduler.add_noise(cond.latents, noise, t_batch)
                with autocast(self.device, self.mixed_precision):
                    teacher = predict(unet, noisy, t_batch, cond)
                    for name, linfusion in self.students.items():
                        with mounted(linfusion, unet):
                            err, ref = squared_error_sums(predict(unet, noisy, t_batch, cond), teacher)
                        sums[name][0] += err
                        sums[name][1] += ref
        return {f"{name}_rel_mse": err / ref if ref else None for name, (err, ref) in sums.items()}


def evaluate(
    checkpoint: Path,
    device: torch.device,
    data: str | None = None,
    max_items: int = 16,
    scales: tuple[int, ...] = DEFAULT_SCALES,
    num_timesteps: int = 4,
    baseline: bool = True,
    mixed_precision: str = "no",
) -> dict[str, Any]:
    """The evaluation report of one checkpoint (also written there as ``eval.json`` and ``eval.md``)."""
    config = read_config(checkpoint)
    source = open_source(data or config["data"])
    keys = eval_keys(config, source, data is not None, max_items)
    pipe = load_frozen_pipeline(config["model"], device)
    students = {"student": LinFusion.from_pretrained(checkpoint / LINFUSION_DIR)}
    if baseline:
        students["init"] = initial_linfusion(pipe.unet, config["init"], config["seed"])
    scorer = _Scorer(pipe, students, config["seed"], mixed_precision)
    timesteps = scorer.timesteps(num_timesteps)
    rows = []
    for scale in scales:
        size = config["resolution"] * scale
        errors = scorer.row(source, keys, size, timesteps)
        rows.append({"scale": scale, "size": size, "latent_size": size // pipe.vae_scale_factor, **errors})
    report = {
        "checkpoint": str(checkpoint),
        "step": checkpoint_step(checkpoint),
        "model": config["model"],
        "resolution": config["resolution"],
        "images": keys,
        "timesteps": timesteps,
        "rows": rows,
    }
    atomic_write(checkpoint / "eval.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"))
    table = markdown_table(report)
    atomic_write(checkpoint / "eval.md", lambda tmp: tmp.write_text(table))
    return report


def markdown_table(report: dict[str, Any]) -> str:
    has_init = "init_rel_mse" in report["rows"][0]
    lines = [
        f"Student vs teacher UNet output, relative MSE (checkpoint step {report['step']}, {report['model']}, "
        f"{len(report['images'])} held-out images x timesteps {report['timesteps']}):",
        "",
        "| scale | image size | latent size | student rel. MSE |" + (" init rel. MSE |" if has_init else ""),
        "|---|---|---|---|" + ("---|" if has_init else ""),
    ]
    for row in report["rows"]:
        cells = [
            f"{row['scale']}x",
            format_size(row["size"], row["size"]),
            format_size(row["latent_size"], row["latent_size"]),
            _number(row["student_rel_mse"]),
        ]
        if has_init:
            cells.append(_number(row["init_rel_mse"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
