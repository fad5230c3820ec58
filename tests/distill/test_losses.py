"""ALM and baseline losses: identity, sign, teacher isolation, chunked == naive."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from loss_fixtures import loss_inputs

from distill.losses import (
    LOSSES,
    alm_chunk_logliks,
    alm_scale,
    binarised_kl,
    merge_groups,
    parse_loss_spec,
    sorted_probability_l1,
    token_kl,
)
from tokensurgeon.logits import (
    checkpointed_position_statistics,
    naive_position_statistics,
    position_statistics,
)


@pytest.fixture(scope="module")
def models(bpe_tokenizer, spm_tokenizer):
    return {
        "llama": tiny.tiny_llama(len(bpe_tokenizer), seed=0),
        "llama_other": tiny.tiny_llama(len(bpe_tokenizer), tied=False, seed=5),
        "gemma": tiny.tiny_gemma(len(spm_tokenizer), seed=2),
    }


def student_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


# ---------------------------------------------------------------------- pure functions


def test_binarised_kl_is_zero_at_identity_and_nonnegative():
    g = torch.Generator().manual_seed(0)
    teacher = -torch.rand(1000, generator=g) * 400
    student = -torch.rand(1000, generator=g) * 400
    assert binarised_kl(teacher, teacher, 100.0).abs().max() == 0
    assert binarised_kl(teacher, student, 100.0).min() >= 0


def test_binarised_kl_matches_the_cross_entropy_formula_and_its_gradient():
    a = torch.tensor([-0.5, -3.0, -40.0, -250.0], dtype=torch.float64)
    b = torch.tensor([-1.5, -2.0, -90.0, -10.0], dtype=torch.float64, requires_grad=True)
    tau = 100.0
    ce = -(a.div(tau).exp() * b / tau + (1 - a.div(tau).exp()) * torch.log(1 - (b / tau).exp()))
    entropy = -(a.div(tau).exp() * a / tau
                + (1 - a.div(tau).exp()) * torch.log(1 - (a / tau).exp()))
    torch.testing.assert_close(binarised_kl(a, b, tau), ce - entropy)
    (g_kl,) = torch.autograd.grad(binarised_kl(a, b, tau).sum(), b)
    (g_ce,) = torch.autograd.grad(ce.sum(), b)
    torch.testing.assert_close(g_kl, g_ce)


def test_binarised_kl_is_finite_at_extremes():
    a = torch.tensor([0.0, -1e-9, -1e4, -1e6, 0.0])
    b = torch.tensor([0.0, -1e4, -1e-9, 0.0, -1e6], requires_grad=True)
    d = binarised_kl(a, b, 100.0)
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(b.grad).all()
    assert d.min() >= 0


def test_alm_in_nats_tends_to_the_log_space_distance_and_its_gradient():
    # u, v: chunk losses in nats. tau * binarised KL -> u log(u/v) - u + v as tau grows, and
    # its gradient with respect to L_S = -v -> u/v - 1 (O(1), like SFT's -1 per token).
    u = torch.tensor([0.3, 2.0, 5.0, 12.0, 1.0], dtype=torch.float64)
    v = torch.tensor([0.9, 1.5, 8.0, 11.0, 1.0], dtype=torch.float64)
    limit = u * torch.log(u / v) - u + v
    errors = []
    for tau in (100.0, 1e4):
        ls = (-v).clone().requires_grad_(True)
        d = binarised_kl(-u, ls, tau) * alm_scale("nats", tau)
        (g,) = torch.autograd.grad(d.sum(), ls)
        errors.append(float((d.detach() - limit).abs().max()))
        torch.testing.assert_close(g, u / v - 1, rtol=0.1, atol=0.02)
    assert errors[1] < errors[0] / 10 and errors[1] < 1e-3
    assert alm_scale("probability", 100.0) == 1.0
    with pytest.raises(ValueError, match="nats"):
        alm_scale("bits", 100.0)


def test_merge_groups_closes_after_confident_boundaries():
    logp = torch.log(torch.tensor([[0.05, 0.5, 0.01, 0.02, 0.9, 0.3]]))
    exists = torch.tensor([[True, True, True, True, True, False]])
    groups = merge_groups(logp, exists, theta=0.1)
    assert groups.tolist() == [[0, 0, 1, 1, 1, -1]]
    assert merge_groups(logp, exists, theta=0.0).tolist() == [[0, 1, 2, 3, 4, -1]]


def test_alm_chunk_logliks_by_hand():
    realised = torch.tensor([[0.0, -1.0, -2.0, -3.0, -4.0]])
    boundary = torch.tensor([[-9.0, -0.5, -0.25, -0.125, -0.0625]])
    predicted = torch.tensor([[False, True, True, True, True]])
    chunk_ids = torch.tensor([[-1, 0, 0, 1, 2]])
    groups = torch.tensor([[0, 1, 1]])
    ll, ok = alm_chunk_logliks(realised, boundary, predicted, chunk_ids, groups, debias=False)
    assert ll.tolist() == [[-3.0, -7.0, 0.0]] and ok.tolist() == [[True, True, False]]
    ll, _ = alm_chunk_logliks(realised, boundary, predicted, chunk_ids, groups, debias=True)
    assert ll.tolist() == [[-3.25, -7.0625, 0.0]]
    # A chunk that holds position 0 (nothing to predict it from) is not complete.
    _, ok = alm_chunk_logliks(realised, boundary, predicted, torch.tensor([[0, 0, 1, 1, 2]]),
                              torch.tensor([[0, 1, 2]]), debias=False)
    assert ok.tolist() == [[False, True, True]]


def test_sorted_l1_and_token_kl_vanish_at_identity():
    logits = torch.randn(3, 5, 11)
    assert sorted_probability_l1(logits, logits).abs().max() < 1e-6
    # Permuting the vocabulary leaves the sorted distance unchanged.
    assert sorted_probability_l1(logits, logits[..., torch.randperm(11)]).abs().max() < 1e-6
    assert sorted_probability_l1(logits, torch.randn(3, 5, 17)).min() > 0
    for reverse in (False, True):
        assert token_kl(logits, logits, reverse).abs().max() < 1e-6
        assert token_kl(logits, torch.randn(3, 5, 11), reverse).min() > 0


def test_parse_loss_spec():
    assert parse_loss_spec("alm+sft") == [("alm", 1.0), ("sft", 1.0)]
    assert parse_loss_spec("alm:2+uld:0.5") == [("alm", 2.0), ("uld", 0.5)]
    for bad in ("alm+nope", "alm:-1", "alm+alm", "alm:x"):
        with pytest.raises(ValueError):
            parse_loss_spec(bad)


# ------------------------------------------------------------------ chunked == naive


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("path", ["checkpoint", "checkpoint-recompute", "fused-keep",
                                  "fused-recompute"])
def test_chunked_logprobs_equal_naive_with_gradients(softcap, path):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2, 13, 8, requires_grad=True)
    ids = torch.randint(0, 50, (2, 13))
    boundary = torch.tensor([0, 3, 7, 49])
    if path.startswith("checkpoint"):
        chunked = checkpointed_position_statistics(hidden, head, ids, boundary, 4, softcap,
                                                   recompute=path.endswith("recompute"))
    else:
        chunked = position_statistics(hidden, head, ids, boundary, 4, softcap,
                                      keep_bytes=0 if path.endswith("recompute") else 1 << 30)
    naive = naive_position_statistics(hidden, head, ids, boundary, softcap)
    for c, n in zip(chunked, naive):
        torch.testing.assert_close(c, n)
    grads_chunked = torch.autograd.grad(sum(x.sum() for x in chunked), [hidden, head.weight])
    grads_naive = torch.autograd.grad(sum(x.sum() for x in naive), [hidden, head.weight])
    for c, n in zip(grads_chunked, grads_naive):
        torch.testing.assert_close(c, n)


@pytest.mark.parametrize("keep_bytes", [0, 1 << 30])
def test_fused_statistics_when_boundary_mass_underflows(keep_bytes):
    """Rows whose boundary tokens sit ~200 nats below the top logit (their float32
    exponentials underflow) still match the naive reference, values and gradients."""
    torch.manual_seed(1)
    head = torch.nn.Linear(6, 40, bias=False)
    with torch.no_grad():
        head.weight[:, 0] = 0.0
        head.weight[5:8] = 0.0
        head.weight[5:8, 0] = -60.0   # boundary tokens: far below when hidden[..., 0] = 3
        head.weight[9, 0] = 50.0      # an ordinary token far above
    hidden = torch.randn(2, 7, 6)
    hidden[0, :4, 0] = 3.0
    hidden.requires_grad_(True)
    ids = torch.randint(0, 40, (2, 7))
    boundary = torch.tensor([5, 6, 7])
    fused = position_statistics(hidden, head, ids, boundary, 3, keep_bytes=keep_bytes)
    naive = naive_position_statistics(hidden, head, ids, boundary)
    assert float(naive[1][0, 0]) < -300  # the case under test: S_B underflows
    for c, n in zip(fused, naive):
        torch.testing.assert_close(c, n)
    # Gradients reach ~200 here, built from logits near 300 (float32 spacing ~3e-5): both
    # paths carry that rounding, so the relative tolerance is float32's at this magnitude.
    for c, n in zip(torch.autograd.grad(sum(x.sum() for x in fused), [hidden, head.weight]),
                    torch.autograd.grad(sum(x.sum() for x in naive), [hidden, head.weight])):
        torch.testing.assert_close(c, n, rtol=1e-4, atol=1e-4)


def test_fused_backward_can_run_twice():
    """GradMag differentiates each loss with retain_graph: kept logits must survive."""
    torch.manual_seed(2)
    head = torch.nn.Linear(8, 30, bias=False)
    hidden = torch.randn(1, 9, 8, requires_grad=True)
    ids = torch.randint(0, 30, (1, 9))
    realised, boundary = position_statistics(hidden, head, ids, torch.tensor([1, 4]), 4)
    loss = realised.sum() + 0.5 * boundary.sum()
    first = torch.autograd.grad(loss, hidden, retain_graph=True)[0]
    second = torch.autograd.grad(loss, hidden)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ------------------------------------------------------------------ losses on models


def total(x, name):
    count = LOSSES[name].count(x)
    return LOSSES[name].total(x) / max(count, 1), count


@pytest.mark.parametrize("name", ["alm", "kl", "kl_reverse", "uld", "hidden"])
def test_identity_gives_zero_loss_and_zero_gradient(models, bpe_tokenizer, name):
    teacher = models["llama"]
    student = tiny.tiny_llama(len(bpe_tokenizer), seed=0)
    student.zero_grad()
    x = loss_inputs(teacher, bpe_tokenizer, student, bpe_tokenizer)
    loss, count = total(x, name)
    assert count > 0
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert student_grads(student).abs().max() < 1e-6


def test_alm_at_identity_without_debias_or_merging(models, bpe_tokenizer):
    student = tiny.tiny_llama(len(bpe_tokenizer), seed=0)
    x = loss_inputs(models["llama"], bpe_tokenizer, student, bpe_tokenizer, debias=False, theta=0.0)
    loss, count = total(x, "alm")
    assert count == x.chunk_valid().sum() > 0
    assert abs(float(loss.detach())) < 1e-6


@pytest.mark.parametrize("name", ["alm", "uld", "sft"])
def test_cross_tokenizer_losses_are_positive(models, bpe_tokenizer, spm_tokenizer, name):
    x = loss_inputs(models["llama"], bpe_tokenizer, models["gemma"], spm_tokenizer)
    loss, count = total(x, name)
    assert count > 0 and float(loss) > 0 and math.isfinite(float(loss))


def test_different_student_same_tokenizer_has_positive_loss_and_gradient(models, bpe_tokenizer):
    student = models["llama_other"]
    student.zero_grad()
    x = loss_inputs(models["llama"], bpe_tokenizer, student, bpe_tokenizer)
    loss, _ = total(x, "alm")
    loss.backward()
    assert float(loss) > 0 and student_grads(student).abs().max() > 0


def test_teacher_gets_no_gradient(models, bpe_tokenizer, spm_tokenizer):
    teacher = tiny.tiny_gemma(len(spm_tokenizer), seed=7, hidden=32)
    teacher.zero_grad()
    student = models["llama_other"]
    x = loss_inputs(teacher, spm_tokenizer, student, bpe_tokenizer, teacher_grad=True)
    assert x.teacher.hidden.requires_grad  # the graph reaches the teacher ...
    loss = sum(total(x, name)[0] for name in ("alm", "sft", "uld", "hidden"))
    loss.backward()
    # ... yet no loss sends a gradient into it.
    assert all(p.grad is None for p in teacher.parameters())
    assert student_grads(student).abs().max() > 0


def test_normalising_by_global_count_makes_split_batches_agree(models, bpe_tokenizer,
                                                               spm_tokenizer):
    from loss_fixtures import TEXTS

    whole = loss_inputs(models["llama"], bpe_tokenizer, models["gemma"], spm_tokenizer)
    parts = [loss_inputs(models["llama"], bpe_tokenizer, models["gemma"], spm_tokenizer,
                         texts=[t]) for t in TEXTS]
    for name in ("alm", "sft", "uld"):
        count = sum(LOSSES[name].count(p) for p in parts)
        assert count == LOSSES[name].count(whole)
        split = sum(float(LOSSES[name].total(p)) for p in parts) / count
        assert split == pytest.approx(float(LOSSES[name].total(whole)) / count, rel=1e-5)


def test_alm_nats_units_scale_loss_and_gradient_by_tau(models, bpe_tokenizer, spm_tokenizer):
    # In probability units (the paper's form) ALM's gradient is ~1/tau of SFT's, so an
    # equal-weight alm+sft is SFT; in nats the two are of the same order.
    grads, values = {}, {}
    for units in ("probability", "nats"):
        models["llama"].zero_grad()
        x = loss_inputs(models["gemma"], spm_tokenizer, models["llama"], bpe_tokenizer,
                        alm_units=units)
        loss = LOSSES["alm"].total(x) / LOSSES["alm"].count(x)
        loss.backward(retain_graph=True)
        values[units], grads[units] = float(loss), student_grads(models["llama"]).clone()
        if units == "nats":
            models["llama"].zero_grad()
            (LOSSES["sft"].total(x) / LOSSES["sft"].count(x)).backward()
            sft = student_grads(models["llama"]).norm()
    models["llama"].zero_grad()
    assert values["nats"] == pytest.approx(100.0 * values["probability"], rel=1e-5)
    torch.testing.assert_close(grads["nats"], 100.0 * grads["probability"], rtol=1e-4, atol=1e-7)
    assert grads["probability"].norm() < sft / 20
    assert 0.05 < grads["nats"].norm() / sft < 20


def test_no_valid_chunk_gives_zero_sum(models, bpe_tokenizer, spm_tokenizer):
    x = loss_inputs(models["llama"], bpe_tokenizer, models["gemma"], spm_tokenizer)
    x.student.mask.zero_()
    x._cache.clear()
    assert LOSSES["alm"].count(x) == 0
    assert float(LOSSES["alm"].total(x)) == 0.0
