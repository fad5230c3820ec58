"""HF-transformers backend: exact per-token acceptance, no vLLM and no timings.

Boundary: acceptance only. The target decodes each prompt alone (greedy, or sampled at the
temperature with a fixed seed); then the target and every draft score that same text with
one teacher-forced forward pass, over the full vocabulary at the temperature. Per output
position t it records:
- greedy: whether argmax q_t = argmax p_t. Greedy speculative decoding emits exactly the
  target's greedy text, so replaying the blocks over this agreement vector gives the exact
  accepted counts vLLM would report (:func:`greedy_block_acceptance`).
- temperature > 0: alpha_t, the exact probability that a token drafted at t is accepted,
  under each drafting rule of :func:`spec_decode.speculative.rule_acceptance`:
  ``probabilistic`` 1 - TVD(p_t, q_t), ``greedy`` (vLLM's default) p_t(argmax q_t). One
  measurement per rule, labelled ``draft_sample``. Block counts are then the expectation
  under independent positions: per-position acceptance alpha^k and
  tau = (1 - alpha^(gamma+1)) / (1 - alpha).
Batch size does not change acceptance, so each batch size repeats the same figures.

Cross-tokenizer drafts (TLI, Timor et al. 2025, as vLLM's ``use_heterogeneous_vocab`` does
it): a draft path written ``tli:DIR`` (or ``tli-bytes:DIR``) may use another tokenizer. The
draft reads the target's token stream mapped id by id into its own vocabulary (tokens
outside the string intersection of the two vocabularies become the draft's unk) and its
logits are restricted to the intersection and scattered into the target's vocabulary, so
it is an ordinary same-vocabulary draft to everything downstream (exact rules here, HF
``generate(assistant_model=...)`` for timing). ``tli:`` matches strings after replacing the
leading space mark (Ġ / ▁) as vLLM's ``VocabMapping`` does; ``tli-bytes:`` matches the
tokens' decoded byte strings (byte-level BPE characters and SentencePiece ``<0xNN>``
decoded, every ▁ a space), a wider intersection (e.g. newlines, non-ASCII).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from spec_decode.backends.base import PROPOSERS, BenchPlan, config_key, register
from spec_decode.speculative import greedy_block_acceptance, rule_acceptance
from tokensurgeon import modelio
from tokensurgeon.logits import apply_softcap


def continuation(model, prompt: list[int], max_tokens: int, temperature: float, seed: int,
                 device: str) -> list[int]:
    """``max_tokens`` tokens from ``model`` after ``prompt``, EOS ignored."""
    ids = torch.tensor([prompt], device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[int] = []
    past = None
    with torch.inference_mode():
        step_ids = ids
        for _ in range(max_tokens):
            res = model(input_ids=step_ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[0, -1].float().cpu()
            if temperature == 0:
                tok = int(logits.argmax())
            else:
                tok = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            out.append(tok)
            step_ids = torch.tensor([[tok]], device=device)
    return out


def position_logits(model, prompt: list[int], generated: list[int], device: str) -> torch.Tensor:
    """[len(generated), V] logits predicting each generated token (teacher forcing)."""
    ids = torch.tensor([prompt + generated], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)].float().cpu()


def block_counts(per_token: list[torch.Tensor], gamma: int, temperature: float) -> dict:
    """vLLM-style counts (drafts, draft tokens, accepted, accepted per position)."""
    if temperature == 0:
        drafts = accepted = 0
        per_pos = [0] * gamma
        for row in per_token:
            b, a, pp = greedy_block_acceptance([bool(x) for x in row.tolist()], gamma)
            drafts, accepted = drafts + b, accepted + a
            per_pos = [x + y for x, y in zip(per_pos, pp)]
        return {"num_drafts": drafts, "num_draft_tokens": drafts * gamma,
                "num_accepted_tokens": accepted, "accepted_per_position": per_pos,
                "exact": True}
    alpha = float(torch.cat(per_token).mean()) if per_token else 0.0
    # Expected counts per 1000 blocks, independent positions with acceptance alpha.
    drafts = 1000
    per_pos = [drafts * alpha ** (k + 1) for k in range(gamma)]
    return {"num_drafts": drafts, "num_draft_tokens": drafts * gamma,
            "num_accepted_tokens": sum(per_pos), "accepted_per_position": per_pos,
            "exact": False}


TLI_PREFIXES = {"tli:": "space", "tli-bytes:": "bytes"}


def space_marks(tokenizer) -> tuple[str, ...]:
    """The word-initial space mark(s) of a tokenizer (``Ġ``, ``▁``), probed as vLLM does."""
    ids = tokenizer.encode(" a", add_special_tokens=False)
    if ids:
        tok = tokenizer.convert_ids_to_tokens(ids[0])
        if isinstance(tok, str) and len(tok) > 1 and tok.endswith("a") and tok[0] not in " \t":
            return (tok[:-1],)
    return ("\u0120", "\u2581")


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: printable character -> byte (inverse of bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def normalise_token(token: str, marks: tuple[str, ...], mode: str) -> str | bytes:
    """The key two vocabularies are intersected on.

    ``space``: vLLM's rule, a leading space mark becomes " ". ``bytes``: the token's bytes:
    byte-level BPE characters (``Ġ`` ``Ċ`` ...) decoded when ``Ġ`` is the space mark,
    SentencePiece ``<0xNN>`` to its byte and every ``▁`` to a space.
    """
    if mode == "space":
        for m in marks:
            if token.startswith(m):
                return " " + token[len(m):]
        return token
    if "\u0120" in marks:
        if all(c in _BYTE_DECODER for c in token):
            return bytes(_BYTE_DECODER[c] for c in token)
        return token.encode()
    m = _SP_BYTE.fullmatch(token)
    if m:
        return bytes([int(m.group(1), 16)])
    return token.replace("\u2581", " ").encode()


@dataclass(frozen=True)
class VocabMap:
    """Token-level intersection of a target and a draft vocabulary (TLI)."""

    target_to_draft: torch.Tensor  # [V_target] draft id of each target id (draft unk outside)
    draft_ids: torch.Tensor  # [K] draft ids in the intersection
    target_ids: torch.Tensor  # [K] the target id of each, same order
    target_size: int

    @property
    def size(self) -> int:
        return int(self.draft_ids.numel())


def vocab_map(target_vocab: dict[str, int], draft_vocab: dict[str, int], target_size: int,
              draft_size: int, draft_unk: int, target_marks: tuple[str, ...],
              draft_marks: tuple[str, ...], mode: str = "space") -> VocabMap:
    """Intersect two vocabularies on normalised strings (:func:`normalise_token`).

    Ids beyond a model's embedding rows are ignored. When several tokens share one key, a
    proposal goes to the lowest id that is not a SentencePiece byte token ``<0xNN>`` (the
    token a tokenizer actually emits for that string), and every one of them is read as
    the draft's token. Target ids outside the intersection map to ``draft_unk``.
    """
    def keyed(vocab, marks, size):
        out: dict = {}
        ranked = sorted(vocab.items(), key=lambda kv: (_SP_BYTE.fullmatch(kv[0]) is not None, kv[1]))
        for tok, i in ranked:
            if i < size:
                out.setdefault(normalise_token(tok, marks, mode), []).append(i)
        return out

    t, d = keyed(target_vocab, target_marks, target_size), keyed(draft_vocab, draft_marks, draft_size)
    common = t.keys() & d.keys()
    pairs = sorted((d[k][0], t[k][0]) for k in common)
    target_to_draft = torch.full((target_size,), draft_unk, dtype=torch.long)
    for k in common:
        target_to_draft[t[k]] = d[k][0]
    draft_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    target_ids = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return VocabMap(target_to_draft, draft_ids, target_ids, target_size)


class TargetIdEmbedding(torch.nn.Module):
    """The draft's input embedding, indexed by target ids (mapped through the intersection)."""

    def __init__(self, embedding: torch.nn.Module, target_to_draft: torch.Tensor):
        super().__init__()
        self.embedding = embedding
        self.register_buffer("target_to_draft", target_to_draft, persistent=False)

    @property
    def weight(self):
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.target_to_draft[input_ids])


class IntersectionHead(torch.nn.Module):
    """[..., H] hidden -> [..., V_target] logits: the draft's logits on the intersection,
    -inf elsewhere (so argmax and softmax only ever pick intersection tokens)."""

    def __init__(self, head: torch.nn.Linear, vmap: VocabMap, softcap: float | None):
        super().__init__()
        self.weight = torch.nn.Parameter(head.weight.detach()[vmap.draft_ids].clone(),
                                         requires_grad=False)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else torch.nn.Parameter(
            bias.detach()[vmap.draft_ids].clone(), requires_grad=False)
        self.register_buffer("target_ids", vmap.target_ids, persistent=False)
        self.target_size = vmap.target_size
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = apply_softcap(torch.nn.functional.linear(hidden, self.weight, self.bias),
                               self.softcap)
        out = logits.new_full((*logits.shape[:-1], self.target_size), float("-inf"))
        out[..., self.target_ids] = logits
        return out


def as_tli_draft(model, vmap: VocabMap):
    """Make ``model`` (a draft with its own tokenizer) read and write target ids, in place.

    Its input embedding is looked up through ``vmap.target_to_draft``, its head only scores
    the intersection and returns [.., V_target] logits; its config says the target's
    vocabulary size, so HF assisted generation and the exact rules treat it as a
    same-vocabulary draft. Returns the model.
    """
    config = getattr(model.config, "text_config", None) or model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    head = IntersectionHead(model.get_output_embeddings(), vmap, softcap)
    if softcap:
        config.final_logit_softcapping = None  # applied inside the head, before the -inf fill
    model.set_output_embeddings(head)
    model.set_input_embeddings(TargetIdEmbedding(model.get_input_embeddings(), vmap.target_to_draft))
    config.vocab_size = vmap.target_size
    model.config.tie_word_embeddings = False
    config.tie_word_embeddings = False
    return model


def split_draft_path(path: str) -> tuple[str, str | None]:
    """``tli:DIR`` -> (DIR, "space"); ``tli-bytes:DIR`` -> (DIR, "bytes"); DIR -> (DIR, None)."""
    for prefix, mode in TLI_PREFIXES.items():
        if path.startswith(prefix):
            return path[len(prefix):], mode
    return path, None


def load_tli_draft(target: str, draft: str, mode: str, device: str = "cpu"):
    """(draft model reading and writing TARGET ids, its :class:`VocabMap`)."""
    t_ref, d_ref = modelio.resolve(target), modelio.resolve(draft)
    t_tok, d_tok = modelio.load_tokenizer(t_ref), modelio.load_tokenizer(d_ref)
    t_cfg, d_cfg = modelio.load_config(t_ref), modelio.load_config(d_ref)
    t_size = (getattr(t_cfg, "text_config", None) or t_cfg).vocab_size
    d_size = (getattr(d_cfg, "text_config", None) or d_cfg).vocab_size
    unk = d_tok.unk_token_id if d_tok.unk_token_id is not None else d_tok.eos_token_id
    vmap = vocab_map(t_tok.get_vocab(), d_tok.get_vocab(), t_size, d_size, unk,
                     space_marks(t_tok), space_marks(d_tok), mode)
    model = modelio.load_model(d_ref, device=device)
    return as_tli_draft(model, vmap).to(device), vmap


def load_draft(target: str, path: str, device: str):
    """A draft for the exact rules: a same-vocabulary model, or a TLI draft (``tli:``)."""
    directory, mode = split_draft_path(path)
    if mode is None:
        return modelio.load_model(modelio.resolve(directory), device=device)
    return load_tli_draft(target, directory, mode, device)[0]


@register("hf")
def run_hf(plan: BenchPlan) -> dict:
    """Acceptance of every draft on the target's own outputs; see the module docstring."""
    device = plan.device
    target = modelio.load_model(modelio.resolve(plan.target), device=device)
    texts: dict[float, list[list[int]]] = {}
    target_logits: dict[float, list[torch.Tensor]] = {}
    for temp in plan.temperatures:
        bar = tqdm(plan.prompts, desc=f"target T={temp:g}", disable=plan.quiet or None)
        texts[temp] = [continuation(target, p, plan.max_tokens, temp, plan.seed + i, device)
                       for i, p in enumerate(bar)]
        target_logits[temp] = [position_logits(target, p, g, device)
                               for p, g in zip(plan.prompts, texts[temp])]
    del target
    measurements = []
    for name, path in plan.drafts.items():
        if path in PROPOSERS:  # a vLLM proposer, not a model: nothing to score here
            continue
        draft = load_draft(plan.target, path, device)
        for temp in plan.temperatures:
            per_rule: dict[str, list[torch.Tensor]] = {m: [] for m in plan.draft_samples}
            for p, g, tl in zip(plan.prompts, texts[temp], target_logits[temp]):
                rules = rule_acceptance(tl, position_logits(draft, p, g, device), temp)
                for method, acc in per_rule.items():
                    acc.append(rules[method])
            # Both rules reduce to argmax agreement at temperature 0: report it once.
            methods = plan.draft_samples[:1] if temp == 0 else plan.draft_samples
            for method in methods:
                rows = per_rule[method]
                token_acceptance = float(torch.cat(rows).mean())
                for gamma in plan.gammas:
                    counts = block_counts(rows, gamma, temp)
                    for b in plan.batch_sizes:
                        measurements.append({
                            "draft": name, "gamma": gamma, "temperature": temp,
                            "batch_size": b, "draft_sample": method,
                            "config": config_key(temp, b), **counts,
                            "token_acceptance": token_acceptance, "output_tokens": None,
                            "seconds": None,
                        })
        del draft
    return {"target": {}, "drafts_alone": {}, "speculative": measurements}
