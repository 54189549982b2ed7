"""The sampler (server/inference/model/sampling.py): the distribution it draws from, per row."""

from __future__ import annotations

import torch

from server.inference.api import SamplingParams
from server.inference.engine import PreparedPrompt, Sequence
from server.inference.model.sampling import sample

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _rows(count: int, params: SamplingParams) -> list[Sequence]:
    return [Sequence(f"r{n}", PreparedPrompt(1, 0, None), params, 8) for n in range(count)]


def _frequencies(params: SamplingParams, draws: int = 20_000) -> torch.Tensor:
    torch.manual_seed(7)  # a fixed draw: the test cannot flake
    logits = PROBS.log().expand(draws, -1).clone()
    chosen = sample(logits, _rows(draws, params), torch.tensor([9]), None)
    return torch.bincount(chosen, minlength=len(PROBS)).float() / draws


def test_temperature_one_draws_each_token_with_its_probability() -> None:
    got = _frequencies(SamplingParams(temperature=1.0))
    assert (got - PROBS).abs().max() < 0.015, got  # ~4 standard deviations at 20,000 draws


def test_top_p_keeps_the_smallest_head_over_p_and_renormalises_it() -> None:
    got = _frequencies(SamplingParams(temperature=1.0, top_p=0.7))  # 0.5 + 0.3 cover 0.7
    expected = torch.tensor([0.625, 0.375, 0.0, 0.0])
    assert got[2:].sum() == 0 and (got - expected).abs().max() < 0.015, got


def test_a_low_temperature_sharpens_and_greedy_rows_take_the_argmax_beside_sampled_ones() -> None:
    sharp = _frequencies(SamplingParams(temperature=0.25))
    expected = PROBS**4 / (PROBS**4).sum()  # softmax(log p / 0.25)
    assert (sharp - expected).abs().max() < 0.015, sharp
    logits = PROBS.log().expand(4, -1).clone()
    rows = _rows(2, SamplingParams()) + _rows(2, SamplingParams(temperature=1.0))
    blocked = torch.tensor([True, False, False, False])
    logits[:, 1] = 5.0  # token 1 is the argmax; it plays the end-of-answer token, blocked in row 0
    chosen = sample(logits, rows, torch.tensor([1]), blocked)
    assert chosen[0] == 0 and chosen[1] == 1  # row 0 cannot end yet: its next best
