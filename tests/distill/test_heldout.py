"""Held-out scoring of masked documents is the ``tokensurgeon eval`` yardstick restricted
to the trained text."""

from __future__ import annotations

import math

import pytest
import tiny

from distill import heldout
from distill.chat import Document, Piece
from tokensurgeon import evaluate


def test_a_completion_scores_like_eval_with_a_bos():
    """An empty prompt and a completion is the completion after a BOS: the same bits per
    byte as ``tokensurgeon eval --bos always`` of that text."""
    tok = tiny.sentencepiece_tokenizer()
    model = tiny.tiny_gemma(len(tok), seed=4)
    texts = ["To be, or not to be, that is the question.", "Café, naïve, 東京 and 🙂."]
    docs = [Document(f"row {n}", pieces=(Piece("", trained=False), Piece(t, trained=True)))
            for n, t in enumerate(texts)]
    held = heldout.prepare(docs, tok, None, max_length=256)
    got = heldout.bits_per_byte(model, tok, held, logit_chunk=7)
    want = evaluate.bits_per_byte(model, tok, texts, bos="always")
    assert got["eval_bpb"] == got["eval_bpb_trained_text"]
    assert got["eval_bpb"] == pytest.approx(want["bits_per_byte"], rel=1e-5)
    assert held.masked_bytes == sum(len(t.encode()) for t in texts)


def test_context_is_read_but_not_scored():
    """A prompt changes the completion's score (it is context) but adds no bytes."""
    tok = tiny.byte_level_tokenizer()
    model = tiny.tiny_llama(len(tok), seed=5)
    bare = [Document("a", pieces=(Piece("", trained=False), Piece("The lazy dog.", trained=True)))]
    prompted = [Document("b", pieces=(Piece("The quick brown fox jumps over", trained=False),
                                      Piece(" the lazy dog.", trained=True)))]
    a, b = (heldout.prepare(d, tok, None, 256) for d in (bare, prompted))
    assert a.masked_bytes == len(b"The lazy dog.") and b.masked_bytes == len(b" the lazy dog.")
    bpb_a = heldout.bits_per_byte(model, tok, a, 7)["eval_bpb"]
    bpb_b = heldout.bits_per_byte(model, tok, b, 7)["eval_bpb"]
    assert math.isfinite(bpb_a) and math.isfinite(bpb_b) and bpb_a != bpb_b
