"""ModelEngine: the Engine implementation over a loaded Qwen3-VL model.

- prefill: new sequences run together in one left-padded transformers forward (vision
  encoder and prompt batched, deepstack and M-RoPE as the model defines them); their
  keys/values are then copied into the paged cache and each row's next M-RoPE position
  is kept;
- decode: `DecodeStep` advances all running rows by one token (a CUDA graph per batch
  bucket on GPUs);
- memory: each sequence reserves pages for prompt + max_new_tokens at admission, so a
  running batch never runs out of cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from protocol.pictures import ImageLimits
from server.inference.api import SamplingParams, Turn
from server.inference.engine import Check, PreparedPrompt, Sequence, keep_going

from .decode import DecodeStep, DeviceTokens, max_pages_per_row
from .kvcache import PAGE, PagedKVCache, SeqCache
from .runner import ModelRunner
from .sampling import sample

log = logging.getLogger("vlbridge.model")


@dataclass
class EngineOptions:
    max_batch: int = 32
    max_batch_tokens: int = 262_144  # KV-cache tokens across all rows
    max_context_tokens: int = 16_384
    max_new_tokens: int = 512
    cuda_graphs: bool = True
    memory_fraction: float = 0.7  # of the GPU memory left after loading, for the KV cache (rest: prefill)


@dataclass
class _State:
    cache: SeqCache
    cell: int  # the sequence's token cell in DecodeStep.tokens
    next_position: int = 0  # M-RoPE position of the next token


class ModelEngine:
    """Runs prompts and decode steps for the executor; owned by the executor's thread."""

    def __init__(self, runner: ModelRunner, options: EngineOptions) -> None:
        self.runner = runner
        self.options = options
        self.name = runner.loaded.name
        self.device = str(runner.device)
        self.eos_token_ids = runner.eos_token_ids
        self._model = runner.model
        if runner.device.type == "cuda":
            from .kernels import fuse_projections

            fuse_projections(runner.model)
        text = runner.model.config.text_config
        layers, kv_heads = text.num_hidden_layers, text.num_key_value_heads
        head_dim = getattr(text, "head_dim", text.hidden_size // text.num_attention_heads)
        per_token = PagedKVCache.bytes_per_token(layers, kv_heads, head_dim, runner.dtype)
        row_tokens = options.max_context_tokens + options.max_new_tokens
        self.max_sequence_tokens = row_tokens  # what one row's page table holds (+1 spare token)
        tokens = min(options.max_batch_tokens, options.max_batch * (row_tokens + 1))  # no more than usable
        if runner.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(runner.device)
            tokens = min(tokens, int(free * options.memory_fraction) // per_token)
        pages = max(2, tokens // 64 + 1)
        self.kv = PagedKVCache(layers, kv_heads, head_dim, pages, runner.dtype, runner.device)
        log.info("KV cache: %d tokens (%.2f GiB)", pages * 64, pages * 64 * per_token / 2**30)
        self.step = DecodeStep(runner.model, self.kv, options.max_batch, max_pages_per_row(row_tokens + 1))
        self._cells = list(range(options.max_batch - 1, -1, -1))
        self._eos = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long, device=runner.device)
        self.capture_seconds = 0.0

    @classmethod
    def load(
        cls,
        path: str,
        *,
        device: str,
        dtype: str,
        limits: ImageLimits,
        options: EngineOptions,
        progress: Callable[[float], None] = lambda _: None,
    ) -> ModelEngine:
        progress(0.05)
        runner = ModelRunner.load(
            path, device=device, dtype=dtype, limits=limits, max_context_tokens=options.max_context_tokens
        )
        progress(0.6)
        engine = cls(runner, options)
        engine.warm_up(progress)
        progress(1.0)
        return engine

    def warm_up(self, progress: Callable[[float], None] = lambda _: None) -> None:
        """Run one request end to end and capture decode graphs, before reporting ready."""
        started = time.monotonic()
        seq = Sequence("warm-up", self.prepare([Turn.user("warm up")]), SamplingParams(), 2)
        if self.reserve(seq):
            seq.tokens.extend(self.prefill([seq]).tokens())
            seq.tokens.extend(self.decode([seq]).tokens())
            self.release(seq)
        progress(0.7)
        if self.options.cuda_graphs and self.runner.device.type == "cuda":
            try:
                self.capture_seconds = self.step.capture()
            except Exception:
                log.exception("CUDA graph capture failed; decoding eagerly")
                self.step.graphs.clear()
        log.info("warm-up took %.1f s", time.monotonic() - started)

    # ---- Engine protocol ----------------------------------------------------------------------------

    def prepare(self, messages: list[Turn], check: Check = keep_going) -> PreparedPrompt:
        prompt = self.runner.prompts.build(messages, check)
        return PreparedPrompt(len(prompt), prompt.image_tokens, prompt)

    def reserve(self, seq: Sequence) -> bool:
        if not self._cells or seq.prompt.length + seq.max_new_tokens > self.max_sequence_tokens:
            return False
        cache = SeqCache()
        # +1: a step may be launched for a sequence before the host has seen that it finished
        if not self.kv.allocate(cache, seq.prompt.length + seq.max_new_tokens + 1):
            return False
        seq.state = _State(cache, self._cells.pop())
        return True

    def _blocked(self, seqs: list[Sequence]) -> list[int]:
        return [int(seq.launched < seq.params.min_new_tokens) for seq in seqs]

    def _publish(self, tokens: torch.Tensor, cells: torch.Tensor, seqs: list[Sequence]) -> DeviceTokens:
        self.step.tokens.index_copy_(0, cells, tokens)  # the next step reads them from here
        for seq in seqs:
            seq.launched += 1
        return DeviceTokens(tokens, self.step.output_buffer(), len(seqs))

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> DeviceTokens:
        prompts = [seq.prompt.data for seq in seqs]
        inputs = self.runner.model_inputs(prompts)
        dense = DynamicCache(config=self._model.config)
        self._model.model.rope_deltas = None  # transformers keeps the last prompt's deltas on the module
        out = self._model(**inputs, cache=dense, use_cache=True, logits_to_keep=1)
        deltas = self._model.model.rope_deltas
        width = inputs["input_ids"].shape[1]
        slots: list[int] = []
        rows: list[int] = []  # flat (row, position) index of every real (unpadded) prompt token
        for row, seq in enumerate(seqs):
            state: _State = seq.state
            length = seq.prompt.length
            slots.extend(state.cache.slot(i) for i in range(length))
            rows.extend(range(row * width + width - length, row * width + width))
            state.cache.length = length
            state.next_position = length + (0 if deltas is None else int(deltas[row, 0]))
        device = self.runner.device
        slot_tensor = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
        row_tensor = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
        for index, layer in enumerate(dense.layers):
            # (rows, kv_heads, width, dim) -> the real tokens, row after row (no host sync)
            keys = layer.keys.transpose(1, 2).flatten(0, 1).index_select(0, row_tensor)
            values = layer.values.transpose(1, 2).flatten(0, 1).index_select(0, row_tensor)
            self.kv.write(index, slot_tensor, keys, values)
        blocked = self._blocked(seqs)
        blocked_dev = torch.tensor(blocked, dtype=torch.bool).to(device) if any(blocked) else None
        tokens = sample(out.logits[:, -1, :], seqs, self._eos, blocked_dev)
        cells = torch.tensor([s.state.cell for s in seqs], dtype=torch.long).to(device, non_blocking=True)
        return self._publish(tokens, cells, seqs)

    def decode(self, seqs: list[Sequence]) -> DeviceTokens:
        cells, positions, slots, lengths, tables = [], [], [], [], []
        for seq in seqs:
            state: _State = seq.state
            pages = len(state.cache.pages)
            if state.cache.length >= pages * PAGE or pages > self.step.table.shape[1]:
                raise IndexError(f"sequence {seq.id} does not fit its page table ({pages} pages)")
            cells.append(state.cell)
            positions.append(state.next_position)
            slots.append(state.cache.slot(state.cache.length))
            tables.append(state.cache.pages)
            lengths.append(state.cache.length + 1)
        blocked = self._blocked(seqs)
        rows = len(seqs)
        logits = self.step.run(cells, positions, slots, lengths, blocked, tables)
        for seq in seqs:  # advanced only once the step is launched: a failed launch changes nothing
            seq.state.cache.length += 1
            seq.state.next_position += 1
        with torch.inference_mode():
            tokens = sample(logits, seqs, self._eos, self.step.blocked_rows(rows) if any(blocked) else None)
            return self._publish(tokens, self.step.cells(rows), seqs)

    def release(self, seq: Sequence) -> None:
        # Work already launched for this sequence runs before anything launched later on the same
        # stream, so its pages and token cell can be handed out again at once.
        if isinstance(seq.state, _State):
            self.kv.free(seq.state.cache)
            self._cells.append(seq.state.cell)
        seq.state = None

    def detokenize(self, token_ids: list[int]) -> str:
        return str(self.runner.tokenizer.decode(token_ids, skip_special_tokens=True))

    def memory(self) -> tuple[int, int] | None:
        if self.runner.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.runner.device)
        return total - free, total

    def close(self) -> None:
        self.step.graphs.clear()
        self._model = None
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def model(self) -> Any:
        return self._model
