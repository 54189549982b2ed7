"""`POST /v1/chat/completions` over real HTTP: parameters it cannot honour are refused by name,
harmless ones are accepted, and answers name the model that served them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from server.backend import DEMO_MODEL_ID
from server.config import Config, ExecutorConfig, ModelConfig, StorageConfig
from server.http.openai_params import IGNORED, NEUTRAL, SUPPORTED
from server.inference.echo import ECHO_PATH
from tests.serving import FAST, make_config, serve

QUESTION = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def echo():
    with serve(make_config()) as running:
        yield running


def ask(running: Any, **params: Any) -> httpx.Response:
    body = {"model": "gpt-4o", "messages": QUESTION, **params}
    return httpx.post(running.http + "/v1/chat/completions", json=body, timeout=60)


TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("tools", [TOOL]),
        ("tool_choice", "auto"),
        ("tool_choice", {"type": "function", "function": {"name": "weather"}}),
        ("functions", [TOOL["function"]]),
        ("function_call", "auto"),
        ("response_format", {"type": "json_object"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("n", 2),
        ("logit_bias", {"1234": 5}),
        ("frequency_penalty", 0.5),
        ("presence_penalty", -1),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "hello"}),
        ("reasoning_effort", "high"),
        ("verbosity", "low"),
        ("web_search_options", {}),
        ("top_k", 5),  # not OpenAI's: unknown
        ("repetition_penalty", 1.2),
    ],
)
def test_a_parameter_the_server_would_ignore_is_refused_by_name(echo, name: str, value: Any) -> None:
    response = ask(echo, **{name: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_request" and error["type"] == "bad_request"
    assert f"'{name}'" in error["message"], error


def test_neutral_values_and_harmless_parameters_are_accepted(echo) -> None:
    params = {name: neutral for name, (neutral, _) in NEUTRAL.items()}
    params |= {"user": "u-1", "safety_identifier": "s-1", "prompt_cache_key": "k", "store": False}
    params |= {"metadata": {"team": "vision"}, "service_tier": "auto", "parallel_tool_calls": False}
    params |= {"n": 1, "seed": 7, "stream_options": None}
    assert set(params) >= IGNORED
    response = ask(echo, **params)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: hi"


def test_the_three_sets_do_not_overlap() -> None:
    assert not (SUPPORTED & IGNORED) and not (SUPPORTED & set(NEUTRAL)) and not (IGNORED & set(NEUTRAL))


def test_min_tokens_is_honoured(echo) -> None:
    """vlbridge's openai backend sends vLLM's `min_tokens`: another vlbridge upstream honours it."""
    answer = ask(echo, min_tokens=20, max_tokens=20).json()
    assert answer["choices"][0]["message"]["content"] == "echo: hi" + "." * 12
    assert ask(echo, min_tokens=-1).status_code == 400


def test_the_official_client_sees_the_refusal(echo) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=echo.http + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="'tools' is not supported"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, tools=[TOOL])


def test_answers_name_the_served_model_not_the_requested_one(echo) -> None:
    listed = httpx.get(echo.http + "/v1/models", timeout=60).json()["data"]
    assert [model["id"] for model in listed] == [ECHO_PATH]
    assert ask(echo).json()["model"] == ECHO_PATH
    with httpx.stream(
        "POST",
        echo.http + "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": QUESTION, "stream": True},
        timeout=60,
    ) as response:
        chunks = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks and all(f'"model":"{ECHO_PATH}"' in chunk for chunk in chunks)


def test_the_demo_model_has_an_id_without_spaces(demo_model_dir: Path, tmp_path: Path) -> None:
    """model.path = "": the demo model (here the session's, found in [storage] path) is listed
    with an id an OpenAI client can send back, which still says its answers are random."""
    (tmp_path / "demo-model").symlink_to(demo_model_dir, target_is_directory=True)
    config = Config(
        server=make_config().server.model_copy(update=FAST),
        model=ModelConfig(path="", max_new_tokens=4, device="cpu"),
        executor=ExecutorConfig(max_batch=2),
        storage=StorageConfig(path=str(tmp_path)),
    )
    with serve(config) as running:
        listed = httpx.get(running.http + "/v1/models", timeout=60).json()["data"]
        answer = ask(running, max_tokens=2).json()
    assert [model["id"] for model in listed] == [DEMO_MODEL_ID]
    assert " " not in DEMO_MODEL_ID and "random" in DEMO_MODEL_ID
    assert answer["model"] == DEMO_MODEL_ID
