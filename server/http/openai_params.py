"""Which OpenAI chat-completions parameters `POST /v1/chat/completions` honours, ignores or refuses.

Every body key falls in one of three sets, so that no parameter is silently dropped:

- `SUPPORTED`: honoured (read by `server.http.openai`).
- `IGNORED`: accepted and not used, because they label, route or cache a request and do not
  change the answer (`user`, `metadata`, `store`, `service_tier`, ...).
- `NEUTRAL`: features this server does not have (tools, structured output, log-probabilities,
  penalties, audio, ...). Accepted only at the value that asks for nothing (the value OpenAI
  assumes when it is left out, which many clients send explicitly: ``"logprobs": false``,
  ``"frequency_penalty": 0``, ``"tools": []``), else refused.

``null`` counts as left out. Any other key is refused as unknown, as OpenAI's API does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from server.errors import BadRequest

SUPPORTED = frozenset(
    {
        "messages",
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "n",
        "min_tokens",  # vLLM's and SGLang's extension; vlbridge's openai backend sends it
    }
)

IGNORED = frozenset(
    {
        "user",  # end-user id, for abuse monitoring
        "safety_identifier",  # the same, newer name
        "prompt_cache_key",  # a cache-routing hint; this server's prefix cache needs none
        "metadata",  # tags for stored completions
        "store",  # store for distillation/evals: nothing is stored here either way
        "service_tier",  # a processing-tier choice; there is one tier
        "parallel_tool_calls",  # meaningful only with `tools`, which are refused unless empty
    }
)

# parameter -> (the value that asks for nothing, why any other value is refused)
NEUTRAL: Mapping[str, tuple[Any, str]] = {
    "tools": ([], "this server does not call tools"),
    "tool_choice": ("none", "this server does not call tools"),
    "functions": ([], "this server does not call functions"),
    "function_call": ("none", "this server does not call functions"),
    "response_format": ({"type": "text"}, "answers are plain text (no JSON mode or schema)"),
    "logprobs": (False, "log-probabilities are not returned"),
    "top_logprobs": (0, "log-probabilities are not returned"),
    "logit_bias": ({}, "token biases are not applied"),
    "frequency_penalty": (0, "penalties are not applied"),
    "presence_penalty": (0, "penalties are not applied"),
    "modalities": (["text"], "answers are text only"),
    "audio": (None, "answers are text only"),
    "prediction": (None, "predicted outputs are not used"),
    "reasoning_effort": (None, "the model has no reasoning-effort setting"),
    "verbosity": (None, "the answer's length is set by max_tokens only"),
    "web_search_options": (None, "this server does not search the web"),
}


def refuse_unsupported(body: Mapping[str, Any]) -> None:
    """Raise `BadRequest` naming the first parameter of *body* that this server would otherwise
    ignore while it changes the answer: an unknown key, or a `NEUTRAL` one at another value."""
    for name, value in body.items():
        if name in SUPPORTED or name in IGNORED or value is None:
            continue
        if name not in NEUTRAL:
            raise BadRequest(
                f"'{name}' is not a parameter this server knows; it takes: {', '.join(sorted(SUPPORTED))}"
            )
        neutral, why = NEUTRAL[name]
        if not _same(value, neutral):
            also = "" if neutral is None else f" (or send {orjson.dumps(neutral).decode()})"
            raise BadRequest(f"'{name}' is not supported: {why}; leave it out{also}")


def _same(value: Any, neutral: Any) -> bool:
    if isinstance(value, bool) != isinstance(neutral, bool):  # False is not 0 in JSON
        return False
    return bool(value == neutral)
