"""Logging set-up for the entry point: readable lines by default, JSON lines on request.

Only `configure_logging` (called once by the CLI) installs handlers; every module logs
through a named logger ("vlbridge.<subsystem>") with lazy %-arguments.

Two guarantees hold for every record that reaches the handler, whoever logged it
(vlbridge, uvicorn's access and error loggers, libraries):

- no secret: `RedactingFilter` rewrites the rendered message so that bearer tokens
  (``?token=``, ``?access_token=``, ``Authorization:`` / ``Bearer ...``) read ``***`` and
  session ids in ``?resume=`` keep only their first `ID_PREFIX` characters (enough to
  follow one session through the log, useless for resuming it);
- one record, one line in the text format: `TextFormatter` escapes control characters
  (newlines, carriage returns, ANSI escapes) in the message, so no client-chosen string
  can forge a log line. (The JSON format is one line by construction.)
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
ID_PREFIX = 8  # characters of a session id that a log line may show

# Query parameters whose value is a secret; `resume` carries a session id.
_QUERY_SECRET = re.compile(r"(?i)([?&](?:access_token|token)=)[^&\s\"'#]*")
_QUERY_RESUME = re.compile(r"(?i)([?&]resume=)([^&\s\"'#]*)")
# "Authorization: Bearer x", "'authorization': 'Basic x'", and a bare "Bearer x" anywhere.
_AUTH_HEADER = re.compile(
    r"(?i)((?:proxy-)?authorization[\"']?\s*[:=,]\s*[\"']?)(?:(bearer|basic|token)\s+)?[^\s\"',;}\]]+"
)
_AUTH_HINT = re.compile(r"(?i)authorization|bearer")
_BEARER = re.compile(r"(?i)\b(bearer)\s+(?!\*\*\*)[A-Za-z0-9._~+/=-]+")

# C0 controls, DEL, C1 controls (ESC starts ANSI sequences) and the Unicode line breaks;
# a tab is harmless and kept.
_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if code != 0x09}
_CONTROL |= {0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"}
_HAS_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def short_id(identifier: str) -> str:
    """What a log line may show of a session id: its first `ID_PREFIX` characters."""
    return identifier[:ID_PREFIX]


def redact(text: str) -> str:
    """*text* with tokens replaced by ``***`` and session ids in ``resume=`` cut to a prefix."""
    if "=" in text:
        text = _QUERY_SECRET.sub(r"\1***", text)
        text = _QUERY_RESUME.sub(lambda m: f"{m.group(1)}{short_id(m.group(2))}***", text)
    if _AUTH_HINT.search(text):
        text = _AUTH_HEADER.sub(lambda m: m.group(1) + (f"{m.group(2)} " if m.group(2) else "") + "***", text)
        text = _BEARER.sub(r"\1 ***", text)
    return text


def escape_controls(text: str) -> str:
    """*text* on one line: control characters shown as escapes (``\\n``, ``\\x1b``)."""
    return text.translate(_CONTROL) if _HAS_CONTROL.search(text) else text


_PLAIN = logging.Formatter()  # renders exception text for redaction before any formatter does


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and exception text, and string extras) through
    `redact`; installed on the handler, so it sees every record, also propagated ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken call: the handler reports it (handleError) when formatting
            return True
        cleaned = redact(message)
        if record.args or cleaned != message:
            record.msg, record.args = cleaned, None  # rendered once; the formatter reuses it
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(_PLAIN.formatException(record.exc_info))
        for key, value in record.__dict__.items():
            if key not in _RESERVED and isinstance(value, str):
                record.__dict__[key] = redact(value)
        return True


class TextFormatter(logging.Formatter):
    """``time level logger: message``, the message kept on one line (`escape_controls`)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # A trailing newline (uvicorn's "Exception in ASGI application\n") forges nothing.
        record.message = escape_controls(record.message.rstrip("\n"))
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, msg, extra fields, exception text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info or record.exc_text:
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return orjson.dumps(entry, default=str).decode()


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries we use are chatty at INFO; keep their warnings.
    for name in ("httpx", "httpx2", "httpcore", "urllib3", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
