"""An `Executor` whose answers come from OpenAI-compatible servers (vLLM, SGLang, their routers,
another vlbridge): ``[model] backend = "openai"``.

The same contract as the local executor (server.inference.api): `submit` never raises and
answers at once; a request waits in a bounded queue (`Queued` with its place; past
`queue_size` waiting, `busy` with `retry_after` at once), runs when one of `max_concurrency`
places is free (`Started`), streams `Delta`s and ends with `Done` (usage as the upstream
counted it: the request asks for ``stream_options.include_usage``) or `Failed` with the
project's codes. Cancelling closes the upstream connection, so the upstream sees the
disconnect and frees its slot.

Each request streams ``POST {base_url}/chat/completions`` over httpx, pictures as ``data:``
URLs. Several base URLs are balanced by least outstanding requests (`UpstreamPool`): an
upstream that refuses connections, answers 5xx or breaks off a stream is ejected for
`eject_seconds` and probed (``GET {base_url}/models``) before it is used again. A request
whose upstream fails before the first text is retried on another; after the first text it
fails (``unavailable``): the caller already showed part of an answer.

Timeouts: connecting (`connect_timeout`), the first text (`first_token_timeout`, from the
moment the request is sent), the whole answer, queue included (the request's timeout, else
`request_timeout`). This module imports neither torch nor anything of the local model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from server.errors import SHUTDOWN_RETRY_AFTER, SHUTTING_DOWN
from server.inference.api import (
    Delta,
    Done,
    ExecutorState,
    ExecutorStats,
    Failed,
    FinishReason,
    InferenceRequest,
    Queued,
    Started,
    Timings,
    Usage,
)
from server.inference.handle import EventHandle
from server.inference.openai_wire import error_of, failed_from, request_body, seconds_of, sse_chunks
from server.inference.upstreams import Health, Upstream, UpstreamPool

log = logging.getLogger("vlbridge.upstream")

OFF_LOOP_BYTES = 256 * 1024  # pictures this large are base64-encoded on a thread
ERROR_BODY_BYTES = 64 * 1024  # what is read of an upstream's error answer


@dataclass(frozen=True, slots=True)
class UpstreamOptions:
    base_urls: tuple[str, ...]
    model: str = ""  # sent as "model"; "" = the first one the upstream lists
    api_key: str = ""
    connect_timeout: float = 5.0
    first_token_timeout: float = 120.0
    eject_seconds: float = 10.0
    max_concurrency: int = 32  # requests in flight over all upstreams (executor.max_batch)
    queue_size: int = 256  # waiting beyond those, before `busy`
    request_timeout: float = 300.0
    max_new_tokens: int = 512


@dataclass(eq=False)
class _Job:
    request: InferenceRequest
    submitted: float  # loop time
    deadline: float  # loop time
    handle: EventHandle = field(init=False)
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    ending: Failed | None = None  # why its task was cancelled (timeout, shutdown), else "cancelled"
    started: float = 0.0
    first_token: float = 0.0


_CANCELLED = Failed("cancelled", "cancelled")


class OpenAIExecutor:
    """Implements server.inference.api.Executor over OpenAI-compatible chat-completions servers."""

    def __init__(self, options: UpstreamOptions) -> None:
        self.options = options
        self.pool = UpstreamPool(options.base_urls, options.eject_seconds)
        self._model = options.model
        self._client: httpx.AsyncClient | None = None
        self._waiting: deque[_Job] = deque()
        self._running: set[_Job] = set()
        self._state = ExecutorState.STOPPED
        self._accepting = False
        self._probed = False  # the first probe of every upstream is over
        self._watcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # an upstream was ejected: the watcher recomputes its wait
        self._idle = asyncio.Event()
        self._idle.set()
        self._requests_total = 0
        self._tokens_total = 0
        self._token_times: deque[tuple[float, int]] = deque(maxlen=1024)
        self._durations: deque[float] = deque(maxlen=64)

    # ---- Executor -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is not None:
            raise RuntimeError(f"expected a stopped executor, got state {self._state.value}")
        self._client = upstream_client(self.options)
        self._state = ExecutorState.LOADING
        self._accepting = True
        self._watcher = asyncio.create_task(self._watch(), name="vlbridge-upstream-probes")

    def submit(self, request: InferenceRequest) -> EventHandle:
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = request.timeout if request.timeout is not None else self.options.request_timeout
        job = _Job(request, now, now + timeout)
        job.handle = EventHandle(request.id, loop, lambda: self._cancel(job))
        if not self._accepting:
            job.handle.push(Failed("unavailable", SHUTTING_DOWN, SHUTDOWN_RETRY_AFTER))
        elif not self.pool.usable:
            retry = self.pool.retry_after(now)
            job.handle.push(
                Failed("unavailable", f"no model server is reachable ({self.pool.summary()})", retry)
            )
        elif len(self._waiting) >= self.options.queue_size:
            retry = self._retry_after()
            message = f"all {self.options.queue_size} queue places are taken; retry in {retry:.0f} s"
            job.handle.push(Failed("busy", message, retry))
        else:
            self._idle.clear()
            self._waiting.append(job)
            job.handle.push(Queued(len(self._waiting)))
            job.timer = loop.call_at(job.deadline, self._expire, job)
            self._pump()
        return job.handle

    def stats(self) -> ExecutorStats:
        now = time.monotonic()
        recent = sum(n for t, n in list(self._token_times) if now - t <= 5.0)
        return ExecutorStats(
            state=self._current_state(),
            load_progress=1.0 if self._probed else 0.0,
            model=self._model or "unknown",  # an id (no spaces): the upstreams list no model yet
            device=f"openai-compatible, {len(self.pool.upstreams)} upstreams",
            queue_depth=len(self._waiting),
            queue_capacity=self.options.queue_size,
            active=len(self._running),
            max_batch=self.options.max_concurrency,
            tokens_per_second=recent / 5.0,
            requests_total=self._requests_total,
            tokens_total=self._tokens_total,
            detail=self.pool.summary(),
        )

    async def stop(self, grace: float = 0.0) -> None:
        self._accepting = False
        if self._client is None:
            return
        if grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        ending = Failed("unavailable", SHUTTING_DOWN, SHUTDOWN_RETRY_AFTER)
        while self._waiting:
            self._drop_waiting(self._waiting.popleft(), ending)
        tasks = [job.task for job in self._running if job.task is not None]
        for job in self._running:
            self._end_task(job, ending)
        if self._watcher is not None:
            self._watcher.cancel()
            tasks.append(self._watcher)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()
        self._client = None
        self._state = ExecutorState.STOPPED

    # ---- queue ----------------------------------------------------------------------------------

    def _current_state(self) -> ExecutorState:
        if self._state is ExecutorState.STOPPED:
            return self._state
        if self.pool.healthy:
            return ExecutorState.READY
        return ExecutorState.FAILED if self._probed and not self.pool.usable else ExecutorState.LOADING

    def _pump(self) -> None:
        """Start waiting requests while places are free; tell the rest their new places."""
        moved = False
        while self._waiting and len(self._running) < self.options.max_concurrency:
            job = self._waiting.popleft()
            if job.timer is not None:
                job.timer.cancel()
            self._running.add(job)
            job.task = asyncio.create_task(self._run(job), name=f"vlbridge-upstream-{job.request.id}")
            moved = True
        if moved:
            for position, job in enumerate(self._waiting, start=1):
                job.handle.push(Queued(position))

    def _cancel(self, job: _Job) -> None:
        if job in self._waiting:
            self._waiting.remove(job)
            self._drop_waiting(job, _CANCELLED)
        elif job.task is not None:
            self._end_task(job, _CANCELLED)

    def _expire(self, job: _Job) -> None:
        if job in self._waiting:
            self._waiting.remove(job)
            self._drop_waiting(job, Failed("timeout", "the request waited past its deadline"))

    def _drop_waiting(self, job: _Job, failed: Failed) -> None:
        if job.timer is not None:
            job.timer.cancel()
        job.handle.push(failed)
        self._check_idle()

    def _end_task(self, job: _Job, failed: Failed) -> None:
        if job.ending is None and job.task is not None:
            job.ending = failed
            job.task.cancel()  # closes the upstream stream: the upstream sees the disconnect

    def _check_idle(self) -> None:
        if not self._waiting and not self._running:
            self._idle.set()

    def _retry_after(self) -> float:
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        waves = len(self._waiting) / self.options.max_concurrency + 1
        return float(min(60.0, max(1.0, round(mean * waves, 1))))

    # ---- one request ----------------------------------------------------------------------------

    async def _run(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        job.started = loop.time()
        job.handle.push(Started())
        try:
            async with asyncio.timeout_at(job.deadline):
                await self._answer(job)
        except asyncio.CancelledError:
            job.handle.push(job.ending or _CANCELLED)
        except TimeoutError:
            job.handle.push(
                Failed("timeout", f"no complete answer within {job.deadline - job.submitted:.0f} s")
            )
        except Exception:  # a bug here must end this request only, with a logged trace
            log.exception("%s: the upstream answer failed", job.request.id)
            job.handle.push(Failed("internal", "the answer failed; see the server log"))
        finally:
            self._running.discard(job)
            self._durations.append(loop.time() - job.submitted)
            self._pump()
            self._check_idle()

    async def _answer(self, job: _Job) -> None:
        """Try upstreams until one streams the answer or none is left; push the final event."""
        body = await self._body(job.request)
        tried: list[Upstream] = []
        failed = Failed("unavailable", f"no model server is reachable ({self.pool.summary()})")
        while (upstream := self.pool.pick(asyncio.get_running_loop().time(), tried)) is not None:
            tried.append(upstream)
            refused = await self._stream(job, upstream, body)
            if refused is None:
                return
            failed = refused
            more = "trying another upstream" if self.pool.pick(0.0, tried) else "none left"
            log.warning("%s: %s; %s", job.request.id, failed.message, more)
        job.handle.push(failed)

    async def _stream(self, job: _Job, upstream: Upstream, body: bytes) -> Failed | None:
        """Stream one attempt on *upstream*: None when the final event was pushed, or the
        failure of an upstream that sent no text (the caller may try another one)."""
        assert self._client is not None
        loop = asyncio.get_running_loop()
        self.pool.begin(upstream)
        texts: list[str] = []
        try:
            first_deadline = min(job.deadline, loop.time() + self.options.first_token_timeout)
            async with (
                asyncio.timeout_at(first_deadline) as until_first,
                self._client.stream(
                    "POST",
                    upstream.url + "/chat/completions",
                    content=body,
                    headers={"Content-Type": "application/json"},
                ) as response,
            ):
                if response.status_code != 200:
                    raw = await _head(response)
                    failed, retry = self._refused(upstream, response.status_code, raw, response.headers)
                    if retry:
                        return failed
                    job.handle.push(failed)
                    return None
                self.pool.succeed(upstream)
                usage, finish, ended = None, FinishReason.STOP, False
                async for chunk in sse_chunks(response.aiter_lines()):
                    if chunk is None:
                        ended = True
                        break
                    if isinstance(error := chunk.get("error"), dict):
                        failed = failed_from(error)
                        if failed.code == "unavailable" and not texts:  # e.g. it is shutting down
                            self._eject(upstream, failed.message)
                            return failed
                        job.handle.push(failed)
                        return None
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if not texts:
                                job.first_token = loop.time()
                                until_first.reschedule(None)  # the whole answer's deadline is the outer one
                            texts.append(text)
                            job.handle.push(Delta(text))
                        if choice.get("finish_reason") == "length":
                            finish = FinishReason.LENGTH
                if not ended:
                    raise httpx.RemoteProtocolError("the stream ended without [DONE]")
        except TimeoutError:
            if texts or loop.time() >= job.deadline:
                raise
            job.handle.push(Failed("timeout", f"no text within {self.options.first_token_timeout:.0f} s"))
            return None
        except httpx.TransportError as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._eject(upstream, reason)
            if not texts:
                return Failed("unavailable", f"the model server {upstream.url} failed ({reason})")
            job.handle.push(
                Failed(
                    "unavailable", f"the model server broke off the answer after {len(texts)} pieces of text"
                )
            )
            return None
        finally:
            self.pool.end(upstream)
        self._finish(job, "".join(texts), len(texts), usage, finish)
        return None

    def _finish(self, job: _Job, text: str, pieces: int, usage: Any, finish: FinishReason) -> None:
        now = asyncio.get_running_loop().time()
        counted = usage if isinstance(usage, dict) else {}
        completion = int(counted.get("completion_tokens") or pieces)
        self._requests_total += 1
        self._tokens_total += completion
        self._token_times.append((time.monotonic(), completion))
        timings = Timings(
            round(job.started - job.submitted, 4),
            round((job.first_token or now) - job.submitted, 4),
            round(now - job.submitted, 4),
        )
        job.handle.push(
            Done(text, Usage(int(counted.get("prompt_tokens") or 0), completion), timings, finish)
        )

    def _refused(
        self, upstream: Upstream, status: int, raw: bytes, headers: httpx.Headers
    ) -> tuple[Failed, bool]:
        """What an upstream's non-200 answer means, and whether another upstream may do better."""
        error = error_of(raw)
        message = str(error.get("message") or raw[:200].decode("utf-8", "replace") or f"HTTP {status}")
        if status == 429:
            retry = seconds_of(headers.get("retry-after"))
            return Failed("busy", f"the model servers are busy: {message}", retry or 5.0), True
        if status >= 500 or status in (401, 403, 404):
            # 401/403: our key; 404: the model name or the URL. Both mean this upstream cannot
            # answer us: say so in the log for the admin, and leave it out for a while.
            self._eject(upstream, f"HTTP {status}: {message}")
            return Failed("unavailable", f"the model server answered HTTP {status}: {message}"), True
        return failed_from({**error, "message": message}, status), False

    def _eject(self, upstream: Upstream, reason: str) -> None:
        log.warning("upstream %s left out for %.0f s: %s", upstream.url, self.options.eject_seconds, reason)
        self.pool.fail(upstream, asyncio.get_running_loop().time(), reason)
        self._wake.set()

    async def _body(self, request: InferenceRequest) -> bytes:
        size = sum(len(image) for turn in request.messages for image in turn.images)
        if size > OFF_LOOP_BYTES:
            return await asyncio.to_thread(request_body, request, self._model, self.options.max_new_tokens)
        return request_body(request, self._model, self.options.max_new_tokens)

    # ---- probes ---------------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Probe unknown upstreams at once and ejected ones when their period is over."""
        loop = asyncio.get_running_loop()
        while True:
            due = self.pool.due(loop.time())
            if due:
                await asyncio.gather(*(self._probe(upstream) for upstream in due))
            self._probed = True
            self._wake.clear()
            next_due = self.pool.next_due()
            wait = None if next_due is None else max(0.05, next_due - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _probe(self, upstream: Upstream) -> None:
        assert self._client is not None
        loop = asyncio.get_running_loop()
        probed = await probe(self._client, upstream.url, self.options.connect_timeout)
        if probed.error:
            if upstream.health is not Health.EJECTED:  # a line when it goes, not at every probe
                log.warning("upstream %s left out: %s", upstream.url, probed.error)
            self.pool.fail(upstream, loop.time(), probed.error)
            return
        if not self._model and probed.models:
            self._model = probed.models[0]
        if upstream.failures:
            log.info("upstream %s is back", upstream.url)
        self.pool.succeed(upstream)


def upstream_client(options: UpstreamOptions) -> httpx.AsyncClient:
    """The HTTP client for the upstreams: their key, connect and write deadlines, a pool as large as
    the requests in flight."""
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    # Read deadlines are this module's (first text, whole answer): httpx's own read timeout
    # would bound the gap between two chunks, which a queued upstream request may exceed.
    timeout = httpx.Timeout(None, connect=options.connect_timeout, write=options.connect_timeout)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=options.max_concurrency)
    return httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits)


@dataclass(frozen=True, slots=True)
class Probe:
    """What ``GET {base_url}/models`` said: the model ids listed, or why the upstream is unusable."""

    models: tuple[str, ...] = ()
    error: str = ""  # "" = it answered 200 (a body that lists nothing still counts)


async def probe(client: httpx.AsyncClient, base_url: str, connect_timeout: float) -> Probe:
    """Ask *base_url* for its models within *connect_timeout* (connecting and the answer); never
    raises (transport errors and non-200 are `Probe.error`)."""
    try:
        response = await client.get(base_url + "/models", timeout=connect_timeout)
    except httpx.HTTPError as exc:
        return Probe(error=f"probe: {type(exc).__name__}: {exc}")
    if response.status_code != 200:
        return Probe(error=f"probe: HTTP {response.status_code}")
    entries: object = []
    with contextlib.suppress(orjson.JSONDecodeError, LookupError, TypeError):
        entries = orjson.loads(response.content)["data"]
    if not isinstance(entries, list):
        return Probe()
    return Probe(tuple(str(entry["id"]) for entry in entries if isinstance(entry, dict) and "id" in entry))


async def _head(response: httpx.Response) -> bytes:
    data = bytearray()
    async for piece in response.aiter_bytes():
        data += piece
        if len(data) >= ERROR_BODY_BYTES:
            break
    return bytes(data[:ERROR_BODY_BYTES])
