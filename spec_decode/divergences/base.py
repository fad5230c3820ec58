"""Types and registry of :mod:`spec_decode.divergences`.

Its members import from here, so the package and its members never import each other;
the package docstring states the boundary."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokensurgeon.registry import Registry

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
DIVERGENCES: Registry[Divergence] = Registry("divergence")
register = DIVERGENCES.register
divergence_names = DIVERGENCES.names


def distributions(
    target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float,
    greedy_target: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of p and q at the decoding temperature.

    Args:
        target_logits: [N, V] target logits.
        draft_logits: [N, V] draft logits (same vocabulary).
        temperature: the sampling temperature. ``> 0`` divides both by it. ``0`` (greedy
            decoding) is degenerate for a smooth loss, so both are taken at temperature 1.
        greedy_target: replace p by a one-hot on the target's argmax, at any temperature:
            the objective for greedy drafting (vLLM's ``draft_sample_method="greedy"``,
            acceptance p(argmax q)) and for greedy decoding; q stays at the temperature.
    Returns:
        (target_logp [N, V], draft_logp [N, V]) in float32; ``target_logp`` is ``-inf``
        off the argmax when ``greedy_target``.
    """
    t = temperature if temperature > 0 else 1.0
    draft_logp = torch.log_softmax(draft_logits.float() / t, dim=-1)
    if greedy_target:
        target_logp = torch.full_like(draft_logp, float("-inf"))
        target_logp.scatter_(-1, target_logits.argmax(-1, keepdim=True), 0.0)
    else:
        target_logp = torch.log_softmax(target_logits.float() / t, dim=-1)
    return target_logp, draft_logp


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, [N, V] x [N, V] -> [N]; rows where p = 0 contribute 0."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1)
