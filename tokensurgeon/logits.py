"""Logits math shared by ``distill``, ``spec`` and ``eval``: the one place that turns final
hidden states into log-probabilities.

Boundary: pure tensor functions plus two small model accessors; no data, no tokenizers, no
I/O. A 262k-vocabulary model never holds [B, T, V] logits: the lm_head runs ``chunk``
positions at a time.

- :func:`decoder_and_head` / :func:`final_hidden_states`: the decoder stack, lm_head and
  final-logit softcap of a causal LM (peft-wrapped too) and its [B, T, H] final states.
- :func:`apply_softcap`: Gemma-2 style ``tanh(z / c) * c``.
- :func:`map_logit_chunks`: apply any function to float32 logits, chunk by chunk.
- :func:`token_logprobs`: log p(label) per position (evaluation; no gradient needed).
- :func:`position_statistics`: log p(realised next token) and, where asked, log p(boundary
  set) per position, with a fused backward (what ALM and SFT need: no full-vocabulary
  softmax is kept, and the lm_head gradient is formed chunk by chunk).
- :func:`logits_at`: full logits at selected positions only (DistillSpec).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

# Keep a chunk's logits for the backward pass (instead of recomputing them) below this size.
DEFAULT_KEEP_BYTES = 1 << 30
# Positions per lm_head call: the one default of eval, distill and the distill losses.
LOGIT_CHUNK = 256


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """The decoder stack, the lm_head and the final-logit softcap of a causal LM (peft too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if softcap is None and hasattr(base.config, "text_config"):
        softcap = getattr(base.config.text_config, "final_logit_softcapping", None)
    return base.get_decoder(), base.get_output_embeddings(), softcap


def final_hidden_states(model, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] final (normed) hidden states of a causal LM, before the lm_head."""
    decoder, _, _ = decoder_and_head(model)
    return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def apply_softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2 style final-logit soft-capping (identity when ``softcap`` is falsy)."""
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def head_logits(hidden: torch.Tensor, head: torch.nn.Module,
                softcap: float | None = None) -> torch.Tensor:
    """float32 (soft-capped) logits [..., V] from hidden states [..., H]."""
    return apply_softcap(head(hidden).float(), softcap)


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
        return fn(head_logits(h, head, softcap), *xs)

    pieces: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, hidden.shape[1], chunk):
        args = (hidden[:, s : s + chunk], *(x[:, s : s + chunk] for x in extras))
        if recompute and torch.is_grad_enabled() and hidden.requires_grad:
            pieces.append(checkpoint(run, *args, use_reentrant=False))
        else:
            pieces.append(run(*args))
    return tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))


def token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                   chunk: int, softcap: float | None = None) -> torch.Tensor:
    """log p(labels) from final hidden states, ``chunk`` positions at a time.

    Args:
        hidden: [B, T, H] final hidden states (already normed).
        head: the lm_head, H -> V.
        labels: [B, T] the token to score at each position.
        chunk: positions per lm_head call.
        softcap: optional final-logit soft-capping.
    Returns:
        [B, T] float32 log-probabilities.
    """
    def pick(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1),)

    return map_logit_chunks(pick, hidden, head, (labels,), chunk, softcap)[0]


def logits_at(model, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[N, V] float32 full-vocabulary logits at the True entries of ``positions`` [B, L]
    only, so [B, L, V] is never materialised."""
    _, head, softcap = decoder_and_head(model)
    return head_logits(final_hidden_states(model, ids, attn)[positions], head, softcap)


# ------------------------------------------------ realised-token and boundary statistics


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits [n, V] of rows ``h`` [n, H], and tanh(u / c) when soft-capped."""
    u = torch.nn.functional.linear(h, weight, bias).float()
    if not softcap:
        return u, None
    t = torch.tanh(u / softcap)
    return t * softcap, t


# Boundary-set sums below this (relative to the row's largest shifted exponential, 1) are
# recomputed exactly from the logits: float32 loses them to underflow near 1e-38.
BOUNDARY_TINY = 1e-30


class _RealisedBoundary(torch.autograd.Function):
    """Fused log p(next) and log p(boundary set) over rows; see :func:`position_statistics`.

    Per chunk of rows, forward shifts the logits by their row maximum m and exponentiates
    them once, e = exp(z - m); the row sum S gives the normaliser m + log S and the
    boundary-set sum S_B = e @ 1_B (one matrix-vector product) gives m + log S_B. It keeps
    e (the logits z with a softcap) when they fit ``keep_bytes``, else recomputes them.
    Backward forms d(loss)/d(logits) in closed form, ``e * (-(g_r + g_b) / S + 1_B g_b /
    S_B)`` plus ``g_r`` at the realised token (two passes over the chunk), and multiplies
    it into the head weight and hidden states. Rows whose S_B underflows
    (< ``BOUNDARY_TINY``) get their boundary term from exactly recomputed logits.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, next_ids, boundary_mask, need_boundary, softcap, chunk,
                keep_bytes):
        n = h.shape[0]
        zeros = [torch.zeros(n, dtype=torch.float32, device=h.device) for _ in range(5)]
        realised, boundary, shift, total, part = zeros
        ones_b = boundary_mask.to(torch.float32) if boundary_mask is not None else None
        keep = n * weight.shape[0] * 4 <= keep_bytes
        kept = []
        for s in range(0, n, chunk):
            rows_h = h[s : s + chunk]
            z, _ = _chunk_logits(rows_h, weight, bias, softcap)
            m = z.amax(dim=-1)
            at_next = z.gather(1, next_ids[s : s + chunk, None]).squeeze(1)
            # z itself becomes e unless a kept softcapped chunk needs z for its backward.
            e = torch.exp(z - m[:, None]) if (softcap and keep) else z.sub_(m[:, None]).exp_()
            row_sum = e.sum(dim=-1)
            norm = m + row_sum.log()
            realised[s : s + chunk] = at_next - norm
            shift[s : s + chunk], total[s : s + chunk] = m, row_sum
            rows = need_boundary[s : s + chunk]
            if ones_b is not None and bool(rows.any()):
                sums = torch.where(rows, e @ ones_b, torch.zeros_like(m))
                log_b = m + sums.log()
                tiny = rows & (sums < BOUNDARY_TINY)
                if bool(tiny.any()):
                    exact, _ = _chunk_logits(rows_h[tiny], weight, bias, softcap)
                    log_b[tiny] = torch.logsumexp(
                        exact.masked_fill(~boundary_mask, float("-inf")), dim=-1)
                    sums = torch.where(tiny, torch.zeros_like(sums), sums)
                boundary[s : s + chunk] = torch.where(rows, log_b - norm, torch.zeros_like(m))
                part[s : s + chunk] = sums
            if keep:
                kept.append(z if softcap else e)
        ctx.softcap, ctx.chunk = softcap, chunk
        ctx.kept = kept if keep else None
        ctx.save_for_backward(h, weight, bias if bias is not None else torch.empty(0),
                              next_ids, boundary_mask if boundary_mask is not None
                              else torch.empty(0, dtype=torch.bool), need_boundary, shift,
                              total, part, boundary)
        ctx.has_bias, ctx.has_boundary = bias is not None, boundary_mask is not None
        return realised, boundary

    @staticmethod
    def backward(ctx, g_realised, g_boundary):
        (h, weight, bias, next_ids, boundary_mask, need_boundary, shift, total, part,
         boundary) = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        want_h, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
            ctx.has_bias and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h) if want_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_b else None
        g_b_all = torch.where(need_boundary, g_boundary, torch.zeros_like(g_boundary)) \
            if ctx.has_boundary else torch.zeros_like(g_boundary)
        ones_b = boundary_mask.to(torch.float32) if ctx.has_boundary else None
        for i, s in enumerate(range(0, h.shape[0], ctx.chunk)):
            hs = h[s : s + ctx.chunk]
            m = shift[s : s + ctx.chunk, None]
            t = None
            if ctx.kept is not None:
                kept = ctx.kept[i]
                if ctx.softcap:
                    t = kept / ctx.softcap
                    e = torch.exp(kept - m)
                else:
                    e = kept  # read only: autograd may run this backward more than once
            else:
                z, t = _chunk_logits(hs, weight, bias, ctx.softcap)
                e = z.sub_(m).exp_()
            g_r, g_b = g_realised[s : s + ctx.chunk], g_b_all[s : s + ctx.chunk]
            sums = part[s : s + ctx.chunk]
            own = -(g_r + g_b) / total[s : s + ctx.chunk]
            if ctx.has_boundary and bool((sums > 0).any()):
                per_b = torch.where(sums > 0, g_b / sums.clamp(min=BOUNDARY_TINY),
                                    torch.zeros_like(g_b))
                grad = torch.addcmul(own[:, None], per_b[:, None], ones_b[None, :]).mul_(e)
            else:
                grad = e * own[:, None]
            grad.scatter_add_(1, next_ids[s : s + ctx.chunk, None], g_r[:, None])
            exact_rows = (g_b != 0) & (sums == 0)
            if ctx.has_boundary and bool(exact_rows.any()):
                z_rows, _ = _chunk_logits(hs[exact_rows], weight, bias, ctx.softcap)
                norm = m[exact_rows, 0] + total[s : s + ctx.chunk][exact_rows].log()
                log_b = boundary[s : s + ctx.chunk][exact_rows] + norm
                q = torch.exp((z_rows - log_b[:, None]).masked_fill(~boundary_mask,
                                                                     float("-inf")))
                grad[exact_rows] += g_b[exact_rows, None] * q
            if ctx.softcap:
                grad.mul_(1 - t * t)
            grad = grad.to(acc)
            if want_h:
                grad_h[s : s + ctx.chunk] = (grad.to(weight.dtype) @ weight).to(h.dtype)
            if want_w:
                grad_w.addmm_(grad.t(), hs.to(acc))
            if want_b:
                grad_b += grad.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if want_w else None,
                grad_b.to(weight.dtype) if want_b else None, None, None, None, None, None, None)


def position_statistics(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    next_ids: torch.Tensor,
    boundary_ids: torch.Tensor | None,
    chunk: int,
    softcap: float | None = None,
    need_boundary: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    keep_bytes: int = DEFAULT_KEEP_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(next token) and log p(boundary set) at every position, chunked, with a fused
    backward (the lm_head weight gets its gradient too when it requires one).

    Args:
        hidden: [B, T, H] final hidden states.
        head: the lm_head, an ``nn.Linear`` H -> V.
        next_ids: [B, T] the realised token after each position (any id where unused).
        boundary_ids: [N] ids of the boundary set, or None (boundary output all 0).
        chunk: rows per lm_head call.
        softcap: optional final-logit soft-capping.
        need_boundary: [B, T] bool, positions whose boundary log-prob is wanted (default:
            all); elsewhere the boundary output is 0 and carries no gradient.
        rows: [B, T] bool, positions computed at all (default: all); elsewhere both
            outputs are 0.
        keep_bytes: keep the float32 logits for the backward pass when the selected
            positions' logits fit in this many bytes; otherwise recompute them.
    Returns:
        ``(realised [B, T], boundary [B, T])`` float32 log-probabilities.
    """
    b, t, _ = hidden.shape
    rows = torch.ones(b, t, dtype=torch.bool, device=hidden.device) if rows is None else rows
    need = rows if need_boundary is None else (need_boundary & rows)
    mask = None
    if boundary_ids is not None:
        mask = torch.zeros(head.weight.shape[0], dtype=torch.bool, device=hidden.device)
        mask[boundary_ids] = True
    realised_rows, boundary_rows = _RealisedBoundary.apply(
        hidden[rows], head.weight, getattr(head, "bias", None), next_ids[rows], mask,
        need[rows], softcap, chunk, keep_bytes)
    realised = torch.zeros(b, t, dtype=torch.float32, device=hidden.device)
    boundary = torch.zeros(b, t, dtype=torch.float32, device=hidden.device)
    return (realised.masked_scatter(rows, realised_rows),
            boundary.masked_scatter(rows, boundary_rows))


def _realised_and_boundary(logits: torch.Tensor, next_ids: torch.Tensor,
                           boundary_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    normaliser = torch.logsumexp(logits, dim=-1)
    realised = logits.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) - normaliser
    boundary = torch.logsumexp(logits.index_select(-1, boundary_ids), dim=-1) - normaliser
    return realised, boundary


def checkpointed_position_statistics(
    hidden: torch.Tensor, head: torch.nn.Module, next_ids: torch.Tensor,
    boundary_ids: torch.Tensor, chunk: int, softcap: float | None = None,
    recompute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`position_statistics` at every position through plain autograd, each chunk
    optionally under activation checkpointing (the earlier, slower path; a reference)."""
    return map_logit_chunks(
        lambda logits, ids: _realised_and_boundary(logits, ids, boundary_ids),
        hidden, head, (next_ids,), chunk, softcap, recompute)


def naive_position_statistics(
    hidden: torch.Tensor, head: torch.nn.Module, next_ids: torch.Tensor,
    boundary_ids: torch.Tensor, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`position_statistics`: full [B, T, V] logits at once."""
    logits = head_logits(hidden, head, softcap)
    logp = torch.log_softmax(logits, dim=-1)
    realised = logp.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
    boundary = torch.logsumexp(logp[..., boundary_ids], dim=-1)
    return realised, boundary
