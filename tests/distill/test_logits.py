"""tokensurgeon.logits: chunked results equal the unchunked computation."""

from __future__ import annotations

import pytest
import tiny
import torch

from tokensurgeon.logits import (
    final_hidden_states,
    head_logits,
    logits_at,
    position_statistics,
    token_logprobs,
)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_token_logprobs_chunked_equal_unchunked(chunk, softcap):
    torch.manual_seed(1)
    head = torch.nn.Linear(6, 40, bias=False)
    hidden, labels = torch.randn(2, 9, 6), torch.randint(0, 40, (2, 9))
    full = torch.log_softmax(head_logits(hidden, head, softcap), -1)
    expected = full.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(hidden, head, labels, chunk, softcap), expected)


def test_position_statistics_rows_subset_equals_full_rows():
    torch.manual_seed(2)
    head = torch.nn.Linear(6, 40, bias=False)
    hidden = torch.randn(2, 9, 6, requires_grad=True)
    ids, boundary = torch.randint(0, 40, (2, 9)), torch.tensor([1, 2, 30])
    rows = torch.rand(2, 9) > 0.3
    full_r, full_b = position_statistics(hidden, head, ids, boundary, 4)
    sub_r, sub_b = position_statistics(hidden, head, ids, boundary, 2, rows=rows)
    torch.testing.assert_close(sub_r, torch.where(rows, full_r, torch.zeros_like(full_r)))
    torch.testing.assert_close(sub_b, torch.where(rows, full_b, torch.zeros_like(full_b)))
    # No boundary set: only the realised log-probs, boundary all zero.
    r, b = position_statistics(hidden, head, ids, None, 4)
    torch.testing.assert_close(r, full_r)
    assert not b.any()


def test_logits_at_equals_full_logits_at_positions():
    model = tiny.tiny_gemma(50, seed=4)
    ids = torch.randint(0, 50, (2, 7))
    attn = torch.ones_like(ids)
    positions = torch.rand(2, 7) > 0.5
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn).logits.float()
        torch.testing.assert_close(logits_at(model, ids, attn, positions), full[positions],
                                   rtol=1e-5, atol=1e-5)
        hidden = final_hidden_states(model, ids, attn)
        torch.testing.assert_close(head_logits(hidden, model.get_output_embeddings(),
                                               model.config.final_logit_softcapping),
                                   full, rtol=1e-5, atol=1e-5)
