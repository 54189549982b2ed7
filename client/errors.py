"""Errors of the chat client, a tree of its own::

    ClientError                the client cannot go on; the message is a sentence for the user
    ├── PictureError           a picture could not be read, or is not a picture
    ├── AuthFailed             the server refused the token (HTTP 401/403 or close UNAUTHORIZED)
    ├── ConnectFailed          no connection within the retry budget, or the server closed for good
    └── ProtocolError          (client.protocol) the server sent what protocol v1 does not allow,
                               or the client's session core was misused

The root is not the server's `VlbridgeError`: the client shares only the wire protocol
with the server (`protocol.v1`), and nothing catches client and server errors together
(`vlbridge chat` turns a `ClientError` into a message and an exit status).

Errors that belong to one question (the server's `error` frames) are not exceptions here:
they arrive as `AskFailed` events and the session goes on.
"""

from __future__ import annotations


class ClientError(Exception):
    """The client cannot continue; str(exc) is meant for the user."""


class PictureError(ClientError):
    pass


class AuthFailed(ClientError):
    pass


class ConnectFailed(ClientError):
    pass
