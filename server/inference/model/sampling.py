"""Per-row token choice on the device, for a batch whose rows have different settings."""

from __future__ import annotations

import torch

from server.inference.engine import Sequence


def sample(
    logits: torch.Tensor, seqs: list[Sequence], eos: torch.Tensor, blocked: torch.Tensor | None
) -> torch.Tensor:
    """One token per row of *logits* (rows, vocab), as a device tensor; no host sync.

    Greedy rows (temperature 0) take the argmax; the others sample with temperature and
    top-p. Rows flagged in *blocked* (below their `min_new_tokens`) cannot pick an
    end-of-answer token (*eos*: the ids, on the device).
    """
    if blocked is not None:
        logits[:, eos] = torch.where(blocked.unsqueeze(1), float("-inf"), logits[:, eos])
    choice = logits.argmax(dim=-1)
    hot = [row for row, seq in enumerate(seqs) if seq.params.temperature > 0]
    if hot:
        device = logits.device
        rows = torch.tensor(hot, device=device)
        temps = torch.tensor([seqs[r].params.temperature for r in hot], device=device)
        top_p = torch.tensor([seqs[r].params.top_p for r in hot], device=device)
        probs = torch.softmax(logits[rows].float() / temps.unsqueeze(1), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p.unsqueeze(1)
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        picked = torch.multinomial(sorted_probs, 1).squeeze(1)
        choice[rows] = order.gather(1, picked.unsqueeze(1)).squeeze(1)
    return choice
