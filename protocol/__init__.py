"""The wire protocol shared by the vlbridge server (`server/`) and its chat client (`client/`).

    v1.py        WebSocket protocol v1: version, frame types, error and close codes, limits
    pictures.py  pictures on the wire: base64 and data: URLs, formats, size and decoding
                 limits checked from a picture's header, the sentences a refusal carries

No I/O and no framework: `v1` needs only the standard library, `pictures` Pillow as well
(both sides decode pictures with it anyway). Both sides import from here and from nowhere
in each other; docs/protocol.md is the contract these names stand for.
"""
