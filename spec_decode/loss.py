"""The DistillSpec training loss and acceptance, from hidden states, chunk by chunk.

Boundary: pure tensor math over hidden states and heads handed in; no data, no models run
here but their heads. A 262k-vocabulary draft and target never hold [N, V] logits: the
draft's and the target's logits exist ``chunk`` positions at a time
(:func:`tokensurgeon.logits.map_logit_chunks`), and the backward pass recomputes them, so
memory is O(chunk x V) instead of several [N, V] tensors (0.5 GB each for 512 positions).

The draft's vocabulary V' is either the full V or, for a reduced head
(:mod:`spec_decode.reduced_head`), its K token ids: the draft's distribution is then the
one it is served with, a softmax over its K logits (probability 0 elsewhere), and the
target is read on the same K tokens, renormalised (the target as a K-token draft can match
it: greedy drafting proposes the K-token argmax, and a full-vocabulary p would make forward
KL infinite wherever p has mass off the K tokens). Acceptance is always measured against
the full target.

- :func:`chunked_divergence`: per-position divergence (with gradient) and acceptance;
- :func:`chunked_acceptance`: acceptance under every rule (no gradient; held-out estimate);
- :func:`plain_divergence`: the same from whole [N, V] tensors, the reference of the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from spec_decode.divergences import DIVERGENCES, distributions
from tokensurgeon.logits import head_logits, map_logit_chunks

# Positions per chunk: a chunk holds a few [c, V] float32 tensors (the target's logits and
# their softmax; the draft's too with a full head): 67 MB each at c = 64 and V = 262k.
CHUNK = 64
LOGIT_ELEMENTS = CHUNK * 262_144  # the same 67 MB for any vocabulary


def positions_per_chunk(vocab: int) -> int:
    """Positions per chunk for a V-token vocabulary: [c, V] stays at 67 MB (c = 64 at
    Gemma-3's 262k, 341 at SmolLM2's 49k); fewer, larger head calls cost less per position."""
    return max(1, LOGIT_ELEMENTS // max(vocab, 1))

TargetLogits = Callable[..., torch.Tensor]
"""``target_logits(*chunks of target_inputs) -> [c, V]`` float32 target logits."""


def rules(target: torch.Tensor, draft: torch.Tensor, head_ids: torch.Tensor | None,
          temperature: float) -> dict[str, torch.Tensor]:
    """Per-position acceptance of the draft under each rule, and argmax agreement: what
    :func:`spec_decode.speculative.rule_acceptance` gives for the draft's logits on the full
    vocabulary (``-inf`` off a reduced head's tokens), without making them.

    Args:
        target: [c, V] target logits.
        draft: [c, V'] draft logits (V' = K when ``head_ids`` [K] names a reduced head).
        head_ids: the reduced head's token ids, or None.
        temperature: decoding temperature (0 = greedy).
    Returns:
        {"probabilistic": 1 - TVD(p, q), "greedy": p(argmax q), "agree": argmax q ==
        argmax p}: [c] float32 each; at temperature 0 all three are the agreement.
    """
    proposed = draft.argmax(-1)
    if head_ids is not None:
        proposed = head_ids[proposed]
    agree = (proposed == target.argmax(-1)).float()
    if temperature == 0:
        return {"probabilistic": agree.clone(), "greedy": agree.clone(), "agree": agree}
    logp = torch.log_softmax(target.float() / temperature, dim=-1)
    q = torch.softmax(draft.float() / temperature, dim=-1)
    p_on = (logp if head_ids is None else logp[:, head_ids]).exp()
    tvd = 0.5 * (p_on - q).abs().sum(-1)
    if head_ids is not None:  # the target's mass off the K tokens, where q is 0
        tvd = tvd + 0.5 * (1 - p_on.sum(-1)).clamp(min=0)
    return {"probabilistic": 1.0 - tvd,
            "greedy": logp.gather(-1, proposed.unsqueeze(-1)).squeeze(-1).exp(),
            "agree": agree}


def _per_position(target: torch.Tensor, draft: torch.Tensor, head_ids: torch.Tensor | None,
                  divergence: str, beta: float, temperature: float,
                  greedy_target: bool) -> torch.Tensor:
    """[c] divergence between the target [c, V] and the draft [c, V'] on V'."""
    p = target if head_ids is None else target[:, head_ids]
    fn = DIVERGENCES[divergence]
    of_argmax = getattr(fn, "of_argmax", None)
    if greedy_target and of_argmax is not None:
        # Against a one-hot p on token a this divergence depends on log q(a) alone.
        t = temperature if temperature > 0 else 1.0
        logq = torch.log_softmax(draft.float() / t, dim=-1)
        return of_argmax(logq.gather(-1, p.argmax(-1, keepdim=True)).squeeze(-1))
    return fn(*distributions(p, draft, temperature, greedy_target=greedy_target), beta)


def chunked_divergence(
    hidden: torch.Tensor, head: torch.nn.Module, target_inputs: tuple[torch.Tensor, ...],
    target_logits: TargetLogits, divergence: str, temperature: float, verify: str,
    beta: float = 0.5, head_ids: torch.Tensor | None = None, softcap: float | None = None,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training divergence and the acceptance under ``verify``, per position.

    Args:
        hidden: [N, H] the draft's final hidden states at the loss positions.
        head: the draft's head as trained, H -> V' (V' = K for a reduced head).
        target_inputs: tensors [N, ...] from which ``target_logits`` makes a chunk's target
            logits (e.g. the target's hidden states, or cached top-k values and ids).
        target_logits: ``(*[c, ...] chunks) -> [c, V]``, run without gradient.
        divergence: a name in :data:`spec_decode.divergences.DIVERGENCES`.
        temperature: decoding temperature (0 counts as 1 for the loss).
        verify: ``greedy`` trains towards a one-hot on the target's argmax (over V'),
            ``probabilistic`` towards p itself.
        beta: JSD mixture weight.
        head_ids: [K] the reduced head's token ids, or None for a full head.
        softcap: the draft's final-logit soft cap.
        chunk: positions per head call.
    Returns:
        (divergence [N] float32, with gradient; acceptance [N] float32 under ``verify``,
        against the full target).
    """
    greedy = verify == "greedy"

    def piece(q: torch.Tensor, *target_chunks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            p = target_logits(*(x[0] for x in target_chunks))
            accepted = rules(p, q[0].detach(), head_ids, temperature)[verify]
        value = _per_position(p, q[0], head_ids, divergence, beta, temperature, greedy)
        return value[None], accepted[None]

    value, accepted = map_logit_chunks(piece, hidden[None], head,
                                       tuple(x[None] for x in target_inputs), chunk, softcap,
                                       recompute=True)
    return value[0], accepted[0]


def chunked_acceptance(
    hidden: torch.Tensor, head: torch.nn.Module, target_inputs: tuple[torch.Tensor, ...],
    target_logits: TargetLogits, temperature: float, head_ids: torch.Tensor | None = None,
    softcap: float | None = None, chunk: int = CHUNK,
) -> dict[str, torch.Tensor]:
    """:func:`rules` at N positions, chunk by chunk, without gradient (arguments as in
    :func:`chunked_divergence`); returns {"probabilistic", "greedy", "agree"}: [N] each."""
    def piece(q: torch.Tensor, *target_chunks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = rules(target_logits(*(x[0] for x in target_chunks)), q[0], head_ids, temperature)
        return tuple(out[k][None] for k in sorted(out))

    with torch.no_grad():
        parts = map_logit_chunks(piece, hidden[None], head,
                                 tuple(x[None] for x in target_inputs), chunk, softcap)
    names = sorted(("probabilistic", "greedy", "agree"))
    return {k: v[0] for k, v in zip(names, parts)}


def plain_divergence(hidden: torch.Tensor, head: torch.nn.Module, target: torch.Tensor,
                     divergence: str, temperature: float, verify: str, beta: float = 0.5,
                     head_ids: torch.Tensor | None = None,
                     softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`chunked_divergence` from whole tensors: the draft's [N, V']
    logits, the target's [N, V] logits ``target`` and the registry's divergence on
    :func:`spec_decode.divergences.distributions` (no one-hot shortcut)."""
    q = head_logits(hidden, head, softcap)
    p = target if head_ids is None else target[:, head_ids]
    value = DIVERGENCES[divergence](*distributions(p, q, temperature,
                                                   greedy_target=verify == "greedy"), beta)
    with torch.no_grad():
        accepted = rules(target, q.detach(), head_ids, temperature)[verify]
    return value, accepted
