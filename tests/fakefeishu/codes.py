"""Error codes and HTTP statuses the fake answers with, and the exception handlers raise.

Codes marked (seen) appear in public bug reports or in the SDK; the rest are the closest codes
documented for the same condition and may differ from production in detail. Product code should key
its behaviour on the conditions (rate limited, token invalid, sequence out of order), not on the
exact message strings.
"""

from __future__ import annotations

OK = 0

# Auth
APP_ID_INVALID = 10003
APP_SECRET_INVALID = 10014
TOKEN_MISSING = 99991661  # (seen)
TOKEN_INVALID = 99991663  # (seen) tenant token invalidated / unknown

# Rate limits and quota (seen)
RATE_LIMITED = 99991400  # app-level frequency limit, HTTP 429
CHAT_RATE_LIMITED = 230020  # per-chat / per-user send limit
MESSAGE_RATE_LIMITED = 11232  # message create frequency limit

# Scopes (seen): the app lacks every scope that allows the call; the message lists them
SCOPE_MISSING = 99991672

# Generic request validation
FIELD_VALIDATION_FAILED = 99992402

# IM
IM_INVALID_PARAM = 230001
IM_CONTENT_TOO_LONG = 230025
IM_NO_PERMISSION = 230027  # (docs) "Lack of necessary permissions", e.g. reading a group message
RESOURCE_INVALID_PARAM = 234001
RESOURCE_NOT_IN_MESSAGE = 234003

# CardKit (300309, 300313, 300317 seen)
CARD_NOT_FOUND = 300301
CARD_INVALID = 300302
CARD_STREAMING_CLOSED = 300309
CARD_ELEMENT_NOT_FOUND = 300313
CARD_SEQUENCE_FAILED = 300317

# Long-connection discovery, as ``lark_oapi.ws.client`` classifies them (read in its source):
# 0 ok; 1 (system busy) and 1000040343 (internal error) raise ServerException, which the SDK
# retries; EVERY other code raises ClientException, which ends its reconnect loop for good.
WS_SYSTEM_BUSY = 1
WS_INTERNAL_ERROR = 1000040343
WS_EXCEED_CONN_LIMIT = 1000040350  # non-retryable for the SDK


class ApiError(Exception):
    """Raised by route logic; the routing layer turns it into ``{"code", "msg", "data": {}}``."""

    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.status = status
