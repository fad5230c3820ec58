"""Reduced-vocabulary draft heads (FR-Spec, Zhao et al. 2025).

Boundary: which tokens a draft may propose, and the head that scores only those. No I/O
beyond reading a model's config; the vLLM side is :mod:`spec_decode.vllm_plugin`.

A draft's output head over the target's full vocabulary is most of a small draft's cost
(SmolLM2's tied 49k x 576 head is 28M of the depth-2 cut's 35M weights), while the target's
next token almost always lies among a few thousand frequent ones. A reduced head scores
only K token ids (the K most frequent in a text, tokenized by the target, plus every
special and stop token) and returns full-vocabulary logits with -inf elsewhere:
- verification stays exact: a token outside the set has draft probability 0, so it is
  never proposed, and the accept/reject rule is unchanged;
- the head's rows are rows of the draft's own output embedding (tied or not), so the
  draft's weights are unchanged on disk: the set is one list of ids in ``config.json``
  (:data:`CONFIG_KEY`), and training a draft trains those rows with everything else;
- the saved architecture name is the base one prefixed with :data:`ARCH_PREFIX`, so stock
  vLLM with this package installed serves it with the reduced head (a
  ``vllm.general_plugins`` entry point registers the class); transformers loads it as the
  base model with the full head (its auto classes read ``model_type``), and
  :func:`apply_reduced_head` swaps the head in, as the HF backend does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tokensurgeon.logits import apply_softcap

CONFIG_KEY = "draft_head_token_ids"
# spec train's default K: the reduced heads measured in vLLM (docs/spec.md, Results) kept
# 4,096 or 8,192 tokens; 8,192 is the one both best drafts use (SmolLM2's 49k vocabulary and
# Gemma-3's 262k).
HEAD_TOKENS = 8192
ARCH_PREFIX = "ReducedHead"


def token_counts(token_lists: Iterable[list[int]], vocab_size: int) -> torch.Tensor:
    """[V] int64: how often each id occurs in ``token_lists`` (ids >= V are ignored)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in token_lists:
        t = torch.as_tensor(ids, dtype=torch.long)
        t = t[(t >= 0) & (t < vocab_size)]
        counts += torch.bincount(t, minlength=vocab_size)
    return counts


def frequent_tokens(counts: torch.Tensor, k: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The head's token set: the ``k`` most frequent ids of ``counts`` [V] (ties go to the
    lower id) together with every id in ``always``; returns [K'] int64, sorted ascending,
    unique, K' <= k + len(always). ``k >= V`` keeps every id."""
    vocab = counts.numel()
    k = min(max(k, 0), vocab)
    # Stable sort on -count keeps ties in ascending id order.
    order = torch.sort(-counts.to(torch.long), stable=True).indices[:k]
    extra = torch.tensor(sorted({int(i) for i in always if 0 <= int(i) < vocab}), dtype=torch.long)
    return torch.unique(torch.cat([order, extra]))


class ScatterHead(torch.nn.Module):
    """[..., H] hidden -> [..., V] logits: a K-row head whose logits land on ``token_ids``
    and -inf everywhere else (argmax and softmax only ever pick those ids).

    ``weight`` [K, H] (and ``bias`` [K]) are the head rows of ``token_ids`` [K]; ``softcap``
    is applied to the K logits before the fill, as Gemma's final softcapping is.
    """

    def __init__(self, weight: torch.Tensor, token_ids: torch.Tensor, vocab_size: int,
                 bias: torch.Tensor | None = None, softcap: float | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.register_buffer("token_ids", token_ids.to(torch.long), persistent=False)
        self.vocab_size = vocab_size
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = apply_softcap(torch.nn.functional.linear(hidden, self.weight, self.bias),
                               self.softcap)
        out = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        out[..., self.token_ids] = logits
        return out


def rows_head(head: torch.nn.Module, rows: torch.Tensor, token_ids: torch.Tensor,
              vocab_size: int, softcap: float | None) -> ScatterHead:
    """A :class:`ScatterHead` made of rows ``rows`` [K] of ``head`` (a Linear-like module with
    ``weight`` [V', H] and maybe ``bias``), writing to ``token_ids`` [K] of a V-vocabulary."""
    bias = getattr(head, "bias", None)
    return ScatterHead(head.weight.detach()[rows].clone(), token_ids, vocab_size,
                       None if bias is None else bias.detach()[rows].clone(), softcap)


def _text_config(config):
    return getattr(config, "text_config", None) or config


def head_token_ids(config) -> torch.Tensor | None:
    """The reduced head's ids from a model config, or None for a full head."""
    ids = getattr(_text_config(config), CONFIG_KEY, None)
    if ids is None:
        ids = getattr(config, CONFIG_KEY, None)
    return None if ids is None else torch.tensor(ids, dtype=torch.long)


def with_head(config: dict, token_ids: torch.Tensor) -> dict:
    """A saved ``config.json`` (as a dict) that names a reduced head: the ids and the
    prefixed architecture name (pure: a new dict)."""
    archs = config.get("architectures") or []
    return {**config, CONFIG_KEY: [int(i) for i in token_ids],
            "architectures": [a if a.startswith(ARCH_PREFIX) else ARCH_PREFIX + a for a in archs]}


def base_architecture(name: str) -> str:
    """``ReducedHeadLlamaForCausalLM`` -> ``LlamaForCausalLM`` (other names unchanged)."""
    return name[len(ARCH_PREFIX):] if name.startswith(ARCH_PREFIX) else name


def apply_reduced_head(model) -> bool:
    """Swap ``model``'s output head for its config's reduced head, in place (input
    embeddings untouched). Returns whether the config names one."""
    ids = head_token_ids(model.config)
    if ids is None:
        return False
    config = _text_config(model.config)
    softcap = getattr(config, "final_logit_softcapping", None)
    head = rows_head(model.get_output_embeddings(), ids, ids, config.vocab_size, softcap)
    if softcap:
        config.final_logit_softcapping = None  # applied inside the head, before the -inf fill
    model.set_output_embeddings(head.to(model.get_output_embeddings().weight.device))
    model.config.tie_word_embeddings = False
    config.tie_word_embeddings = False
    return True


def head_weights(config) -> dict:
    """Weights per drafted token of the output head: ``{"full": V*H, "reduced": K*H}``."""
    config = _text_config(config)
    ids = head_token_ids(config)
    full = config.vocab_size * config.hidden_size
    return {"full": full, "reduced": full if ids is None else int(ids.numel()) * config.hidden_size}
