"""The local test client: `vlbridge chat` (terminal) speaking WebSocket protocol v1.

    images.py      pictures from files or stdin -> bytes worth sending (Pillow, no torch)
    protocol.py    sans-I/O client session: frames in -> events out, asks/cancels -> frames out
    connection.py  asyncio + websockets: connect, answer pings, reconnect with backoff, resume
    terminal.py    one-shot and interactive terminal UI (spinner, queue position, timings)

Nothing here imports torch; the package is importable on a machine without the model.
"""
