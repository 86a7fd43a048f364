"""The app's output folder: one sub-folder per finished generation, named by the app, written atomically.

``<root>/<id>/`` holds ``image.png`` (with the run's metadata as PNG text chunks, like the command line's),
``metadata.json``, ``thumbnail.jpg`` for the gallery and the deep-zoom pyramid ``image.dzi`` +
``image_files/``. Everything is written into ``<root>/.<id>.tmp/`` and renamed into place, so a folder either
is complete or does not exist; nothing in a request decides a path.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from distlin.app.tiles import TILE_SIZE, write_pyramid
from distlin.errors import UsageError
from distlin.io import save_png

RESULT_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}")
THUMBNAIL_SIZE = 384
IMAGE_NAME = "image"


@dataclass(frozen=True)
class SavedResult:
    """A finished generation on disk; paths are inside the store's root."""

    id: str
    folder: Path

    @property
    def image(self) -> Path:
        return self.folder / f"{IMAGE_NAME}.png"

    @property
    def thumbnail(self) -> Path:
        return self.folder / "thumbnail.jpg"

    @property
    def dzi(self) -> Path:
        return self.folder / f"{IMAGE_NAME}.dzi"

    def metadata(self) -> dict[str, Any]:
        return json.loads((self.folder / "metadata.json").read_text())


class ResultStore:
    """Writes and lists results under ``root`` (created if missing)."""

    def __init__(self, root: str | Path, tile_size: int = TILE_SIZE):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.tile_size = tile_size

    def save(self, image: Image.Image, metadata: Mapping[str, Any]) -> SavedResult:
        """Write the image, its metadata, a thumbnail and the tile pyramid as one new result folder."""
        result_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        staging = self.root / f".{result_id}.tmp"
        staging.mkdir()
        try:
            save_png(staging / f"{IMAGE_NAME}.png", image, metadata)
            text = json.dumps({key: _jsonable(value) for key, value in metadata.items()}, indent=2)
            (staging / "metadata.json").write_text(text + "\n")
            thumbnail = image.convert("RGB")
            thumbnail.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            thumbnail.save(staging / "thumbnail.jpg", quality=90)
            write_pyramid(image, staging, IMAGE_NAME, self.tile_size)
            staging.rename(self.root / result_id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return SavedResult(result_id, self.root / result_id)

    def results(self) -> list[SavedResult]:
        """Every finished result, newest first."""
        found = [path for path in self.root.iterdir() if path.is_dir() and RESULT_ID.fullmatch(path.name)]
        return [SavedResult(path.name, path) for path in sorted(found, key=lambda p: p.name, reverse=True)]

    def get(self, result_id: str) -> SavedResult:
        """The result with this id; UsageError for anything that is not an existing result's id."""
        folder = self.root / result_id
        if not RESULT_ID.fullmatch(result_id) or not folder.is_dir():
            raise UsageError(f"no result {result_id!r}")
        return SavedResult(result_id, folder)


def _jsonable(value: Any) -> Any:
    """Metadata values as JSON keeps them (numbers, strings, lists); anything else as its text."""
    try:
        json.dumps(value)
    except TypeError:
        return str(value)
    return value
