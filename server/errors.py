"""The project's exception tree.

    VlbridgeError
    ├── ConfigError            bad configuration file or environment (fails at start-up)
    ├── ModelLoadError         the model or its processor could not be loaded; the message
    │   │                      is one line saying what to do
    │   └── LoadCancelled      the service stopped while the model was downloading or loading
    ├── ListenError            the listening address cannot be taken (port in use, ...)
    ├── InvalidFrame           (server.ws.frames) a WebSocket frame the server will not act on;
    │                          carries the wire code; the session stays usable
    ├── FeishuApiError         (bot.feishu.openapi) a Feishu Open API call failed for good;
    │                          keeps the platform's code
    ├── StorageError           (bot.store) the inbox cannot be used: a file damaged, locked,
    │                          unwritable or in use by another service, or a Redis server
    │                          unreachable or refusing writes (fails at start-up)
    ├── TransitionError        (bot.store) a message state change that does not fit its state
    ├── NotNow                 (bot.conversation) the model is not answering now (stopping,
    │                          loading): the message is kept in the inbox for later
    ├── ReferenceUnreadable    (bot.types) a quoted or forwarded message the bot cannot read
    │                          (a missing permission, named; recalled; no answer)
    └── RequestError           belongs to one request, never to a worker; has a wire `code`
        ├── BadRequest         code "bad_request": malformed or unsupported input
        │   └── MalformedEvent (bot.feishu.messages) a Feishu event that cannot be read
        ├── BadImage           code "bad_image": undecodable or unsafe picture
        ├── TooLarge           code "too_large": picture, prompt or frame over a limit
        ├── UnsupportedMediaType  code "unsupported_media_type": an HTTP body of the wrong type
        ├── Busy               code "busy": queue full; carries `retry_after` seconds
        ├── Timeout            code "timeout": deadline passed
        ├── Cancelled          code "cancelled": the asker cancelled or went away
        ├── Unavailable        code "unavailable": model loading or failed, or shutting down
        └── InternalError      code "internal": a bug or a device failure, logged with a trace

The picture checks that server and client share (`protocol.pictures`) raise a root of their own,
converted at each side's edge (server: `BadImage` / `TooLarge`; client: `PictureError`)::

    PictureRejected            (protocol.pictures) carries the wire code "bad_image" or "too_large"

The chat client (`client/`) has a tree of its own, rooted at `client.errors.ClientError`: it
shares only the wire protocol with the server. tests/test_errors.py checks that every
exception class the project defines is drawn in one of these trees.

Foreign errors (torch, PIL, lark-oapi codes) are translated into these at the boundary
that meets them, keeping the useful fields.
"""

from __future__ import annotations

from protocol.v1 import ErrorCode


class VlbridgeError(Exception):
    """Root of every error vlbridge raises on purpose."""


class ConfigError(VlbridgeError):
    """The configuration is invalid; the message is one line naming file and key."""


class ModelLoadError(VlbridgeError):
    """The model, tokenizer or image processor could not be loaded."""


class LoadCancelled(ModelLoadError):
    """The load was stopped on purpose (the service is stopping): not a failure of the model."""


class ListenError(VlbridgeError):
    """`vlbridge serve` cannot listen where it was told to; the message says what to change."""


class RequestError(VlbridgeError):
    """An error that belongs to one request; `code` is the stable wire code."""

    code: str = ErrorCode.INTERNAL

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    @staticmethod
    def from_code(code: str, message: str, retry_after: float | None = None) -> RequestError:
        """The exception for a wire *code* (e.g. from a `Failed` event); unknown codes are internal."""
        return ERROR_CODES.get(code, InternalError)(message, retry_after=retry_after)


class BadRequest(RequestError):
    code = ErrorCode.BAD_REQUEST


class BadImage(RequestError):
    code = ErrorCode.BAD_IMAGE


class TooLarge(RequestError):
    code = ErrorCode.TOO_LARGE


class UnsupportedMediaType(RequestError):
    code = "unsupported_media_type"


class Busy(RequestError):
    code = ErrorCode.BUSY


class Timeout(RequestError):
    code = ErrorCode.TIMEOUT


class Cancelled(RequestError):
    code = ErrorCode.CANCELLED


class Unavailable(RequestError):
    code = ErrorCode.UNAVAILABLE


class InternalError(RequestError):
    code = ErrorCode.INTERNAL


SHUTTING_DOWN = "the service is shutting down; ask again shortly"
SHUTDOWN_RETRY_AFTER = 5.0


def shutting_down() -> Unavailable:
    """The one error every route and backend gives for work refused or cut by a shutdown."""
    return Unavailable(SHUTTING_DOWN, retry_after=SHUTDOWN_RETRY_AFTER)


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
