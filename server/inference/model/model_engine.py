"""ModelEngine: the Engine implementation over a loaded Qwen3-VL model.

- prefill: the vision encoder over the new pictures in one batch (vision.py), then the new
  sequences' tokens packed into one forward of the language model that writes keys/values
  straight into the paged cache (prefill.py); each row's next M-RoPE position is kept;
- decode: `DecodeStep` advances all running rows by one token (a CUDA graph per batch
  bucket on GPUs);
- memory: each sequence reserves pages for prompt + max_new_tokens at admission, so a
  running batch never runs out of cache.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from protocol.pictures import ImageLimits
from server.inference.api import SamplingParams, Turn
from server.inference.engine import Check, PreparedPrompt, Sequence, keep_going
from server.inference.loading import LoadProgress
from server.inference.picture_processes import PictureProcesses
from server.inference.profile import Profile

from .decode import DecodeStep, DeviceTokens, max_pages_per_row
from .devices import cpu_threads, send, usable_cores
from .kvcache import FP8, PAGE, PagedKVCache, SeqCache
from .positions import mrope_positions
from .prefill import PrefillForward, pack
from .prefill_graphs import GRAPH_ROWS, GRAPH_TOKENS, PrefillGraphs, check_batches
from .prefix import PrefixCache, full_block_keys, identity, picture_starts
from .prompt import Prompt
from .runner import ModelRunner
from .sampling import sample
from .vision import Picture, VisionEncoder

log = logging.getLogger("vlbridge.model")

# Attention kernels the prefill may use on CUDA (vision encoder and prompt). cuDNN's is left out:
# for a call with an explicit mask (every prefill that reuses a cached prefix, and left-padded
# batches) it builds an execution plan for each new (query, key) shape, and a follow-up's shape
# is nearly always new: 650-950 ms for a ~150-token prefill on an H200 (torch 2.11), against
# ~25 ms for a 1047-token one. Flash and memory-efficient attention need no plan. None: torch's
# own choice (bench/prefill_probe.py compares both).
PREFILL_ATTENTION: list[SDPBackend] | None = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


@dataclass
class EngineOptions:
    max_batch: int = 32
    max_batch_tokens: int = 262_144  # KV-cache tokens across all rows
    max_context_tokens: int = 16_384
    max_new_tokens: int = 512
    cuda_graphs: bool = True
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"  # "auto": the model's dtype (kvcache.py)
    weights_dtype: Literal["auto", "fp8"] = "auto"  # the language model's linear layers (float8.py)
    memory_fraction: float = 0.7  # of the GPU memory left after loading, for the KV cache (rest: prefill)
    prefix_cache: bool = True  # keep finished sequences' KV pages for prompts that start alike
    vision_cache_bytes: int = 512 * 2**20  # encoder outputs kept by picture hash; 0: off
    profile_seconds: float = 10.0  # log prefill phase timings this often while busy; 0: off
    cpu_threads: int | Literal["auto"] = "auto"  # torch threads on the CPU: devices.cpu_threads
    prepare_processes: int = 0  # worker processes decoding pictures (picture_processes.py); 0: threads
    progress_log_seconds: float = 5.0  # a hub download's progress goes to the log this often
    # decode steps launched beyond the last one collected; 0: 2 on a GPU (its queue then holds
    # a step more while the host prepares a prefill or is held up), 1 on the CPU
    steps_ahead: int = 0


def _quantize(runner: ModelRunner) -> torch.dtype:
    """The language model's linear layers in float8 where its GEMMs work (float8.py); the
    weights' dtype it runs with."""
    from . import float8

    if runner.device.type == "cuda" and not float8.works(runner.device, runner.dtype):
        return runner.dtype
    replaced = float8.quantize_language_model(runner.model)
    log.info("weights: %d linear layers of the language model in float8 (model.weights_dtype)", replaced)
    return float8.FP8


def _float8_works(text: Any, head_dim: int, runner: ModelRunner) -> bool:
    """The float8 KV cache's kernels checked on this GPU (`attention.float8_cache_agrees`)."""
    from .attention import float8_cache_agrees

    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    try:
        if float8_cache_agrees(heads, kv_heads, head_dim, runner.dtype, runner.device):
            log.info("KV cache in float8: its kernels agree with the reference on this GPU")
            return True
        log.warning("the float8 KV cache's kernels disagree with the reference on this GPU; caching in %s",
                    runner.dtype)  # fmt: skip
    except Exception:
        log.warning("the float8 KV cache's kernels failed on this GPU; caching in %s", runner.dtype,
                    exc_info=True)  # fmt: skip
    return False


@dataclass
class _PromptPicture:
    start: int  # index of its first token in the prompt
    picture: Picture


@dataclass
class _Prompt:
    """The engine's prepared prompt (PreparedPrompt.data)."""

    prompt: Prompt
    ident: list[int]  # token ids, picture tokens replaced by the picture's identity (prefix.py)
    keys: list[bytes]  # prefix-cache keys of its full blocks
    positions: torch.Tensor  # (3, tokens) M-RoPE positions, on the CPU
    next_position: int  # M-RoPE position of the first generated token
    pictures: list[_PromptPicture]


@dataclass
class _State:
    cache: SeqCache
    cell: int  # the sequence's token cell in DecodeStep.tokens
    next_position: int = 0  # M-RoPE position of the next token
    reused: int = 0  # prompt tokens taken from the prefix cache
    shared: list[int] = field(default_factory=list)  # pages shared with the cache (the first ones)
    source: int | None = None  # cached page whose first tokens are copied at prefill (pinned)


class _PrefillTimer:
    """Host and device time of a prefill's phases. Device times come from CUDA events, read
    at a later prefill once they have completed (never waited for)."""

    def __init__(self, profile: Profile, cuda: bool) -> None:
        self.profile = profile
        self.cuda = cuda
        self._pending: list[list[tuple[str, float, Any]]] = []
        self._marks: list[tuple[str, float, Any]] = []

    def start(self) -> None:
        self._collect()
        self._marks = []
        self.mark("start")

    def mark(self, phase: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self._marks.append((phase, time.perf_counter(), event))

    def end(self) -> None:
        marks = self._marks
        for (_, before, _), (phase, after, _) in pairwise(marks):
            self.profile.record(f"host_{phase}", after - before)
        if self.cuda:
            self._pending.append(marks)

    def _collect(self) -> None:
        while self._pending and self._pending[0][-1][2].query():
            marks = self._pending.pop(0)
            for (_, _, before), (phase, _, after) in pairwise(marks):
                self.profile.record(f"gpu_{phase}", before.elapsed_time(after) / 1e3)


def _set_cpu_threads(setting: int | Literal["auto"], parameters: int) -> None:
    """Size torch's CPU thread pool; called on the thread that will run the model, whose OpenMP
    settings are its own."""
    threads = cpu_threads(setting, usable_cores(), parameters)
    torch.set_num_threads(threads)
    log.info(
        "CPU: %d torch thread(s) for %.1f M parameters (model.cpu_threads = %s)",
        threads,
        parameters / 1e6,
        setting,
    )


def _slots(pages: list[int] | torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Flat cache slots of token positions start..end-1 of a sequence with page table *pages*."""
    at = torch.arange(start, end)
    return torch.as_tensor(pages, dtype=torch.long)[at // PAGE] * PAGE + at % PAGE


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
        self.weights_dtype = runner.dtype
        if options.weights_dtype == "fp8":
            self.weights_dtype = _quantize(runner)
        text = runner.model.config.text_config
        layers, kv_heads = text.num_hidden_layers, text.num_key_value_heads
        head_dim = getattr(text, "head_dim", text.hidden_size // text.num_attention_heads)
        kv_dtype = FP8 if options.kv_cache_dtype == "fp8" else runner.dtype
        if kv_dtype == FP8 and runner.device.type == "cuda" and not _float8_works(text, head_dim, runner):
            kv_dtype = runner.dtype
        per_token = PagedKVCache.bytes_per_token(layers, kv_heads, head_dim, kv_dtype)
        row_tokens = options.max_context_tokens + options.max_new_tokens
        self.steps_ahead = options.steps_ahead or (2 if runner.device.type == "cuda" else 1)
        self.max_sequence_tokens = row_tokens  # what one row's page table holds (+ steps_ahead spare)
        row_room = row_tokens + self.steps_ahead
        tokens = min(options.max_batch_tokens, options.max_batch * row_room)  # no more than usable
        if runner.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(runner.device)
            tokens = min(tokens, int(free * options.memory_fraction) // per_token)
        pages = max(2, tokens // 64 + 1)
        self.kv = PagedKVCache(layers, kv_heads, head_dim, pages, kv_dtype, runner.device)
        log.info("KV cache: %d tokens (%.2f GiB, %s)", pages * 64, pages * 64 * per_token / 2**30, kv_dtype)
        self.prefix = PrefixCache(self.kv) if options.prefix_cache else None
        self.vision = VisionEncoder(runner.model, options.vision_cache_bytes, graphs=options.cuda_graphs)
        self.step = DecodeStep(
            runner.model, self.kv, options.max_batch, max_pages_per_row(row_room), self.steps_ahead
        )
        self.forward = PrefillForward(runner.model, self.kv)
        self._merge = int(runner.model.config.vision_config.spatial_merge_size)
        self._cells = list(range(options.max_batch - 1, -1, -1))
        self._admissions = 0  # a cell given to a new sequence changes what its row's table holds
        self._eos = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long, device=runner.device)
        self.capture_seconds = 0.0
        self.keep_logits = False  # prefill keeps the logits of every position in `prefill_logits`
        # host and device time of each prefill phase, logged every 10 s (server/inference/profile.py)
        self.prefill_timer = _PrefillTimer(
            Profile(logging.getLogger("vlbridge.profile"), "prefill phases", options.profile_seconds),
            runner.device.type == "cuda",
        )
        self.prefill_logits: list[torch.Tensor] | None = None  # per row, with keep_logits
        # Pictures decoded off this process's GIL; started at warm-up, stopped by close().
        self.picture_processes = (
            PictureProcesses(options.prepare_processes) if options.prepare_processes > 0 else None
        )
        runner.prompts.processes = self.picture_processes
        # Detokenizing runs on the worker thread twice per row and step (detok.py): the Rust
        # tokenizer directly costs ~2 us a call, transformers' wrapper around it ~12 us, which at
        # 64 rows is a millisecond of every ~4 ms decode step. Same text, unless the tokenizer
        # cleans up spaces after decoding (its wrapper does that step).
        tokenizer = runner.tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        self._decode: Callable[[list[int]], str] = (
            functools.partial(backend.decode, skip_special_tokens=True)
            if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
            else functools.partial(tokenizer.decode, skip_special_tokens=True)
        )

    @classmethod
    def load(
        cls,
        path: str,
        *,
        device: str,
        dtype: str,
        limits: ImageLimits,
        options: EngineOptions,
        progress: LoadProgress | None = None,
    ) -> ModelEngine:
        """Fetch (a hub id), load and warm up; *progress* hears each phase (`LoadProgress`)."""
        progress = progress or LoadProgress()
        progress(0.05, f"loading {path}")
        runner = ModelRunner.load(
            path,
            device=device,
            dtype=dtype,
            limits=limits,
            max_context_tokens=options.max_context_tokens,
            progress=progress,
            log_interval=options.progress_log_seconds,
        )
        if runner.device.type == "cpu":
            _set_cpu_threads(options.cpu_threads, runner.model.num_parameters())
        progress(0.65, "warming up")
        engine = cls(runner, options)
        engine.warm_up(progress)
        progress(1.0)
        return engine

    def warm_up(self, progress: LoadProgress | None = None) -> None:
        """Run one request end to end and capture decode graphs, before reporting ready."""
        progress = progress or LoadProgress()
        started = time.monotonic()
        if self.picture_processes is not None:
            self.picture_processes.start()  # their imports now, not at the first pictures
        seq = Sequence("warm-up", self.prepare([Turn.user("warm up")]), SamplingParams(), 2)
        if self.reserve(seq):
            seq.tokens.extend(self.prefill([seq]).tokens())
            seq.tokens.extend(self.decode([seq]).tokens())
            self.release(seq)
        if self.options.cuda_graphs and self.runner.device.type == "cuda":
            progress(0.75, "warming up: capturing CUDA graphs")
            try:
                self.capture_seconds = self.step.capture()
            except Exception:
                log.exception("CUDA graph capture failed; decoding eagerly")
                self.step.graphs.clear()
            begun = time.monotonic()
            graphs = self.vision.warm_up_graphs(self.runner.device, self.runner.dtype)
            if graphs:
                log.info("vision encoder: %d CUDA graphs in %.1f s", graphs, time.monotonic() - begun)
            self._warm_up_prefill_graphs()
        log.info("warm-up took %.1f s", time.monotonic() - started)

    def _warm_up_prefill_graphs(self) -> None:
        """The packed forward's CUDA graphs (prefill_graphs.py), checked on batches written into
        pages taken for the check and given back."""
        levels = len(getattr(self.runner.model.config.vision_config, "deepstack_visual_indexes", ()))
        self.forward.graphs = PrefillGraphs(self.forward, GRAPH_TOKENS, GRAPH_ROWS, levels)
        cache = SeqCache()
        try:
            checks = []
            if self.kv.allocate(cache, 512):
                checks = check_batches(cache, self.runner.prompts.image_token_id, self.runner.device)
            self.forward.graphs.warm_up(checks)
        finally:
            self.kv.free(cache)

    # ---- Engine protocol ----------------------------------------------------------------------------

    def prepare(self, messages: list[Turn], check: Check = keep_going) -> PreparedPrompt:
        """The prompt plus what the worker would otherwise compute on the critical path: the
        M-RoPE positions, each picture's content hash and tokens, the prefix-cache keys. *check* is
        called between the builder's stages (it raises to stop a cancelled preparation)."""
        prompt = self.runner.prompts.build(messages, check)
        digests = [picture.digest for picture in prompt.pictures]  # the builder hashed them once
        ident = identity(prompt.input_ids, self.runner.prompts.image_token_id, digests)
        grid = prompt.image_grid_thw.tolist() if prompt.image_grid_thw is not None else []
        positions, next_position = mrope_positions(
            prompt.input_ids, self.runner.prompts.image_token_id, [(t, h, w) for t, h, w in grid], self._merge
        )
        starts = picture_starts(prompt.input_ids, self.runner.prompts.image_token_id)
        pictures = [
            _PromptPicture(start, Picture(digest, decoded))
            for start, digest, decoded in zip(starts, digests, prompt.pictures, strict=True)
        ]
        data = _Prompt(
            prompt, ident, full_block_keys(ident), torch.from_numpy(positions), next_position, pictures
        )
        return PreparedPrompt(len(prompt), prompt.image_tokens, data)

    def reserve(self, seq: Sequence) -> bool:
        if not self._cells or seq.prompt.length + seq.max_new_tokens > self.max_sequence_tokens:
            return False
        data: _Prompt = seq.prompt.data
        cache = SeqCache()
        hit = self.prefix.match(data.ident, data.keys) if self.prefix is not None else None
        if hit is not None and self.prefix is not None:
            self.prefix.use(hit)  # pinned first: the allocation below may evict idle cached pages
            cache.pages = list(hit.shared)
        # A sequence's last step writes its last token but one; the steps_ahead launched before the
        # host has seen that it finished write that token and those after it: one spare is left.
        if not self.kv.allocate(cache, seq.prompt.length + seq.max_new_tokens + self.steps_ahead):
            self.kv.free(cache)
            if hit is not None and hit.source is not None:
                self.kv.drop(hit.source)
            return False
        seq.state = _State(cache, self._cells.pop())
        self._admissions += 1
        if hit is not None:
            seq.state.reused = hit.length
            seq.state.shared = hit.shared
            seq.state.source = hit.source
        return True

    def _unpin_source(self, state: _State) -> None:
        if state.source is not None:
            self.kv.drop(state.source)
            state.source = None

    def _blocked(self, seqs: list[Sequence]) -> list[int]:
        return [int(seq.launched < seq.params.min_new_tokens) for seq in seqs]

    def _publish(self, tokens: torch.Tensor, cells: torch.Tensor, seqs: list[Sequence]) -> DeviceTokens:
        self.step.tokens.index_copy_(0, cells, tokens)  # the next step reads them from here
        for seq in seqs:
            seq.launched += 1
        return DeviceTokens(tokens, self.step.output_buffer(), len(seqs))

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> DeviceTokens:
        """Prefill what each row does not reuse from the prefix cache, in one packed forward
        (prefill.py): the rows' new tokens one after another, their keys/values written into the
        rows' pages as each layer computes them. Positions are the prompt's own M-RoPE positions
        (computed at preparation), so a reused prefix and its continuation line up exactly. A row
        that continues a cached page part-way first copies that page's first tokens into its own.
        """
        device = self.runner.device
        timer = self.prefill_timer
        timer.start()
        rows: list[tuple[list[int], torch.Tensor, torch.Tensor, int]] = []
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        pictures: list[_PromptPicture] = []
        for seq in seqs:
            prompt: _Prompt = seq.prompt.data
            state: _State = seq.state
            n, r = len(prompt.prompt), state.reused
            rows.append(
                (prompt.prompt.input_ids[r:], prompt.positions[:, r:], _slots(state.cache.pages, 0, n), r)
            )
            if state.source is not None:
                first = len(state.shared) * PAGE
                copies.append((_slots([state.source], 0, r - first), _slots(state.cache.pages, first, r)))
            pictures.extend(p for p in prompt.pictures if p.start >= r)
        batch = pack(rows, copies, self.runner.prompts.image_token_id, device)
        timer.profile.count("rows", len(seqs))
        timer.profile.count("new_tokens", batch.query_starts[-1])
        timer.profile.count("reused_tokens", sum(seq.state.reused for seq in seqs))
        timer.profile.count("pictures", len(pictures))
        timer.mark("inputs")
        embeds, deepstack = None, []
        if pictures:
            with self._attention():
                encoded = self.vision.encode([p.picture for p in pictures], device, self.runner.dtype)
            embeds = torch.cat([e.embeds for e in encoded])
            deepstack = [torch.cat(level) for level in zip(*(e.deepstack for e in encoded), strict=True)]
        timer.mark("vision")
        with self._attention():
            logits = self.forward.run(batch, embeds, deepstack, every_position=self.keep_logits)
        if self.keep_logits:  # correctness checks compare every prompt position (bench/gpu_check.py)
            self.prefill_logits = list(torch.split(logits, [b - a for a, b in pairwise(batch.query_starts)]))
            logits = logits.index_select(0, batch.last)
        timer.mark("forward")
        for seq in seqs:
            state = seq.state
            state.cache.length = len(seq.prompt.data.prompt)
            state.next_position = seq.prompt.data.next_position
            self._unpin_source(state)  # the copy above is queued before any later reuse of the page
        blocked = self._blocked(seqs)
        blocked_dev = send(torch.tensor(blocked, dtype=torch.bool), device) if any(blocked) else None
        tokens = sample(logits, seqs, self._eos, blocked_dev)
        cells = send(torch.tensor([s.state.cell for s in seqs]), device)
        published = self._publish(tokens, cells, seqs)
        timer.mark("sample")
        timer.end()
        return published

    def _attention(self) -> AbstractContextManager[None]:
        if self.runner.device.type == "cuda" and PREFILL_ATTENTION is not None:
            return sdpa_kernel(PREFILL_ATTENTION)
        return nullcontext()

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
        layout = (self._admissions, tuple(cells))  # the same rows as the last step: same tables
        logits = self.step.run(cells, positions, slots, lengths, blocked, tables, layout)
        for seq in seqs:  # advanced only once the step is launched: a failed launch changes nothing
            seq.state.cache.length += 1
            seq.state.next_position += 1
        with torch.inference_mode():
            tokens = sample(logits, seqs, self._eos, self.step.blocked_rows(rows) if any(blocked) else None)
            return self._publish(tokens, self.step.cells(rows), seqs)

    def release(self, seq: Sequence) -> None:
        # Work already launched for this sequence runs before anything launched later on the same
        # stream, so its pages and token cell can be handed out again at once.
        state = seq.state
        if isinstance(state, _State):
            if self.prefix is not None and state.cache.length:
                # What it wrote and the host has seen: prompt, then the generated tokens fed back.
                data: _Prompt = seq.prompt.data
                written = min(state.cache.length, len(data.ident) + len(seq.tokens))
                self.prefix.register(state.cache.pages, (data.ident + seq.tokens)[:written])
            self._unpin_source(state)
            self.kv.free(state.cache)
            self._cells.append(state.cell)
        seq.state = None

    def detokenize(self, token_ids: list[int]) -> str:
        return str(self._decode(token_ids))

    def memory(self) -> tuple[int, int] | None:
        if self.runner.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.runner.device)
        return total - free, total

    def close(self) -> None:
        if self.picture_processes is not None:
            self.picture_processes.shutdown()
        self.step.graphs.clear()
        self._model = None
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def model(self) -> Any:
        return self._model
