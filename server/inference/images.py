"""Safe picture decoding: bytes in, a bounded RGB PIL image out (no torch here).

Every picture that reaches the model passes through `decode_image`, which enforces the
byte limit, refuses decompression bombs before decoding pixels, refuses pictures whose
decoding would cost more than `max_decode_pixels` (a JPEG is decoded at a reduced scale
when it will be shrunk anyway, so a 50-megapixel phone photo costs about 3 megapixels of
work; other formats cannot be decoded reduced: a tiny single-colour 9,000 x 9,000 PNG
costs seconds of CPU and hundreds of MB), follows EXIF
orientation, takes the first frame of animations, flattens transparency onto white,
converts every mode (P, LA, CMYK, I;16, ...) to RGB and shrinks the picture so it has at
most `max_pixels` pixels. Problems raise `BadImage` or `TooLarge` with a sentence a user
can act on. `sniff_image` makes the cheap part of these checks (the header) for the
edges that want to refuse garbage before it takes a queue place.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import BadImage, TooLarge

MIN_SIDE = 32  # one merged vision token is 32x32 pixels
MAX_ASPECT = 150  # the Qwen processor refuses ratios past 200


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 1280 * 32 * 32  # after resizing: what the model sees
    max_source_pixels: int = 100_000_000  # before decoding: the bomb guard
    max_side: int = 16384
    max_decode_pixels: int = 16_777_216  # pixels actually decoded (a JPEG's after reduced decoding)


def _flatten(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        image = image.point(lambda value: value / 256).convert("L")
    return image.convert("RGB")


def _shrink(image: Image.Image, max_pixels: int) -> Image.Image:
    width, height = image.size
    if width * height <= max_pixels and min(width, height) >= MIN_SIDE:
        return image
    scale = math.sqrt(max_pixels / (width * height)) if width * height > max_pixels else 1.0
    new_w, new_h = max(MIN_SIDE, int(width * scale)), max(MIN_SIDE, int(height * scale))
    if new_w * new_h > max_pixels:  # the MIN_SIDE floor on a thin picture
        new_w, new_h = max(MIN_SIDE, new_w - 1), max(MIN_SIDE, new_h - 1)
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)


FORMATS = "PNG, JPEG, WebP, GIF, BMP, TIFF"


def sniff_image(data: bytes, number: int, max_bytes: int, limits: ImageLimits | None = None) -> None:
    """Refuse what is clearly not a usable picture, reading the header only (microseconds).

    With *limits*, also the sizes `decode_image` would refuse. Raises BadImage or TooLarge
    naming picture *number*.
    """
    if not data:
        raise BadImage(f"picture {number} is empty")
    if len(data) > max_bytes:
        raise TooLarge(f"picture {number} is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB")
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as image:  # reads the header only
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if limits is not None:
                _check_size(image, limits)
    except (TooLarge, BadImage) as exc:
        raise type(exc)(f"picture {number}: {exc.message}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge(f"picture {number} has too many pixels to decode safely") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise BadImage(f"picture {number} is not a picture format I can read ({FORMATS})") from None


def _check_size(image: Image.Image, limits: ImageLimits) -> None:
    """Refuse *image* (opened, not loaded) by its header's size; set up reduced JPEG decoding."""
    width, height = image.size
    if width * height > limits.max_source_pixels or max(width, height) > limits.max_side:
        raise TooLarge(
            f"the picture is {width}x{height} pixels; at most "
            f"{limits.max_source_pixels // 1_000_000} megapixels and {limits.max_side} pixels a side "
            "are accepted"
        )
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT:
        raise BadImage(f"the picture is {width}x{height} pixels: too thin to look at")
    if image.format == "JPEG":
        # Let libjpeg decode at a reduced scale when we will shrink anyway: far less work.
        scale = math.sqrt(limits.max_pixels / (width * height))
        if scale < 0.5:
            image.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
    decoded = image.size[0] * image.size[1]  # after `draft`, the size libjpeg will decode
    if decoded > limits.max_decode_pixels:
        raise TooLarge(
            f"the picture is {width}x{height} pixels; a {image.format or 'picture'} file is accepted up to "
            f"{limits.max_decode_pixels / 1e6:.0f} megapixels (a JPEG may be larger). "
            "Send a smaller picture or a JPEG."
        )


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode *data* into an RGB image of at most `limits.max_pixels` pixels.

    Raises TooLarge (bytes, dimensions or decoding cost over the limits) or BadImage
    (not a picture, truncated, or too thin to see).
    """
    if not data:
        raise BadImage("the picture is empty")
    if len(data) > limits.max_bytes:
        raise TooLarge(
            f"the picture is {len(data) / 1e6:.1f} MB; the limit is {limits.max_bytes / 1e6:.1f} MB"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            image.seek(0)  # first frame of a GIF/WebP animation
            _check_size(image, limits)
            image.load()
            image = ImageOps.exif_transpose(image) or image
    except (TooLarge, BadImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge("the picture has too many pixels to decode safely") from None
    except UnidentifiedImageError:
        raise BadImage(f"this is not a picture format I can read ({FORMATS})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(f"the picture could not be decoded ({exc})") from None
    return _shrink(_flatten(image), limits.max_pixels)
