"""Platform-neutral inference types: what a caller submits and the events it gets back.

This module imports neither torch nor transformers; the WebSocket endpoint, the HTTP API
and the Feishu adapter all speak these types and convert at their own edge.

A caller does::

    handle = executor.submit(InferenceRequest(id=..., messages=[Turn.user("what is it?", [png])]))
    async for event in handle:          # Queued*, Reading?, Started, Delta*, then one Done or Failed
        ...
    handle.listen(on_events)            # or: the same events passed to a callback, in batches
    handle.cancel()                     # at any time; the stream then ends with Failed("cancelled")

`submit` never blocks and never raises for a request-level problem: a full queue, a
bad picture or a model that is still loading arrive as a `Failed` event with a stable
`code` (see server.errors) and, for "busy", a `retry_after` estimate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol, TypeVar, dataclass_transform

Role = Literal["system", "user", "assistant"]
_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def value(cls: type[_T]) -> type[_T]:
    """A frozen, slotted dataclass for the type checker (mypy rejects an assignment to a
    field); at run time a plain slotted one with the same equality and hash.

    For the types built several times per answer or per token (turns, events): a frozen
    dataclass sets each field through ``object.__setattr__``, which makes it three times
    slower to build, about a tenth of the server's CPU per WebSocket question.
    """
    return dataclass(slots=True, unsafe_hash=True)(cls)


@value
class Turn:
    """One message of a conversation; *images* are encoded picture files (PNG, JPEG, ...)."""

    role: Role
    text: str = ""
    images: tuple[bytes, ...] = ()

    @classmethod
    def user(cls, text: str, images: list[bytes] | tuple[bytes, ...] = ()) -> Turn:
        return cls("user", text, tuple(images))

    @classmethod
    def assistant(cls, text: str) -> Turn:
        return cls("assistant", text)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request generation settings; requests with different settings share a batch.

    temperature 0 means greedy. `min_new_tokens` suppresses end-of-answer tokens until
    reached (benchmarks force the answer length with min == max).
    """

    max_new_tokens: int | None = None  # None: the model's configured max_new_tokens
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0
    seed: int | None = None


@dataclass(slots=True)
class InferenceRequest:
    """A question about zero or more pictures, with the earlier turns as context."""

    id: str
    messages: list[Turn]
    params: SamplingParams = field(default_factory=SamplingParams)
    timeout: float | None = None  # seconds from submission; None: executor.request_timeout
    client: str = ""  # who asks (e.g. a session): clients take turns at preparing pictures

    @property
    def image_count(self) -> int:
        return sum(len(turn.images) for turn in self.messages)


@value
class Usage:
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@value
class Timings:
    """Seconds from submission, rounded to 0.1 ms (by the executor, off the event loop)."""

    queued: float  # until the request joined the batch
    first_token: float  # time to first token
    total: float


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-answer token or a stop string
    LENGTH = "length"  # max_new_tokens reached


@value
class Queued:
    position: int  # 1 = next to start
    eta: float | None = None  # seconds until it starts, estimated
    type: Literal["queued"] = "queued"


@value
class Reading:
    """The request's pictures are being read: decoded, resized and, after `Started`, encoded
    by the model with the prompt. Only for requests whose question (the last turn) has
    pictures, at most once, when their preparation begins (which can take seconds for large
    pictures, while the queue position alone would still say 1); a backend that does not
    prepare pictures itself never sends it."""

    type: Literal["reading"] = "reading"


@value
class Started:
    type: Literal["started"] = "started"


@value
class Delta:
    text: str
    type: Literal["delta"] = "delta"


@value
class Done:
    text: str
    usage: Usage
    timings: Timings
    finish_reason: FinishReason = FinishReason.STOP
    token_ids: tuple[int, ...] = ()
    type: Literal["done"] = "done"


@value
class Failed:
    code: str
    message: str
    retry_after: float | None = None
    type: Literal["error"] = "error"


Event = Queued | Reading | Started | Delta | Done | Failed
Events = Sequence[Event]  # what a listener gets: a non-empty batch, in order
FINAL = (Done, Failed)  # the events that end a stream (a tuple: `Done | Failed` is rebuilt per call)


class ExecutorState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class ExecutorStats:
    """A snapshot for /health, /metrics and /status."""

    state: ExecutorState
    load_progress: float  # 0..1 while loading
    model: str
    device: str
    queue_depth: int
    queue_capacity: int
    active: int  # requests in the running batch
    max_batch: int
    tokens_per_second: float  # output tokens/s over the last few seconds
    requests_total: int
    tokens_total: int
    gpu_memory_used: int | None = None  # bytes
    gpu_memory_total: int | None = None
    detail: str = ""  # e.g. why it failed to load

    @property
    def load(self) -> float:
        """0 (idle) .. 1 (full): running batch and queue together."""
        capacity = self.max_batch + self.queue_capacity
        return min(1.0, (self.active + self.queue_depth) / capacity) if capacity else 1.0


class RequestHandle(Protocol):
    """The caller's side of one submitted request."""

    @property
    def id(self) -> str: ...

    def __aiter__(self) -> AsyncIterator[Event]: ...

    def listen(self, callback: Callable[[Events], None]) -> None:
        """Instead of iterating: have the events passed to *callback* on the event loop,
        as many at a time as are ready (a non-empty batch, the events already waiting
        first, possibly before `listen` returns; the final event ends the last batch).
        Costs no task per request; a listener that stops caring must call `cancel`."""

    def cancel(self) -> None:
        """Stop the request; its slot is freed at the next step. Idempotent."""


class AnswerSource(Protocol):
    """Where answers come from: what the routes and the IM adapters need (the service's
    answer gateway implements it over an `Executor`)."""

    def submit(self, request: InferenceRequest) -> RequestHandle: ...

    def stats(self) -> ExecutorStats: ...


class Executor(AnswerSource, Protocol):
    """An inference backend: an `AnswerSource` that is started and stopped."""

    async def start(self) -> None:
        """Begin loading in the background; returns at once (stats().state says when ready)."""

    async def stop(self, grace: float = 0.0) -> None:
        """Let running requests finish for up to *grace* seconds, fail the rest, free the model."""
