"""The contract between the executor (scheduling) and an engine (the model's steps).

The executor owns one engine on its worker thread and calls it step by step:
`prepare` (on a preprocessing thread) turns a conversation into a prompt; `reserve`
claims memory for a sequence; `prefill` runs new sequences' prompts and returns their
first tokens; `decode` advances every running sequence by one token; `release` frees
a sequence. An engine never sees asyncio, queues or clients.
"""

from __future__ import annotations

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
    tokens: list[int] = field(default_factory=list)  # generated so far
    state: Any = None  # engine-private (KV slot, blocks, positions)


class Engine(Protocol):
    name: str
    device: str
    eos_token_ids: frozenset[int]

    def prepare(self, messages: list[Turn]) -> PreparedPrompt:
        """Build the prompt; thread-safe; raises RequestError subclasses for bad input."""

    def reserve(self, seq: Sequence) -> bool:
        """Claim memory for the whole sequence (prompt + max_new_tokens); False: not now."""

    def prefill(self, seqs: list[Sequence]) -> list[int]:
        """Run the prompts of reserved sequences; return each one's first generated token."""

    def decode(self, seqs: list[Sequence]) -> list[int]:
        """One step for every sequence (each has >= 1 token); return each one's next token."""

    def release(self, seq: Sequence) -> None:
        """Free what the sequence holds; idempotent."""

    def detokenize(self, token_ids: list[int]) -> str:
        """Text of *token_ids*, special tokens skipped; thread-safe."""

    def memory(self) -> tuple[int, int] | None:
        """(used, total) device memory in bytes, or None off-GPU."""

    def close(self) -> None:
        """Free the model."""
