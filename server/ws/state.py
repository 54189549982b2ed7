"""Session state of protocol v1, sans-I/O: plain values in, decisions out, time passed in.

- `FrameLog`: numbers the session's frames (seq 1, 2, ...) and keeps the unacknowledged
  ones for resume, bounded in count. A pong acknowledges every frame up to the ping it
  answers (TCP delivered them in order), so a healthy session's log stays near empty.
- `Keepalive`: one connection's ping bookkeeping: when to ping, when the peer is dead,
  round-trip time from the pong.
- `FloodGate`: a token bucket of frames per second.
- `History`: earlier turns as context, bounded, with a generation so that an
  answer started before a reset does not land in the new conversation.

None of these awaits, sleeps or reads a clock; callers pass `now` (monotonic seconds).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import orjson

from server.inference.api import Turn

_TRIM_SLACK = 64  # at most this many frames (an eighth of the limit) past the limit before a trim


class FrameLog:
    """Sequence numbers and the replay buffer of one session."""

    __slots__ = ("_frames", "_trim_at", "limit", "seq")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._trim_at = limit + min(_TRIM_SLACK, limit >> 3)
        self.seq = 0  # the last seq given out
        # The encoded frames held, oldest first: their seqs run up to `seq` without gaps, as
        # frames are numbered when appended and leave from the front. A list, not a deque:
        # an idle session holds 0-1 frames, and a deque's first block alone is ~600 bytes.
        # Created on first use, dropped when empty.
        self._frames: list[bytes] | None = None

    def append(self, frame: dict[str, Any]) -> bytes:
        """Give *frame* (which is the log's now: it gets a "seq" key) the next seq, keep it
        for replay, return its encoding."""
        self.seq += 1
        frame["seq"] = self.seq
        # A right-sized copy (b"%b" % x is the cheapest way to copy bytes): orjson's result
        # keeps the ~4 KiB buffer it was written into, so a log of them would cost 4 KiB
        # of memory per frame, and the buffer is reused at once instead of going cold.
        data = b"%b" % orjson.dumps(frame)
        frames = self._frames
        if frames is None:
            self._frames = [data]
        else:
            frames.append(data)
            if len(frames) > self._trim_at:  # trimmed in chunks: del [0] is O(n)
                del frames[: len(frames) - self.limit]
        return data

    def ack(self, seq: int) -> None:
        """The client has every frame up to *seq*: stop keeping them."""
        frames = self._frames
        if not frames:
            return
        first = self.seq - len(frames) + 1
        if seq >= first:
            del frames[: seq - first + 1]
            if not frames:
                self._frames = None

    @property
    def backlog(self) -> bool:
        """True once an eighth of the limit awaits acknowledgement: time to ask the client
        for one (a ping), long before frames would fall out unacknowledged."""
        return self._frames is not None and len(self._frames) >= self.limit >> 3

    def since(self, last_seq: int) -> tuple[list[bytes], int]:
        """Frames after *last_seq* still held, and how many after it are gone for good."""
        if last_seq >= self.seq:
            return [], 0
        frames = self._frames or []
        first = self.seq - len(frames) + 1
        start = max(last_seq + 1, first)
        return frames[start - first :], max(0, first - 1 - max(last_seq, 0))

    def __len__(self) -> int:
        return len(self._frames) if self._frames else 0


class Beat(Enum):
    NOTHING = "nothing"
    PING = "ping"
    DEAD = "dead"


class Keepalive:
    """Ping bookkeeping for one connection.

    The peer is dead once it has sent nothing for ``interval + timeout`` seconds; pings go
    out every *interval* seconds. Any received frame counts as a sign of life.
    """

    __slots__ = ("interval", "last_received", "next_ping", "outstanding", "timeout")

    def __init__(self, interval: float, timeout: float, now: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self.last_received = now
        self.next_ping = now + interval
        self.outstanding: tuple[int, float, int] | None = None  # (ts sent, sent at, seq)

    def received(self, now: float) -> None:
        self.last_received = now

    def poll(self, now: float) -> Beat:
        if now - self.last_received >= self.interval + self.timeout:
            return Beat.DEAD
        if now >= self.next_ping:
            return Beat.PING
        return Beat.NOTHING

    def ping_sent(self, ts: int, seq: int, now: float) -> bool:
        """Record a ping; True when the previous one was never answered (a missed pong)."""
        missed = self.outstanding is not None
        self.outstanding = (ts, now, seq)
        self.next_ping = now + self.interval
        return missed

    def pong(self, ts: float | None, now: float) -> tuple[float, int] | None:
        """(round-trip seconds, seq of the ping) when *ts* answers the outstanding ping."""
        if self.outstanding is None or ts is None or int(ts) != self.outstanding[0]:
            return None
        _, sent, seq = self.outstanding
        self.outstanding = None
        return now - sent, seq

    def deadline(self) -> float:
        """When `poll` may next answer something other than NOTHING."""
        return min(self.next_ping, self.last_received + self.interval + self.timeout)


class FloodGate:
    """Token bucket: *rate* frames a second, bursts of up to *burst*."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def allow(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class History:
    """Earlier turns of one session: at most *max_turns* question/answer pairs, and the
    pictures of only the newest *max_images* pictures (older turns keep their text)."""

    __slots__ = ("_turns", "generation", "max_images", "max_turns")

    def __init__(self, max_turns: int, max_images: int) -> None:
        self.max_turns = max_turns
        self.max_images = max_images
        self.generation = 0
        self._turns: list[Turn] | None = None

    def messages(self, question: Turn) -> list[Turn]:
        """The context to submit for *question*."""
        return [*(self._turns or ()), question]

    def add(self, question: Turn, answer: str, generation: int) -> None:
        """Remember a finished exchange unless a reset happened since it started."""
        if generation != self.generation or self.max_turns == 0:
            return
        turns = self._turns
        if turns is None:
            turns = self._turns = []
        turns += (question, Turn.assistant(answer))  # in place: messages() hands out copies
        if len(turns) > 2 * self.max_turns:
            del turns[:2]
        if not question.images:  # the pictures kept so far were within the limit already
            return
        kept = 0
        for index in range(len(turns) - 1, -1, -1):
            turn = turns[index]
            if turn.images:
                if kept + len(turn.images) > self.max_images:
                    turns[index] = Turn(turn.role, turn.text)
                else:
                    kept += len(turn.images)

    def reset(self) -> None:
        self._turns = None
        self.generation += 1

    def __len__(self) -> int:
        return len(self._turns) if self._turns else 0
