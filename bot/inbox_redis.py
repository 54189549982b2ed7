"""The inbox on Redis: the `bot.store.InboxStore` contract for processes that share one Redis.

Layout, under ``<prefix>:{<platform>}:`` (the braces are a cluster hash tag: every key of one
inbox lives in one slot, so the Lua scripts may touch them all):

- ``m:<message_id>``: a hash, the message's row (the same fields as the SQLite table);
- ``seq``: the arrival counter (``INCR``), the ``seq`` of each row;
- ``state:<state>``: a sorted set of message ids by ``seq`` (`in_state`, `counts`);
- ``ctx:<context_key>``: the *pending* (received or running) ids of one conversation by ``seq``;
- ``heads``: every conversation with something pending, scored by the ``seq`` of its oldest
  pending message, so `heads` reads one entry per conversation, in arrival order;
- ``times``: every id by ``received_at`` (`listing` by age, `prune`);
- ``leases``: the running ids by the end of their lease (`claim` takes over the ended ones);
- ``memory:<context_key>``: a conversation's context (a string that expires with it);
- ``turns:<user>``: a user's questions of the last minute, a sorted set by time (`take_turn`).

Every change of state is one Lua script (atomic on the server): the state is read, checked
against the expected ones and moved with the sets in one step, so two processes (the worker,
the service, `vlbridge inbox retry`) never interleave inside a move. A receive is one script
too: a redelivery finds the row and changes nothing.

Durability is the server's: run Redis with ``appendonly yes`` (``appendfsync everysec`` is the
SQLite store's promise: a killed process loses nothing, a power cut at most the last second).
`check` logs a warning when the server keeps the inbox in memory only, or may evict it.

The client is redis-py's synchronous one: a store is called from one thread (the service's inbox
thread, the worker's SDK handler), like `bot.inbox.InboxDb`.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis

from bot.store import (
    FINAL,
    RATE_WINDOW,
    InboxState,
    StorageError,
    StoredMessage,
    check_final,
    transition_error,
)
from bot.types import InboundMessage

log = logging.getLogger("vlbridge.inbox")

P = ParamSpec("P")
T = TypeVar("T")

SOCKET_TIMEOUT = 10.0  # seconds; a command that takes longer is a Redis in trouble
LISTING_CHUNK = 500

# Keeps ``heads`` equal to the lowest seq of the conversation's pending set.
_FIX_HEAD = """
local function fix_head(p, ctx)
  local first = redis.call('ZRANGE', p .. 'ctx:' .. ctx, 0, 0, 'WITHSCORES')
  if #first == 0 then redis.call('ZREM', p .. 'heads', ctx)
  else redis.call('ZADD', p .. 'heads', first[2], ctx) end
end
"""

# ARGV: prefix, message_id, context_key, received_at, then field/value pairs.
_RECEIVE = """
local p, id, ctx, at = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = p .. 'm:' .. id
if redis.call('EXISTS', key) == 1 then return 0 end
local seq = redis.call('INCR', p .. 'seq')
redis.call('HSET', key, 'seq', seq, 'message_id', id, 'context_key', ctx, 'received_at', at,
  'state', 'received', 'attempts', 0, 'reason', '', 'updated_at', at, 'card_id', '',
  'reply_id', '', 'sequence', 0, 'receipt_id', '', unpack(ARGV, 5))
redis.call('ZADD', p .. 'state:received', seq, id)
redis.call('ZADD', p .. 'ctx:' .. ctx, seq, id)
redis.call('ZADD', p .. 'heads', 'NX', seq, ctx)
redis.call('ZADD', p .. 'times', at, id)
return 1
"""

# ARGV: prefix, message_id, new state, now, operation, reason, lease, expected states...
# Returns {1, row} or {0, the state found ('' for no such message)}.
_MOVE = (
    _FIX_HEAD
    + """
local p, id, new, now, op, reason, lease = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local key = p .. 'm:' .. id
local state = redis.call('HGET', key, 'state')
if not state then return {0, ''} end
local allowed = false
for i = 8, #ARGV do if ARGV[i] == state then allowed = true end end
if not allowed then return {0, state} end
local seq = redis.call('HGET', key, 'seq')
local ctx = redis.call('HGET', key, 'context_key')
redis.call('ZREM', p .. 'state:' .. state, id)
redis.call('ZADD', p .. 'state:' .. new, seq, id)
redis.call('HSET', key, 'state', new, 'updated_at', now)
if new == 'running' then
  redis.call('ZADD', p .. 'leases', lease, id)
else
  redis.call('ZREM', p .. 'leases', id)
end
if op == 'start' then
  redis.call('HINCRBY', key, 'attempts', 1)
elseif op == 'requeue' then
  if tonumber(redis.call('HGET', key, 'attempts')) > 0 then redis.call('HINCRBY', key, 'attempts', -1) end
elseif op == 'retry' then
  redis.call('HSET', key, 'attempts', 0, 'reason', '')
elseif op == 'finish' then
  redis.call('HSET', key, 'reason', reason)
end
if new == 'received' or new == 'running' then
  redis.call('ZADD', p .. 'ctx:' .. ctx, seq, id)
else
  redis.call('ZREM', p .. 'ctx:' .. ctx, id)
end
fix_head(p, ctx)
return {1, redis.call('HGETALL', key)}
"""
)

# ARGV: prefix, message_id, field/value pairs: set on an existing message only.
# ARGV: prefix, message_id, card_id. The card recorded now and its sequence ({} when unknown).
_CLAIM_CARD = """
local key = ARGV[1] .. 'm:' .. ARGV[2]
if redis.call('EXISTS', key) == 0 then return {} end
if redis.call('HGET', key, 'card_id') == '' then redis.call('HSET', key, 'card_id', ARGV[3]) end
return redis.call('HMGET', key, 'card_id', 'sequence')
"""

# ARGV: prefix, message_id, receipt_id. The receipt recorded now ('' when unknown).
_CLAIM_RECEIPT = """
local key = ARGV[1] .. 'm:' .. ARGV[2]
if redis.call('EXISTS', key) == 0 then return '' end
if redis.call('HGET', key, 'receipt_id') == '' then redis.call('HSET', key, 'receipt_id', ARGV[3]) end
return redis.call('HGET', key, 'receipt_id')
"""

# ARGV: prefix, message_id, receipt_id. 1 when this call cleared the receipt, else 0.
_TAKE_RECEIPT = """
local key = ARGV[1] .. 'm:' .. ARGV[2]
if ARGV[3] ~= '' and redis.call('HGET', key, 'receipt_id') == ARGV[3] then
  redis.call('HSET', key, 'receipt_id', '')
  return 1
end
return 0
"""

_SET = """
local key = ARGV[1] .. 'm:' .. ARGV[2]
if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, unpack(ARGV, 3)) end
"""

# ARGV: prefix, message_id, upto.
_RAISE_SEQUENCE = """
local key = ARGV[1] .. 'm:' .. ARGV[2]
local current = redis.call('HGET', key, 'sequence')
if current and tonumber(current) < tonumber(ARGV[3]) then redis.call('HSET', key, 'sequence', ARGV[3]) end
"""

# ARGV: prefix, lease_until, message ids... (running ones only).
_RENEW = """
local p = ARGV[1]
for i = 3, #ARGV do
  if redis.call('HGET', p .. 'm:' .. ARGV[i], 'state') == 'running' then
    redis.call('ZADD', p .. 'leases', 'XX', ARGV[2], ARGV[i])
  end
end
"""

# ARGV: prefix, ended before ('(now' or '+inf'), lease_until. The running messages taken over.
_CLAIM = """
local p = ARGV[1]
local rows = {}
for _, id in ipairs(redis.call('ZRANGE', p .. 'leases', '-inf', ARGV[2], 'BYSCORE')) do
  local key = p .. 'm:' .. id
  if redis.call('HGET', key, 'state') == 'running' then
    redis.call('ZADD', p .. 'leases', ARGV[3], id)
    rows[#rows + 1] = redis.call('HGETALL', key)
  else
    redis.call('ZREM', p .. 'leases', id)
  end
end
return rows
"""

# ARGV: prefix, state, after_seq, limit. Rows in arrival order.
_IN_STATE = """
local p = ARGV[1]
local ids = redis.call('ZRANGE', p .. 'state:' .. ARGV[2], '(' .. ARGV[3], '+inf', 'BYSCORE',
  'LIMIT', 0, tonumber(ARGV[4]))
local rows = {}
for i, id in ipairs(ids) do rows[i] = redis.call('HGETALL', p .. 'm:' .. id) end
return rows
"""

# ARGV: prefix, limit, busy conversations... The oldest pending message of each conversation,
# in the order of those messages, when it is received (a running one holds its conversation).
_HEADS = """
local p, limit = ARGV[1], tonumber(ARGV[2])
local busy = {}
for i = 3, #ARGV do busy[ARGV[i]] = true end
local rows, from = {}, 0
while #rows < limit do
  local page = redis.call('ZRANGE', p .. 'heads', from, from + 199)
  if #page == 0 then break end
  for _, ctx in ipairs(page) do
    if not busy[ctx] then
      local first = redis.call('ZRANGE', p .. 'ctx:' .. ctx, 0, 0)[1]
      if first and redis.call('HGET', p .. 'm:' .. first, 'state') == 'received' then
        rows[#rows + 1] = redis.call('HGETALL', p .. 'm:' .. first)
        if #rows >= limit then break end
      end
    end
  end
  from = from + 200
end
return rows
"""

# ARGV: prefix, cutoff, final states... Forgets finished messages received before the cutoff.
_PRUNE = """
local p = ARGV[1]
local final = {}
for i = 3, #ARGV do final[ARGV[i]] = true end
local n = 0
for _, id in ipairs(redis.call('ZRANGE', p .. 'times', '-inf', '(' .. ARGV[2], 'BYSCORE')) do
  local key = p .. 'm:' .. id
  local state = redis.call('HGET', key, 'state')
  if not state then
    redis.call('ZREM', p .. 'times', id)
  elseif final[state] then
    redis.call('DEL', key)
    redis.call('ZREM', p .. 'state:' .. state, id)
    redis.call('ZREM', p .. 'times', id)
    n = n + 1
  end
end
return n
"""

# ARGV: prefix, user, now, per_minute, window, a unique member. nil when recorded, else the wait.
_TAKE_TURN = """
local key = ARGV[1] .. 'turns:' .. ARGV[2]
local now, window = tonumber(ARGV[3]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) >= tonumber(ARGV[4]) then
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return tostring(window - (now - tonumber(first[2])))
end
redis.call('ZADD', key, now, ARGV[6])
redis.call('EXPIRE', key, math.ceil(window) + 1)
return false
"""


def redacted(url: str) -> str:
    """*url* without its password, for log lines and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def describe(url: str, exc: BaseException) -> StorageError:
    """One line naming the server, what is wrong and what to do."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in text or "WRONGPASS" in text:
        advice = "check the user and password in [storage] redis_url (VLBRIDGE_STORAGE_REDIS_URL)"
    elif isinstance(exc, redis.ReadOnlyError) or "READONLY" in text:
        advice = "that server is a read-only replica; point [storage] redis_url at the primary"
    elif "OOM" in text:
        advice = "Redis is out of memory; raise its maxmemory or free memory (the inbox needs noeviction)"
    elif isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        advice = "is Redis running and reachable there? start it, or fix [storage] redis_url"
    else:
        advice = "check the Redis server and [storage] redis_url"
    return StorageError(f"inbox redis {redacted(url)}: {text}; {advice}")


def _storage_errors(method: Callable[P, T]) -> Callable[P, T]:
    """Redis' errors leave a store method as `StorageError` (the inbox's own type)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except redis.RedisError as exc:
            store = args[0]
            assert isinstance(store, RedisInboxDb)
            raise describe(store.url, exc) from None

    return wrapper


def _score(value: float) -> str:
    """A sorted-set score as Redis reads it (``inf`` is spelled ``+inf``)."""
    return "+inf" if math.isinf(value) and value > 0 else repr(float(value))


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


def _row(fields: Mapping[Any, Any]) -> StoredMessage:
    """A row from ``HGETALL`` (names and values as bytes: the client does not decode)."""
    return StoredMessage(
        seq=int(fields[b"seq"]),
        message_id=_text(fields.get(b"message_id")),
        chat_id=_text(fields.get(b"chat_id")),
        context_key=_text(fields.get(b"context_key")),
        sender_id=_text(fields.get(b"sender_id")),
        text=_text(fields.get(b"text")),
        image_keys=tuple(orjson.loads(fields.get(b"image_keys") or b"[]")),
        created_at=float(fields.get(b"created_at") or 0),
        received_at=float(fields.get(b"received_at") or 0),
        body=fields.get(b"body") or b"",
        state=InboxState(_text(fields[b"state"])),
        attempts=int(fields.get(b"attempts") or 0),
        reason=_text(fields.get(b"reason")),
        updated_at=float(fields.get(b"updated_at") or 0),
        card_id=_text(fields.get(b"card_id")),
        reply_id=_text(fields.get(b"reply_id")),
        sequence=int(fields.get(b"sequence") or 0),
        receipt_id=_text(fields.get(b"receipt_id")),
    )


def _flat_row(flat: list[bytes]) -> StoredMessage:
    """A row from a script's ``HGETALL`` (a flat list of names and values)."""
    return _row(dict(zip(flat[::2], flat[1::2], strict=True)))


class RedisInboxDb:
    """The Redis store (`bot.store.InboxStore`); one client, used from one thread at a time.

    Connects lazily: `check()` (at start-up) is the first call that reaches the server, and
    raises `StorageError` with one line naming it when it cannot be used.
    """

    def __init__(
        self, url: str, *, platform: str, retention_hours: float = 24.0, prefix: str = "vlbridge"
    ) -> None:
        self.url = url
        self.platform = platform
        self.retention = retention_hours * 3600.0
        self.prefix = f"{prefix}:{{{platform}}}:"
        try:
            self._redis = redis.Redis.from_url(
                url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT
            )
        except ValueError as exc:  # not a redis://, rediss:// or unix:// URL
            raise StorageError(
                f"inbox redis {redacted(url)}: {exc}; set [storage] redis_url to redis://host:port/db"
            ) from None
        script = self._redis.register_script
        self._receive = script(_RECEIVE)
        self._move_script = script(_MOVE)
        self._set_script = script(_SET)
        self._claim_card = script(_CLAIM_CARD)
        self._claim_receipt = script(_CLAIM_RECEIPT)
        self._take_receipt = script(_TAKE_RECEIPT)
        self._raise_sequence = script(_RAISE_SEQUENCE)
        self._in_state = script(_IN_STATE)
        self._renew = script(_RENEW)
        self._claim = script(_CLAIM)
        self._heads = script(_HEADS)
        self._prune = script(_PRUNE)
        self._take_turn = script(_TAKE_TURN)

    def close(self) -> None:
        self._redis.close()

    @_storage_errors
    def check(self) -> None:
        """Raise `StorageError` unless the server answers and takes writes; warn (a log line) for
        each of `risks()`."""
        self.check_writes()
        for risk in self.risks():
            log.warning("inbox redis %s %s", redacted(self.url), risk)

    @_storage_errors
    def check_writes(self) -> None:
        """Raise `StorageError` unless the server answers and takes writes."""
        self._redis.set(self.prefix + "check", str(time.time()), ex=60)

    @_storage_errors
    def risks(self) -> list[str]:
        """Ways the server may lose the inbox (no persistence, an eviction policy that may drop its
        keys), each a sentence saying what to set; empty when none, or when the server does not
        allow CONFIG (many managed servers: their operators answer for it)."""
        try:
            config = self._redis.config_get("appendonly")
            config.update(self._redis.config_get("save"))
            config.update(self._redis.config_get("maxmemory-policy"))
        except redis.ResponseError:
            return []
        found = {_text(k) if isinstance(k, bytes) else str(k): v for k, v in config.items()}

        def value(name: str) -> str:
            raw = found.get(name, b"")
            return raw.decode() if isinstance(raw, bytes) else str(raw)

        risks = []
        if value("appendonly") != "yes" and not value("save").strip():
            risks.append(
                "keeps data in memory only (appendonly no, no save): a Redis restart loses accepted "
                "messages; set appendonly yes"
            )
        policy = value("maxmemory-policy")
        if policy and policy != "noeviction":
            risks.append(f"has maxmemory-policy {policy}, which may evict accepted messages; use noeviction")
        return risks

    # -- arrivals ---------------------------------------------------------------------------------

    @_storage_errors
    def receive(
        self, message: InboundMessage, body: bytes, received_at: float, *, ordered: bool = True
    ) -> bool:
        key = message.context_key if ordered else f"{message.context_key}#{message.message_id}"
        fields: list[str | bytes] = [
            "chat_id",
            message.chat_id,
            "sender_id",
            message.sender_id,
            "text",
            message.text,
            "image_keys",
            orjson.dumps(list(message.image_keys)),
            "created_at",
            repr(float(message.created_at)),
            "body",
            body,
        ]
        new = self._receive(args=[self.prefix, message.message_id, key, repr(float(received_at)), *fields])
        return int(new) == 1

    # -- the state machine ------------------------------------------------------------------------

    @_storage_errors
    def _move(
        self,
        message_id: str,
        expected: Iterable[InboxState],
        new: InboxState,
        op: str,
        reason: str = "",
        lease_until: float = math.inf,
    ) -> StoredMessage:
        expected = tuple(expected)
        done, result = self._move_script(
            args=[
                self.prefix,
                message_id,
                new.value,
                repr(time.time()),
                op,
                reason,
                _score(lease_until),
                *(s.value for s in expected),
            ]
        )
        if int(done) != 1:
            found = InboxState(_text(result)) if result else None
            raise transition_error(message_id, expected, found, new)
        return _flat_row(result)

    def start(self, message_id: str, lease_until: float = math.inf) -> StoredMessage:
        return self._move(
            message_id, [InboxState.RECEIVED], InboxState.RUNNING, "start", lease_until=lease_until
        )

    @_storage_errors
    def renew(self, message_ids: Sequence[str], lease_until: float) -> None:
        if message_ids:
            self._renew(args=[self.prefix, _score(lease_until), *message_ids])

    @_storage_errors
    def claim(self, now: float, lease_until: float) -> list[StoredMessage]:
        ended = "+inf" if math.isinf(now) else f"({now!r}"
        rows = self._claim(args=[self.prefix, ended, _score(lease_until)])
        return sorted((_flat_row(row) for row in rows), key=lambda m: m.seq)

    def finish(self, message_id: str, state: InboxState, reason: str = "") -> StoredMessage:
        check_final(message_id, state)
        return self._move(message_id, [InboxState.RUNNING], state, "finish", reason)

    def requeue(self, message_id: str) -> StoredMessage:
        return self._move(message_id, [InboxState.RUNNING], InboxState.RECEIVED, "requeue")

    def recover(self, message_id: str) -> StoredMessage:
        return self._move(message_id, [InboxState.RUNNING], InboxState.RECEIVED, "recover")

    def retry(self, message_id: str) -> StoredMessage:
        return self._move(message_id, [InboxState.FAILED], InboxState.RECEIVED, "retry")

    # -- the reply --------------------------------------------------------------------------------

    @_storage_errors
    def note_reply(self, message_id: str, *, card_id: str | None = None, reply_id: str | None = None) -> None:
        pairs: list[str] = []
        if card_id is not None:
            pairs += ["card_id", card_id]
        if reply_id is not None:
            pairs += ["reply_id", reply_id]
        if pairs:
            self._set_script(args=[self.prefix, message_id, *pairs])

    @_storage_errors
    def claim_receipt(self, message_id: str, receipt_id: str) -> str:
        return _text(self._claim_receipt(args=[self.prefix, message_id, receipt_id]))

    @_storage_errors
    def take_receipt(self, message_id: str, receipt_id: str) -> bool:
        return bool(self._take_receipt(args=[self.prefix, message_id, receipt_id]))

    @_storage_errors
    def claim_card(self, message_id: str, card_id: str) -> tuple[str, int]:
        found = self._claim_card(args=[self.prefix, message_id, card_id])
        return (_text(found[0]), int(found[1])) if found else ("", 0)

    @_storage_errors
    def reserve_sequence(self, message_id: str, upto: int) -> None:
        self._raise_sequence(args=[self.prefix, message_id, int(upto)])

    # -- reading ----------------------------------------------------------------------------------

    @_storage_errors
    def get(self, message_id: str) -> StoredMessage | None:
        fields = self._redis.hgetall(self.prefix + "m:" + message_id)
        return _row(fields) if fields else None

    @_storage_errors
    def in_state(self, state: InboxState, limit: int = 1000, after_seq: int = 0) -> list[StoredMessage]:
        rows = self._in_state(args=[self.prefix, state.value, int(after_seq), int(limit)])
        return [_flat_row(row) for row in rows]

    @_storage_errors
    def heads(self, busy: tuple[str, ...], limit: int) -> list[StoredMessage]:
        rows = self._heads(args=[self.prefix, max(1, int(limit)), *busy])
        return [_flat_row(row) for row in rows]

    @_storage_errors
    def running_of(self, sender_id: str) -> list[str]:
        ids = [_text(i) for i in self._redis.zrange(self.prefix + "state:" + InboxState.RUNNING.value, 0, -1)]
        pipe = self._redis.pipeline(transaction=False)
        for message_id in ids:
            pipe.hget(self.prefix + "m:" + message_id, "sender_id")
        return [mid for mid, sender in zip(ids, pipe.execute(), strict=True) if _text(sender) == sender_id]

    @_storage_errors
    def counts(self) -> dict[str, int]:
        pipe = self._redis.pipeline(transaction=True)
        for state in InboxState:
            pipe.zcard(self.prefix + "state:" + state.value)
        return {state.value: int(n) for state, n in zip(InboxState, pipe.execute(), strict=True)}

    @_storage_errors
    def listing(
        self,
        *,
        states: Iterable[InboxState] = (),
        chat_id: str = "",
        since: float = 0.0,
        limit: int = 200,
    ) -> list[StoredMessage]:
        chosen = set(states)
        ids = self._redis.zrangebyscore(self.prefix + "times", since, "+inf")
        found: list[StoredMessage] = []
        for start in range(0, len(ids), LISTING_CHUNK):
            pipe = self._redis.pipeline(transaction=False)
            for message_id in ids[start : start + LISTING_CHUNK]:
                pipe.hgetall(self.prefix + "m:" + _text(message_id))
            for fields in pipe.execute():
                if not fields:
                    continue  # pruned meanwhile
                row = _row(fields)
                if (not chosen or row.state in chosen) and (not chat_id or row.chat_id == chat_id):
                    found.append(row)
        found.sort(key=lambda row: row.seq, reverse=True)
        return found[:limit]

    @_storage_errors
    def prune(self, now: float) -> int:
        cutoff = now - self.retention
        return int(self._prune(args=[self.prefix, repr(float(cutoff)), *(s.value for s in FINAL)]))

    # -- conversation memory ----------------------------------------------------------------------

    @_storage_errors
    def load_context(self, key: str, now: float) -> bytes | None:
        data = self._redis.get(self.prefix + "memory:" + key)  # expired ones are gone (PXAT)
        return data.encode() if isinstance(data, str) else data

    @_storage_errors
    def save_context(self, key: str, data: bytes, expires_at: float) -> None:
        self._redis.set(self.prefix + "memory:" + key, data, pxat=max(1, int(expires_at * 1000)))

    @_storage_errors
    def drop_context(self, key: str) -> None:
        self._redis.delete(self.prefix + "memory:" + key)

    @_storage_errors
    def take_turn(self, user: str, now: float, per_minute: int) -> float | None:
        member = f"{now!r}:{secrets.token_hex(6)}"
        wait = self._take_turn(args=[self.prefix, user, repr(now), per_minute, RATE_WINDOW, member])
        return None if wait is None else float(_text(wait))
