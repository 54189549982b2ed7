"""The packed prefill (server/inference/model/prefill.py) against transformers' own forward.

The demo model in float32 on the CPU: the engine's logits at every prompt position must be
transformers' for the same tokens, for a batch that packs rows with and without pictures of
different sizes, and for a follow-up that reuses a cached prefix ending part-way into a page
(its first tokens copied into the row's own page) beside a fresh row in the same prefill.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.gpu_check import check_teacher_forcing
from protocol.pictures import ImageLimits
from server.inference.api import SamplingParams, Turn
from server.inference.engine import Sequence
from server.inference.model.flash import attention_by_rows
from server.inference.model.kvcache import PAGE
from server.inference.model.model_engine import EngineOptions, ModelEngine
from tests.conftest import make_png


@pytest.mark.parametrize("model", ["demo", "demo-moe"])
def test_teacher_forcing_matches_transformers_at_every_position(model: str) -> None:
    """bench/gpu_check.py's check, as run on the GPU for 2B/8B/30B-A3B, on the demo model and
    on its mixture-of-experts twin (whose block wants (batch, tokens, hidden): the CPU paths
    failed on it before `TextModel.mlp`)."""
    report = check_teacher_forcing(model, 8, "cpu")
    for name in ("cold", "prefix cache", "vision cache"):
        result = report[name]
        assert isinstance(result, dict)
        assert result["prefill_max_rel_err"] < 1e-4, (name, result)
        assert result["decode_max_rel_err"] < 1e-4, (name, result)
        assert result["prefill_top1"] == 1.0 and result["decode_top1"] == 1.0, (name, result)


def test_rows_attend_causally_to_their_whole_sequence() -> None:
    """Two rows packed: one prefills all its 5 tokens, one 3 new tokens after 4 cached ones."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(8, 4, 16, generator=generator)
    k = torch.randn(12, 2, 16, generator=generator)
    v = torch.randn(12, 2, 16, generator=generator)
    out = attention_by_rows(q, k, v, [0, 5, 8], [0, 5, 12], 0.25)
    for row, (qa, qb, ka, kb) in enumerate([(0, 5, 0, 5), (5, 8, 5, 12)]):
        for i, query in enumerate(range(qa, qb)):
            seen = (kb - ka) - (qb - qa) + i + 1  # keys up to this token's own position
            keys = k[ka : ka + seen].repeat_interleave(2, dim=1)  # (seen, heads, dim)
            values = v[ka : ka + seen].repeat_interleave(2, dim=1)
            weights = torch.softmax(torch.einsum("hd,shd->hs", q[query], keys) * 0.25, dim=-1)
            expected = torch.einsum("hs,shd->hd", weights, values)
            torch.testing.assert_close(out[query], expected, msg=f"row {row} token {i}")


def _stock_logits(engine: ModelEngine, turns: list[Turn], ids: list[int]) -> torch.Tensor:
    """transformers' forward over *ids* (the prompt of *turns*, possibly extended): (len, vocab)."""
    runner = engine.runner
    prompt = runner.prompts.build(turns)
    assert ids[: len(prompt)] == prompt.input_ids
    from dataclasses import replace

    inputs = runner.model_inputs([replace(prompt, input_ids=ids)])
    with torch.inference_mode():
        return runner.model(**inputs).logits[0].float()


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path) -> ModelEngine:
    options = EngineOptions(max_batch=4, max_context_tokens=1024, max_new_tokens=64, vision_cache_bytes=0)
    return ModelEngine.load(
        str(demo_model_dir), device="cpu", dtype="float32", limits=ImageLimits(), options=options
    )


def test_a_follow_up_continuing_a_cached_page_beside_a_fresh_row(engine: ModelEngine) -> None:
    first = [Turn.user("What is in this picture?", [make_png(320, 256, (200, 40, 40))])]
    seq = Sequence("first", engine.prepare(first), SamplingParams(max_new_tokens=12), 12)
    assert engine.reserve(seq)
    seq.tokens.extend(engine.prefill([seq]).tokens())
    while len(seq.tokens) < 12:
        seq.tokens.extend(engine.decode([seq]).tokens())
    engine.release(seq)  # its pages are now cached by content

    follow = [*first, Turn.assistant(engine.detokenize(seq.tokens)), Turn.user("And its colour?")]
    fresh = [
        Turn.user("Describe it.", [make_png(160, 96, (30, 60, 220))]),
        Turn.assistant("A"),
        Turn.user("B?"),
    ]
    seqs = [
        Sequence(name, engine.prepare(turns), SamplingParams(max_new_tokens=4), 4)
        for name, turns in (("follow", follow), ("fresh", fresh))
    ]
    for s in seqs:
        assert engine.reserve(s)
    reused = seqs[0].state.reused
    assert reused >= PAGE and reused % PAGE and seqs[0].state.source is not None  # part-way into a page
    assert seqs[1].state.reused == 0
    engine.keep_logits = True
    try:
        engine.prefill(seqs)
        logits = engine.prefill_logits
    finally:
        engine.keep_logits = False
    assert logits is not None
    for s, turns, r in ((seqs[0], follow, reused), (seqs[1], fresh, 0)):
        ids = s.prompt.data.prompt.input_ids
        expected = _stock_logits(engine, turns, ids)[r:]
        torch.testing.assert_close(logits[seqs.index(s)], expected, rtol=1e-4, atol=1e-4)
    for s in seqs:
        engine.release(s)


def test_the_same_picture_again_after_a_reused_prefix(engine: ModelEngine) -> None:
    """A follow-up that sends the conversation's picture once more: the cached prefix covers the
    first copy, the second copy is prefilled with its own encoder output at its own place."""
    picture = make_png(320, 256, (90, 160, 60))
    first = [Turn.user("What is in this picture?", [picture])]
    seq = Sequence("first", engine.prepare(first), SamplingParams(max_new_tokens=8), 8)
    assert engine.reserve(seq)
    seq.tokens.extend(engine.prefill([seq]).tokens())
    while len(seq.tokens) < 8:
        seq.tokens.extend(engine.decode([seq]).tokens())
    engine.release(seq)

    again = [*first, Turn.assistant(engine.detokenize(seq.tokens)), Turn.user("Once more:", [picture])]
    follow = Sequence("again", engine.prepare(again), SamplingParams(max_new_tokens=4), 4)
    starts = [p.start for p in follow.prompt.data.pictures]
    assert len(starts) == 2 and starts[0] < starts[1]
    assert engine.reserve(follow)
    assert starts[0] < follow.state.reused <= starts[1]  # the first copy comes from the cache
    engine.keep_logits = True
    try:
        engine.prefill([follow])
        logits = engine.prefill_logits
    finally:
        engine.keep_logits = False
    assert logits is not None
    ids = follow.prompt.data.prompt.input_ids
    expected = _stock_logits(engine, again, ids)[follow.state.reused :]
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)
    engine.release(follow)


def test_the_padded_layout_of_the_prefill_graphs_changes_no_logit_and_no_real_page(
    engine: ModelEngine,
) -> None:
    """prefill_graphs.py's padded batches, run eagerly on the CPU (what a CUDA graph records): the
    padding tokens and row, the empty rows and the picture and last-token indexes that point at
    padding change neither the rows' logits nor the keys/values of their pages, for two rows with
    a picture and a reused prefix and for a follow-up with a long reused prefix."""
    from server.inference.model.kvcache import SeqCache
    from server.inference.model.prefill_graphs import PrefillGraphs, check_batches

    forward = engine.forward
    cache = SeqCache()
    assert engine.kv.allocate(cache, 512)
    try:
        rows, follow_up = check_batches(cache, engine.runner.prompts.image_token_id, forward.device)
        assert rows.pictures is not None and follow_up.pictures is None
        generator = torch.Generator().manual_seed(3)
        hidden = forward.embed.embedding_dim
        embeds = torch.randn(64, hidden, generator=generator)
        deep = [torch.randn(64, hidden, generator=generator) for _ in range(3)]
        real = torch.tensor([cache.slot(index) for index in range(360)])
        flat = (-1, forward.kv_heads, forward.head_dim)

        def pages() -> list[torch.Tensor]:
            return [keys.view(flat)[real].clone() for keys in forward.cache.keys]

        graphs = PrefillGraphs(forward, 1024, 4, 3)
        for batch, pictures, bucket in (
            (rows, (embeds, deep), (512, 256)),
            (follow_up, (None, []), (64, 1024)),
        ):
            with torch.inference_mode():
                expected = forward.logits(batch, *pictures)
                written = pages()
                for keys in forward.cache.keys:
                    keys.view(flat)[batch.host["store"]] = 0  # the padded run must write them again
                assert graphs.key(batch) == bucket  # the smallest that holds the batch
                got = graphs.run(batch, *pictures)
            assert got is not None
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            for before, after in zip(written, pages(), strict=True):
                torch.testing.assert_close(after, before)
        # What no graph takes runs eagerly: more rows than a graph has, or more new tokens.
        assert PrefillGraphs(forward, 1024, 1, 3).key(rows) is None
        assert PrefillGraphs(forward, 256, 4, 3).key(rows) is None
    finally:
        engine.kv.free(cache)


def test_a_prefill_a_graph_takes_sends_only_its_page_copies(engine: ModelEngine) -> None:
    """The graph path stages a batch's host tensors itself (prefill_graphs.py): running it sends
    the row's page copies to the device, not the whole batch a second time (it did, on every
    prefill), and the copy is made: the logits equal those of the row with the tokens already in
    its own page."""
    from server.inference.model.kvcache import SeqCache
    from server.inference.model.prefill import pack
    from server.inference.model.prefill_graphs import PrefillGraphs

    forward = engine.forward
    cache = SeqCache()
    assert engine.kv.allocate(cache, 2 * PAGE)
    try:
        shared = torch.tensor([cache.slot(index) for index in range(10)])  # a cached page's first tokens
        own = torch.tensor([cache.slot(index) for index in range(PAGE, PAGE + 30)])  # the row's page
        generator = torch.Generator().manual_seed(5)
        flat = (-1, forward.kv_heads, forward.head_dim)
        pools = [*forward.cache.keys, *forward.cache.values]
        for pool in pools:
            pool.view(flat)[shared] = torch.randn(10, *flat[1:], generator=generator)
        image = engine.runner.prompts.image_token_id
        new = torch.randint(0, image, (20,), generator=generator).tolist()
        rows = [(new, torch.arange(10, 30).expand(3, -1), own, 10)]
        for pool in pools:  # the reference: the reused tokens in the row's own page already
            pool.view(flat)[own[:10]] = pool.view(flat)[shared]
        with torch.inference_mode():
            expected = forward.run(pack(rows, [], image, forward.device), None, []).clone()
        for pool in pools:
            pool.view(flat)[own] = 0
        taken = pack(rows, [(shared, own[:10])], image, forward.device)
        forward.graphs = PrefillGraphs(forward, 1024, 4, 3)  # on the CPU: the padded layout, eagerly
        try:
            assert forward.graphs.key(taken) == (64, 256)
            with torch.inference_mode():
                got = forward.run(taken, None, [])
        finally:
            forward.graphs = None
        assert taken.sent is None  # only the copies went to the device
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    finally:
        engine.kv.free(cache)


def test_the_start_up_checks_measure_differences_against_the_references_largest_value() -> None:
    """agreement.relative_error, by which the graphs, fused kernels and float8 cache are checked."""
    from server.inference.model.agreement import relative_error

    reference = torch.tensor([1.0, -4.0], dtype=torch.bfloat16)
    assert relative_error(reference, reference) == 0
    assert relative_error(torch.tensor([1.0, -3.0]), reference) == 0.25
    assert relative_error(torch.tensor([0.5, 0.0]), torch.zeros(2)) == 0.5  # an all-zero reference: absolute
