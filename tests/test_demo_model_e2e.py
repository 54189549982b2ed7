"""End to end with the real executor and the tiny real Qwen3-VL: WebSocket, SSE and OpenAI."""

from __future__ import annotations

import base64

import httpx
import orjson
import pytest

from tests.conftest import make_png
from tests.serving import make_config, serve
from tests.wsclient import Client


@pytest.fixture(scope="module")
def demo_server(demo_model_dir):
    config = make_config(str(demo_model_dir), executor={"max_batch": 4})
    with serve(config) as running:
        yield running


async def test_ws_ask_about_a_picture_streams_from_the_real_model(demo_server) -> None:
    client = await Client.open(demo_server.ws)
    await client.ask("pic", "what is in this picture?", [make_png()], max_tokens=12)
    frames = await client.until_end("pic", timeout=60)
    done = frames[-1]
    assert done["type"] == "done", done
    assert done["usage"]["image_tokens"] > 0 and 1 <= done["usage"]["completion_tokens"] <= 12
    assert "".join(f["text"] for f in frames if f["type"] == "delta") == done["text"]
    # The picture and the answer are context for the next question.
    await client.ask("more", "and the colour?", max_tokens=4)
    follow = (await client.until_end("more", timeout=60))[-1]
    assert follow["usage"]["prompt_tokens"] > done["usage"]["prompt_tokens"]
    await client.close()


def test_sse_analyze_with_the_real_model(demo_server) -> None:
    files = {"image": ("p.png", make_png(64, 64), "image/png")}
    response = httpx.post(
        demo_server.http + "/v1/analyze",
        files=files,
        data={"prompt": "describe", "max_tokens": "8"},
        timeout=60,
    )
    assert response.status_code == 200
    events = [orjson.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "done" and events[-1]["usage"]["image_tokens"] > 0


def test_the_openai_client_against_the_real_model(demo_server) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=demo_server.http + "/v1", api_key="unused", max_retries=0, timeout=60)
    url = "data:image/png;base64," + base64.b64encode(make_png()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "what is it?"},
            ],
        }
    ]
    completion = client.chat.completions.create(model="demo", messages=messages, max_tokens=6)
    assert completion.usage.completion_tokens <= 6 and completion.choices[0].finish_reason in (
        "stop",
        "length",
    )
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=6, stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == completion.choices[0].message.content
