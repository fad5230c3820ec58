"""The speculative-decoding accept/reject rule, and a reference sampler built on it.

Boundary: pure tensor math over next-token distributions; no models, no tokenizers and no
I/O. A "model" here is any function from a token prefix to next-token logits, so tests can
pass stubs with hand-built distributions and the HF backend can pass real models.

The rule (Leviathan et al. 2023; Chen et al. 2023): the draft proposes x_1..x_gamma from q;
x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token
is drawn from norm(max(0, p_i - q_i)); if all gamma are accepted, one more is drawn from
p_{gamma+1}. The output is distributed exactly as p, and each drafted token is accepted with
probability 1 - TVD(p_i, q_i). At temperature 0 both sides are argmax: x_i is accepted iff
it equals argmax p_i, and the output equals target-only greedy decoding.

Two drafting rules, as vLLM names them (``SpeculativeConfig.draft_sample_method``):
- ``probabilistic``: x_i ~ q_i and q_i enters the ratio test: acceptance 1 - TVD(p_i, q_i);
- ``greedy`` (vLLM's default): x_i = argmax q_i and q_i is treated as a one-hot, so x_i is
  accepted with probability p_i(argmax q_i). The output is still distributed as p.
At temperature 0 both reduce to argmax agreement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NextTokenLogits = Callable[[list[int]], torch.Tensor]  # prefix -> [V] logits


DRAFT_SAMPLE_METHODS = ("greedy", "probabilistic")


def rule_acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor,
                    temperature: float) -> dict[str, torch.Tensor]:
    """Exact per-position probability that a drafted token is accepted, for each rule.

    Args:
        target_logits: [N, V] target logits at N positions.
        draft_logits: [N, V] draft logits at the same positions (same vocabulary).
        temperature: sampling temperature (0 = greedy decoding).
    Returns:
        {"greedy": [N] p_T(argmax q), "probabilistic": [N] 1 - TVD(p_T, q_T)}; at
        temperature 0 both are [N] 1.0 where argmax q = argmax p, else 0.0.
    """
    draft_argmax = draft_logits.argmax(-1)
    if temperature == 0:
        agree = (target_logits.argmax(-1) == draft_argmax).float()
        return {"greedy": agree, "probabilistic": agree.clone()}
    p = torch.softmax(target_logits.float() / temperature, dim=-1)
    q = torch.softmax(draft_logits.float() / temperature, dim=-1)
    return {"greedy": p.gather(-1, draft_argmax.unsqueeze(-1)).squeeze(-1),
            "probabilistic": 1.0 - 0.5 * (p - q).abs().sum(-1)}


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[..., V] logits -> [..., V] sampling distribution; temperature 0 is a one-hot argmax."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, dim=-1)


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one block of drafted tokens."""

    accepted: int  # how many drafted tokens were kept (0..gamma)
    next_token: int  # the correction (after a rejection) or bonus token (all accepted)

    def tokens(self, drafted: list[int]) -> list[int]:
        return list(drafted[: self.accepted]) + [self.next_token]


def verify(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, drafted: torch.Tensor,
    uniforms: torch.Tensor, generator: torch.Generator | None = None,
) -> Verdict:
    """Accept or reject one block of drafted tokens.

    Args:
        target_probs: [gamma + 1, V] p at each drafted position, plus the one after them.
        draft_probs: [gamma, V] q at each drafted position (one-hot for greedy drafts).
        drafted: [gamma] the drafted token ids (sampled from ``draft_probs``).
        uniforms: [gamma] U(0, 1) draws, one per drafted token.
        generator: random source for the correction / bonus sample.
    Returns:
        The :class:`Verdict`. With one-hot p and q (temperature 0) this is greedy
        verification: accept while the drafted token equals argmax p.
    """
    gamma = drafted.shape[0]
    for i in range(gamma):
        x = int(drafted[i])
        p_x, q_x = float(target_probs[i, x]), float(draft_probs[i, x])
        if q_x > 0 and float(uniforms[i]) < min(1.0, p_x / q_x):
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q here: any rejection is measure-zero
            residual = target_probs[i]
        return Verdict(i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
    bonus = target_probs[gamma]
    return Verdict(gamma, int(torch.multinomial(bonus, 1, generator=generator)))


@dataclass
class SpeculativeRun:
    tokens: list[int]  # generated tokens (prompt excluded)
    drafted: int  # drafted tokens in total
    accepted: int  # drafted tokens accepted in total
    blocks: int  # verification steps (target calls)
    accepted_per_position: list[int]  # [gamma] accepted counts at draft position 1..gamma


def speculative_generate(
    target: NextTokenLogits, draft: NextTokenLogits, prompt: list[int], max_new_tokens: int,
    gamma: int, temperature: float, generator: torch.Generator | None = None,
    draft_sample: str = "probabilistic",
) -> SpeculativeRun:
    """Reference speculative sampler: correct and simple, one prefix call per token.

    ``target`` and ``draft`` map a prefix (list of ids) to [V] next-token logits. Generates
    exactly ``max_new_tokens`` tokens (no EOS handling, like ``ignore_eos``).
    ``draft_sample`` is the drafting rule (see the module docstring): ``greedy`` proposes
    argmax q and verifies against a one-hot q, as vLLM does by default.
    """
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    if draft_sample not in DRAFT_SAMPLE_METHODS:
        raise ValueError(f"draft_sample must be one of {DRAFT_SAMPLE_METHODS}, got {draft_sample!r}")
    draft_temperature = 0.0 if draft_sample == "greedy" else temperature
    seq = list(prompt)
    out: list[int] = []
    drafted_total = accepted_total = blocks = 0
    per_position = [0] * gamma
    while len(out) < max_new_tokens:
        proposal: list[int] = []
        q_rows = []
        for _ in range(gamma):
            q = probabilities(draft(seq + proposal), draft_temperature)
            x = int(q.argmax()) if draft_temperature == 0 else int(torch.multinomial(q, 1, generator=generator))
            proposal.append(x)
            q_rows.append(q)
        p_rows = [probabilities(target(seq + proposal[:i]), temperature) for i in range(gamma + 1)]
        uniforms = torch.rand(gamma, generator=generator)
        verdict = verify(torch.stack(p_rows), torch.stack(q_rows), torch.tensor(proposal),
                         uniforms, generator)
        drafted_total += gamma
        accepted_total += verdict.accepted
        for i in range(verdict.accepted):
            per_position[i] += 1
        blocks += 1
        new = verdict.tokens(proposal)
        seq += new
        out += new
    return SpeculativeRun(out[:max_new_tokens], drafted_total, accepted_total, blocks, per_position)


def target_generate(
    target: NextTokenLogits, prompt: list[int], max_new_tokens: int, temperature: float,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Plain autoregressive decoding with ``target`` alone (the reference for the sampler)."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        p = probabilities(target(seq), temperature)
        seq.append(int(p.argmax()) if temperature == 0 else int(torch.multinomial(p, 1, generator=generator)))
    return seq[len(prompt):]


def greedy_block_acceptance(agree: list[bool], gamma: int) -> tuple[int, int, list[int]]:
    """Exact greedy speculative decoding replayed on the target's own greedy output.

    Under greedy verification every emitted token equals the target's greedy token, so
    the draft's proposal at each block matches while it agrees with the target along that
    trajectory. ``agree[t]`` says whether argmax q = argmax p at output position t.

    Only complete blocks are counted (gamma drafted positions plus the target's token all
    inside the text), so a truncated last block does not bias the acceptance rate.

    Returns:
        (blocks, accepted drafted tokens, accepted counts at draft positions 1..gamma).
    """
    t = blocks = accepted = 0
    per_position = [0] * gamma
    n = len(agree)
    while t + gamma < n:
        k = 0
        while k < gamma and agree[t + k]:
            per_position[k] += 1
            k += 1
        accepted += k
        blocks += 1
        t += k + 1  # k accepted + one correction/bonus token from the target
    return blocks, accepted, per_position
