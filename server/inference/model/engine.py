"""ModelEngine: the Engine implementation over a loaded Qwen3-VL model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from server.inference.api import Turn
from server.inference.engine import PreparedPrompt, Sequence
from server.inference.images import ImageLimits

from .runner import ModelRunner
from .sampling import sample

log = logging.getLogger("vlbridge.model")


@dataclass
class _State:
    cache: Any
    next_position: int  # M-RoPE position of the next token


class ModelEngine:
    """Runs prompts and decode steps for the executor; owned by the executor's thread."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.name = runner.loaded.name
        self.device = str(runner.device)
        self.eos_token_ids = runner.eos_token_ids
        self._model = runner.model

    @classmethod
    def load(
        cls,
        path: str,
        *,
        device: str,
        dtype: str,
        limits: ImageLimits,
        max_context_tokens: int,
        progress: Callable[[float], None] = lambda _: None,
    ) -> ModelEngine:
        progress(0.05)
        runner = ModelRunner.load(
            path, device=device, dtype=dtype, limits=limits, max_context_tokens=max_context_tokens
        )
        progress(0.9)
        return cls(runner)

    def prepare(self, messages: list[Turn]) -> PreparedPrompt:
        prompt = self.runner.prompts.build(messages)
        return PreparedPrompt(len(prompt), prompt.image_tokens, prompt)

    def reserve(self, seq: Sequence) -> bool:
        return True

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[int]:
        first: list[int] = []
        for seq in seqs:
            inputs = self.runner.model_inputs([seq.prompt.data])
            cache = DynamicCache(config=self._model.config)
            self._model.model.rope_deltas = None  # HF keeps the last prompt's deltas on the module
            out = self._model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
            deltas = self._model.model.rope_deltas
            delta = 0 if deltas is None else int(deltas[0, 0])
            seq.state = _State(out.cache if hasattr(out, "cache") else cache, seq.prompt.length + delta)
            first.extend(sample(out.logits[:, -1, :], [seq], self.eos_token_ids))
        return first

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> list[int]:
        tokens: list[int] = []
        for seq in seqs:
            state: _State = seq.state
            cache_len = state.cache.get_seq_length()
            ids = torch.tensor([[seq.tokens[-1]]], device=self.runner.device)
            position = torch.tensor([cache_len, *([state.next_position] * 3)], device=self.runner.device)
            out = self._model(
                input_ids=ids, position_ids=position.view(4, 1, 1), cache=state.cache, use_cache=True
            )
            state.next_position += 1
            tokens.extend(sample(out.logits[:, -1, :], [seq], self.eos_token_ids))
        return tokens

    def release(self, seq: Sequence) -> None:
        seq.state = None

    def detokenize(self, token_ids: list[int]) -> str:
        return str(self.runner.tokenizer.decode(token_ids, skip_special_tokens=True))

    def memory(self) -> tuple[int, int] | None:
        if self.runner.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.runner.device)
        return total - free, total

    def close(self) -> None:
        self._model = None
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()
