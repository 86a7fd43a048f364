"""Output files: checked before any heavy import or work, written atomically so Ctrl-C never leaves half a file.

The temporary file beside an output names its writer (host and pid), so the next run for the same output removes
those a killed writer left (SIGKILL gives no chance to clean up) and leaves a live writer's alone.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import secrets
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distlin.errors import UsageError

if TYPE_CHECKING:  # imported where used: output paths are checked before any heavy import
    import torch
    from PIL import Image

# zlib level 1, the fastest: higher levels spend more time for slightly smaller files on photo-like images.
PNG_COMPRESS_LEVEL = 1


def check_output_path(path: str | os.PathLike[str], suffix: str | tuple[str, ...]) -> Path:
    """Fail early, before minutes of sampling, if ``path`` could not be written.

    Catches a wrong suffix, a missing folder, a folder in the way, a name too long once the temporary file's
    suffix is added, and a folder this process cannot create files in (tried with the temporary file's own name,
    not guessed from mode bits, so root and read-only mounts are right). Removes stale temporary files of ``path``.
    """
    out = Path(path)
    suffixes = (suffix,) if isinstance(suffix, str) else suffix
    suffix = suffixes[0]
    if out.suffix.lower() not in suffixes:
        raise UsageError(
            f"output {str(out)!r} must end in {' or '.join(suffixes)}; pass e.g. {out.with_suffix(suffix)}"
        )
    if out.suffix.lower() in TIFF_SUFFIXES and importlib.util.find_spec("tifffile") is None:
        raise UsageError(f"output {str(out)!r}: tiled TIFF needs the tifffile package; pip install 'distlin[highres]'")
    folder = out.parent
    if not folder.is_dir():
        raise UsageError(f"folder {str(folder)!r} for output {str(out)!r} does not exist; create it first")
    if out.is_dir():
        raise UsageError(f"output {str(out)!r} is a folder; pass a file path ending in {suffix}")
    remove_stale_temporaries(out)
    probe = _temporary(out)  # the very name the final write will use: its length is tried too
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise UsageError(
                f"output name {out.name!r} is too long for its folder (with the temporary file's suffix, "
                f"{len(probe.name)} characters); pass a shorter name"
            ) from None
        raise UsageError(
            f"folder {str(folder)!r} for output {str(out)!r} is not writable; choose another folder"
        ) from None
    return out


def _temporary(out: Path) -> Path:
    """The temporary file this process writes ``out`` through: hidden, beside it, naming this host and pid."""
    return out.with_name(f".{out.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary files of ``out`` whose writer, a process on this host, is gone; returns them."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{re.escape(_host())}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    removed = []
    for candidate in out.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match and not _alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> Path:
    """Call ``writer`` on a temporary file beside ``path``, then rename it over ``path``.

    Readers see the old file or the whole new one, never a partial one; on any error, KeyboardInterrupt
    included, the temporary file is removed and ``path`` is left as it was.
    """
    out = Path(path)
    tmp = _temporary(out)
    try:
        writer(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
TIFF_SUFFIXES = (".tif", ".tiff")
TIFF_TILE = 512


def save_png(path: str | os.PathLike[str], image: Image.Image, metadata: Mapping[str, Any]) -> Path:
    """Write ``image`` as PNG with each ``metadata`` item as a text chunk (``Image.open(path).text``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))  # PIL switches to an iTXt chunk when the value is not Latin-1
    return atomic_write(
        path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    )


def save_image(path: str | os.PathLike[str], image: Image.Image, metadata: Mapping[str, Any]) -> Path:
    """PNG, or for ``.tif``/``.tiff`` a tiled BigTIFF that viewers of huge images can page in tile by tile."""
    if Path(path).suffix.lower() not in TIFF_SUFFIXES:
        return save_png(path, image, metadata)
    import numpy as np
    import tifffile  # optional: only huge-image users need it

    pixels = np.asarray(image)
    text = json.dumps({key: str(value) for key, value in metadata.items()})

    def write(tmp: Path) -> None:
        tifffile.imwrite(
            tmp,
            pixels,
            tile=(TIFF_TILE, TIFF_TILE),
            bigtiff=True,
            photometric="rgb",
            compression="zlib",
            compressionargs={"level": 1},
            description=text,
        )

    return atomic_write(path, write)


def save_latents(path: str | os.PathLike[str], latents: torch.Tensor) -> Path:
    """Write the final latents (before VAE decoding) as safetensors under the key ``latents``."""
    from safetensors.torch import save

    # Serialised in memory (latents are small even at 16K) because save_file would create a 0600 file.
    data = save({"latents": latents.detach().to("cpu").contiguous()})
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
