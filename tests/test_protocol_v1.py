"""protocol.v1, the definitions server and client share: the same as the contract page, the
same on both sides, and the only thing of the project the client imports."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import orjson
import pytest

from client.protocol import ClientProtocol
from protocol.v1 import PROTOCOL_VERSION, ClientFrameType, CloseCode, ErrorCode, ServerFrameType
from server.ws.frames import Cancel, FrameLimits, InvalidFrame, parse_client_frame
from tests.chattools import ROOT, chat_env

CONTRACT = (ROOT / "docs" / "protocol.md").read_text()

# Imports every module of PACKAGE, then prints the modules of FORBIDDEN packages that came along.
_IMPORTS = """
import importlib, pkgutil, sys
package, forbidden = sys.argv[1], sys.argv[2].split(",")
root = importlib.import_module(package)
for module in pkgutil.walk_packages(root.__path__, package + "."):
    importlib.import_module(module.name)
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in forbidden)))
"""


def _section(heading: str) -> str:
    start = CONTRACT.index(f"\n{heading}\n")
    end = CONTRACT.find("\n#", start + len(heading) + 2)
    return CONTRACT[start : end if end != -1 else None]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("client", ("server", "bot")), ("protocol", ("server", "bot", "client"))],
)
def test_a_package_imports_nothing_it_must_not(package: str, forbidden: tuple[str, ...]) -> None:
    """The client is a client of the server, not a part of it; protocol stands alone."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTS, package, ",".join(forbidden)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=chat_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [], f"importing {package} imported {result.stdout.strip()}"


def test_close_codes_are_the_documented_ones() -> None:
    documented = {int(code) for code in re.findall(r"^\| (\d{4}) \|", _section("## Close codes"), re.M)}
    assert documented == set(CloseCode)


def test_error_codes_are_the_documented_ones() -> None:
    table = set(re.findall(r"^\| `([a-z_]+)` \|", _section("### error"), re.M))
    assert table == set(ErrorCode) - {ErrorCode.UNAUTHORIZED}
    assert f'{{"code": "{ErrorCode.UNAUTHORIZED}"' in _section("## Connecting")  # the 403 body


def test_the_server_parses_every_client_frame_type() -> None:
    for kind in ClientFrameType:
        frame = parse_client_frame(orjson.dumps({"type": kind, "id": "q1", "text": "hi"}), FrameLimits())
        assert type(frame).__name__.lower() == kind
    assert parse_client_frame(orjson.dumps({"type": ClientFrameType.CANCEL, "id": "q1"}), FrameLimits()) == (
        Cancel("q1")
    )
    with pytest.raises(InvalidFrame) as caught:
        parse_client_frame(b'{"type": "bye"}', FrameLimits())
    assert caught.value.code == ErrorCode.BAD_REQUEST
    assert caught.value.message.endswith("expected one of " + ", ".join(ClientFrameType))


def test_the_client_knows_every_server_frame_type(caplog: pytest.LogCaptureFixture) -> None:
    core = ClientProtocol()
    core.connecting()
    hello = {"type": ServerFrameType.HELLO, "seq": 0, "session": "s1", "protocol": PROTOCOL_VERSION}
    core.receive(orjson.dumps(hello))
    ask_id = core.ask("hi")
    caplog.set_level(logging.DEBUG, logger="vlbridge.client")
    for seq, kind in enumerate((t for t in ServerFrameType if t is not ServerFrameType.HELLO), start=1):
        core.receive(orjson.dumps({"type": kind, "seq": seq, "id": ask_id, "text": "x", "ts": 1}))
    assert "unknown frame type" not in caplog.text
    core.receive(orjson.dumps({"type": "bye", "seq": 99}))
    assert "unknown frame type 'bye'" in caplog.text  # the check above can see an unknown type
