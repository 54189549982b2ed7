"""Pictures as the chat client reads them: pass-through when fine, re-encoded when not."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from client.errors import PictureError
from client.images import prepare_picture, read_picture
from tests.conftest import png_declaring


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_small_pictures_pass_through_unchanged(fmt: str) -> None:
    raw = encode(Image.new("RGB", (120, 80), (10, 200, 30)), fmt)
    picture = prepare_picture("p", raw)
    assert (picture.data, picture.format, picture.reencoded) == (raw, fmt, False)
    assert (picture.width, picture.height) == (120, 80)


def test_gif_becomes_its_first_frame() -> None:
    frames = [Image.new("P", (40, 30), 0), Image.new("P", (40, 30), 1)]
    frames[0].putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    frames[1].putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    raw = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    picture = prepare_picture("anim.gif", raw)
    assert picture.reencoded and picture.format == "PNG"
    decoded = Image.open(io.BytesIO(picture.data)).convert("RGB")
    assert decoded.getpixel((5, 5)) == (255, 0, 0)


def test_large_pictures_are_shrunk_upright_and_sent_as_jpeg() -> None:
    image = Image.new("RGB", (3000, 1000), (90, 90, 200))
    exif = image.getexif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    picture = prepare_picture("big.jpg", encode(image, "JPEG", exif=exif), max_pixels=500_000)
    assert picture.format == "JPEG" and picture.reencoded
    assert picture.width * picture.height <= 500_000
    assert picture.height > picture.width  # EXIF orientation applied before dropping the tag


def test_transparency_is_kept_as_png() -> None:
    raw = encode(Image.new("RGBA", (600, 600), (0, 0, 0, 0)), "TIFF")
    picture = prepare_picture("t.tiff", raw)
    assert picture.format == "PNG"
    assert Image.open(io.BytesIO(picture.data)).mode == "RGBA"


def test_read_from_a_file_and_from_stdin(tmp_path: Path) -> None:
    raw = encode(Image.new("RGB", (50, 50)), "PNG")
    (tmp_path / "a.png").write_bytes(raw)
    assert read_picture(str(tmp_path / "a.png")).data == raw
    stdin = read_picture("-", io.BytesIO(raw))
    assert stdin.name == "stdin" and stdin.data == raw
    assert "stdin (50x50 PNG" in stdin.describe()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty file"), (b"hello, not a picture", "not a picture Pillow can read")],
)
def test_not_a_picture(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(PictureError, match=message):
        read_picture(str(path))


def test_missing_file_and_truncated_file(tmp_path: Path) -> None:
    with pytest.raises(PictureError, match="cannot read"):
        read_picture(str(tmp_path / "nope.png"))
    raw = encode(Image.new("RGB", (200, 200), (1, 2, 3)), "JPEG")
    with pytest.raises(PictureError, match=r"cut\.jpg"):
        prepare_picture("cut.jpg", raw[: len(raw) // 2])


@pytest.mark.parametrize(
    ("side", "shown"), [(12_500, "12500x12500 is too many"), (14_000, "bomb.png: too many")]
)
def test_decompression_bombs_are_refused_with_a_sentence(side: int, shown: str) -> None:
    # 14,000 x 14,000 is past Pillow's own guard (about 179 MP), which raises as it opens the file.
    with pytest.raises(PictureError, match=shown):
        prepare_picture("bomb.png", png_declaring(side, side))
