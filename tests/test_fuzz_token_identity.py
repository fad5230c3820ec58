"""Fuzzing token identity: for any Unicode text, the canonical bytes of a tokenizer's tokens
concatenate to exactly the text's UTF-8 bytes. Fast tier: the two in-memory tokenizers
(byte-level BPE like SmolLM2, ``▁``/byte-fallback like Gemma-3); slow tier: the two real
builtin tokenizers (converted into ``~/.cache/tokensurgeon`` by ``tokensurgeon inspect``)."""

from __future__ import annotations

import pytest
from fuzz_text import unicode_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokensurgeon import validate
from tokensurgeon.errors import UsageError
from tokensurgeon.token_identity import vocabulary

# U+2581 is SentencePiece's own space marker: a literal "▁" in the text is stored exactly
# like a space, so no byte mapping can tell them apart (Gemma-3 has the same property).
# It is excluded from the SentencePiece fuzzing and pinned by its own test below.
SPM_MARKER = "\u2581"
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_bytes_cover_text(tokenizer, vocab, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [vocab.token_bytes[i] for i in ids]
    assert None not in pieces, "an ordinary text produced a special token"
    assert b"".join(pieces) == text.encode("utf-8"), text


@pytest.fixture(scope="module")
def tiny_vocabs(bpe_tokenizer, spm_tokenizer):
    return {"byte_level": (bpe_tokenizer, vocabulary(bpe_tokenizer)),
            "sentencepiece": (spm_tokenizer, vocabulary(spm_tokenizer))}


@FUZZ
@given(unicode_text())
def test_byte_level_bytes_concatenate_to_any_text(tiny_vocabs, text):
    assert_bytes_cover_text(*tiny_vocabs["byte_level"], text)


@FUZZ
@given(unicode_text(exclude=SPM_MARKER))
def test_sentencepiece_bytes_concatenate_to_any_text(tiny_vocabs, text):
    assert_bytes_cover_text(*tiny_vocabs["sentencepiece"], text)


def test_sentencepiece_marker_in_text_reads_as_a_space(tiny_vocabs):
    """The one known collision: documented here so that a fix shows up as a failure."""
    tok, vocab = tiny_vocabs["sentencepiece"]
    ids = tok("a" + SPM_MARKER + "b", add_special_tokens=False)["input_ids"]
    assert b"".join(vocab.token_bytes[i] for i in ids) == b"a b"


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=20), st.integers(0xD800, 0xDFFF), st.text(max_size=20))
def test_lone_surrogates_are_refused_cleanly(before, surrogate, after):
    # From JSON (an escaped "\ud800") the surrogate reaches the parsers as a str ...
    text = before + chr(surrogate) + after
    with pytest.raises(UsageError, match="lone surrogate"):
        validate.check_unicode({"text": [text]}, "data.jsonl:1")
    # ... and from a file as its (invalid) UTF-8 encoding, refused with its byte offset.
    assert validate.check_unicode(before + after, "x") == before + after


@settings(max_examples=100, deadline=None)
@given(unicode_text(max_pieces=10), st.integers(0xD800, 0xDFFF))
def test_surrogate_bytes_in_a_file_name_their_offset(tmp_path_factory, text, surrogate):
    path = tmp_path_factory.mktemp("t") / "x.txt"
    prefix = text.encode("utf-8")
    path.write_bytes(prefix + chr(surrogate).encode("utf-8", "surrogatepass") + b"tail")
    with pytest.raises(UsageError, match=f"offset {len(prefix)} "):
        validate.read_text(path)


# -- real tokenizers (slow: they live in ~/.cache/tokensurgeon, not in a fresh clone) ------

@pytest.fixture(scope="module")
def real_vocabs():
    from tokensurgeon import modelio

    out = {}
    for name in ("builtin:smollm2-135m", "builtin:gemma3-270m"):
        try:
            tok = modelio.load_tokenizer(modelio.resolve(name))
        except UsageError as exc:
            pytest.skip(f"{name} unavailable: {exc}")
        out[name] = (tok, vocabulary(tok))
    return out


@pytest.mark.slow
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(unicode_text(exclude=SPM_MARKER))
def test_real_tokenizers_bytes_concatenate_to_any_text(real_vocabs, text):
    """Exact for Gemma-3. SmolLM2's vocabulary has no token for the bytes 0x04, 0x06, 0x13,
    0x14, 0x16, 0x1d, 0xf1 and 0xf2 (found by this test), so its tokenizer silently drops
    them (e.g. U+40000 = f1 80 80 80 becomes three 0x80 tokens). The property checked is
    therefore: the tokens spell the text's bytes minus exactly the bytes the vocabulary
    cannot spell, and nothing else is lost or changed."""
    for tok, vocab in real_vocabs.values():
        spellable = {b[0] for b in vocab.token_bytes if b is not None and len(b) == 1}
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = [vocab.token_bytes[i] for i in ids]
        assert None not in pieces
        expected = bytes(b for b in text.encode("utf-8") if b in spellable)
        assert b"".join(pieces) == expected, text


@pytest.mark.slow
def test_real_tokenizers_unspellable_bytes(real_vocabs):
    """Pin which bytes each real vocabulary lacks (beyond the 13 that never occur in UTF-8),
    so a tokenizer or conversion change that alters it is noticed."""
    never_utf8 = {0xC0, 0xC1, *range(0xF5, 0x100)}
    missing = {}
    for name, (_, vocab) in real_vocabs.items():
        spellable = {b[0] for b in vocab.token_bytes if b is not None and len(b) == 1}
        missing[name] = sorted(set(range(256)) - spellable - never_utf8)
    assert missing == {"builtin:smollm2-135m": [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1, 0xF2],
                       "builtin:gemma3-270m": []}
