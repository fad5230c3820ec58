"""Fuzzing ALM chunk alignment on arbitrary Unicode: chunks cover both tokenizations
exactly, and their boundaries agree. Fast tier: the in-memory byte-level and SentencePiece
tokenizers; slow tier: the real SmolLM2 and Gemma-3 tokenizers."""

from __future__ import annotations

import pytest
from fuzz_text import unicode_text
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from distill.alignment import NO_CHUNK, align_chunks, text_byte_lengths
from tokensurgeon.token_identity import vocabulary

SPM_MARKER = "\u2581"  # reads as a space in SentencePiece (see test_fuzz_token_identity)


def check_alignment(side_a, side_b, text: str, bos_a: bool, bos_b: bool) -> None:
    data = text.encode("utf-8")
    sides = []
    for (tok, vocab), bos in ((side_a, bos_a), (side_b, bos_b)):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos and prefix is not None:
            ids = [prefix] + ids
        sides.append((ids, vocab, text_byte_lengths(ids, vocab.token_bytes, data)))
    (ids_a, va, la), (ids_b, vb, lb) = sides
    aligned = align_chunks(la, lb)
    for ids, vocab, lengths, chunks in ((ids_a, va, la, aligned.chunk_a),
                                        (ids_b, vb, lb, aligned.chunk_b)):
        # Every text byte of this side is in exactly one chunk, in order: concatenating the
        # chunks gives the whole text (both sides cover the same bytes, so nothing is cut).
        assert all(c != NO_CHUNK for c, n in zip(chunks, lengths) if n > 0)
        assert all(c == NO_CHUNK for c, n in zip(chunks, lengths) if n == 0)
        kept = [c for c in chunks if c != NO_CHUNK]
        assert kept == sorted(kept) and set(kept) == set(range(aligned.num_chunks))
        spans = [b""] * aligned.num_chunks
        for i, c, n in zip(ids, chunks, lengths):
            if c != NO_CHUNK:
                b = vocab.token_bytes[i]
                spans[c] += b[len(b) - n:]
        assert b"".join(spans) == data
        ends, total = [], 0
        for span in spans:
            total += len(span)
            ends.append(total)
        if chunks is aligned.chunk_a:
            ends_a, spans_a = ends, spans
    # Boundaries agree: chunk k ends at the same byte offset, over the same bytes, on both.
    assert ends == ends_a and spans == spans_a
    # And the chunks are maximal: each boundary is a token end on both sides, no other is.
    token_ends = []
    for lengths in (la, lb):
        acc, e = 0, set()
        for n in lengths:
            acc += n
            if n:
                e.add(acc)
        token_ends.append(e)
    assert set(ends) == token_ends[0] & token_ends[1]


@pytest.fixture(scope="module")
def tiny_sides(bpe_tokenizer, spm_tokenizer):
    return (bpe_tokenizer, vocabulary(bpe_tokenizer)), (spm_tokenizer, vocabulary(spm_tokenizer))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(unicode_text(exclude=SPM_MARKER), st.booleans(), st.booleans())
def test_chunks_cover_both_sides_and_agree(tiny_sides, text, bos_a, bos_b):
    check_alignment(*tiny_sides, text, bos_a, bos_b)


@pytest.fixture(scope="module")
def real_sides():
    from tokensurgeon import modelio
    from tokensurgeon.errors import UsageError

    out = []
    for name in ("builtin:smollm2-135m", "builtin:gemma3-270m"):
        try:
            tok = modelio.load_tokenizer(modelio.resolve(name))
        except UsageError as exc:
            pytest.skip(f"{name} unavailable: {exc}")
        out.append((tok, vocabulary(tok)))
    return out


@pytest.mark.slow
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(unicode_text(exclude=SPM_MARKER), st.booleans(), st.booleans())
def test_real_tokenizers_chunks_cover_both_sides_and_agree(real_sides, text, bos_a, bos_b):
    # SmolLM2 cannot spell a few bytes (see test_fuzz_token_identity); such text is refused
    # by text_byte_lengths, which the distill data tests cover.
    for _, vocab in real_sides:
        spellable = {b[0] for b in vocab.token_bytes if b is not None and len(b) == 1}
        assume(all(b in spellable for b in text.encode("utf-8")))
    check_alignment(*real_sides, text, bos_a, bos_b)
