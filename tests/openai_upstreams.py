"""`vlbridge serve` processes as OpenAI-compatible upstreams, and the metrics they count.

The service speaks the OpenAI chat-completions API itself, so the openai backend is tested
against real upstreams: other `vlbridge serve` processes with the demo model, each in its
own process group (``kill -9`` in a test), its log read on a thread the whole time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from server.inference.echo import ECHO_PATH
from tests.feishu_service import Service, launched, launched_together
from tests.waiting import DEADLINE, until_blocking

UPSTREAM_KEY = "upstream-key"  # the upstreams' bearer token: the backend must send it


def upstream_config(path: Path, demo_model_dir: Path, storage: Path) -> Path:
    """A demo-model server on the CPU that wants `UPSTREAM_KEY`."""
    path.write_text(
        f'[server]\nport = 0\nshutdown_grace = 1.0\nauth_tokens = ["{UPSTREAM_KEY}"]\n'
        f'[model]\npath = "{demo_model_dir}"\ndevice = "cpu"\nmax_new_tokens = 512\n'
        f"[executor]\nmax_batch = 8\n"
        f'[storage]\npath = "{storage}"\n'
    )
    return path


def echo_config(directory: Path, server: str = "", executor: str = "", grace: float = 1.0) -> Path:
    """*directory*/vlbridge.toml (made with the directory) for an instance of the echo engine:
    answers as long as the question (up to a million characters) at no model cost; *server* and
    *executor* are extra TOML lines for those sections, *grace* is server.shutdown_grace."""
    directory.mkdir()
    path = directory / "vlbridge.toml"
    path.write_text(
        f"[server]\nport = 0\nshutdown_grace = {grace}\n{server}\n"
        f'[model]\npath = "{ECHO_PATH}"\nmax_new_tokens = 1000000\nmax_context_tokens = 2000000\n'
        f"[executor]\n{executor}\n"
        f'[storage]\npath = "{directory}"\n'
    )
    return path


@contextmanager
def spawned(
    config: Path, python_flags: Sequence[str] = (), env: dict[str, str] | None = None
) -> Iterator[Service]:
    """`vlbridge serve --config config` until the block ends (then killed); waits until its
    /health says the model is ready. Every line it logs is in `Service.lines`."""
    full_env = {**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})}
    with launched(config, full_env, python_flags) as service:
        _until_ready(service)
        yield service


@contextmanager
def spawned_together(configs: Sequence[Path]) -> Iterator[list[Service]]:
    """`spawned` for several servers, all started before the first is waited for (their
    slow imports and model loads overlap), in the order of *configs*."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    with launched_together(configs, env) as services:
        for service in services:
            _until_ready(service)
        yield services


def _until_ready(service: Service) -> None:
    until_blocking(lambda: service.health()["state"] == "ready", "the model to load", 4 * DEADLINE, poll=0.1)


def base_url(service: Service) -> str:
    return f"http://127.0.0.1:{service.port}/v1"


def answers_counted(metrics: str, code: str | None = None) -> int:
    """How many chat completions the server counted (with result *code*, or all)."""
    total = 0.0
    for line in metrics.splitlines():
        ours = line.startswith("vlbridge_requests_total{") and 'route="/v1/chat/completions"' in line
        if ours and (code is None or f'code="{code}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)
