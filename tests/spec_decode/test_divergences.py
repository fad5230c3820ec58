"""Each divergence against a direct, loop-based reference; zero at p = q; TVD <= 1."""

from __future__ import annotations

import math

import pytest
import torch

from spec_decode.divergences import DIVERGENCES, distributions


def reference(name: str, p: list[float], q: list[float], beta: float) -> float:
    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(name, temperature):
    g = torch.Generator().manual_seed(0)
    lp, lq = torch.randn(5, 11, generator=g) * 2, torch.randn(5, 11, generator=g) * 2
    logp, logq = distributions(lp, lq, temperature)
    got = DIVERGENCES[name](logp, logq, 0.3)
    for r in range(5):
        p = torch.softmax(lp[r].double() / temperature, -1).tolist()
        q = torch.softmax(lq[r].double() / temperature, -1).tolist()
        assert got[r].item() == pytest.approx(reference(name, p, q, 0.3), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_zero_when_equal(name):
    logits = torch.randn(4, 9)
    logp, logq = distributions(logits, logits.clone(), 1.0)
    assert torch.allclose(DIVERGENCES[name](logp, logq, 0.5), torch.zeros(4), atol=1e-6)


def test_tvd_bounded_by_one():
    logits_p = torch.full((3, 6), -30.0)
    logits_q = torch.full((3, 6), -30.0)
    logits_p[:, 0] = 30.0
    logits_q[:, 5] = 30.0  # disjoint supports: TVD -> 1
    tvd = DIVERGENCES["tvd"](*distributions(logits_p, logits_q, 1.0))
    assert torch.all(tvd <= 1.0 + 1e-6) and torch.all(tvd > 0.999)
    rand = DIVERGENCES["tvd"](*distributions(torch.randn(50, 20) * 5, torch.randn(50, 20) * 5, 1.0))
    assert torch.all((rand >= 0) & (rand <= 1))


def test_greedy_target_is_one_hot():
    lp, lq = torch.randn(4, 7), torch.randn(4, 7)
    logp, logq = distributions(lp, lq, 0.0, greedy_target=True)
    q = torch.softmax(lq, -1)
    top = lp.argmax(-1)
    assert torch.allclose(DIVERGENCES["fkl"](logp, logq), -torch.log(q[range(4), top]), atol=1e-5)
    assert torch.allclose(DIVERGENCES["tvd"](logp, logq), 1 - q[range(4), top], atol=1e-5)
    assert torch.isfinite(DIVERGENCES["jsd"](logp, logq, 0.5)).all()


def test_gradients_are_finite():
    lq = torch.randn(3, 8, requires_grad=True)
    for name in DIVERGENCES:
        logp, logq = distributions(torch.randn(3, 8), lq, 1.0)
        DIVERGENCES[name](logp, logq, 0.5).sum().backward()
        assert torch.isfinite(lq.grad).all()
        lq.grad = None
