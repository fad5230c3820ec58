"""The chunked DistillSpec loss equals the plain one; training split-off rows equals training
the whole matrices."""

from __future__ import annotations

import pytest
import tiny
import torch

from spec_decode.divergences import DIVERGENCES
from spec_decode.loss import chunked_acceptance, chunked_divergence, plain_divergence, rules
from spec_decode.speculative import rule_acceptance
from spec_decode.trainable_rows import RowsHead, split_rows
from tokensurgeon import training

V, H, HT, N = 50, 16, 12, 13
CASES = [(name, verify) for name in sorted(DIVERGENCES) for verify in ("greedy", "probabilistic")
         if not (name == "rkl" and verify == "greedy")]  # infinite against a one-hot target


def setup(reduced: bool, seed: int = 3):
    """A draft head (full, or K rows of a trained parameter), hidden states, and a target
    that makes its logits from its own hidden states with its own head."""
    torch.manual_seed(seed)
    hidden = torch.randn(N, H, requires_grad=True)
    target_hidden = torch.randn(N, HT)
    target_head = torch.nn.Linear(HT, V, bias=False)
    target_head.weight.data *= 4  # peaked enough that argmaxes are distinct
    if reduced:
        head_ids = torch.tensor(sorted(torch.randperm(V)[:20].tolist()))
        source = torch.nn.Parameter(torch.randn(V, H) * 0.5)
        head = RowsHead(source, head_ids, head_ids)
        weight = source
    else:
        head_ids = None
        head = torch.nn.Linear(H, V, bias=False)
        weight = head.weight
    return hidden, head, weight, head_ids, target_hidden, target_head


@pytest.mark.parametrize("name,verify", CASES)
@pytest.mark.parametrize("reduced", [False, True])
@pytest.mark.parametrize("softcap,temperature", [(None, 0.0), (30.0, 1.0), (None, 0.7)])
def test_chunked_equals_plain(name, verify, reduced, softcap, temperature):
    """Value, acceptance and gradients (hidden states and head weight) of the chunked loss
    equal the plain [N, V] computation for every chunk size; the fast one-hot path of
    fkl/tvd (``of_argmax``) is checked against the registry's full divergence."""
    hidden, head, weight, head_ids, t_hidden, t_head = setup(reduced)
    target = t_head(t_hidden)

    def target_fn(h):
        return t_head(h).float()

    ref, ref_acc = plain_divergence(hidden, head, target.detach(), name, temperature, verify,
                                    0.3, head_ids, softcap)
    assert torch.isfinite(ref).all()
    g_ref = torch.autograd.grad(ref.sum(), [hidden, weight])
    assert all(g.abs().sum() > 0 for g in g_ref)  # a loss with a gradient to compare
    for chunk in (4, 64):  # several chunks (the last one short), and one
        got, acc = chunked_divergence(hidden, head, (t_hidden,), target_fn, name, temperature,
                                      verify, 0.3, head_ids, softcap, chunk)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(acc, ref_acc, atol=1e-6, rtol=1e-6)
        grads = torch.autograd.grad(got.sum(), [hidden, weight])
        for a, b in zip(grads, g_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # The comparison can fail: another target (rows shuffled) gives another loss.
    shuffled, _ = chunked_divergence(hidden, head, (t_hidden.flip(0),), target_fn, name,
                                     temperature, verify, 0.3, head_ids, softcap, 5)
    assert not torch.allclose(shuffled, ref, atol=1e-5)


def test_reduced_head_reads_the_target_on_its_tokens():
    """With a reduced head, the greedy target is the target's argmax over the K tokens (the
    best a K-token draft can propose), while acceptance is scored against the full target."""
    hidden, head, _, head_ids, t_hidden, t_head = setup(True)
    target = t_head(t_hidden).detach()
    loss, acc = chunked_divergence(hidden, head, (t_hidden,), lambda h: t_head(h).float(),
                                   "fkl", 0.0, "greedy", head_ids=head_ids)
    logq = torch.log_softmax(head(hidden), -1)
    best = target[:, head_ids].argmax(-1)
    torch.testing.assert_close(loss, -logq[torch.arange(N), best], atol=1e-5, rtol=1e-5)
    proposed = head_ids[head(hidden).argmax(-1)]
    assert torch.equal(acc, (proposed == target.argmax(-1)).float())


def full_vocabulary(draft: torch.Tensor, head_ids: torch.Tensor | None) -> torch.Tensor:
    """[N, K] draft logits -> [N, V], -inf off the head's tokens (as the served head)."""
    if head_ids is None:
        return draft
    return torch.full((draft.shape[0], V), float("-inf")).index_copy(1, head_ids, draft)


@pytest.mark.parametrize("reduced", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_chunked_acceptance_equals_rules(reduced, temperature):
    """rules() equals speculative.rule_acceptance on the draft's full-vocabulary logits, and
    its chunked form equals it."""
    hidden, head, _, head_ids, t_hidden, t_head = setup(reduced)
    target, draft = t_head(t_hidden).detach(), head(hidden).detach()
    want = rules(target, draft, head_ids, temperature)
    served = full_vocabulary(draft, head_ids)
    reference = rule_acceptance(target, served, temperature)
    for k in ("greedy", "probabilistic"):
        torch.testing.assert_close(want[k], reference[k], atol=1e-6, rtol=1e-5)
    assert torch.equal(want["agree"], (served.argmax(-1) == target.argmax(-1)).float())
    got = chunked_acceptance(hidden.detach(), head, (t_hidden,), lambda h: t_head(h).float(),
                             temperature, head_ids, chunk=4)
    assert set(got) == set(want) == {"probabilistic", "greedy", "agree"}
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    if temperature > 0:
        assert not torch.allclose(got["greedy"], got["probabilistic"])


# ------------------------------------------------------------ training split-off rows


def adam_run(model, parts, ids: torch.Tensor, head_ids, steps: int = 3) -> None:
    """A few AdamW steps (weight decay 0, clipping) of a loss over the head (K rows or all)
    on ``ids``, as spec train takes them."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = training.build_optimizer(params, 1e-2, 0.0)
    for step in range(steps):
        hidden = model.get_decoder()(input_ids=ids[:, step:]).last_hidden_state
        head = parts.head if parts is not None else model.get_output_embeddings()
        logits = head(hidden)
        if parts is None and head_ids is not None:
            logits = logits[..., head_ids]
        labels = torch.randint(0, logits.shape[-1], logits.shape[:-1],
                               generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels.reshape(-1))
        loss.backward()
        training.clip_gradients(params, 0.05)  # clips: the norms must agree too
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind,tied,reduced", [
    ("llama", True, True), ("llama", True, False), ("llama", False, True),
    ("llama", False, False), ("gemma", True, True)])  # Gemma: a scaled embedding
def test_split_rows_train_like_the_whole_matrices(kind, tied, reduced):
    """AdamW on the split-off rows (weight decay 0) gives the same weights as on the whole
    embedding and head; the rows that train are only the ones read and the head's."""
    vocab = 120
    make = tiny.tiny_llama if kind == "llama" else tiny.tiny_gemma
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    head_ids = torch.tensor([3, 7, 50, 60, 61, 99]) if reduced else None
    whole = make(vocab, tied=tied, seed=4)
    whole.train()
    adam_run(whole, None, ids, head_ids)
    split = make(vocab, tied=tied, seed=4)
    split.train()
    before = {k: v.clone() for k, v in split.state_dict().items()}
    parts = split_rows(split, head_ids, ids)
    trained = sum(p.numel() for p in split.parameters() if p.requires_grad)
    adam_run(split, parts, ids, head_ids)
    parts.restore()
    after, want = split.state_dict(), whole.state_dict()
    assert set(after) == set(want)
    for k in want:
        torch.testing.assert_close(after[k], want[k], atol=2e-6, rtol=1e-5, msg=k)
    emb = split.get_input_embeddings().weight
    moved = (emb != before[next(k for k in before if "embed_tokens" in k)]).any(-1)
    reachable = set(ids.unique().tolist()) | (set(head_ids.tolist()) if tied and reduced else set())
    if tied and not reduced:  # every row is reached through the softmax: nothing split
        assert parts.trained_rows["embedding"] == vocab
    else:
        assert set(moved.nonzero().flatten().tolist()) <= reachable
        assert trained < sum(p.numel() for p in whole.parameters())
    # With weight decay every row moves: nothing may be split then.
    third = make(vocab, tied=tied, seed=4)
    decayed = split_rows(third, head_ids, ids, split=False)
    assert decayed.trained_rows["embedding"] == vocab
    assert all(p.requires_grad for p in third.parameters())
