"""The chat client: `vlbridge chat` (terminal) speaking WebSocket protocol v1.

    protocol.py    sans-I/O client session: frames in -> events out, asks/cancels -> frames out
    connection.py  asyncio + websockets: connect, answer pings, reconnect with backoff, resume
    images.py      pictures from files or stdin -> bytes worth sending (Pillow, no torch)
    screen.py      what the terminal shows: answers, status lines, the spinner
    terminal.py    one-shot and interactive terminal UI (spinner, queue position, timings)
    command.py     `vlbridge chat`: options in, exit status out
    errors.py      the client's own error tree

A client of the server, not a part of it: of the project it imports only the wire
protocol's definitions (`protocol.v1`), never `server` or `bot`, and nothing here imports
torch; the package is importable on a machine without the model.
"""
