"""The contract between the executor (scheduling) and an engine (the model's steps).

The executor owns one engine on its worker thread and calls it step by step:
`prepare` (on a preprocessing thread) turns a conversation into a prompt; `reserve`
claims memory for a sequence; `prefill` launches new sequences' prompts and `decode`
launches one step for every running sequence. Both return a `StepResult` at once: the
work may still be running on the device, and `tokens()` waits for it. This lets the
executor launch up to `steps_ahead` steps beyond those whose tokens it has processed, so
the CPU-side work (detokenizing, streaming, scheduling, a prefill's host work) overlaps the
GPU's. A sequence's newest tokens may therefore still be on the device when its next step
is launched: the engine keeps tokens device-resident and counts launched steps itself
(`Sequence.launched`), and reserves room for `steps_ahead` tokens past a sequence's end
(steps launched before the executor saw that it finished).
`release` frees a sequence. An engine never sees asyncio, queues or clients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.inference.api import SamplingParams, Turn


@dataclass
class PreparedPrompt:
    """An engine-specific prompt with the sizes the scheduler needs."""

    length: int  # prompt tokens
    image_tokens: int
    data: Any  # engine-private (token ids, pixel tensors, ...)


@dataclass(eq=False)
class Sequence:
    """One request as the engine sees it; the executor owns it."""

    id: str
    prompt: PreparedPrompt
    params: SamplingParams
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)  # generated and seen by the executor
    launched: int = 0  # steps launched (prefill included); >= len(tokens)
    state: Any = None  # engine-private (KV pages, positions, token cell)


class StepResult(Protocol):
    def tokens(self) -> list[int]:
        """One token per sequence of the step, in order; waits for the device if needed."""


@dataclass
class ReadyTokens:
    """A StepResult that is already complete (CPU engines)."""

    values: list[int]

    def tokens(self) -> list[int]:
        return self.values


Check = Callable[[], None]  # raises RequestError (Cancelled, Timeout) when work should stop


def keep_going() -> None:
    """A `Check` that never stops the work."""


class Engine(Protocol):
    name: str
    device: str
    eos_token_ids: frozenset[int]
    max_sequence_tokens: int  # prompt + answer of one sequence, at most
    steps_ahead: int  # steps launched beyond the last one collected (1: step N+1 before N's tokens)

    def prepare(self, messages: list[Turn], check: Check = keep_going) -> PreparedPrompt:
        """Build the prompt; thread-safe; raises RequestError subclasses for bad input.

        *check* is called between the stages of the work (each picture, each attempt at
        fitting the context) and stops it by raising: a request whose asker left or whose
        deadline passed does not keep a preparation thread busy.
        """

    def reserve(self, seq: Sequence) -> bool:
        """Claim memory for the whole sequence (prompt + max_new_tokens + steps_ahead); False: not now."""

    def prefill(self, seqs: list[Sequence]) -> StepResult:
        """Launch the prompts of reserved sequences; the result is each one's first token."""

    def decode(self, seqs: list[Sequence]) -> StepResult:
        """Launch one step for every sequence (each has launched >= 1 step): their next tokens.

        Atomic: when it raises, no sequence has advanced, so the caller may launch the rows
        again (e.g. one by one, to find the one that fails)."""

    def release(self, seq: Sequence) -> None:
        """Free what the sequence holds; idempotent."""

    def detokenize(self, token_ids: list[int]) -> str:
        """Text of *token_ids*, special tokens skipped; thread-safe."""

    def memory(self) -> tuple[int, int] | None:
        """(used, total) device memory in bytes, or None off-GPU."""

    def close(self) -> None:
        """Free the model."""
