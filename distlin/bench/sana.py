"""SANA-1600M's exchange bytes per step on N ranks: the engine's dry-run counters against Ulysses' all-to-alls.

The transformer runs on meta tensors through the band engine with a dry-run communicator (every exchange counted
for the middle rank, none sent), so the bytes are the engine's own accounting at sizes no CPU could run. Ulysses
(sequence parallelism, xDiT's path for SANA) moves each self-attention's Q, K, V and output through an
all-to-all: ``4 · B · T/N · hidden · bytes · (N-1)/N`` received per rank and layer.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from distlin.bench import options
from distlin.bench.report import SuiteResult, dtype_name, finish_axes, fmt_bytes, markdown_table, new_figure, ranks_axis
from distlin.parallel.comm import CommStats
from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.context import ParallelContext
from distlin.parallel.runtime import Runtime

DEFAULT_DTYPE = torch.bfloat16
# SANA-1600M (diffusers' SanaTransformer2DModel defaults): 20 layers, 70 heads of 32 (2240 wide), patch 1.
SANA_1600M: dict[str, Any] = {"num_layers": 20, "num_attention_heads": 70, "attention_head_dim": 32}
SANA_1600M |= {"patch_size": 1, "sample_size": 128}
DC_AE_FACTOR = 32
TEXT_TOKENS, BATCH = 300, 2  # Gemma-2 tokens; the two guidance halves


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sizes = "square image sizes in pixels"
    options.add(parser, "--height", [4096, 8192, 16384], [1024, 2048], sizes, type=options.int_list)
    options.add(parser, "--ranks", [2, 4, 8], [2, 8], "numbers of GPUs", type=options.int_list)


def engine_bytes(height: int, ranks: int, dtype: torch.dtype) -> dict[str, float]:
    """Bytes per step by kind the middle rank receives, counted by the engine on meta tensors."""
    from diffusers import SanaTransformer2DModel

    from distlin.families.sana.transformer import ParallelSanaTransformer

    with torch.device("meta"):
        model = torch.nn.Module.to(SanaTransformer2DModel.from_config(SANA_1600M), dtype=dtype).eval()
    config = PatchParallelConfig(check_finite=False, cfg_parallel=False)
    ctx = ParallelContext(Runtime(), config, dry_run_ranks=ranks, stats=CommStats())
    handle = ParallelSanaTransformer(model, ctx, DC_AE_FACTOR).apply()
    rows = height // DC_AE_FACTOR
    with torch.no_grad(), torch.device("meta"):
        model(
            hidden_states=torch.empty(BATCH, model.config.in_channels, rows, rows, dtype=dtype),
            encoder_hidden_states=torch.empty(BATCH, TEXT_TOKENS, model.config.caption_channels, dtype=dtype),
            timestep=torch.empty(BATCH),
        )
    handle.undo()
    return dict(ctx.stats.summary()["bytes_per_step"])


def ulysses_bytes(height: int, ranks: int, dtype: torch.dtype) -> float:
    """Bytes per step per rank of Ulysses' four all-to-alls (Q, K, V, output) in every self-attention."""
    hidden = SANA_1600M["num_attention_heads"] * SANA_1600M["attention_head_dim"]
    local = BATCH * (height // DC_AE_FACTOR) ** 2 / ranks * hidden * torch.finfo(dtype).bits // 8
    return 4 * local * (ranks - 1) / ranks * SANA_1600M["num_layers"]


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> SuiteResult:
    records = [
        {"height": height, "ranks": ranks, "dtype": dtype_name(dtype), "engine": engine_bytes(height, ranks, dtype)}
        | {"ulysses_total": ulysses_bytes(height, ranks, dtype)}
        for height in args.height
        for ranks in args.ranks
    ]
    rows = [
        [r["height"], r["ranks"], *(fmt_bytes(r["engine"][k]) for k in ("attention", "halo", "gather", "total"))]
        + [fmt_bytes(r["ulysses_total"]), f"{r['ulysses_total'] / r['engine']['total']:.1f}x"]
        for r in records
    ]
    table = markdown_table(
        ["px", "ranks", "attention", "halo", "gather", "distlin total", "Ulysses", "Ulysses / distlin"], rows
    )
    figure, (ax,) = new_figure(1)
    for height in args.height:
        mine = [r for r in records if r["height"] == height]
        ax.plot([r["ranks"] for r in mine], [r["engine"]["total"] for r in mine], "o-", label=f"distlin {height} px")
        ax.plot([r["ranks"] for r in mine], [r["ulysses_total"] for r in mine], "x--", label=f"Ulysses {height} px")
    ax.set_yscale("log")
    ax.set_ylabel("bytes per step per rank")
    ranks_axis(ax)
    finish_axes(ax)
    note = "Per denoising step (batch 2: both guidance halves), received by the middle rank; SANA-1600M, patch 1."
    return SuiteResult(records, f"{note}\n\n{table}\n", figure, label="COUNTED by the engine on meta tensors")
