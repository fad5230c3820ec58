"""Reverse KL, KL(q || p): mode-seeking; infinite where q puts mass p forbids."""

from __future__ import annotations

import torch

from spec_decode.divergences.base import kl, register


@register("rkl")
def reverse_kl(target_logp: torch.Tensor, draft_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """sum_v q(v) (log q(v) - log p(v)).

    Args:
        target_logp: [N, V] log p; must be finite (a one-hot greedy target gives +inf).
        draft_logp: [N, V] log q.
        beta: unused.
    Returns:
        [N] non-negative values.
    """
    return kl(draft_logp, target_logp)
