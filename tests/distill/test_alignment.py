"""Alignment invariants: chunks partition both token sequences and cover equal bytes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.alignment import (
    NO_CHUNK,
    AlignmentError,
    align_chunks,
    text_byte_lengths,
)
from tokensurgeon.token_identity import vocabulary

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello 🚀 東京 wörld",  # emoji and CJK split into byte-fallback / byte-level pieces
    " two  spaces\n\ttab",  # leading space, double space, newline and tab
    "你好 🙂 Café naïve",
    "x",
]


def chunk_bytes(ids, chunks, token_bytes, lengths):
    """bytes covered by each chunk, from each token's text bytes."""
    out: dict[int, bytes] = {}
    for i, c, n in zip(ids, chunks, lengths):
        if c != NO_CHUNK:
            # The last n bytes of a token are text (a dummy-prefix space is not).
            b = token_bytes[i]
            out[c] = out.get(c, b"") + b[len(b) - n:]
    return out


def check_partition(lengths_a, lengths_b, aligned):
    for lengths, chunks in ((lengths_a, aligned.chunk_a), (lengths_b, aligned.chunk_b)):
        assert len(chunks) == len(lengths)
        kept = [c for c in chunks if c != NO_CHUNK]
        # Chunk ids rise in steps of 0 or 1 from 0: each chunk is one contiguous run.
        assert kept == sorted(kept)
        assert all(b - a in (0, 1) for a, b in itertools.pairwise(kept))
        assert set(kept) == set(range(aligned.num_chunks))
        # Zero-byte (special) tokens are never in a chunk.
        assert all(c == NO_CHUNK for c, n in zip(chunks, lengths) if n == 0)
    for k in range(aligned.num_chunks):
        bytes_a = sum(n for n, c in zip(lengths_a, aligned.chunk_a) if c == k)
        bytes_b = sum(n for n, c in zip(lengths_b, aligned.chunk_b) if c == k)
        assert bytes_a == bytes_b > 0


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("bos", ["none", "a", "b", "both"])
def test_real_tokenizers_chunks_cover_equal_bytes(bpe_tokenizer, spm_tokenizer, text, bos):
    va, vb = vocabulary(bpe_tokenizer), vocabulary(spm_tokenizer)
    ids_a = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
    ids_b = spm_tokenizer(text, add_special_tokens=False)["input_ids"]
    # One-sided specials (a BOS, an EOS in the middle) cover no bytes and are dropped.
    if bos in ("a", "both"):
        ids_a = [bpe_tokenizer.bos_token_id] + ids_a
    if bos in ("b", "both"):
        ids_b = [spm_tokenizer.bos_token_id] + ids_b + [spm_tokenizer.eos_token_id]
    la = text_byte_lengths(ids_a, va.token_bytes, text.encode())
    lb = text_byte_lengths(ids_b, vb.token_bytes, text.encode())
    aligned = align_chunks(la, lb)
    check_partition(la, lb, aligned)
    a = chunk_bytes(ids_a, aligned.chunk_a, va.token_bytes, la)
    b = chunk_bytes(ids_b, aligned.chunk_b, vb.token_bytes, lb)
    assert a == b
    assert b"".join(a[k] for k in range(aligned.num_chunks)) == text.encode()
    if bos != "none":
        assert aligned.chunk_a[0] == NO_CHUNK or aligned.chunk_b[0] == NO_CHUNK


def test_multibyte_char_split_on_one_side_lands_in_one_chunk(bpe_tokenizer, spm_tokenizer):
    text = "🚀"
    va, vb = vocabulary(bpe_tokenizer), vocabulary(spm_tokenizer)
    ids_b = spm_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids_b) == 4 and all(i in vb.byte_fallback_ids for i in ids_b)
    ids_a = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
    la = text_byte_lengths(ids_a, va.token_bytes, text.encode())
    lb = text_byte_lengths(ids_b, vb.token_bytes, text.encode())
    aligned = align_chunks(la, lb)
    check_partition(la, lb, aligned)
    # Byte-level splits the 4 bytes 2+1+1, fallback 1+1+1+1: cuts at bytes 2, 3 and 4.
    assert aligned.num_chunks == 3


def test_dummy_prefix_space_counts_as_no_text():
    token_bytes = (None, b" Hello", b" world")
    assert text_byte_lengths([0, 1, 2], token_bytes, b"Hello world") == [0, 5, 6]


def test_text_rewritten_by_normalizer_is_rejected():
    token_bytes = (b"hello", b" world")
    with pytest.raises(AlignmentError, match="byte 0"):
        text_byte_lengths([0, 1], token_bytes, b"Hello world")


def test_truncated_side_leaves_trailing_tokens_unchunked():
    aligned = align_chunks([2, 2, 2], [3, 1])
    assert aligned.chunk_a == (0, 0, NO_CHUNK)
    assert aligned.chunk_b == (0, 0)
    assert aligned.num_chunks == 1


def test_no_common_cut_gives_no_chunk():
    aligned = align_chunks([3], [2])
    assert aligned.num_chunks == 0
    assert aligned.chunk_a == (NO_CHUNK,) and aligned.chunk_b == (NO_CHUNK,)


def split_bytes(total: int, cuts: list[int]) -> list[int]:
    points = sorted({c for c in cuts if 0 < c < total} | {total})
    return [b - a for a, b in zip([0] + points, points)]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 60), st.lists(st.integers(1, 59), max_size=30),
       st.lists(st.integers(1, 59), max_size=30), st.lists(st.integers(0, 30), max_size=4),
       st.lists(st.integers(0, 30), max_size=4))
def test_property_random_segmentations(total, cuts_a, cuts_b, specials_a, specials_b):
    la, lb = split_bytes(total, cuts_a), split_bytes(total, cuts_b)
    for at in specials_a:
        la.insert(min(at, len(la)), 0)
    for at in specials_b:
        lb.insert(min(at, len(lb)), 0)
    aligned = align_chunks(la, lb)
    check_partition(la, lb, aligned)
    # Equal totals: every byte is in some chunk, and chunk ends are exactly the common cuts.
    assert all(c != NO_CHUNK for c, n in zip(aligned.chunk_a, la) if n > 0)
    assert all(c != NO_CHUNK for c, n in zip(aligned.chunk_b, lb) if n > 0)
    ends_a = {sum(la[: i + 1]) for i in range(len(la))}
    ends_b = {sum(lb[: i + 1]) for i in range(len(lb))}
    assert aligned.num_chunks == len((ends_a & ends_b) - {0})


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab xyz\n\té東🙂好.,0")), min_size=1, max_size=40))
def test_property_real_tokenizers(bpe_tokenizer, spm_tokenizer, text):
    va, vb = vocabulary(bpe_tokenizer), vocabulary(spm_tokenizer)
    ids_a = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
    ids_b = spm_tokenizer(text, add_special_tokens=False)["input_ids"]
    la = text_byte_lengths(ids_a, va.token_bytes, text.encode())
    lb = text_byte_lengths(ids_b, vb.token_bytes, text.encode())
    aligned = align_chunks(la, lb)
    check_partition(la, lb, aligned)
    a = chunk_bytes(ids_a, aligned.chunk_a, va.token_bytes, la)
    assert a == chunk_bytes(ids_b, aligned.chunk_b, vb.token_bytes, lb)
    assert b"".join(a[k] for k in range(aligned.num_chunks)) == text.encode()
