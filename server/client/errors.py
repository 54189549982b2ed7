"""Errors of the test client, a branch of the project's tree (server.errors)::

    VlbridgeError
    └── ClientError            the client cannot go on; the message is a sentence for the user
        ├── PictureError       a picture could not be read, or is not a picture
        ├── AuthFailed         the server refused the token (HTTP 401/403 or close 4401)
        └── ConnectFailed      no connection within the retry budget, or the server closed for good

Errors that belong to one question (the server's `error` frames) are not exceptions here:
they arrive as `AskFailed` events and the session goes on.
"""

from __future__ import annotations

from server.errors import VlbridgeError


class ClientError(VlbridgeError):
    """The client cannot continue; str(exc) is meant for the user."""


class PictureError(ClientError):
    pass


class AuthFailed(ClientError):
    pass


class ConnectFailed(ClientError):
    pass
