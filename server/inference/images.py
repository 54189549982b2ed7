"""Pictures for the model: bytes in, a bounded RGB PIL image out (no torch here).

Every picture that reaches the model passes through `decode_image`, which enforces the
byte limit and the header checks the edges also make (`protocol.pictures.check_size`:
dimensions, the decompression-bomb guard, the decoding budget, reduced JPEG decoding),
then decodes, follows EXIF orientation, takes the first frame of animations, flattens
transparency onto white, converts every mode (P, LA, CMYK, I;16, ...) to RGB and shrinks
the picture so it has at most `max_pixels` pixels. Problems raise `BadImage` or
`TooLarge` with a sentence a user can act on. What the edges check before queueing
(`sniff_image`), the limits (`ImageLimits`) and the base64 wire form live in
`protocol.pictures`, shared with the chat client.
"""

from __future__ import annotations

import io
import math
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from protocol.pictures import FORMATS, UNREADABLE, ImageLimits, PictureRejected, check_size
from server.errors import BadImage, RequestError, TooLarge

MIN_SIDE = 32  # one merged vision token is 32x32 pixels


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
            check_size(image, limits)
            image.load()
            image = ImageOps.exif_transpose(image) or image
    except PictureRejected as exc:
        raise RequestError.from_code(exc.code, exc.message) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge("the picture has too many pixels to decode safely") from None
    except UnidentifiedImageError:
        raise BadImage(f"this is not a picture format I can read ({FORMATS})") from None
    except UNREADABLE as exc:
        raise BadImage(f"the picture could not be decoded ({exc})") from None
    return _shrink(_flatten(image), limits.max_pixels)
