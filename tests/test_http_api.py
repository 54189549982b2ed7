"""HTTP over real sockets: /v1/analyze (SSE and JSON), /v1/chat/completions, errors, auth."""

from __future__ import annotations

import base64
import io
import os

import httpx
import orjson
import pytest
from PIL import Image

from server.inference.echo import ECHO_PATH
from server.inference.instant import INSTANT_PATH
from tests.conftest import make_png, png_declaring
from tests.serving import make_config, serve, slow_echo
from tests.waiting import until_blocking


@pytest.fixture(scope="module")
def server():
    with serve(make_config(auth_tokens=("tok",), max_image_bytes=64 * 1024, max_images=2)) as running:
        yield running


AUTH = {"Authorization": "Bearer tok"}
LARGE = 256 * 1024  # bytes of base64: a picture as large as phones send


def sse_events(body: str) -> list[tuple[str, dict]]:
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines.get("event", ""), orjson.loads(lines["data"])))
    return events


def test_analyze_streams_server_sent_events(server) -> None:
    files = {"image": ("cat.png", make_png(), "image/png")}
    with httpx.stream(
        "POST", server.http + "/v1/analyze", files=files, data={"prompt": "what?"}, headers=AUTH
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        events = sse_events(response.read().decode())
    names = [name for name, _ in events]
    assert names[:3] == ["queued", "reading", "started"] and names[-1] == "done", names
    assert all(data["type"] == name for name, data in events)
    assert events[-1][1]["text"] == "echo: what? [96x64]"


def test_analyze_answers_one_json_object_without_streaming(server) -> None:
    response = httpx.post(
        server.http + "/v1/analyze?stream=false",
        headers=AUTH,
        files=[
            ("image", ("a.png", make_png(), "image/png")),
            ("image", ("b.png", make_png(40, 40), "image/png")),
        ],
        data={"prompt": "compare", "max_tokens": "200"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "done" and body["text"] == "echo: compare [96x64, 40x40]"
    assert body["usage"]["total_tokens"] > 0


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"prompt": "x"}}, 415, "unsupported_media_type"),
        ({"files": {"image": ("a.png", b"not a picture", "image/png")}}, 400, "bad_image"),
        ({"files": {"image": ("a.png", make_png() + b"\0" * 70_000, "image/png")}}, 413, "too_large"),
        ({"files": [("image", ("a", make_png(), "image/png"))] * 3}, 413, "too_large"),
        ({"files": {"other": ("a", b"x", "text/plain")}, "data": {"prompt": " "}}, 400, "bad_request"),
        (
            {"files": {"image": ("a", make_png(), "image/png")}, "data": {"max_tokens": "-1"}},
            400,
            "bad_request",
        ),
    ],
)
def test_analyze_errors_are_json_with_the_right_status(server, kwargs, status, code) -> None:
    response = httpx.post(server.http + "/v1/analyze", headers=AUTH, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_http_routes_need_the_token(server) -> None:
    response = httpx.post(server.http + "/v1/analyze", files={"image": ("a", make_png(), "image/png")})
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.http + "/v1/models?token=tok").status_code == 200
    assert httpx.get(server.http + "/v1/models").status_code == 401
    assert httpx.get(server.http + "/health").status_code == 200  # load balancers need no token
    missing = httpx.get(server.http + "/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def chat_body(**extra) -> dict:
    content = [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": data_url(make_png())}},
    ]
    return {
        "model": "any",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],
        **extra,
    }


def test_chat_completions_without_streaming(server) -> None:
    response = httpx.post(server.http + "/v1/chat/completions", headers=AUTH, json=chat_body(max_tokens=100))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == ECHO_PATH  # the served model
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo: what is it? [96x64]"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )


def test_chat_completions_streaming_chunks_end_with_done(server) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", server.http + "/v1/chat/completions", headers=AUTH, json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "echo: what is it? [96x64]"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"messages": []}, 400, "non-empty"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "not supported"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
                    }
                ]
            },
            400,
            "remote image URLs",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}],
                    }
                ]
            },
            400,
            "base64",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "'n' must be 1"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
    ],
)
def test_chat_completions_refuses_bad_requests(server, body, status, words) -> None:
    response = httpx.post(server.http + "/v1/chat/completions", headers=AUTH, json=body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]


def test_the_official_openai_client_works_against_the_bridge(server) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.http + "/v1", api_key="tok", max_retries=0)
    messages = chat_body()["messages"]
    completion = client.chat.completions.create(model="vlbridge", messages=messages, max_tokens=50)
    assert completion.choices[0].message.content == "echo: what is it? [96x64]"
    stream = client.chat.completions.create(model="vlbridge", messages=messages, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == (
        "echo: what is it? [96x64]"
    )
    assert [model.id for model in client.models.list()] == [ECHO_PATH]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], n=3)
    wrong = openai.OpenAI(base_url=server.http + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("route", ["analyze", "chat"])
def test_a_client_that_gives_up_frees_its_answer_without_streaming(route: str) -> None:
    # One character every 20 ms: a 600-character answer would run for ~12 s.
    with serve(make_config(), executor=slow_echo(0.02)) as running:
        long_question = "x" * 590
        if route == "analyze":
            files = {"image": ("cat.png", make_png(), "image/png")}
            url, kwargs = "/v1/analyze?stream=false", {"data": {"prompt": long_question}, "files": files}
        else:
            url = "/v1/chat/completions"
            kwargs = {"json": {"model": "m", "messages": [{"role": "user", "content": long_question}]}}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(running.http + url, timeout=0.5, **kwargs)
        stats = running.service.answers.stats
        # Within 10 s, before the ~12 s answer could have ended by itself.
        until_blocking(lambda: stats().active == 0, "the abandoned answer to stop running", timeout=10)
        assert stats().requests_total == 0  # cancelled, never completed


@pytest.mark.parametrize("route", ["analyze", "chat"])
def test_a_picture_over_the_decoding_budget_is_refused_before_queueing(route: str) -> None:
    # 9,400 x 9,400 pixels (88 MP: under Pillow's bomb guard, over the 16.7 MP decoding budget)
    # in a header of a few bytes. The instant backend never decodes pictures: had the route
    # queued it, the answer would be a 200.
    bomb = png_declaring(9400, 9400)
    with serve(make_config(INSTANT_PATH)) as running:
        if route == "analyze":
            url, kwargs = "/v1/analyze?stream=false", {"files": {"image": ("big.png", bomb, "image/png")}}
        else:
            content = [{"type": "image_url", "image_url": {"url": data_url(bomb)}}]
            url, kwargs = (
                "/v1/chat/completions",
                {"json": {"messages": [{"role": "user", "content": content}]}},
            )
        response = httpx.post(running.http + url, timeout=30, **kwargs)
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "too_large"
        assert "picture 1: the picture is 9400x9400 pixels" in error["message"]
        assert "megapixels" in error["message"]
        assert running.service.answers.stats().requests_total == 0


def test_chat_completions_take_large_pictures_and_refuse_large_garbage() -> None:
    noise = Image.frombytes("RGB", (400, 300), os.urandom(400 * 300 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    picture = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert len(picture) > LARGE  # a picture of the size users send, not a few bytes

    def ask(url: str) -> httpx.Response:
        content = [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]
        return httpx.post(
            running.http + "/v1/chat/completions",
            headers=AUTH,
            json={"messages": [{"role": "user", "content": content}]},
            timeout=60,
        )

    with serve(make_config(auth_tokens=("tok",), max_image_bytes=2 * 2**20)) as running:
        answer = ask(picture)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "echo: what? [400x300]"
        refused = ask("data:image/png;base64," + "@" * (LARGE + 1))
        assert refused.status_code == 400 and "base64" in refused.json()["error"]["message"], refused.text
