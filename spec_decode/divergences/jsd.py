"""Generalised Jensen-Shannon divergence JSD[beta] with mixture M = beta p + (1 - beta) q."""

from __future__ import annotations

import math

import torch

from spec_decode.divergences.base import kl, register


@register("jsd")
def jensen_shannon(target_logp: torch.Tensor, draft_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q.

    Args:
        target_logp: [N, V] log p (``-inf`` allowed).
        draft_logp: [N, V] log q.
        beta: mixture weight in (0, 1); 0.5 is the symmetric JSD, bounded by log 2.
    Returns:
        [N] values in [0, -beta log beta - (1-beta) log(1-beta)].
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    log_m = torch.logaddexp(target_logp + math.log(beta), draft_logp + math.log(1.0 - beta))
    return beta * kl(target_logp, log_m) + (1.0 - beta) * kl(draft_logp, log_m)
