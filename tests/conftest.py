"""Fixtures shared across the suite: the tiny demo checkpoint, picture bytes, an inbox."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from bot.inbox import Inbox
from tests.fakefeishu.fixtures import fake_feishu, lark_ws
from tests.redisserver import redis_server

__all__ = ["fake_feishu", "lark_ws", "make_png", "png_declaring", "redis_server"]


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline demo Qwen3-VL checkpoint, built once per test session."""
    from server.inference.model.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo-model"))


def make_png(width: int = 96, height: int = 64, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (width, height), color)
    for x in range(0, width, 8):  # some structure, so pictures differ in more than colour
        image.putpixel((x, (x * 7) % height), (255 - color[0], 255 - color[1], 255 - color[2]))
    image.save(buffer, "PNG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares *width* x *height* pixels (a decompression bomb)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[Inbox]:
    """An open SQLite inbox in the test's folder."""
    inbox = Inbox.sqlite(tmp_path / "inbox.sqlite3", platform="feishu", retention_hours=12)
    await inbox.open()
    yield inbox
    await inbox.close()


@pytest.fixture
def png() -> bytes:
    return make_png()
