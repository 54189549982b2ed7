"""Per-row token choice on the device, for a batch whose rows have different settings."""

from __future__ import annotations

import torch

from server.inference.engine import Sequence

from .devices import send


def sample(
    logits: torch.Tensor, seqs: list[Sequence], eos: torch.Tensor, blocked: torch.Tensor | None
) -> torch.Tensor:
    """One token per row of *logits* (rows, vocab), as a device tensor; no host sync (the rows'
    settings reach the device through `devices.send`).

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
        rows = send(torch.tensor(hot), device)
        params = [seqs[r].params for r in hot]
        temps, top_p = send(
            torch.tensor([[p.temperature for p in params], [p.top_p for p in params]]), device
        )
        probs = torch.softmax(logits[rows].float() / temps.unsqueeze(1), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p.unsqueeze(1)
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        # p_i / E_i with E_i ~ Exp(1) is largest at i with probability p_i (what vLLM samples with):
        # torch.multinomial checks its input with an .item(), a host sync per step. E_i > 0, or a
        # token of probability 0 would win as 0 / 0 (some backends' exponential_ can give 0).
        noise = torch.empty_like(sorted_probs).exponential_().clamp_min_(torch.finfo(torch.float32).tiny)
        picked = (sorted_probs / noise).argmax(dim=-1)
        choice[rows] = order.gather(1, picked.unsqueeze(1)).squeeze(1)
    return choice
