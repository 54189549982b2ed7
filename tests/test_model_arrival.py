"""A real model arriving: `vlbridge serve` downloading a hub id from a local fake hub (progress in the
log and in /health; SIGTERM or Ctrl-C during the download), and a model or port that cannot be had
ending the process with one line and a non-zero exit.

Every `vlbridge serve` here runs as a subprocess with ``HF_HOME`` in the test's folder and
``HF_ENDPOINT`` at the fake hub (or an unreachable address): nothing is fetched from the internet.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.sync.client import connect

from client.command import model_status
from tests.fakehub import fake_hub
from tests.waiting import DEADLINE, until_blocking

REPO = "Qwen/Demo-VL"
LOAD_DEADLINE = 180.0  # torch and transformers imports plus a load on a busy 2-core machine


@pytest.fixture(scope="module")
def sharded_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint in 1 MB shards (six), as real checkpoints are sharded."""
    from server.inference.model.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("sharded-demo"), shard_size="1MB")


class Serve:
    """`vlbridge serve` in a subprocess; its stderr lines are collected as they come."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *args: str) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VLBRIDGE_"))}
        self.env = {
            **base,
            "PYTHONPATH": os.getcwd(),
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_ENDPOINT": "http://127.0.0.1:1",  # nothing reaches the internet, whatever a case sets
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "VLBRIDGE_SERVER_PORT": "0",
            "VLBRIDGE_STORAGE_PATH": str(tmp_path / "storage"),
            "VLBRIDGE_MODEL_DEVICE": "cpu",
            **env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=self.env,
        )
        self.lines: list[str] = []
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            self._lines.put(line)
        self._lines.put(None)

    def wait_line(self, pattern: str, timeout: float = LOAD_DEADLINE) -> re.Match[str]:
        """The first stderr line (from now on) matching *pattern*."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout} s: {self.lines}"
                ) from None
            if line is None:
                raise AssertionError(f"the process ended without a line matching {pattern!r}: {self.lines}")
            if found := re.search(pattern, line):
                return found

    def port(self) -> int:
        return int(self.wait_line(r"Uvicorn running on http://[\d.]+:(\d+)").group(1))

    def finish(self, timeout: float = DEADLINE) -> int:
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@contextmanager
def serve(tmp_path: Path, env: dict[str, str], *args: str) -> Iterator[Serve]:
    process = Serve(tmp_path, env, *args)
    try:
        yield process
    finally:
        process.kill()


def health(port: int) -> dict[str, object]:
    body: dict[str, object] = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10.0).json()
    return body


# ---- item 1: the download shows its progress ---------------------------------------------------------


def test_download_progress_in_the_log_and_health(tmp_path: Path, sharded_demo: Path) -> None:
    """Download, then the load's phases, in /health and the log; SIGTERM during the load ends it."""
    with (
        fake_hub({REPO: sharded_demo}, rate=1_500_000) as hub,
        serve(
            tmp_path,
            {
                "HF_ENDPOINT": hub.url,
                "VLBRIDGE_MODEL_PATH": REPO,
                "VLBRIDGE_MODEL_DOWNLOAD_LOG_SECONDS": "0.3",
            },
        ) as server,
    ):
        port = server.port()
        seen: list[tuple[float, str, str]] = []

        def loading_after_the_download() -> bool:
            body = health(port)
            seen.append((float(body["progress"]), str(body["detail"]), str(body["state"])))  # type: ignore[arg-type]
            return seen[-1][1].startswith(("loading weights", "warming up")) or body["state"] != "loading"

        def downloading_now() -> bool:
            return str(health(port)["detail"]).startswith(f"downloading {REPO}: ")

        until_blocking(downloading_now, "the download", LOAD_DEADLINE, poll=0.05)
        with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=DEADLINE) as ws:  # a client meanwhile
            hello = orjson.loads(ws.recv(timeout=DEADLINE))
        assert hello["type"] == "hello" and hello["model_state"] == "loading", hello
        assert str(hello["model_detail"]).startswith(f"downloading {REPO}: ") and hello["model_progress"] > 0
        assert model_status(hello).startswith("the model is still loading (")  # what `vlbridge chat` shows
        until_blocking(loading_after_the_download, "the load after the download", LOAD_DEADLINE, poll=0.05)
        assert seen[-1][2] == "loading" and seen[-1][0] >= 0.55, seen[-1]  # a phase after the download
        downloading = [(p, d) for p, d, _ in seen if d.startswith(f"downloading {REPO}: ")]
        assert downloading, seen
        assert all(0.05 <= p <= 0.55 for p, _ in downloading), downloading
        assert re.fullmatch(
            rf"downloading {REPO}: [\d.]+ (B|kB|MB) of 5\.\d MB at [\d.]+ (B|kB|MB)/s", downloading[-1][1]
        )
        shown = [p for p, _ in downloading]
        assert len(set(shown)) >= 2, shown  # rising, shard after shard
        progress = [p for p, _, _ in seen]
        assert progress == sorted(progress), progress  # never goes back
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.finish()
        assert time.monotonic() - started < 8.0  # LOAD_STOP_WAIT (1.5 s) and the shutdown
    log = "\n".join(server.lines)
    cache = tmp_path / "hf-home" / "hub"
    assert re.search(
        rf"fetching {REPO} \(14 files, 5\.\d MB; 0 already cached\) from {hub.url} into {cache}", log
    )
    assert len(re.findall(rf"downloading {REPO}: [\d.]+ (B|kB|MB) of 5\.\d MB at ", log)) >= 2, log
    assert re.search(rf"downloaded {REPO}: 5\.\d MB in \d+ s", log), log
    assert "Traceback" not in log and "executor ready" not in log
    snapshot = cache / "models--Qwen--Demo-VL" / "snapshots" / hub.sha
    assert (snapshot / "model-00006-of-00006.safetensors").is_file()
    fetched = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert len(fetched) == len(set(fetched)) == 14  # each file once; nothing else downloaded


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_download_stops_at_once(tmp_path: Path, sharded_demo: Path, signum: int) -> None:
    # 100 kB/s: the download would take about a minute, a shard ten seconds
    with (
        fake_hub({REPO: sharded_demo}, rate=100_000) as hub,
        serve(tmp_path, {"HF_ENDPOINT": hub.url, "VLBRIDGE_MODEL_PATH": REPO}) as server,
    ):
        server.wait_line(rf"fetching {REPO} ")
        until_blocking(lambda: any("/resolve/" in p for _, p in hub.requests), "a file download")
        started = time.monotonic()
        server.process.send_signal(signum)
        code = server.finish()
        took = time.monotonic() - started
    assert took < 8.0, took  # LOAD_STOP_WAIT (1.5 s) and the shutdown; not the minute left
    assert code in (0, -signal.SIGTERM, 130), (code, server.lines)
    assert "executor ready" not in "\n".join(server.lines)


def test_a_cached_model_starts_offline(tmp_path: Path, sharded_demo: Path) -> None:
    with (
        fake_hub({REPO: sharded_demo}) as hub,
        serve(tmp_path, {"HF_ENDPOINT": hub.url, "VLBRIDGE_MODEL_PATH": REPO}) as server,
    ):
        server.wait_line(rf"downloaded {REPO}")
        server.process.send_signal(signal.SIGTERM)
        server.finish()
    with serve(tmp_path, {"HF_HUB_OFFLINE": "1", "VLBRIDGE_MODEL_PATH": REPO}) as offline:
        offline.wait_line(rf"{REPO}: HF_HUB_OFFLINE is set; using the copy in the hub cache")
        offline.wait_line(r"loaded \S+/models--Qwen--Demo-VL/snapshots/\w+ \(Qwen3VL")
        offline.process.send_signal(signal.SIGTERM)
        offline.finish()


# ---- item 2: a model that cannot load ends the process ---------------------------------------------


def _not_qwen(tmp_path: Path) -> str:
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return str(folder)


def _empty(tmp_path: Path) -> str:
    folder = tmp_path / "empty"
    folder.mkdir()
    return str(folder)


# A local folder that is missing or holds no checkpoint is refused before anything starts, by the
# checks `vlbridge check-config` shares (server/preflight.py, the loader's own folder check): a
# config error, exit status 2.
REFUSED = {
    "missing folder": (
        lambda tmp: {"VLBRIDGE_MODEL_PATH": str(tmp / "no" / "such" / "dir")},
        r"VLBRIDGE_MODEL_PATH: '.*/no/such/dir' does not exist: set it to a checkpoint folder or a hub id",
    ),
    "relative missing folder": (
        lambda tmp: {"VLBRIDGE_MODEL_PATH": "./models/qwen3-vl-8b"},
        r"VLBRIDGE_MODEL_PATH: './models/qwen3-vl-8b' does not exist",
    ),
    "not a checkpoint": (
        lambda tmp: {"VLBRIDGE_MODEL_PATH": _empty(tmp)},
        r"empty has no config\.json: it is not a Hugging Face checkpoint folder",
    ),
    "another architecture": (
        lambda tmp: {"VLBRIDGE_MODEL_PATH": _not_qwen(tmp)},
        r"holds a llama checkpoint .*vlbridge serves Qwen3-VL",
    ),
}


def _ends_with_one_line(tmp_path: Path, env: dict[str, str], code: int, prefix: str, expected: str) -> str:
    """Run `vlbridge serve` with *env* until it ends; check its exit *code* and that its last line
    is *prefix* plus a reason matching *expected*, with no traceback and no model served. The log."""
    with serve(tmp_path, env) as server:
        status = server.finish(LOAD_DEADLINE)
    log = "\n".join(server.lines)
    assert status == code, log
    last = server.lines[-1]
    assert last.startswith(prefix), log
    assert re.search(expected, last), last
    assert "Traceback" not in log and "repo id must be" not in log and "executor ready" not in log
    return log


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_model_folder_that_is_not_there_is_refused_before_the_start(tmp_path: Path, case: str) -> None:
    env, expected = REFUSED[case]
    _ends_with_one_line(tmp_path, env(tmp_path), 2, "vlbridge: config error: ", expected)


FAILURES = {
    "hub unreachable": (
        lambda tmp: {"VLBRIDGE_MODEL_PATH": "Qwen/Qwen3-VL-2B-Instruct", "HF_ENDPOINT": "http://127.0.0.1:1"},
        r"cannot get Qwen/Qwen3-VL-2B-Instruct: the hub at http://127\.0\.0\.1:1 is unreachable .*"
        r"has no complete copy; .*`hf download Qwen/Qwen3-VL-2B-Instruct --local-dir DIR`.*model\.path = DIR"
        r".*HF_HUB_OFFLINE=1",
    ),
    "offline without a copy": (
        lambda tmp: {"VLBRIDGE_MODEL_PATH": "Qwen/Qwen3-VL-2B-Instruct", "HF_HUB_OFFLINE": "1"},
        r"cannot get Qwen/Qwen3-VL-2B-Instruct: HF_HUB_OFFLINE is set, "
        r"and the hub cache .* has no complete copy",
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_model_that_cannot_load_ends_serve_with_one_line(tmp_path: Path, case: str) -> None:
    env, expected = FAILURES[case]
    prefix = "vlbridge: the model failed to load: "
    log = _ends_with_one_line(tmp_path, env(tmp_path), 1, prefix, expected)
    assert "Retrying" not in log
    # the reason once in the log, once as the last line: nothing repeated beyond that
    lines = log.splitlines()
    reason = lines[-1].removeprefix(prefix)
    assert sum(reason in line for line in lines) == 2, log


def test_a_model_that_cannot_load_stays_failed_in_process(tmp_path: Path) -> None:
    """Embedded (no CLI): the executor reports the failure in /health instead of ending anything."""
    import asyncio

    from server.backend import build_executor
    from server.config import Config, ModelConfig, StorageConfig

    config = Config(
        model=ModelConfig(path=str(tmp_path / "missing"), device="cpu"),
        storage=StorageConfig(path=str(tmp_path)),
    )

    async def run() -> None:
        executor = build_executor(config)
        await executor.start()
        with pytest.raises(Exception, match="does not exist"):
            await executor.wait_ready(DEADLINE)
        stats = executor.stats()
        assert stats.state.value == "failed" and "does not exist" in stats.detail
        await executor.stop()

    asyncio.run(run())


# ---- item 3: a port in use --------------------------------------------------------------------------


def test_a_port_in_use_fails_before_the_model_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        with serve(tmp_path, {}, "--port", str(port)) as server:
            code = server.finish()
        took = time.monotonic() - started
    assert code == 1
    assert server.lines[-1] == (
        f"vlbridge: port {port} on 127.0.0.1 is in use (another vlbridge?); "
        "choose another with --port or server.port"
    )
    # before it, only the line naming the configuration read: nothing loaded, nothing listening
    assert [line for line in server.lines[:-1] if "vlbridge: configuration: " not in line] == []
    assert took < 20.0  # no model was built or loaded (the demo model alone takes longer)
    assert not (tmp_path / "storage" / "demo-model").exists()


def test_a_hub_warning_is_logged_once() -> None:
    """huggingface_hub's retry warnings reach the service's log handler only (they showed twice:
    once more through the hub library's own stderr handler)."""
    script = (
        "import logging\n"
        "from server.logs import configure_logging\n"
        "import server.inference.model.fetch\n"
        "configure_logging()\n"
        "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        timeout=DEADLINE,
        check=True,
    )
    assert result.stderr.count("Retrying in 1s") == 1, result.stderr
