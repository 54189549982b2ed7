"""The chat client's terminal UI: one-shot (`vlbridge chat "question"`) and interactive.

One loop serves both: it waits on the connection's events and on the user's input at the
same time, so pings are answered, reconnects are shown and `/cancel` or Ctrl-C work while
an answer streams. A one-shot run is the same loop fed one scripted question.

Interactive commands: `/image PATH` (attach a picture to the next question), `/reset`,
`/cancel`, `/history`, `/help`, `/quit`. Lines typed while an answer streams wait for it,
except `/cancel` and `/quit` on a terminal (from a pipe, every line waits its turn). The
first Ctrl-C cancels the answer in progress; a Ctrl-C with nothing running, or end of
input, quits.

Exit status: 0 answered (interactive: quit), 1 the one-shot question failed, 3 the
connection failed for good (see `connection.py`), 130 interrupted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, TextIO

from client.connection import Connection, Disconnected, LinkEvent
from client.errors import ClientError, PictureError
from client.images import Picture, read_picture
from client.protocol import (
    SESSION_LOST,
    AskDone,
    AskFailed,
    Delta,
    FramesLost,
    Hello,
    Queued,
    Reading,
    ServerError,
    SessionLost,
    Started,
)
from client.screen import Screen
from protocol.v1 import ErrorCode

HELP = "commands: /image PATH  /reset  /cancel  /history  /help  /quit   (Ctrl-C cancels an answer)"
EXIT_FAILED, EXIT_CONNECTION, EXIT_INTERRUPTED = 1, 3, 130
LOST_ANSWER = "the answer was lost with the session (the server restarted or forgot it); ask again"


class Signal(Enum):
    EOF = "eof"
    INTERRUPT = "interrupt"


Input = str | Signal


class Inputs(Protocol):
    async def get(self) -> Input: ...

    def interrupt(self) -> None: ...


class ScriptedInputs:
    """Fixed lines, then end of input (the one-shot mode)."""

    def __init__(self, lines: list[str]) -> None:
        self._queue: asyncio.Queue[Input] = asyncio.Queue()
        for line in lines:
            self._queue.put_nowait(line)
        self._queue.put_nowait(Signal.EOF)

    async def get(self) -> Input:
        return await self._queue.get()

    def interrupt(self) -> None:
        self._queue.put_nowait(Signal.INTERRUPT)


class StdinLines:
    """Lines of a text stream read by a daemon thread (it may block in read() forever)."""

    def __init__(self, stream: TextIO, backlog: int = 64) -> None:
        self._stream = stream
        self._queue: asyncio.Queue[Input] = asyncio.Queue(backlog)
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, name="stdin-reader", daemon=True).start()

    def _read(self) -> None:
        while True:
            line = self._stream.readline()
            item: Input = line.rstrip("\r\n") if line else Signal.EOF
            try:
                asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop).result()
            except RuntimeError:
                return  # the loop is closed: the client is exiting
            if not line:
                return

    async def get(self) -> Input:
        return await self._queue.get()

    def interrupt(self) -> None:
        if self._queue.full():
            self._queue.get_nowait()  # Ctrl-C must never be lost behind typed-ahead lines
        self._queue.put_nowait(Signal.INTERRUPT)


@dataclass(slots=True)
class Answer:
    id: str
    question: str
    pictures: list[str]
    sent: float
    first: float | None = None
    text: str = ""
    reconnects: int = 0
    cancelling: bool = False

    def timings(self, usage: dict[str, Any], now: float) -> str:
        total = now - self.sent
        ttft = (self.first if self.first is not None else now) - self.sent
        tokens = usage.get("completion_tokens")
        parts = [f"TTFT {ttft:.2f} s", f"total {total:.2f} s"]
        if isinstance(tokens, int):
            decode = total - ttft
            rate = (tokens - 1) / decode if tokens > 1 and decode > 0 else tokens / total if total else 0.0
            parts.append(f"{tokens} tokens, {rate:.1f} tokens/s")
        if self.reconnects:
            parts.append(f"resumed after {self.reconnects} reconnect{'s' if self.reconnects > 1 else ''}")
        return " · ".join(parts)


@dataclass(slots=True)
class Turn:
    question: str
    pictures: list[str]
    answer: str


@dataclass
class Chat:
    """The loop described in the module docstring."""

    conn: Connection
    screen: Screen
    inputs: Inputs
    interactive: bool
    prompt: str | None = None  # shown when waiting for a line (a terminal on stdin)
    max_tokens: int | None = None  # sent with every question
    attached: list[Picture] = field(default_factory=list)
    history: list[Turn] = field(default_factory=list)
    current: Answer | None = None
    backlog: deque[str] = field(default_factory=deque)
    exit_code: int = 0
    _eof: bool = False
    _quit: bool = False

    async def run(self) -> int:
        line_task: asyncio.Task[Input] | None = None
        event_task: asyncio.Task[LinkEvent] | None = None
        self._show_prompt()
        try:
            while not self._quit:
                if line_task is None:  # also after end of input: Ctrl-C still arrives this way
                    line_task = asyncio.create_task(self.inputs.get())
                if event_task is None:
                    event_task = asyncio.create_task(self.conn.next_event())
                waiting = {t for t in (line_task, event_task) if t is not None}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if event_task in done:
                    event, event_task = event_task.result(), None
                    self.on_event(event)
                if line_task in done and not self._quit:
                    item, line_task = line_task.result(), None
                    self.on_input(item)
        except ClientError as exc:
            self.screen.end_answer()
            self.screen.status(f"vlbridge chat: {exc}", dim=False)
            self.exit_code = EXIT_CONNECTION
        finally:
            for task in (line_task, event_task):
                if task is not None:
                    task.cancel()
            await self.screen.aclose()
        return self.exit_code

    # -- input ----------------------------------------------------------------------------

    def on_input(self, item: Input) -> None:
        if item is Signal.INTERRUPT:
            if self.current is None or self.current.cancelling:
                self.exit_code = EXIT_INTERRUPTED
                self._quit = True
            else:
                self._cancel()
                if not self.interactive:
                    self.exit_code = EXIT_INTERRUPTED
            return
        if item is Signal.EOF:
            self._eof = True
            self._quit = self.current is None and not self.backlog
            return
        self.screen.prompt_taken()
        line = item.strip()
        if self.current is not None:
            if self.prompt is None:
                self.backlog.append(line)  # a script: every line in turn, none read ahead
            elif line == "/cancel":
                self._cancel()
            elif line == "/quit":
                self._quit = True
            else:
                self.backlog.append(line)
            return
        self.handle(line)
        self._show_prompt()

    def handle(self, line: str) -> None:
        command, _, rest = line.partition(" ")
        if not line:
            if self.attached and not self.interactive:
                self._ask("")  # pictures alone are a question (`vlbridge chat --image x.png ""`)
            return
        if not line.startswith("/"):
            self._ask(line)
        elif command == "/image" and rest.strip():
            try:
                picture = read_picture(rest.strip())
            except PictureError as exc:
                self.screen.status(f"✗ {exc}", dim=False)
                return
            self.attached.append(picture)
            self.screen.status(f"attached {picture.describe()}; it goes with your next question")
        elif command == "/reset":
            self.conn.reset()
            self.history.clear()
            self.attached.clear()
            self.screen.status("conversation reset: the model forgets the earlier turns")
        elif command == "/cancel":
            self.screen.status("nothing to cancel")
        elif command == "/history":
            self._print_history()
        elif command == "/quit":
            self._quit = True
        elif command == "/help":
            self.screen.status(HELP)
        else:
            self.screen.status(f"unknown command {command}; {HELP}")

    def _ask(self, text: str) -> None:
        pictures, self.attached = self.attached, []
        ask_id = self.conn.ask(text, [p.data for p in pictures], self.max_tokens)
        self.current = Answer(ask_id, text, [p.name for p in pictures], time.monotonic())
        self.screen.wait("sending")

    def _cancel(self) -> None:
        assert self.current is not None
        self.current.cancelling = True
        self.conn.cancel(self.current.id)
        if self.current.first is None:
            self.screen.wait("cancelling")
        else:
            self.screen.status("cancelling…")

    # -- events ---------------------------------------------------------------------------

    def on_event(self, event: LinkEvent) -> None:
        current = self.current if self.current is not None and self.current.id == _ask_id(event) else None
        match event:
            case Disconnected(reason, attempt, retry_in):
                self.screen.stop_waiting()
                more = f", attempt {attempt}" if attempt > 1 else ""
                self.screen.status(f"⚡ connection lost: {reason}; reconnecting in {retry_in:.1f} s{more}")
                self._wait_again("reconnecting")
            case Hello(session, resumed) if self.conn.reconnects:
                self._reconnected(session, resumed)
            case SessionLost(old, _new, asked_again):
                self.screen.status(f"! the server no longer knew session {old}; earlier turns are forgotten")
                self.history.clear()
                if self.current is not None and self.current.id in asked_again:
                    self.screen.status("the server had not received the question yet: it is asked again")
                    self._wait_again("asking again")
            case FramesLost(first, last):
                self.screen.status(
                    f"! the server could not replay frames {first}..{last}; text may be missing"
                )
            case ServerError(code, message):
                self.screen.status(f"! server: {code}: {message}", dim=False)
            case Queued(_, position) if current is not None:
                self.screen.wait(f"queued, position {position}" if position else "queued", news=True)
            case Reading() if current is not None:
                self.screen.wait("reading the picture…", news=True)
            case Started() if current is not None:
                # The model reads the new pictures with the prompt now (its prefill): for a
                # large picture that is most of the wait before the first word.
                self.screen.wait("reading the picture…" if current.pictures else "thinking")
            case Delta(_, text) if current is not None:
                if current.first is None:
                    current.first = time.monotonic()
                    self.screen.stop_waiting()
                current.text += text
                self.screen.answer(text)
            case AskDone(_, text, usage, finish_reason) if current is not None:
                self._finish(current, text, usage, finish_reason)
            case AskFailed(_, code, message, retry_after) if current is not None:
                self.screen.stop_waiting()
                self.screen.end_answer()
                if code == SESSION_LOST:
                    message = LOST_ANSWER
                detail = f": {message}" if message and message != code else ""
                retry = f" (retry in {retry_after:g} s)" if retry_after else ""
                self.screen.status(f"✗ {code}{detail}{retry}", dim=code == ErrorCode.CANCELLED)
                if not self.interactive and self.exit_code != EXIT_INTERRUPTED:
                    self.exit_code = EXIT_FAILED
                self._next()

    def _reconnected(self, session: str, resumed: bool) -> None:
        """Say what a reconnect means for the answer in progress: it continues only when the
        server resumed our session. A new session comes with `SessionLost` (which says whether
        the question is asked again) and, when the answer was under way, its `AskFailed`."""
        current = self.current
        if not resumed:
            self.screen.status(f"↻ reconnected, but to a new session {session}")
            return
        going_on = "; the answer continues" if current is not None else ""
        self.screen.status(f"↻ reconnected, session {session} resumed{going_on}")
        if current is not None:
            current.reconnects += 1
            self._wait_again("waiting")

    def _finish(self, answer: Answer, text: str, usage: dict[str, Any], finish_reason: str) -> None:
        now = time.monotonic()
        self.screen.stop_waiting()
        if answer.first is None:
            answer.first = now
        if text != answer.text:
            # Only when frames were lost: show the server's full text rather than a partial one.
            if answer.text:
                self.screen.end_answer()
                self.screen.status("! the streamed text was incomplete; the full answer:")
            self.screen.answer(text)
        self.screen.end_answer()
        cut = " · cut at the length limit" if finish_reason == "length" else ""
        self.screen.status(answer.timings(usage, now) + cut)
        self.history.append(Turn(answer.question, answer.pictures, text))
        self._next()

    def _next(self) -> None:
        self.current = None
        while self.backlog and self.current is None and not self._quit:
            self.handle(self.backlog.popleft())
        if self.current is None and (self._eof or not self.interactive):
            self._quit = True
        self._show_prompt()

    def _wait_again(self, label: str) -> None:
        if self.current is not None and self.current.first is None:
            self.screen.wait(label)

    def _show_prompt(self) -> None:
        if self.prompt and self.current is None and not self._quit and not self._eof:
            self.screen.prompt(self.prompt)

    def _print_history(self) -> None:
        if not self.history:
            self.screen.status("no turns yet")
        for number, turn in enumerate(self.history, start=1):
            pictures = f" [{', '.join(turn.pictures)}]" if turn.pictures else ""
            self.screen.status(f"{number}. you: {turn.question}{pictures}", dim=False)
            self.screen.status(f"   model: {turn.answer}")


def _ask_id(event: LinkEvent) -> str | None:
    return getattr(event, "id", None)
