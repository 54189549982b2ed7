"""Pictures for the client: read a file (or stdin), check it, and re-encode only when useful.

A PNG, JPEG or WebP that is already within the limits is sent byte for byte (no
generation loss). Anything else (an animated GIF or WebP, a TIFF or BMP, a picture over
`max_pixels` or `max_bytes`) is decoded, turned upright by its EXIF orientation, reduced
to its first frame, shrunk to at most `max_pixels` and re-encoded: PNG when it has
transparency or is small, JPEG (quality 90) otherwise. The server still validates
everything; this only keeps uploads small and in formats it accepts.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from client.errors import PictureError
from protocol.pictures import UNREADABLE

MAX_PIXELS = 2048 * 2048  # the model sees at most ~1.3 MP by default; more is wasted upload
MAX_BYTES = 8 * 1024 * 1024
# Refuse decompression bombs before decoding pixels (below the 179 MP past which Pillow's
# own DecompressionBombError comes first; that one gets the same sentence).
MAX_SOURCE_PIXELS = 150_000_000
_PASS_THROUGH = {"PNG", "JPEG", "WEBP"}
_TOO_MANY_PIXELS = "too many pixels to be a sensible picture"


@dataclass(frozen=True, slots=True)
class Picture:
    """An encoded picture ready to send, with what the user should be told about it."""

    name: str
    data: bytes
    width: int
    height: int
    format: str  # of `data`: PNG, JPEG or WEBP
    reencoded: bool

    def describe(self) -> str:
        size = f"{len(self.data) / 1024:.0f} KB" if len(self.data) >= 1024 else f"{len(self.data)} B"
        how = ", re-encoded" if self.reencoded else ""
        return f"{self.name} ({self.width}x{self.height} {self.format}, {size}{how})"


def read_picture(
    path: str, stdin: BinaryIO | None = None, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES
) -> Picture:
    """Read *path* ("-" means *stdin*, a binary stream) into a `Picture`.

    Raises `PictureError` with a sentence naming the file when it cannot be read or is
    not a picture Pillow knows.
    """
    if path == "-":
        if stdin is None:
            raise PictureError("--image -: no standard input to read the picture from")
        raw = stdin.read()
        name = "stdin"
    else:
        name = Path(path).name
        try:
            raw = Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise PictureError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not raw:
        raise PictureError(f"{name}: empty file, not a picture")
    return prepare_picture(name, raw, max_pixels=max_pixels, max_bytes=max_bytes)


def prepare_picture(
    name: str, raw: bytes, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES
) -> Picture:
    """Check *raw* is a picture and return it as it should be sent (see the module docstring)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > MAX_SOURCE_PIXELS:
                raise PictureError(f"{name}: {width}x{height} is {_TOO_MANY_PIXELS}")
            animated = bool(getattr(image, "is_animated", False))
            fmt = (image.format or "").upper()
            oriented = image.getexif().get(0x0112, 1) not in (0, 1)
            if (
                fmt in _PASS_THROUGH
                and not animated
                and width * height <= max_pixels
                and len(raw) <= max_bytes
            ):
                image.load()  # a truncated file fails here, not on the server
                return Picture(name, raw, width, height, fmt, reencoded=False)
            image.seek(0)  # first frame of an animation
            frame = ImageOps.exif_transpose(image) if oriented else image.copy()
    except PictureError:
        raise
    except Image.DecompressionBombError:
        raise PictureError(f"{name}: {_TOO_MANY_PIXELS}") from None
    except UNREADABLE as exc:
        detail = "not a picture Pillow can read" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise PictureError(f"{name}: {detail}") from None
    return _reencode(name, frame, max_pixels, max_bytes)


def _reencode(name: str, image: Image.Image, max_pixels: int, max_bytes: int) -> Picture:
    if image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if alpha:
        image = image.convert("RGBA")
        data = _encode(image, "PNG")
        if len(data) <= max_bytes:
            return Picture(name, data, image.width, image.height, "PNG", reencoded=True)
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image, mask=image.getchannel("A"))
        image = flat
    else:
        image = image.convert("RGB")
    fmt = "PNG" if image.width * image.height <= 256 * 256 else "JPEG"
    data = _encode(image, fmt)
    if len(data) > max_bytes and fmt == "PNG":
        fmt, data = "JPEG", _encode(image, "JPEG")
    if len(data) > max_bytes:
        raise PictureError(f"{name}: still {len(data)} bytes after re-encoding (limit {max_bytes})")
    return Picture(name, data, image.width, image.height, fmt, reencoded=True)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=90, optimize=True)
    else:
        image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()
