"""A zero-cost engine that answers by echoing the question: for transport tests and benchmarks.

Selected with ``model.path = "builtin:echo"``. It runs the real executor (queueing,
batching, streaming, cancellation) with no model, so what is measured is everything
but the model. Each character is one token; `step_delay` simulates a decode step.
"""

from __future__ import annotations

import time

from protocol.pictures import ImageLimits
from server.errors import BadImage
from server.inference.api import Turn
from server.inference.engine import Check, PreparedPrompt, ReadyTokens, Sequence, keep_going
from server.inference.images import decode_image

ECHO_PATH = "builtin:echo"
_EOS = 0


class EchoEngine:
    name = ECHO_PATH
    device = "none"
    eos_token_ids = frozenset({_EOS})
    steps_ahead = 1

    def __init__(
        self,
        limits: ImageLimits | None = None,
        step_delay: float = 0.0,
        capacity: int = 1 << 30,
        picture_delay: float = 0.0,
    ) -> None:
        self.limits = limits or ImageLimits()
        self.step_delay = step_delay
        self.picture_delay = picture_delay  # seconds a picture takes to read, as a large one would
        self.capacity = capacity  # tokens of "memory"
        self.max_sequence_tokens = capacity - 1  # one sequence alone always fits
        self.used = 0

    def prepare(self, messages: list[Turn], check: Check = keep_going) -> PreparedPrompt:
        sizes = []
        for turn in messages:
            for number, data in enumerate(turn.images, start=1):
                check()
                if self.picture_delay:
                    time.sleep(self.picture_delay)  # on a preparation thread, like real decoding
                try:
                    image = decode_image(data, self.limits)
                except BadImage as exc:
                    raise BadImage(f"picture {number}: {exc.message}") from None
                sizes.append(f"{image.width}x{image.height}")
        question = messages[-1].text if messages else ""
        answer = f"echo: {question}" + (f" [{', '.join(sizes)}]" if sizes else "")
        tokens = [ord(ch) for ch in answer] + [_EOS]
        length = sum(len(t.text) for t in messages) + 1
        return PreparedPrompt(length=length, image_tokens=len(sizes), data=tokens)

    def reserve(self, seq: Sequence) -> bool:
        need = seq.prompt.length + seq.max_new_tokens + self.steps_ahead
        if self.used + need > self.capacity:
            return False
        self.used += need
        seq.state = need
        return True

    def _next(self, seq: Sequence) -> int:
        answer: list[int] = seq.prompt.data
        index = seq.launched
        seq.launched += 1
        if index < len(answer) and not (answer[index] == _EOS and index < seq.params.min_new_tokens):
            return answer[index]
        return ord(".")  # forced past the end (min_new_tokens): pad with dots

    def prefill(self, seqs: list[Sequence]) -> ReadyTokens:
        return ReadyTokens([self._next(seq) for seq in seqs])

    def decode(self, seqs: list[Sequence]) -> ReadyTokens:
        if self.step_delay:
            time.sleep(self.step_delay)
        return ReadyTokens([self._next(seq) for seq in seqs])

    def release(self, seq: Sequence) -> None:
        if seq.state:
            self.used -= seq.state
            seq.state = None

    def detokenize(self, token_ids: list[int]) -> str:
        return "".join(chr(t) for t in token_ids if t != _EOS)

    def memory(self) -> tuple[int, int] | None:
        return None

    def close(self) -> None:
        pass
