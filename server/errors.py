"""The project's exception tree.

    VlbridgeError
    ├── ConfigError            bad configuration file or environment (fails at start-up)
    ├── ModelLoadError         the model or its processor could not be loaded
    └── RequestError           belongs to one request, never to a worker; has a wire `code`
        ├── BadRequest         code "bad_request": malformed or unsupported input
        ├── BadImage           code "bad_image": undecodable or unsafe picture
        ├── TooLarge           code "too_large": picture, prompt or frame over a limit
        ├── UnsupportedMediaType  code "unsupported_media_type": an HTTP body of the wrong type
        ├── Busy               code "busy": queue full; carries `retry_after` seconds
        ├── Timeout            code "timeout": deadline passed
        ├── Cancelled          code "cancelled": the asker cancelled or went away
        ├── Unavailable        code "unavailable": model loading or failed
        └── InternalError      code "internal": a bug or a device failure, logged with a trace

Foreign errors (torch, PIL, lark-oapi codes) are translated into these at the boundary
that meets them, keeping the useful fields.
"""

from __future__ import annotations


class VlbridgeError(Exception):
    """Root of every error vlbridge raises on purpose."""


class ConfigError(VlbridgeError):
    """The configuration is invalid; the message is one line naming file and key."""


class ModelLoadError(VlbridgeError):
    """The model, tokenizer or image processor could not be loaded."""


class RequestError(VlbridgeError):
    """An error that belongs to one request; `code` is the stable wire code."""

    code = "internal"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    @staticmethod
    def from_code(code: str, message: str, retry_after: float | None = None) -> RequestError:
        """The exception for a wire *code* (e.g. from a `Failed` event); unknown codes are internal."""
        return ERROR_CODES.get(code, InternalError)(message, retry_after=retry_after)


class BadRequest(RequestError):
    code = "bad_request"


class BadImage(RequestError):
    code = "bad_image"


class TooLarge(RequestError):
    code = "too_large"


class UnsupportedMediaType(RequestError):
    code = "unsupported_media_type"


class Busy(RequestError):
    code = "busy"


class Timeout(RequestError):
    code = "timeout"


class Cancelled(RequestError):
    code = "cancelled"


class Unavailable(RequestError):
    code = "unavailable"


class InternalError(RequestError):
    code = "internal"


ERROR_CODES: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        BadImage,
        TooLarge,
        UnsupportedMediaType,
        Busy,
        Timeout,
        Cancelled,
        Unavailable,
        InternalError,
    )
}
