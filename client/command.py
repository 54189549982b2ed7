"""`vlbridge chat`: options in, exit status out. The CLI parses; this wires the parts."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from typing import Any, TextIO

from client.connection import Backoff, Connection
from client.errors import ClientError, PictureError
from client.images import Picture, read_picture
from client.screen import Screen
from client.terminal import EXIT_CONNECTION, HELP, Chat, Inputs, ScriptedInputs, StdinLines

EXIT_USAGE = 2


@dataclass(frozen=True, slots=True)
class ChatOptions:
    url: str = "ws://127.0.0.1:8000/ws"
    token: str | None = None
    images: list[str] = field(default_factory=list)
    question: str | None = None  # None: interactive
    give_up_after: float = 120.0
    color: bool = True
    max_tokens: int | None = None  # each answer's limit, sent with every question; None: the server's


def run_chat(options: ChatOptions, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Run the client to completion; every failure is a message on *stderr* and a status."""
    if options.question is not None and not options.question.strip() and not options.images:
        print("vlbridge chat: empty question (leave it out for an interactive session)", file=stderr)
        return EXIT_USAGE
    if "-" in options.images and options.question is None:
        print("vlbridge chat: --image - needs a QUESTION (standard input holds the picture)", file=stderr)
        return EXIT_USAGE
    try:
        pictures = [read_picture(path, stdin.buffer) for path in options.images]
    except PictureError as exc:
        print(f"vlbridge chat: {exc}", file=stderr)
        return EXIT_USAGE
    return asyncio.run(_chat(options, pictures, stdin, Screen(stdout, stderr, color=options.color)))


def model_status(info: dict[str, Any]) -> str | None:
    """What the server's hello says of a model that cannot answer yet; None when it is ready (or
    the server, older, does not say)."""
    state = info.get("model_state")
    detail = str(info.get("model_detail") or "")
    said = f": {detail}" if detail else ""
    if state == "loading":
        progress = info.get("model_progress")
        done = f" ({progress:.0%})" if isinstance(progress, int | float) and 0 < progress < 1 else ""
        return f"the model is still loading{done}{said}; questions wait for it"
    if state == "failed":
        return f"the model failed to load{said}; questions will be refused"
    if state == "stopped":
        return "the service is stopping; questions will be refused"
    return None


async def _chat(options: ChatOptions, pictures: list[Picture], stdin: TextIO, screen: Screen) -> int:
    conn = Connection(options.url, options.token, backoff=Backoff(give_up_after=options.give_up_after))
    try:
        hello = await conn.start()
    except ClientError as exc:
        screen.status(f"vlbridge chat: {exc}", dim=False)
        await conn.close()
        return EXIT_CONNECTION
    interactive = options.question is None
    waiting = model_status(hello.info)
    if waiting:
        screen.status(waiting)
    inputs: Inputs
    if interactive:
        inputs = StdinLines(stdin)
        model = hello.info.get("model")
        screen.status(
            f"connected to {options.url}, session {hello.session}" + (f", model {model}" if model else "")
        )
        screen.status(HELP)
    else:
        inputs = ScriptedInputs([options.question or ""])
    chat = Chat(
        conn,
        screen,
        inputs,
        interactive,
        prompt="> " if interactive and stdin.isatty() else None,
        max_tokens=options.max_tokens,
    )
    chat.attached.extend(pictures)
    for picture in pictures:
        if interactive:
            screen.status(f"attached {picture.describe()}; it goes with your first question")
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread / platform
        loop.add_signal_handler(signal.SIGINT, inputs.interrupt)
    try:
        return await chat.run()
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        await conn.close()
