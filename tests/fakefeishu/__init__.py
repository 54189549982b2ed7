"""A fake Feishu Open Platform for tests, spoken to by the unmodified lark-oapi SDK over loopback.

This first layer is sans-I/O: the long-connection frame codec, platform error codes, the fault plan,
the platform's own state and the record store tests assert on.
"""

from .codes import ApiError
from .faults import (
    CHAT_RATE_LIMITED,
    MESSAGE_RATE_LIMITED,
    RATE_LIMITED,
    TOKEN_INVALID,
    Fault,
    FaultPlan,
    Route,
)
from .frames import ClientConfig
from .records import Records

__all__ = [
    "CHAT_RATE_LIMITED",
    "MESSAGE_RATE_LIMITED",
    "RATE_LIMITED",
    "TOKEN_INVALID",
    "ApiError",
    "ClientConfig",
    "Fault",
    "FaultPlan",
    "Records",
    "Route",
]
