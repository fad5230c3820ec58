"""Memory-lean per-position statistics from final hidden states and an lm_head.

Boundary: pure tensor functions; no data, no tokenizers. ALM needs two numbers per
position, the log-prob of the realised next token and the log-prob of the boundary set
(tokens that start a new word, plus specials). Both come from logits computed ``chunk``
positions at a time, so a 262k-vocabulary model never holds [B, T, V] logits. With
``recompute=True`` each chunk runs under activation checkpointing: the backward pass
recomputes that chunk's logits instead of keeping every chunk's [B, c, V] alive.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def apply_softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2 style final-logit soft-capping (identity when ``softcap`` is falsy)."""
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def map_logit_chunks(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    hidden: torch.Tensor,
    head: torch.nn.Module,
    extras: tuple[torch.Tensor, ...],
    chunk: int,
    softcap: float | None = None,
    recompute: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Apply ``fn`` to float32 logits ``chunk`` positions at a time.

    Args:
        fn: ``fn(logits [B, c, V], *extra_chunks) -> tuple of [B, c, ...] tensors``.
        hidden: [B, T, H] final hidden states (already normed).
        head: the lm_head, H -> V.
        extras: tensors of shape [B, T, ...], sliced alongside ``hidden``.
        chunk: positions per lm_head call.
        softcap: optional final-logit soft-capping.
        recompute: checkpoint each chunk so the backward pass recomputes its logits.
    Returns:
        ``fn``'s outputs concatenated along the position axis: each [B, T, ...].
    """

    def run(h: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return fn(apply_softcap(head(h).float(), softcap), *xs)

    pieces: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, hidden.shape[1], chunk):
        args = (hidden[:, s : s + chunk], *(x[:, s : s + chunk] for x in extras))
        if recompute and torch.is_grad_enabled() and hidden.requires_grad:
            pieces.append(checkpoint(run, *args, use_reentrant=False))
        else:
            pieces.append(run(*args))
    return tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))


def _realised_and_boundary(logits: torch.Tensor, next_ids: torch.Tensor,
                           boundary_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    normaliser = torch.logsumexp(logits, dim=-1)
    realised = logits.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) - normaliser
    boundary = torch.logsumexp(logits.index_select(-1, boundary_ids), dim=-1) - normaliser
    return realised, boundary


def position_statistics(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    next_ids: torch.Tensor,
    boundary_ids: torch.Tensor,
    chunk: int,
    softcap: float | None = None,
    recompute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(next token) and log p(boundary set) at every position, chunked.

    Args:
        hidden: [B, T, H] final hidden states.
        head: the lm_head, H -> V.
        next_ids: [B, T] the realised token after each position (any id where unused).
        boundary_ids: [N] ids of the boundary set.
        chunk, softcap, recompute: see :func:`map_logit_chunks`.
    Returns:
        ``(realised [B, T], boundary [B, T])`` float32 log-probabilities.
    """
    return map_logit_chunks(
        lambda logits, ids: _realised_and_boundary(logits, ids, boundary_ids),
        hidden, head, (next_ids,), chunk, softcap, recompute)


def naive_position_statistics(
    hidden: torch.Tensor, head: torch.nn.Module, next_ids: torch.Tensor,
    boundary_ids: torch.Tensor, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`position_statistics`: full [B, T, V] logits at once."""
    logits = apply_softcap(head(hidden).float(), softcap)
    logp = torch.log_softmax(logits, dim=-1)
    realised = logp.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
    boundary = torch.logsumexp(logp[..., boundary_ids], dim=-1)
    return realised, boundary
