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
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from spec_decode.backends.base import PROPOSERS, BenchPlan, config_key, register
from spec_decode.speculative import greedy_block_acceptance, rule_acceptance
from tokensurgeon import modelio


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
        draft = modelio.load_model(modelio.resolve(path), device=device)
        for temp in plan.temperatures:
            per_rule: dict[str, list[torch.Tensor]] = {m: [] for m in plan.draft_samples}
            for p, g, tl in zip(plan.prompts, texts[temp], target_logits[temp]):
                rules = rule_acceptance(tl, position_logits(draft, p, g, device), temp)
                for method in per_rule:
                    per_rule[method].append(rules[method])
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
