"""Pictures as the wire carries them: base64 text, the formats and limits both sides apply.

Whoever receives a picture (the WebSocket frame parser, the HTTP routes, the model's
decoder) and whoever sends one (the chat client) agrees here on:

- the wire encoding: standard base64, bare or as a ``data:image/...;base64,`` URL
  (`encode_base64`, `decode_base64`; the size is checked from the text's length before
  anything is decoded);
- the formats a server reads (`FORMATS`) and the exceptions Pillow raises for a file that
  is not one of them or is cut short (`UNREADABLE`);
- the size limits (`ImageLimits`): bytes, pixels a side, source pixels (the bomb guard)
  and decoding cost, checked from a picture's header (`sniff_image`, `check_size`)
  in microseconds, so garbage and decompression bombs are refused before they take a
  queue place or a decoder's memory.

Every refusal raises `PictureRejected` with a protocol v1 error code (`bad_image` or
`too_large`) and the sentence the sender is shown; each side turns it into its own error
type at its edge. Nothing here decodes pixels: the server's model side
(`server/inference/images.py`) and the client's re-encoding (`client/images.py`) do.
Beyond the standard library: Pillow, which both sides already need, and pybase64 (SIMD base64:
~0.07 ms instead of 2.5 ms for a 1.2 MB picture, time the server's parser held the GIL).
"""

from __future__ import annotations

import binascii
import io
import math
import warnings
from dataclasses import dataclass
from typing import Final

import pybase64
from PIL import Image, UnidentifiedImageError

from protocol.v1 import ErrorCode

FORMATS: Final = "PNG, JPEG, WebP, GIF, BMP, TIFF"  # what a server reads, in its refusals
MAX_ASPECT: Final = 150  # longest side / shortest side; the Qwen processor refuses ratios past 200

# What Pillow raises, opening or loading, for bytes that are not a picture it reads or are cut.
UNREADABLE: Final = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError)


class PictureRejected(Exception):
    """A picture refused; `code` is `bad_image` or `too_large`, `message` a sentence for its sender."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 1280 * 32 * 32  # after resizing: what the model sees
    max_source_pixels: int = 100_000_000  # before decoding: the bomb guard
    max_side: int = 16384
    max_decode_pixels: int = 16_777_216  # pixels actually decoded (a JPEG's after reduced decoding)


def encode_base64(data: bytes) -> str:
    """*data* as a frame's ``images`` entry carries it (standard alphabet, padded)."""
    return pybase64.b64encode_as_string(data)


def decode_base64(item: str, number: int, max_bytes: int) -> bytes:
    """Bytes of picture *number*, sent as bare base64 or a ``data:image/...;base64,`` URL.

    The size is checked from the encoded length before anything is decoded. Raises
    `PictureRejected`: `bad_image` (not base64, another kind of data: URL, empty) or
    `too_large` (over *max_bytes*).
    """
    if item.startswith("data:"):
        header, sep, item = item.partition(",")
        if not sep or not header.endswith(";base64"):
            raise PictureRejected(
                ErrorCode.BAD_IMAGE, f"picture {number}: only base64 data: URLs are accepted"
            )
    if len(item) // 4 * 3 > max_bytes + 3:
        raise PictureRejected(
            ErrorCode.TOO_LARGE,
            f"picture {number} is about {len(item) * 3 / 4e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB",
        )
    try:
        data = pybase64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise PictureRejected(ErrorCode.BAD_IMAGE, f"picture {number} is not valid base64") from None
    if len(data) > max_bytes:
        raise PictureRejected(
            ErrorCode.TOO_LARGE,
            f"picture {number} is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB",
        )
    if not data:
        raise PictureRejected(ErrorCode.BAD_IMAGE, f"picture {number} is empty")
    return data


def sniff_image(data: bytes, number: int, max_bytes: int, limits: ImageLimits | None = None) -> None:
    """Refuse what is clearly not a usable picture, reading the header only (microseconds).

    With *limits*, also the sizes the model's decoder would refuse (`check_size`): an edge
    that passes them refuses a decompression bomb before it is queued. Raises
    `PictureRejected` naming picture *number*.
    """
    if not data:
        raise PictureRejected(ErrorCode.BAD_IMAGE, f"picture {number} is empty")
    if len(data) > max_bytes:
        raise PictureRejected(
            ErrorCode.TOO_LARGE,
            f"picture {number} is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB",
        )
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as image:  # reads the header only
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if limits is not None:
                check_size(image, limits)
    except PictureRejected as exc:
        raise PictureRejected(exc.code, f"picture {number}: {exc.message}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PictureRejected(
            ErrorCode.TOO_LARGE, f"picture {number} has too many pixels to decode safely"
        ) from None
    except UNREADABLE:
        raise PictureRejected(
            ErrorCode.BAD_IMAGE, f"picture {number} is not a picture format I can read ({FORMATS})"
        ) from None


def check_size(image: Image.Image, limits: ImageLimits) -> None:
    """Refuse *image* (opened, not loaded) by its header's size; set up reduced JPEG decoding.

    A JPEG is decoded at a reduced scale when it will be shrunk to `max_pixels` anyway (so
    a 50-megapixel photo costs about 3 megapixels of work); other formats cannot be, so
    `max_decode_pixels` refuses e.g. a tiny single-colour 9,000 x 9,000 PNG that would cost
    seconds of CPU and hundreds of MB. Raises `PictureRejected`.
    """
    width, height = image.size
    if width * height > limits.max_source_pixels or max(width, height) > limits.max_side:
        raise PictureRejected(
            ErrorCode.TOO_LARGE,
            f"the picture is {width}x{height} pixels; at most "
            f"{limits.max_source_pixels // 1_000_000} megapixels and {limits.max_side} pixels a side "
            "are accepted",
        )
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT:
        raise PictureRejected(
            ErrorCode.BAD_IMAGE, f"the picture is {width}x{height} pixels: too thin to look at"
        )
    if image.format == "JPEG":
        # Let libjpeg decode at a reduced scale when we will shrink anyway: far less work.
        scale = math.sqrt(limits.max_pixels / (width * height))
        if scale < 0.5:
            image.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
    decoded = image.size[0] * image.size[1]  # after `draft`, the size libjpeg will decode
    if decoded > limits.max_decode_pixels:
        raise PictureRejected(
            ErrorCode.TOO_LARGE,
            f"the picture is {width}x{height} pixels; a {image.format or 'picture'} file is accepted up to "
            f"{limits.max_decode_pixels / 1e6:.0f} megapixels (a JPEG may be larger). "
            "Send a smaller picture or a JPEG.",
        )
