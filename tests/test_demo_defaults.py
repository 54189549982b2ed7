"""The demo model stays quick: torch's CPU threads sized by rule, a short default answer."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from server.backend import DEMO_ANSWER_TOKENS
from server.config import Config, ModelConfig, ServerConfig, StorageConfig
from server.inference.model.devices import SMALL_MODEL_PARAMETERS, cpu_threads
from tests.conftest import make_png
from tests.serving import FAST, serve
from tests.wsclient import Client


@pytest.mark.parametrize(
    ("setting", "cores", "parameters", "threads"),
    [
        ("auto", 2, 2_500_000, 1),  # the demo model: one thread, whatever the cores
        ("auto", 64, SMALL_MODEL_PARAMETERS - 1, 1),
        ("auto", 2, 2_000_000_000, 1),  # a real model: one core left for the service
        ("auto", 16, 8_000_000_000, 15),
        ("auto", 1, 8_000_000_000, 1),  # never 0
        (4, 2, 2_500_000, 4),  # a number is taken as it is
    ],
)
def test_cpu_thread_rule(setting: int | str, cores: int, parameters: int, threads: int) -> None:
    assert cpu_threads(setting, cores, parameters) == threads  # type: ignore[arg-type]


def test_cpu_threads_config_key() -> None:
    assert ModelConfig().cpu_threads == "auto"
    assert ModelConfig(cpu_threads=3).cpu_threads == 3
    with pytest.raises(ValueError, match="cpu_threads"):
        ModelConfig(cpu_threads=0)
    with pytest.raises(ValueError, match="cpu_threads"):
        ModelConfig(cpu_threads="many")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def demo_service(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`model.path = ""`: the service's own demo model (copied in place to skip building it)."""
    storage = tmp_path_factory.mktemp("storage")
    shutil.copytree(demo_model_dir, storage / "demo-model")
    config = Config(
        server=ServerConfig(**FAST),
        model=ModelConfig(path="", device="cpu", max_new_tokens=512),
        storage=StorageConfig(path=str(storage)),
    )
    with serve(config) as running:
        yield running


async def ask(url: str, **params: object) -> dict[str, object]:
    client = await Client.open(url)
    try:
        await client.ask("q", "what is in this picture?", [make_png()], temperature=0, **params)
        done = (await client.until_end("q", timeout=120))[-1]
    finally:
        await client.close()
    assert done["type"] == "done", done
    return done


async def test_demo_answers_briefly_unless_asked_for_more(demo_service) -> None:
    done = await ask(demo_service.ws)
    # Greedy decoding of this model runs on past 96 tokens (see the second question): the short
    # answer is the default's doing.
    assert done["usage"]["completion_tokens"] == DEMO_ANSWER_TOKENS, done["usage"]
    assert done["finish_reason"] == "length"
    longer = await ask(demo_service.ws, max_tokens=DEMO_ANSWER_TOKENS + 50)
    assert longer["usage"]["completion_tokens"] > DEMO_ANSWER_TOKENS, longer["usage"]


def test_demo_runs_on_one_cpu_thread(demo_model_dir: Path, tmp_path: Path, caplog) -> None:
    shutil.copytree(demo_model_dir, tmp_path / "demo-model")
    config = Config(
        server=ServerConfig(**FAST),
        model=ModelConfig(path="", device="cpu"),
        storage=StorageConfig(path=str(tmp_path)),
    )
    with caplog.at_level(logging.INFO, logger="vlbridge.model"), serve(config):
        pass
    assert any("CPU: 1 torch thread(s)" in r.getMessage() for r in caplog.records), caplog.text
