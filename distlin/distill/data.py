"""Training images and their captions: a folder (``.txt`` beside each image, or ``metadata.jsonl``/``.csv``, or the
prompt a ``distlin-generate`` PNG carries) or a Hugging Face ``datasets`` dataset saved with ``save_to_disk``.

Every problem that can be seen by listing the data (no folder, no images, an image without a caption, a
metadata row naming a missing file) is a :class:`UsageError` before any model loads. An image that cannot be
decoded only shows when it is read, mid-run: it is skipped, counted and reported, never fatal.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from distlin.distill.sampling import SampleOrder, generator
from distlin.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# What a broken or truncated file raises from PIL (UnidentifiedImageError is an OSError).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Files whose presence marks a folder written by ``datasets.Dataset(Dict).save_to_disk``.
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
CROPS = ("center", "random")


def warn_unreadable(key: str, err: BaseException) -> None:
    print(f"warning: skipping unreadable image {key!r} ({type(err).__name__}: {err})", file=sys.stderr, flush=True)


class ImageSource(Protocol):
    """Captioned images addressed by index; ``keys`` name them (relative paths, or row numbers)."""

    root: Path
    keys: list[str]

    def caption(self, index: int) -> str: ...

    def open(self, index: int) -> Image.Image: ...


@dataclass
class FolderSource:
    """Images under ``root`` (recursively), captioned by ``metadata.jsonl``/``metadata.csv`` if present, else by
    a same-name ``.txt`` file."""

    root: Path
    keys: list[str]
    captions: list[str]

    def caption(self, index: int) -> str:
        return self.captions[index]

    def open(self, index: int) -> Image.Image:
        with Image.open(self.root / self.keys[index]) as image:
            return image.convert("RGB")  # convert() decodes the whole file, so corruption shows here


@dataclass
class HFSource:
    """A ``datasets`` dataset on disk; the image column is the first of type Image, the caption ``text`` or
    ``caption``."""

    root: Path
    keys: list[str]
    dataset: Any
    image_column: str
    text_column: str

    def caption(self, index: int) -> str:
        return str(self.dataset[index][self.text_column])

    def open(self, index: int) -> Image.Image:
        return self.dataset[index][self.image_column].convert("RGB")


def open_source(path: str | os.PathLike[str]) -> ImageSource:
    """The captioned images at ``path``, or one UsageError saying what is wrong and how to fix it."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"--data {str(path)!r} is not a folder; pass a folder of images with captions")
    if any((root / marker).is_file() for marker in HF_MARKERS):
        return _hf_source(root)
    images = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )
    if not images:
        raise UsageError(
            f"--data {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass the folder with the images"
        )
    metadata = next((root / name for name in METADATA_FILES if (root / name).is_file()), None)
    captions = _metadata_captions(metadata, set(images)) if metadata else _txt_captions(root, images)
    return FolderSource(root, images, [captions[key] for key in images])


def _png_prompt(path: Path) -> str | None:
    """The prompt a PNG written by ``distlin-generate`` records in its text chunks, if any."""
    if path.suffix.lower() != ".png":
        return None
    try:
        with Image.open(path) as image:
            return image.text.get("prompt")
    except OSError:
        return None


def _txt_captions(root: Path, images: Sequence[str]) -> dict[str, str]:
    captions = {}
    for key in images:
        txt = (root / key).with_suffix(".txt")
        if not txt.is_file():
            prompt = _png_prompt(root / key)
            if prompt is not None:
                captions[key] = prompt
                continue
            raise UsageError(
                f"image {key!r} in --data {str(root)!r} has no caption; add {txt.name} beside it "
                f"(or a metadata.jsonl with file_name and text)"
            )
        captions[key] = txt.read_text(encoding="utf-8").strip()
    return captions


def _metadata_captions(metadata: Path, images: set[str]) -> dict[str, str]:
    """``file_name -> text`` from the metadata file; every image must have a row and every row an image."""
    try:
        with open(metadata, encoding="utf-8", newline="") as f:
            if metadata.suffix == ".jsonl":
                rows = [json.loads(line) for line in f if line.strip()]
            else:
                rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {metadata} ({type(err).__name__}: {err}); fix the file") from None
    captions = {}
    for line, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise UsageError(f"{metadata} row {line} lacks file_name or text; every row needs both")
        name = Path(str(row["file_name"])).as_posix()
        if name not in images:
            raise UsageError(
                f"{metadata} row {line} names {name!r}, which is not an image in the folder; "
                "fix the row or add the image"
            )
        captions[name] = str(row["text"])
    missing = sorted(images - captions.keys())
    if missing:
        raise UsageError(
            f"image {missing[0]!r} has no row in {metadata} ({len(missing)} images lack one); "
            "add a row with its file_name and text"
        )
    return captions


def _hf_source(root: Path) -> HFSource:
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"--data {str(root)!r} is a Hugging Face datasets folder but `datasets` is not installed; "
            "pip install datasets, or export the images to a folder with .txt captions"
        ) from None
    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            raise UsageError(f"dataset {str(root)!r} has splits {list(loaded)} but no 'train'; save one split")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    image_column = next((name for name, f in loaded.features.items() if isinstance(f, datasets.Image)), None)
    text_column = next((name for name in ("text", "caption") if name in loaded.features), None)
    if image_column is None or text_column is None:
        raise UsageError(
            f"dataset {str(root)!r} needs an Image column and a 'text' or 'caption' column; it has "
            f"{list(loaded.features)}"
        )
    if len(loaded) == 0:
        raise UsageError(f"dataset {str(root)!r} is empty; pass a dataset with images")
    return HFSource(root, [str(i) for i in range(len(loaded))], loaded, image_column, text_column)


def prepare_image(
    image: Image.Image, size: int, crop: str, rng: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize the short side to ``size`` and crop a square: pixels in [-1, 1] (C, H, W), and SDXL's micro-
    conditioning ``(orig_h, orig_w, crop_top, crop_left, size, size)`` as the SDXL training recipe sets it."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if crop == "random":
        top = int(torch.randint(new_h - size + 1, (1,), generator=rng))
        left = int(torch.randint(new_w - size + 1, (1,), generator=rng))
    else:
        top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32)
    pixels = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
    time_ids = torch.tensor([height, width, top, left, size, size], dtype=torch.float32)
    return pixels.contiguous(), time_ids


class ImageSamples(torch.utils.data.Dataset):
    """Training samples by stream position: the item the seeded order puts there, read and cropped.

    An unreadable image is replaced by the item at the next position (a rule of the position alone, so all
    world sizes agree), reported once per worker and counted in the sample's ``skipped``.
    """

    def __init__(self, source: ImageSource, indices: Sequence[int], size: int, crop: str, seed: int):
        self.source = source
        self.indices = list(indices)
        self.size = size
        self.crop = crop
        self.seed = seed
        self.order = SampleOrder(len(self.indices), seed)
        self._reported: set[int] = set()

    def __getitem__(self, position: int) -> dict[str, Any]:
        for attempt in range(len(self.indices)):
            index = self.indices[self.order.item(position + attempt)]
            try:
                image = self.source.open(index)
            except UNREADABLE as err:
                self._report(index, err)
                continue
            rng = generator(self.seed, "crop", position) if self.crop == "random" else None
            pixels, time_ids = prepare_image(image, self.size, self.crop, rng)
            return {
                "position": position,
                "pixels": pixels,
                "caption": self.source.caption(index),
                "time_ids": time_ids,
                "skipped": attempt,
            }
        raise UsageError(f"no image in --data {str(self.source.root)!r} could be read; check the files")

    def _report(self, index: int, err: BaseException) -> None:
        if index not in self._reported:
            self._reported.add(index)
            warn_unreadable(self.source.keys[index], err)
