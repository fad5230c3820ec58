"""Total variation distance: one token's rejection probability in speculative sampling."""

from __future__ import annotations

import torch

from spec_decode.divergences.base import register


@register("tvd")
def total_variation(target_logp: torch.Tensor, draft_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """TVD(p, q) = 1/2 sum_v |p(v) - q(v)|; 1 - TVD is the chance a drafted token is accepted.

    Args:
        target_logp: [N, V] log p (``-inf`` allowed).
        draft_logp: [N, V] log q.
        beta: unused.
    Returns:
        [N] values in [0, 1].
    """
    return 0.5 * (target_logp.exp() - draft_logp.exp()).abs().sum(-1)


# Against a one-hot p on token a: 1 - q(a) (see spec_decode.loss).
total_variation.of_argmax = lambda logq_a: 1 - logq_a.exp()
