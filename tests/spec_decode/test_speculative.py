"""The accept/reject rule on stub models with hand-built distributions."""

from __future__ import annotations

import pytest
import torch

from spec_decode.divergences import DIVERGENCES, distributions
from spec_decode.speculative import (
    greedy_block_acceptance,
    rule_acceptance,
    speculative_generate,
    target_generate,
    verify,
)

P = torch.tensor([0.5, 0.3, 0.15, 0.05])
Q = torch.tensor([0.1, 0.2, 0.3, 0.4])


def stub(probs: torch.Tensor):
    """A 'model' whose next-token distribution ignores the prefix."""
    return lambda prefix: probs.log()


def test_empirical_acceptance_equals_one_minus_tvd():
    g = torch.Generator().manual_seed(0)
    n = 20000
    accepted = 0
    counts = torch.zeros(4)
    for _ in range(n):
        x = torch.multinomial(Q, 1, generator=g)
        v = verify(torch.stack([P, P]), Q[None], x, torch.rand(1, generator=g), g)
        accepted += v.accepted
        counts[v.tokens([int(x)])[0]] += 1
    tvd = float(DIVERGENCES["tvd"](*distributions(P.log()[None], Q.log()[None], 1.0)))
    assert tvd == pytest.approx(0.5)
    assert abs(accepted / n - (1 - tvd)) < 0.015  # sd ~ 0.0035
    # The first emitted token is distributed as the target.
    assert torch.allclose(counts / n, P, atol=0.015)


def test_sampler_acceptance_on_stubs():
    g = torch.Generator().manual_seed(1)
    run = speculative_generate(stub(P), stub(Q), [0], 3000, gamma=1, temperature=1.0, generator=g)
    assert abs(run.accepted / run.drafted - 0.5) < 0.04  # 1 - TVD(P, Q) = 0.5
    same = speculative_generate(stub(P), stub(P), [0], 300, gamma=3, temperature=1.0, generator=g)
    assert same.accepted == same.drafted  # q = p: always accepts
    never = speculative_generate(stub(torch.tensor([1.0, 1e-9, 1e-9, 1e-9])),
                                 stub(torch.tensor([1e-9, 1.0, 1e-9, 1e-9])), [0], 50,
                                 gamma=2, temperature=1.0, generator=g)
    assert never.accepted == 0  # disjoint supports: never accepts


def test_greedy_output_equals_target_greedy():
    torch.manual_seed(0)
    table_p = torch.randn(7, 7)
    mixed = torch.randn(7, 7)
    mixed[0::2] = table_p[0::2]  # agrees on even contexts only
    drafts = {"same": table_p, "random": torch.randn(7, 7), "mixed": mixed}

    def target(prefix):
        return table_p[prefix[-1]]

    expected = target_generate(target, [3], 40, temperature=0.0)
    for name, table in drafts.items():
        for gamma in (1, 2, 4):
            run = speculative_generate(target, lambda prefix, t=table: t[prefix[-1]], [3], 40,
                                       gamma, temperature=0.0)
            assert run.tokens == expected, (name, gamma)
            if name == "same":
                assert run.accepted == run.drafted


def test_greedy_block_replay():
    # agree: T T F T F T T ; gamma 2: [T,T] + bonus -> t=3; [T,F] -> correction -> t=5;
    # a block at t=5 would need positions 5..7, past the end: not counted.
    blocks, accepted, per_pos = greedy_block_acceptance([True, True, False, True, False, True, True], 2)
    assert (blocks, accepted, per_pos) == (2, 3, [2, 1])


def test_greedy_drafting_accepts_p_of_draft_argmax():
    """vLLM's default draft_sample_method: argmax drafts are accepted with p(argmax q), not
    1 - TVD; the output is still distributed as the target."""
    rules = rule_acceptance(P.log()[None], Q.log()[None], 1.0)
    assert float(rules["greedy"]) == pytest.approx(float(P[3]))  # argmax Q = 3, p = 0.05
    assert float(rules["probabilistic"]) == pytest.approx(0.5)
    g = torch.Generator().manual_seed(2)
    run = speculative_generate(stub(P), stub(Q), [0], 4000, gamma=1, temperature=1.0,
                               generator=g, draft_sample="greedy")
    assert abs(run.accepted / run.drafted - 0.05) < 0.015  # sd ~ 0.004
    counts = torch.bincount(torch.tensor(run.tokens), minlength=4).float()
    assert torch.allclose(counts / counts.sum(), P, atol=0.03)
    # A draft identical to the target: probabilistic always accepts, greedy accepts p(argmax).
    self_rules = rule_acceptance(P.log()[None], P.log()[None], 1.0)
    assert float(self_rules["probabilistic"]) == pytest.approx(1.0)
    assert float(self_rules["greedy"]) == pytest.approx(0.5)
    same = speculative_generate(stub(P), stub(P), [0], 4000, gamma=1, temperature=1.0,
                                generator=g, draft_sample="greedy")
    assert abs(same.accepted / same.drafted - 0.5) < 0.03


def test_rules_coincide_at_temperature_zero():
    torch.manual_seed(3)
    p, q = torch.randn(50, 9), torch.randn(50, 9)
    rules = rule_acceptance(p, q, 0.0)
    agree = (p.argmax(-1) == q.argmax(-1)).float()
    assert torch.equal(rules["greedy"], agree) and torch.equal(rules["probabilistic"], agree)


def test_compare_backends_pools_batch_sizes_and_matches_rules():
    from spec_decode.bench import compare_backends

    def row(b, drafts, first, accepted, rule="greedy"):
        return {"draft": "d", "temperature": 1.0, "draft_sample": rule, "gamma": 2,
                "batch_size": b, "num_drafts": drafts, "num_draft_tokens": 2 * drafts,
                "num_accepted_tokens": accepted, "accepted_per_position": [first, accepted - first]}

    measured = [row(1, 100, 40, 60), row(8, 300, 140, 200), row(8, 50, 50, 100, "probabilistic")]
    exact = [{"draft": "d", "temperature": 1.0, "draft_sample": "greedy", "gamma": 2,
              "token_acceptance": 0.5, "alpha": 0.375},
             {"draft": "d", "temperature": 1.0, "draft_sample": "probabilistic", "gamma": 2,
              "token_acceptance": 1.0, "alpha": 1.0}]
    out = {r["draft_sample"]: r for r in compare_backends(measured, exact)}
    assert out["greedy"]["first_position"] == pytest.approx(180 / 400)
    assert out["greedy"]["first_position_rel_diff"] == pytest.approx(180 / 400 / 0.5 - 1)
    assert out["greedy"]["alpha"] == pytest.approx(260 / 800)
    assert out["probabilistic"]["first_position"] == 1.0
    assert out["probabilistic"]["first_position_se"] == 0.0
