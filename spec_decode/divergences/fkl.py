"""Forward KL, KL(p || q): mass-covering; the standard distillation loss."""

from __future__ import annotations

import torch

from spec_decode.divergences.base import kl, register


@register("fkl")
def forward_kl(target_logp: torch.Tensor, draft_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """sum_v p(v) (log p(v) - log q(v)).

    Args:
        target_logp: [N, V] log p (``-inf`` allowed).
        draft_logp: [N, V] log q (finite).
        beta: unused.
    Returns:
        [N] non-negative values; with a one-hot p this is the cross-entropy -log q(argmax p).
    """
    return kl(target_logp, draft_logp)


# Against a one-hot p on token a: -log q(a) (see spec_decode.loss).
forward_kl.of_argmax = lambda logq_a: -logq_a
