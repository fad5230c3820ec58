"""Bits per byte: chunked log-probs equal naive ones; the total matches a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cli
from tokensurgeon.evaluate import bits_per_byte, chunked_token_logprobs, first_bytes, segment_text
from tokensurgeon.modelio import load_model, load_tokenizer, resolve


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_logprobs_equal_naive(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2, 7, 8)
    labels = torch.randint(0, 50, (2, 7))
    naive = torch.log_softmax(head(hidden), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(chunked_token_logprobs(hidden, head, labels, chunk), naive)


def test_bits_per_byte_matches_direct_computation(model_dirs):
    ref = resolve(str(model_dirs["llama_bpe"]))
    model, tok = load_model(ref), load_tokenizer(ref)
    segments = ["The quick brown fox.\n", "To be, or not to be: 你好 🙂\n"]
    result = bits_per_byte(model, tok, segments, batch_size=2, logit_chunk=3, bos="always")
    total = 0.0
    with torch.no_grad():
        for s in segments:
            ids = torch.tensor([[tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            total -= float(logp.gather(-1, ids[0, 1:].unsqueeze(-1)).sum())
    n_bytes = sum(len(s.encode()) for s in segments)
    assert result["bytes"] == n_bytes
    assert math.isclose(result["bits_per_byte"], total / math.log(2) / n_bytes, rel_tol=1e-4)


def test_segments_respect_lines_and_byte_budget():
    text = "".join(f"line {i}\n" for i in range(100))
    segs = segment_text([text], 50, 0)
    assert "".join(segs) == text and all(len(s) <= 50 for s in segs)
    budget = segment_text([text], 50, 120)
    assert sum(len(s.encode()) for s in budget) <= 120


def test_eval_cli_prints_bits_per_byte(model_dirs, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Natalia sold clips to 48 of her friends.\n" * 3)
    assert cli.main(["eval", str(model_dirs["gemma_spm"]), str(text), "--quiet"]) == 0
    assert "bits/byte" in capsys.readouterr().out


def test_eval_cli_rejects_empty_text(model_dirs, tmp_path, capsys):
    text = tmp_path / "empty.txt"
    text.write_text("")
    assert cli.main(["eval", str(model_dirs["gemma_spm"]), str(text), "--quiet"]) == 2
    assert "no text" in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(docs=st.lists(st.text(alphabet=st.sampled_from("ab é東🙂\n"), max_size=40), max_size=4),
       max_bytes=st.integers(0, 120))
def test_first_bytes_is_a_prefix_within_the_budget(docs, max_bytes):
    """--max-bytes keeps a prefix of the text of at most that many bytes, cut at the last
    line end within the budget (at a character when there is none), so no budget that
    covers some text keeps nothing."""
    kept = first_bytes(docs, max_bytes)
    whole, part = "".join(docs), "".join(kept)
    assert whole.startswith(part) and len(kept) <= len(docs)
    if max_bytes == 0 or len(whole.encode()) <= max_bytes:
        assert kept == docs
        return
    assert len(part.encode()) <= max_bytes
    if kept:
        cut_doc = docs[len(kept) - 1]
        head = cut_doc.encode()[: max_bytes - len("".join(kept[:-1]).encode())]
        if b"\n" in head:
            assert kept[-1].endswith("\n")
        else:  # every whole character of the budget is kept
            assert len(head) - len(kept[-1].encode()) < 4
