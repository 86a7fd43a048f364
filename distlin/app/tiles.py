"""A Deep Zoom (DZI) tile pyramid of an image, so a viewer loads only the tiles it shows at any zoom.

Layout (Microsoft's Deep Zoom format, as OpenSeadragon reads it): ``name.dzi`` (XML: size, tile size, overlap,
format) beside ``name_files/<level>/<column>_<row>.png``. Level ``L`` is the image scaled by ``2**(L - top)``,
where ``top = ceil(log2(max(width, height)))``: level ``top`` is the full image, level 0 is one pixel. Tiles do
not overlap; edge tiles are smaller. Tiles are lossless PNG, so the deepest level shows the exact pixels.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from distlin.sizes import format_size

TILE_SIZE = 256
TILE_FORMAT = "png"
# zlib level 1: tiles of a 16K image are written in seconds rather than minutes, a little larger.
TILE_COMPRESS_LEVEL = 1
DZI_NAMESPACE = "http://schemas.microsoft.com/deepzoom/2008"


@dataclass(frozen=True)
class PyramidLevel:
    """One level of the pyramid: its index, its size in pixels and its number of tile columns and rows."""

    index: int
    width: int
    height: int
    columns: int
    rows: int


def pyramid_levels(width: int, height: int, tile_size: int = TILE_SIZE) -> list[PyramidLevel]:
    """Every level from 0 (one pixel) to the full size; each is half the next, rounded up."""
    if width < 1 or height < 1 or tile_size < 1:
        raise ValueError(f"pyramid of a {format_size(width, height)} image with {tile_size} px tiles")
    top = math.ceil(math.log2(max(width, height)))
    levels = []
    for index in range(top + 1):
        scale = 2 ** (top - index)
        w, h = math.ceil(width / scale), math.ceil(height / scale)
        levels.append(PyramidLevel(index, w, h, math.ceil(w / tile_size), math.ceil(h / tile_size)))
    return levels


def dzi_descriptor(width: int, height: int, tile_size: int = TILE_SIZE) -> str:
    """The ``.dzi`` XML a deep-zoom viewer starts from."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Image xmlns="{DZI_NAMESPACE}" Format="{TILE_FORMAT}" Overlap="0" TileSize="{tile_size}">'
        f'<Size Width="{width}" Height="{height}"/></Image>\n'
    )


def write_pyramid(image: Image.Image, folder: Path, name: str, tile_size: int = TILE_SIZE, workers: int = 4) -> Path:
    """Write ``folder/name.dzi`` and ``folder/name_files/`` for ``image``; returns the ``.dzi`` path.

    Not atomic by itself: callers write into a temporary folder and rename it into place
    (:class:`distlin.app.results.ResultStore`). PNG encoding releases the GIL, so ``workers`` threads help.
    """
    levels = pyramid_levels(image.width, image.height, tile_size)
    tiles = folder / f"{name}_files"
    scaled = image.convert("RGB")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for level in reversed(levels):
            if scaled.size != (level.width, level.height):
                scaled = scaled.reduce(2)  # a 2x2 box filter; odd sizes round up, as the levels do
            (tiles / str(level.index)).mkdir(parents=True)
            pending += [pool.submit(_write_tiles, scaled, level, tiles, tile_size, row) for row in range(level.rows)]
        for task in pending:
            task.result()
    descriptor = folder / f"{name}.dzi"
    descriptor.write_text(dzi_descriptor(image.width, image.height, tile_size))
    return descriptor


def _write_tiles(level_image: Image.Image, level: PyramidLevel, tiles: Path, tile_size: int, row: int) -> None:
    """One row of tiles of one level."""
    top = row * tile_size
    bottom = min(top + tile_size, level.height)
    for column in range(level.columns):
        left = column * tile_size
        box = (left, top, min(left + tile_size, level.width), bottom)
        path = tiles / str(level.index) / f"{column}_{row}.{TILE_FORMAT}"
        level_image.crop(box).save(path, format="PNG", compress_level=TILE_COMPRESS_LEVEL)
