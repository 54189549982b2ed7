"""Incremental detokenization with stop strings, for one streaming answer.

Tokens arrive one at a time; text is released only when it can no longer change:
never half of a multi-byte character (the tokenizer yields U+FFFD until the character
is complete) and never the first characters of what may become a stop string. The
concatenation of every released piece equals the final text exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]

_WINDOW = 6  # tokens of left context re-decoded each step (merges spaces/bytes correctly)


class IncrementalDetokenizer:
    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._tokens: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens whose text is already in self._text
        self._text = ""  # decoded, stable text
        self._sent = 0  # characters of self._text already released
        self.stopped = False  # a stop string was found; the text ends before it

    @property
    def text(self) -> str:
        return self._text[: self._sent]

    def push(self, token: int) -> str:
        """Add one token; return newly releasable text (possibly empty)."""
        if self.stopped:
            return ""
        self._tokens.append(token)
        prefix_text = self._decode(self._tokens[self._prefix : self._read])
        full = self._decode(self._tokens[self._prefix :])
        if full.endswith("\ufffd") or len(full) < len(prefix_text):
            return ""  # an incomplete character: wait for its next bytes
        self._text += full[len(prefix_text) :]
        self._prefix = max(0, len(self._tokens) - _WINDOW)
        self._read = len(self._tokens)
        return self._release(final=False)

    def finish(self) -> str:
        """The end of the answer: release everything still held (incomplete bytes included)."""
        if not self.stopped and self._read < len(self._tokens):
            prefix_text = self._decode(self._tokens[self._prefix : self._read])
            self._text += self._decode(self._tokens[self._prefix :])[len(prefix_text) :]
            self._read = len(self._tokens)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop:
            start = max(0, self._sent - self._hold)
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self._text = self._text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self._text) if final else max(self._sent, len(self._text) - self._hold)
        piece = self._text[self._sent : end]
        self._sent = end
        return piece
