"""Precomputed VAE latents and text embeddings, so training runs the frozen encoders zero times instead of once
per sample per epoch.

A cache is a folder of ``shard-NNNNN.safetensors`` files (rows: ``latents``, ``prompt_embeds`` and, for SDXL,
``pooled`` and ``time_ids``) and a ``manifest.json`` naming the model, resolution and source data. The manifest
is written last, so a folder without one is an unfinished cache. Images are center-cropped: a random crop
cannot be precomputed once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

from distlin.distill.data import UNREADABLE, ImageSource, prepare_image, warn_unreadable
from distlin.distill.encode import Conditioning, Encoders
from distlin.distill.sampling import SampleOrder
from distlin.errors import UsageError
from distlin.io import atomic_write

MANIFEST = "manifest.json"
CACHE_FORMAT = 1
# Conditioning fields stored per row, in the order of the Conditioning constructor.
CACHED_FIELDS = ("latents", "prompt_embeds", "pooled", "time_ids")


class _CacheImages(torch.utils.data.Dataset):
    """Center-cropped images by source index; an unreadable one comes back as ``None`` to be skipped."""

    def __init__(self, source: ImageSource, size: int):
        self.source = source
        self.size = size

    def __len__(self) -> int:
        return len(self.source.keys)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            image = self.source.open(index)
        except UNREADABLE as err:
            warn_unreadable(self.source.keys[index], err)
            return None
        pixels, time_ids = prepare_image(image, self.size, "center")
        return {"index": index, "pixels": pixels, "caption": self.source.caption(index), "time_ids": time_ids}


def _collate_readable(samples: list[dict[str, Any] | None]) -> tuple[dict[str, Any] | None, int]:
    readable = [s for s in samples if s is not None]
    batch = torch.utils.data.default_collate(readable) if readable else None
    return batch, len(samples) - len(readable)


class _ShardWriter:
    """Buffers encoded rows and writes them ``shard_size`` at a time, each shard atomically."""

    def __init__(self, out: Path, shard_size: int):
        self.out = out
        self.shard_size = shard_size
        self.keys: list[str] = []
        self.buffers: dict[str, list[torch.Tensor]] = {}
        self.items: list[dict[str, Any]] = []
        self.shards = 0

    def add(self, keys: Sequence[str], cond: Conditioning) -> None:
        self.keys += keys
        for name in CACHED_FIELDS:
            if getattr(cond, name) is not None:
                self.buffers.setdefault(name, []).append(getattr(cond, name).cpu())
        while len(self.keys) >= self.shard_size:
            self._write(self.shard_size)

    def close(self) -> list[dict[str, Any]]:
        if self.keys:
            self._write(len(self.keys))
        return self.items

    def _write(self, rows: int) -> None:
        name = f"shard-{self.shards:05d}.safetensors"
        stacked = {field: torch.cat(parts) for field, parts in self.buffers.items()}
        data = save({field: t[:rows].contiguous() for field, t in stacked.items()})
        atomic_write(self.out / name, lambda tmp: tmp.write_bytes(data))
        self.items += [{"key": key, "shard": name, "row": row} for row, key in enumerate(self.keys[:rows])]
        self.keys = self.keys[rows:]
        self.buffers = {field: [t[rows:]] for field, t in stacked.items()}
        self.shards += 1


def write_cache(
    source: ImageSource,
    encoders: Encoders,
    out: Path,
    model: str,
    resolution: int,
    batch_size: int,
    shard_size: int,
    workers: int,
) -> dict[str, Any]:
    """Encode every readable image of ``source`` into ``out``; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(
        _CacheImages(source, resolution), batch_size=batch_size, num_workers=workers, collate_fn=_collate_readable
    )
    writer = _ShardWriter(out, shard_size)
    skipped = 0
    for batch, lost in tqdm(loader, desc="cache", unit="batch"):
        skipped += lost
        if batch is not None:
            writer.add([source.keys[i] for i in batch["index"].tolist()], encoders.encode(batch))
    items = writer.close()
    if not items:
        raise UsageError(f"no image in --data {str(source.root)!r} could be read; nothing was cached")
    manifest = {
        "format": CACHE_FORMAT,
        "model": model,
        "resolution": resolution,
        "data": str(source.root),
        "sdxl": encoders.sdxl,
        "skipped": skipped,
        "items": items,
    }
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))
    return manifest


def read_manifest(cache: str | Path) -> dict[str, Any]:
    """The manifest of a finished cache, or a UsageError saying how to make one."""
    path = Path(cache).expanduser() / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(
            f"--cache {str(cache)!r} has no readable {MANIFEST} ({type(err).__name__}); build it "
            "with `launch/distill.py cache --data DIR --out CACHE`"
        ) from None
    if manifest.get("format") != CACHE_FORMAT:
        raise UsageError(
            f"--cache {str(cache)!r} has format {manifest.get('format')}, not {CACHE_FORMAT}; "
            "rebuild it with `launch/distill.py cache`"
        )
    return manifest


def check_cache_fits(manifest: dict[str, Any], cache: str | Path, model: str, resolution: int, crop: str) -> None:
    """A cache is only valid for the model and resolution it was encoded with, and a center crop."""
    for what, have, want in (("model", manifest["model"], model), ("resolution", manifest["resolution"], resolution)):
        if have != want:
            raise UsageError(
                f"--cache {str(cache)!r} was built for {what} {have!r}, not {want!r}; rebuild it or "
                f"train with --{what} {have}"
            )
    if crop != "center":
        raise UsageError("--crop random cannot use --cache (cached latents are center crops); use --crop center")


class CachedSamples(torch.utils.data.Dataset):
    """Training samples by stream position, read from the cache's shards (memory-mapped by safetensors)."""

    def __init__(self, cache: str | Path, manifest: dict[str, Any], indices: Sequence[int], seed: int):
        self.root = Path(cache).expanduser()
        self.items = [manifest["items"][i] for i in indices]
        self.order = SampleOrder(len(self.items), seed)

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.items[self.order.item(position)]
        row = item["row"]
        with safe_open(self.root / item["shard"], framework="pt") as shard:
            sample = {name: shard.get_slice(name)[row : row + 1][0] for name in shard.keys()}
        return {"position": position, "skipped": 0, **sample}


def cached_conditioning(batch: dict[str, Any], device: torch.device) -> Conditioning:
    """A collated cache batch as UNet inputs on the device."""
    return Conditioning(*(batch[name].to(device) if name in batch else None for name in CACHED_FIELDS))
