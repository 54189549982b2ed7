"""`vlbridge doctor`: a good setup passes, and each broken one names its failing line.

Feishu is the fake platform over real sockets; the openai upstream is a real vlbridge (the echo
backend); the CLI runs as a subprocess once end to end, and otherwise through its own argument
parser and command function in this process (`main` would reconfigure the test's logging).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bot.inbox import Inbox
from server.cli import build_parser
from tests.fakefeishu import FakeFeishu
from tests.serving import make_config, serve
from tests.waiting import DEADLINE

ROW = re.compile(r"^(\S.*?)\s{2,}(ok|warn|FAIL)\s{2,}(.*?)\s*$")


def rows(output: str) -> dict[str, tuple[str, str]]:
    """The table as {check: (verdict, detail)}; a detail wrapped over several lines is joined."""
    found: dict[str, tuple[str, str]] = {}
    last = ""
    for line in output.splitlines():
        match = ROW.match(line)
        if match:
            last = match.group(1)
            found[last] = (match.group(2), match.group(3))
        elif line.startswith(" ") and last:
            verdict, detail = found[last]
            found[last] = (verdict, f"{detail} {line.strip()}")
    return found


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def feishu_toml(
    fake: FakeFeishu, storage: Path, *, domain: str | None = None, mode: str = "longconn", extra: str = ""
) -> str:
    """Feishu on *fake*, the demo model on the CPU, the inbox under *storage* (plus *extra* lines
    in [storage])."""
    return (
        f'[model]\ndevice = "cpu"\n'
        f'[storage]\npath = "{storage}"\n{extra}'
        f'[feishu]\nenabled = true\napp_id = "{fake.app_id}"\ndomain = "{domain or fake.url}"\n'
        f'mode = "{mode}"\n'
    )


@pytest.fixture
def secret(fake_feishu: FakeFeishu, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("VLBRIDGE_FEISHU_APP_SECRET", fake_feishu.app_secret)
    return fake_feishu.app_secret


def doctor(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    """The `doctor` command as the CLI parses and runs it: (exit status, rows, the whole output)."""
    args = build_parser().parse_args(["doctor", *argv])
    status = args.func(args)
    output = capsys.readouterr().out
    return status, rows(output), output


def test_good_setup_passes_every_line(tmp_path: Path, fake_feishu: FakeFeishu) -> None:
    config = write_config(tmp_path / "vlbridge.toml", feishu_toml(fake_feishu, tmp_path / "data"))
    env = {
        **os.environ,
        "PYTHONPATH": os.getcwd(),
        "VLBRIDGE_FEISHU_APP_SECRET": fake_feishu.app_secret,
    }
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "doctor", "--config", str(config), "--proxy-idle-timeout", "60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    table = rows(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(table) == {
        "config",
        "model",
        "storage",
        "inbox",
        "feishu credentials",
        "feishu long connection",
        "proxy idle timeout",
    }, done.stdout
    assert {verdict for verdict, _ in table.values()} == {"ok"}, done.stdout
    assert "7 ok, 0 warn, 0 FAIL" in done.stdout
    records = fake_feishu.records
    assert records.token_fetches == 1 and records.discoveries == 1, "Feishu was not asked"
    assert records.connections() == [], "doctor must not open a long connection (it could take events)"


def test_bad_app_secret_fails_the_credentials_line(
    tmp_path: Path,
    fake_feishu: FakeFeishu,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VLBRIDGE_FEISHU_APP_SECRET", "not-the-secret")
    config = write_config(tmp_path / "c.toml", feishu_toml(fake_feishu, tmp_path / "data"))
    status, table, output = doctor(capsys, "--config", str(config))
    assert status == 1
    verdict, detail = table["feishu credentials"]
    assert verdict == "FAIL", output
    assert "VLBRIDGE_FEISHU_APP_SECRET" in detail and "code 10014" in detail, output
    assert table["feishu long connection"][0] == "FAIL", output  # discovery checks the secret too
    assert table["storage"][0] == "ok" and table["proxy idle timeout"][0] == "ok", output


def test_unreachable_feishu_domain_fails_both_feishu_lines(
    tmp_path: Path, fake_feishu: FakeFeishu, secret: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as held:  # bound and not listening: connections to it are refused
        held.bind(("127.0.0.1", 0))
        domain = f"http://127.0.0.1:{held.getsockname()[1]}"
        config = write_config(tmp_path / "c.toml", feishu_toml(fake_feishu, tmp_path / "data", domain=domain))
        status, table, output = doctor(capsys, "--config", str(config))
    assert status == 1
    for check in ("feishu credentials", "feishu long connection"):
        verdict, detail = table[check]
        assert verdict == "FAIL", output
        assert "cannot reach" in detail and "feishu.domain" in detail, output


def test_unwritable_storage_fails_the_storage_line(
    tmp_path: Path, fake_feishu: FakeFeishu, secret: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A path under a regular file: unwritable for root too (mode bits do not stop root).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = write_config(tmp_path / "c.toml", feishu_toml(fake_feishu, blocker / "sub"))
    status, table, output = doctor(capsys, "--config", str(config))
    assert status == 1
    verdict, detail = table["storage"]
    assert verdict == "FAIL", output
    assert str(blocker) in detail and "[storage] path" in detail, output
    assert "inbox" not in table  # nothing more to say about an inbox that cannot exist


async def test_inbox_held_by_a_running_service_is_ok_and_names_its_pid(
    tmp_path: Path, fake_feishu: FakeFeishu, secret: str, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "data"
    inbox = Inbox.sqlite(storage / "feishu-inbox.sqlite3", platform="feishu", retention_hours=24)
    inbox.open_now()  # takes the service's lock, as `vlbridge serve` does
    try:
        config = write_config(tmp_path / "c.toml", feishu_toml(fake_feishu, storage))
        status, table, output = doctor(capsys, "--config", str(config))
    finally:
        await inbox.close()
    assert status == 0, output
    verdict, detail = table["inbox"]
    assert verdict == "ok" and f"in use by the running service (pid {os.getpid()})" in detail, output
    status, table, output = doctor(capsys, "--config", str(config))  # the lock is free again
    assert status == 0 and "in use" not in table["inbox"][1], output


@pytest.mark.parametrize(
    ("toml", "timeout", "verdict"),
    [
        ("", "50", "FAIL"),  # 45 s + 10 s
        ("", "56", "ok"),
        ("[server]\nping_interval = 1\nping_timeout = 1\n", "3", "ok"),
        ("[server]\nping_interval = 1\nping_timeout = 1\n", "2", "FAIL"),
    ],
)
def test_proxy_idle_timeout_against_the_pings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, timeout: str, verdict: str
) -> None:
    config = write_config(tmp_path / "c.toml", f'{toml}[model]\npath = "builtin:echo"\n')
    status, table, output = doctor(capsys, "--config", str(config), "--proxy-idle-timeout", timeout)
    assert table["proxy idle timeout"][0] == verdict, output
    assert status == (1 if verdict == "FAIL" else 0), output
    if verdict == "FAIL":
        assert "raise its idle timeout above" in table["proxy idle timeout"][1], output


@pytest.fixture
def upstream() -> Iterator[str]:
    """A real vlbridge (the echo backend) that wants the bearer token "up-key"."""
    with serve(make_config(auth_tokens=("up-key",))) as running:
        yield f"{running.http}/v1"


def test_openai_upstream_down_fails_its_line(
    tmp_path: Path, upstream: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLBRIDGE_MODEL_API_KEY", "up-key")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{held.getsockname()[1]}/v1"
        config = write_config(
            tmp_path / "c.toml",
            f'[model]\nbackend = "openai"\nbase_urls = ["{upstream}", "{down}"]\nmodel = "builtin:echo"\n',
        )
        status, table, output = doctor(capsys, "--config", str(config))
    assert status == 1
    assert (
        table[f"upstream {upstream}"][0] == "ok" and "serves builtin:echo" in table[f"upstream {upstream}"][1]
    )
    verdict, detail = table[f"upstream {down}"]
    assert verdict == "FAIL" and "ConnectError" in detail and "model.base_urls" in detail, output


def test_openai_upstream_without_the_model_fails(
    tmp_path: Path, upstream: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLBRIDGE_MODEL_API_KEY", "up-key")
    config = write_config(
        tmp_path / "c.toml", f'[model]\nbackend = "openai"\nbase_urls = ["{upstream}"]\nmodel = "qwen-72b"\n'
    )
    status, table, output = doctor(capsys, "--config", str(config))
    assert status == 1
    verdict, detail = table[f"upstream {upstream}"]
    assert verdict == "FAIL" and "'qwen-72b'" in detail and "builtin:echo" in detail, output
    monkeypatch.setenv("VLBRIDGE_MODEL_API_KEY", "wrong-key")  # the probe sends the key
    status, table, output = doctor(capsys, "--config", str(config))
    assert table[f"upstream {upstream}"][0] == "FAIL" and "HTTP 401" in table[f"upstream {upstream}"][1], (
        output
    )


def checkpoint(directory: Path, weight_bytes: int) -> Path:
    """A checkpoint folder with a sparse weight file of *weight_bytes* (nothing is loaded)."""
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "qwen3_vl", "dtype": "float32"}')
    with open(directory / "model.safetensors", "wb") as handle:
        handle.truncate(weight_bytes)
    return directory


@pytest.mark.parametrize(("weight_bytes", "verdict"), [(4096, "ok"), (10**13, "FAIL")])
def test_checkpoint_weights_against_free_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], weight_bytes: int, verdict: str
) -> None:
    model = checkpoint(tmp_path / "ckpt", weight_bytes)
    config = write_config(tmp_path / "c.toml", f'[model]\npath = "{model}"\ndevice = "cpu"\n')
    status, table, output = doctor(capsys, "--config", str(config))
    assert table["model"][0] == "ok", output
    assert table["model memory"][0] == verdict, output
    assert status == (1 if verdict == "FAIL" else 0), output


def test_checkpoint_missing_a_shard_fails_the_model_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = checkpoint(tmp_path / "ckpt", 4096)
    (model / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    )
    config = write_config(tmp_path / "c.toml", f'[model]\npath = "{model}"\ndevice = "cpu"\n')
    status, table, output = doctor(capsys, "--config", str(config))
    assert status == 1
    assert table["model"][0] == "FAIL" and "model-00002-of-00002.safetensors" in table["model"][1], output
    assert "model memory" not in table


def test_webhook_without_secrets_fails_its_line(
    tmp_path: Path, fake_feishu: FakeFeishu, secret: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "c.toml", feishu_toml(fake_feishu, tmp_path / "data", mode="webhook"))
    status, table, output = doctor(capsys, "--config", str(config))
    assert status == 1
    assert table["feishu credentials"][0] == "ok", output
    assert (
        table["feishu webhook"][0] == "FAIL" and "VLBRIDGE_FEISHU_ENCRYPT_KEY" in table["feishu webhook"][1]
    )
    assert "feishu long connection" not in table


def test_a_config_error_is_one_failed_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.toml", "[server]\nping_intervall = 1\n")
    status, table, output = doctor(capsys, "--config", str(config))
    assert status == 1
    assert list(table) == ["config"], output
    assert table["config"][0] == "FAIL" and "server.ping_intervall: unknown key" in table["config"][1], output


def test_redis_inbox_ok_then_warned_about_eviction(
    tmp_path: Path,
    fake_feishu: FakeFeishu,
    secret: str,
    redis_server: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(
        tmp_path / "c.toml",
        feishu_toml(
            fake_feishu,
            tmp_path / "data",
            extra=f'backend = "redis"\nredis_url = "{redis_server}"\nredis_prefix = "doctor"\n',
        ),
    )
    status, table, output = doctor(capsys, "--config", str(config))
    assert status == 0 and table["inbox"][0] == "ok", output
    with redis.Redis.from_url(redis_server) as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
        try:
            status, table, output = doctor(capsys, "--config", str(config))
        finally:
            client.config_set("maxmemory-policy", "noeviction")
    assert status == 0, output  # a warning is not a failure
    verdict, detail = table["inbox"]
    assert verdict == "warn" and "allkeys-lru" in detail and "noeviction" in detail, output


def test_missing_model_folder_fails_the_model_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "c.toml", f'[model]\npath = "{tmp_path / "nowhere"}"\ndevice = "cpu"\n')
    status, table, output = doctor(capsys, "--config", str(config))
    assert status == 1
    assert table["model"][0] == "FAIL" and "is not a folder" in table["model"][1], output
