"""The user's pictures (init image, mask, control and IP-Adapter images), decoded in one place and one way.

Every picture is decoded completely before it is used, by the command line before any model loads and by the web
app before a request is broadcast to the ranks, so a truncated or corrupt file, a decompression bomb, a device or
FIFO named as a file, or a format outside the usual ones is one :class:`~distlin.errors.UsageError` naming the
flag (or field) and the fix, never a traceback after minutes of loading nor a rank that fails alone. PIL's global
settings (its bomb limit, truncated-image loading) are left as they are. Torch-free.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING

from distlin.errors import UsageError

if TYPE_CHECKING:  # imported where used: PIL is only needed once a picture is given
    from PIL import Image

# The largest picture accepted: 16384 x 8192 px (a 128-megapixel control image of a 16K-wide output). PIL's own
# limit warns from ~89 Mpx and refuses from ~179 Mpx; ours refuses above this, whatever PIL's setting.
MAX_INPUT_PIXELS = 16384 * 8192
# Formats decoded by Pillow itself (no external program such as Ghostscript is ever run on a user's file).
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
FIX = "pass a complete PNG, JPEG, WebP, BMP, GIF or TIFF file"


def open_regular(path: str | os.PathLike[str], what: str) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file: never blocks on a FIFO, never reads a device."""
    name = Path(path).expanduser()
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UsageError(f"{what} {str(path)!r} does not exist; pass an image file") from None
    except OSError as err:
        raise UsageError(f"{what} {str(path)!r} cannot be read ({err.strerror}); pass a readable image file") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{what} {str(path)!r} is not a regular file (a folder, device or pipe); pass an image file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _decode(source: IO[bytes], what: str, shown: str) -> Image.Image:
    """The fully decoded picture in ``source``, or a UsageError naming ``what`` ``shown``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL warns between its own limit and ours: ours decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source, formats=FORMATS)
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise Image.DecompressionBombError(f"{width}x{height} px")
        image.load()
    except Image.DecompressionBombError:
        raise UsageError(
            f"{what}{shown} has more than {MAX_INPUT_PIXELS} pixels (the limit of a picture); pass a smaller picture"
        ) from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise UsageError(f"{what}{shown} is not a complete image ({reason}); {FIX}") from None
    return image


def decode_image(data: bytes, what: str) -> Image.Image:
    """A picture from its file's bytes (a web request's upload), decoded and checked."""
    return _decode(io.BytesIO(data), what, "")


def read_image(path: str | os.PathLike[str], what: str) -> Image.Image:
    """A picture from a regular file, decoded and checked (``what`` names the flag, e.g. ``--mask``)."""
    with open_regular(path, what) as file:
        image = _decode(file, what, f" {str(path)!r}")
    return image


def check_image(path: str | os.PathLike[str], what: str) -> tuple[int, int]:
    """The (width, height) of a picture file, after decoding it whole (so truncation is found now)."""
    return read_image(path, what).size


def load_rgb(path: str | os.PathLike[str], what: str, size: tuple[int, int] | None = None) -> Image.Image:
    """A picture file as RGB, resized (bicubic) to ``size`` (width, height) when given."""
    return to_rgb(read_image(path, what), size)


def to_rgb(image: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
    """``image`` as RGB, resized (bicubic) to ``size`` (width, height) when given and different."""
    from PIL import Image

    rgb = image.convert("RGB")
    return rgb if size is None or rgb.size == size else rgb.resize(size, Image.Resampling.BICUBIC)
