"""Terminal output for the chat client: the answer on stdout, everything else on stderr.

Keeping the answer alone on stdout makes `vlbridge chat "..." > answer.txt` capture
exactly the model's text. When both streams are the same terminal, `Screen` remembers
whether the answer's line is open, so a status line (a reconnect, say) starts on a line
of its own instead of being glued to half a sentence, and the spinner only ever draws
on an empty line. Without a terminal there is no spinner; states are printed once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TextIO

_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_TICK = 0.1


class Screen:
    def __init__(self, out: TextIO, err: TextIO, *, tty: bool | None = None, color: bool = True) -> None:
        self.out = out
        self.err = err
        self.tty = err.isatty() if tty is None else tty
        self.shared = self.tty and out.isatty()  # same terminal: lines interleave
        self.color = color and self.tty
        self._line_open = False  # the answer's current line has text and no newline yet
        self._label: str | None = None
        self._since = 0.0
        self._spinner: asyncio.Task[None] | None = None
        self._drawn = False
        self._prompt: str | None = None  # shown and not yet answered

    # -- the answer -----------------------------------------------------------------------

    def answer(self, text: str) -> None:
        if not text:
            return
        self._erase()
        self.out.write(text)
        self.out.flush()
        self._line_open = not text.endswith("\n")

    def end_answer(self) -> None:
        if self._line_open:
            self.out.write("\n")
            self.out.flush()
            self._line_open = False

    # -- status ---------------------------------------------------------------------------

    def status(self, line: str, *, dim: bool = True) -> None:
        """A permanent line on stderr, on a line of its own."""
        self._erase()
        if self._line_open and self.shared:
            self.err.write("\n")
            self._line_open = False  # the answer goes on below the status line
        if self._prompt is not None:
            self.err.write("\r\x1b[K" if self.tty else "\n")
        self.err.write(f"\x1b[2m{line}\x1b[0m\n" if dim and self.color else f"{line}\n")
        if self._prompt is not None and self.tty:
            self.err.write(self._prompt)  # put the prompt back under the news
        self.err.flush()

    def prompt(self, text: str) -> None:
        self._erase()
        self._prompt = text
        self.err.write(text)
        self.err.flush()

    def prompt_taken(self) -> None:
        """The user answered the prompt (pressed Enter): it is no longer on screen alone."""
        self._prompt = None

    def wait(self, label: str, *, news: bool = False) -> None:
        """Show that we are waiting (*label*: "thinking"); replaces the last label.

        Without a terminal only *news* labels (a queue position) are printed, once each.
        """
        if label == self._label:
            return
        if self._label is None:
            self._since = time.monotonic()
        self._label = label
        if not self.tty:
            if news:
                self.err.write(f"{label}\n")
                self.err.flush()
            return
        if self._spinner is None:
            self._spinner = asyncio.get_running_loop().create_task(self._spin(), name="spinner")
        self._draw()

    def stop_waiting(self) -> None:
        self._label = None
        if self._spinner is not None:
            self._spinner.cancel()
            self._spinner = None
        self._erase()

    async def aclose(self) -> None:
        task, self._spinner = self._spinner, None
        self.stop_waiting()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _spin(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            self._draw()

    def _draw(self) -> None:
        if self._label is None or (self._line_open and self.shared):
            return
        elapsed = time.monotonic() - self._since
        frame = _FRAMES[int(elapsed / _TICK) % len(_FRAMES)]
        self.err.write(f"\r{frame} {self._label} {elapsed:.1f}s\x1b[K")
        self.err.flush()
        self._drawn = True

    def _erase(self) -> None:
        if self._drawn:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._drawn = False
