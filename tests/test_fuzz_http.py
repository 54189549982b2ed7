"""Property-based fuzzing of the HTTP request parsers, against the real server.

The property: any body gets either an answer or a well-formed error (4xx, JSON, the
project's error shape); never a 500, never a traceback in the log, and the server answers
a good request afterwards. Examples are derandomized (the same ones every run) and
bounded in number, so this runs in seconds and never differs between CI runs.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_png, png_declaring
from tests.serving import Running, make_config, serve

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

PNG_URL = "data:image/png;base64," + base64.b64encode(make_png(16, 16)).decode()
BOMB_URL = "data:image/png;base64," + base64.b64encode(png_declaring(30000, 30000)).decode()

# Anything JSON can say (and a little more: integers past 64 bits, NaN, lone surrogates).
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=40)
    | st.text(alphabet=st.characters(categories=["Cs", "Co", "Cc", "Zs"]), max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)

# Near-valid chat requests: the right shape, with wrong types and nonsense mixed in.
image_urls = st.sampled_from(
    [
        PNG_URL,
        BOMB_URL,
        "data:image/png;base64,!!!",
        "data:,x",
        "data:image/png;base64,",
        "http://127.0.0.1:1/x.png",
        "ftp://x",
    ]
) | st.text(max_size=30)
parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio"]) | json_values},
    optional={
        "text": st.text(max_size=40) | json_values,
        "image_url": image_urls | st.fixed_dictionaries({"url": image_urls}) | json_values,
    },
)
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "developer", "assistant", "tool"]) | json_values},
    optional={
        "content": st.text(max_size=60) | st.lists(parts, max_size=3) | json_values,
        "name": json_values,
    },
)
numbers = st.integers(min_value=-5, max_value=5) | st.floats(min_value=-3, max_value=3) | json_values
chat_requests = st.fixed_dictionaries(
    {"messages": st.lists(messages, max_size=3) | json_values},
    optional={
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values}) | json_values,
        "max_tokens": st.integers(min_value=-2, max_value=2**63 - 1) | json_values,
        "max_completion_tokens": numbers,
        "temperature": numbers,
        "top_p": numbers,
        "stop": st.lists(st.text(max_size=5), max_size=3) | json_values,
        "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1) | json_values,
        "n": numbers,
        "model": json_values,
        "extra": json_values,
    },
)


# Valid requests (pictures included, the bomb among them) with arbitrary extra parameters:
# these reach the picture checks and the sampling parameters.
good_image_urls = st.sampled_from([PNG_URL, BOMB_URL, "data:image/gif;base64,R0lGODlh"])
valid_parts = st.fixed_dictionaries(
    {"type": st.just("text"), "text": st.text(max_size=30)}
) | st.fixed_dictionaries(
    {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": good_image_urls})}
)
valid_chats = st.builds(
    lambda history, last, extra: {"messages": [*history, last], **extra},
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "assistant"]), "content": st.text(max_size=20)}
        ),
        max_size=2,
    ),
    st.fixed_dictionaries(
        {"role": st.just("user"), "content": st.text(max_size=30) | st.lists(valid_parts, max_size=3)}
    ),
    st.dictionaries(
        st.sampled_from(
            ["stream", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream_options"]
        ),
        numbers | st.booleans(),
        max_size=3,
    ),
)


def encode(value: Any) -> bytes:
    """JSON as a sloppy client writes it: big integers and NaN kept, surrogates escaped."""
    return json.dumps(value, allow_nan=True).encode()


bodies = (
    valid_chats.map(encode)  # half of the examples
    | st.one_of(
        chat_requests.map(encode),
        json_values.map(encode),
        st.binary(max_size=200),
        st.text(max_size=100).map(str.encode),
    )
)


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    with serve(make_config(max_image_bytes=64 * 1024, max_images=2)) as running:
        yield running


def assert_well_formed(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json", response.text
        error = response.json()["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith(("data: [DONE]", "}")), response.text
    else:
        assert response.json()


def assert_still_usable(client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "still there?"}]}
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: still there?"


@pytest.mark.slow
def test_chat_completions_never_answers_500(server: Running, caplog: pytest.LogCaptureFixture) -> None:
    with httpx.Client(base_url=server.http, timeout=30) as client:

        @FUZZ
        @given(body=bodies)
        def fuzz(body: bytes) -> None:
            response = client.post(
                "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
            )
            assert_well_formed(response)

        fuzz()
        assert_still_usable(client)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a traceback was logged"


form_values = (
    st.text(max_size=30) | st.integers().map(str) | st.sampled_from(["nan", "inf", "-0", "1e999", "9" * 5000])
)


@pytest.mark.slow
def test_analyze_never_answers_500(server: Running, caplog: pytest.LogCaptureFixture) -> None:
    with httpx.Client(base_url=server.http, timeout=30) as client:

        @settings(FUZZ, max_examples=100)
        @given(
            fields=st.dictionaries(
                st.sampled_from(["prompt", "max_tokens", "temperature", "image", "other"]),
                form_values,
                max_size=4,
            ),
            image=st.sampled_from(
                [None, make_png(16, 16), png_declaring(30000, 30000), b"", b"GIF89a", b"\x89PNG\r\n\x1a\n"]
            )
            | st.binary(max_size=64),
        )
        def fuzz(fields: dict[str, str], image: bytes | None) -> None:
            files = (
                {"image": ("a.png", image, "image/png")}
                if image is not None
                else {"unused": ("u", b"", "x/y")}
            )
            response = client.post("/v1/analyze?stream=false", data=fields, files=files)
            assert_well_formed(response)

        fuzz()
        assert_still_usable(client)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a traceback was logged"
