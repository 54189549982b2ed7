from __future__ import annotations

import io

import pytest
from PIL import Image

from protocol.pictures import ImageLimits, PictureRejected, decode_base64, encode_base64, sniff_image
from protocol.v1 import ErrorCode
from server.errors import BadImage, TooLarge
from server.inference.images import decode_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_modes_become_rgb_and_transparency_is_white() -> None:
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    out = decode_image(encode(rgba), ImageLimits())
    assert out.mode == "RGB"
    assert out.getpixel((3, 3)) == (255, 255, 255)
    for mode in ("L", "P", "CMYK", "I;16", "LA", "1"):
        fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
        assert decode_image(encode(Image.new(mode, (40, 40)), fmt), ImageLimits()).mode == "RGB"


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (80, 40), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(image, "JPEG", exif=exif), ImageLimits())
    assert out.size == (40, 80)


def test_large_picture_is_shrunk_to_max_pixels() -> None:
    out = decode_image(encode(Image.new("RGB", (3000, 2000)), "JPEG"), ImageLimits(max_pixels=512 * 512))
    assert out.width * out.height <= 512 * 512
    assert abs(out.width / out.height - 1.5) < 0.05


def test_gif_first_frame_and_tiny_picture_upscaled() -> None:
    frames = [Image.new("RGB", (10, 12), c) for c in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buffer.getvalue(), ImageLimits())
    assert min(out.size) >= 32
    assert out.getpixel((5, 5))[0] > 200


def test_rejections_are_clear() -> None:
    with pytest.raises(BadImage, match="not a picture format"):
        decode_image(b"hello, not an image", ImageLimits())
    with pytest.raises(BadImage, match="empty"):
        decode_image(b"", ImageLimits())
    with pytest.raises(TooLarge, match="MB"):
        decode_image(b"x" * 5000, ImageLimits(max_bytes=4096))
    png = encode(Image.new("RGB", (200, 200)))
    with pytest.raises(BadImage, match="could not be decoded"):
        decode_image(png[: len(png) // 2], ImageLimits())
    with pytest.raises(BadImage, match="too thin"):
        decode_image(encode(Image.new("RGB", (4000, 10))), ImageLimits())


def test_decompression_bomb_refused_before_decoding() -> None:
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")  # tiny file, 400 MP
    assert len(bomb) < 2_000_000
    with pytest.raises(TooLarge, match="pixels"):
        decode_image(bomb, ImageLimits())


def test_decoding_cost_budget_refuses_big_pngs_but_not_big_jpegs() -> None:
    limits = ImageLimits(max_pixels=256 * 256, max_decode_pixels=1_000_000)
    big = Image.new("RGB", (1200, 1200), (10, 200, 30))
    with pytest.raises(TooLarge, match="1200x1200 pixels; a PNG file is accepted up to 1 megapixels"):
        decode_image(encode(big, "PNG"), limits)
    with pytest.raises(PictureRejected, match="picture 3: the picture is 1200x1200") as refused:
        sniff_image(encode(big, "PNG"), 3, 1 << 20, limits)  # the header tells: refused before queueing
    assert refused.value.code is ErrorCode.TOO_LARGE
    photo = decode_image(encode(big, "JPEG"), limits)  # decoded at a quarter of its size: cheap
    assert photo.width * photo.height <= 256 * 256
    sniff_image(encode(big, "JPEG"), 1, 1 << 20, limits)
    sniff_image(encode(big, "PNG"), 1, 1 << 20)  # without limits: the format check only


@pytest.mark.parametrize(
    ("data", "max_bytes", "code", "message"),
    [
        (b"\x89PNG but not really" * 50, 1 << 20, ErrorCode.BAD_IMAGE, "picture 2 is not a picture format"),
        (b"", 1 << 20, ErrorCode.BAD_IMAGE, "picture 2 is empty"),
        (b"x" * 20, 10, ErrorCode.TOO_LARGE, r"picture 2 is 0\.0 MB; the limit is 0\.0 MB"),
    ],
)
def test_sniff_refuses_what_is_not_a_picture_by_its_header(
    data: bytes, max_bytes: int, code: ErrorCode, message: str
) -> None:
    with pytest.raises(PictureRejected, match=message) as refused:
        sniff_image(data, 2, max_bytes, ImageLimits())
    assert refused.value.code is code


def test_base64_round_trip_bare_and_as_a_data_url() -> None:
    png = encode(Image.new("RGB", (40, 40)))
    assert decode_base64(encode_base64(png), 1, 1 << 20) == png
    assert decode_base64("data:image/png;base64," + encode_base64(png), 1, 1 << 20) == png


@pytest.mark.parametrize(
    ("item", "code", "message"),
    [
        ("data:image/png,rawbytes", ErrorCode.BAD_IMAGE, "picture 4: only base64 data: URLs are accepted"),
        ("not base64!", ErrorCode.BAD_IMAGE, "picture 4 is not valid base64"),
        ("", ErrorCode.BAD_IMAGE, "picture 4 is empty"),
        ("A" * 4000, ErrorCode.TOO_LARGE, r"picture 4 is about 0\.0 MB; the limit is 0\.0 MB"),
    ],
)
def test_base64_refusals(item: str, code: ErrorCode, message: str) -> None:
    with pytest.raises(PictureRejected, match=message) as refused:
        decode_base64(item, 4, 1000)
    assert refused.value.code is code
