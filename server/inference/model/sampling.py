"""Per-row token choice for a batch whose rows have different sampling settings."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from server.inference.engine import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: Iterable[int]) -> list[int]:
    """Pick one token per row of *logits* (rows, vocab) following each sequence's params.

    Greedy rows take the argmax; others sample with temperature and top-p. Rows that have
    not reached `min_new_tokens` cannot pick an end-of-answer token.
    """
    logits = logits.float()
    eos = [i for i in eos_ids if i < logits.shape[-1]]
    blocked = [row for row, seq in enumerate(seqs) if len(seq.tokens) < seq.params.min_new_tokens]
    if blocked and eos:
        rows = torch.tensor(blocked, device=logits.device)
        logits[rows.unsqueeze(1), torch.tensor(eos, device=logits.device)] = float("-inf")
    choice = logits.argmax(dim=-1)
    hot = [row for row, seq in enumerate(seqs) if seq.params.temperature > 0]
    if hot:
        rows = torch.tensor(hot, device=logits.device)
        temps = torch.tensor([seqs[r].params.temperature for r in hot], device=logits.device)
        top_p = torch.tensor([seqs[r].params.top_p for r in hot], device=logits.device)
        probs = torch.softmax(logits[rows] / temps.unsqueeze(1), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p.unsqueeze(1)
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        picked = torch.multinomial(sorted_probs, 1).squeeze(1)
        choice[rows] = order.gather(1, picked.unsqueeze(1)).squeeze(1)
    return [int(t) for t in choice.tolist()]
