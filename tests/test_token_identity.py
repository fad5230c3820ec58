"""Token identity: canonical bytes for every token, across tokenizer families."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokensurgeon.token_identity import (
    byte_level_alphabet,
    decode_token_string,
    encode_bytes_greedy,
    shared_token_map,
    vocabulary,
)

TEXT = st.lists(
    st.sampled_from(list("the quick brown fox, 48 clips\n\t東京你好🙂éï") + ["  ", "\n\n", "the"]),
    min_size=1, max_size=40,
).map("".join)


def test_byte_level_alphabet_is_a_bijection_over_bytes():
    table = byte_level_alphabet()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n") and table["a"] == ord("a")


def test_sentencepiece_strings():
    assert decode_token_string("\u2581the", "sentencepiece") == b" the"
    assert decode_token_string("<0xE4>", "sentencepiece") == b"\xe4"
    assert decode_token_string("Ġthe", "byte_level") == b" the"
    assert decode_token_string("ä½ł", "byte_level") == "你".encode()


def test_kinds(bpe_tokenizer, spm_tokenizer):
    assert vocabulary(bpe_tokenizer).kind == "byte_level"
    assert vocabulary(spm_tokenizer).kind == "sentencepiece"


def _assert_bytes_cover_text(tokenizer, text):
    vocab = vocabulary(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [vocab.token_bytes[i] for i in ids]
    assert None not in pieces
    assert b"".join(pieces) == text.encode("utf-8")


@settings(max_examples=60, deadline=None)
@given(TEXT)
def test_byte_level_tokens_concatenate_to_the_text(bpe_tokenizer, text):
    _assert_bytes_cover_text(bpe_tokenizer, text)


@settings(max_examples=60, deadline=None)
@given(TEXT)
def test_sentencepiece_tokens_concatenate_to_the_text(spm_tokenizer, text):
    _assert_bytes_cover_text(spm_tokenizer, text)


def test_specials_have_no_bytes_and_match_by_role(bpe_tokenizer, spm_tokenizer):
    bpe, spm = vocabulary(bpe_tokenizer), vocabulary(spm_tokenizer)
    eos_spm = spm_tokenizer.eos_token_id
    assert spm.token_bytes[eos_spm] is None
    assert "role:eos" in spm.special_keys[eos_spm]
    mapping = shared_token_map(bpe, spm)
    # <eos> and <|endoftext|> differ as strings but share the eos role.
    assert mapping[eos_spm] == bpe_tokenizer.eos_token_id
    assert mapping[spm_tokenizer.bos_token_id] == bpe_tokenizer.bos_token_id
    # <pad> has a pad role on both sides.
    assert mapping[spm_tokenizer.pad_token_id] == bpe_tokenizer.pad_token_id


def test_shared_tokens_have_equal_bytes(bpe_tokenizer, spm_tokenizer):
    bpe, spm = vocabulary(bpe_tokenizer), vocabulary(spm_tokenizer)
    mapping = shared_token_map(bpe, spm)
    ordinary = {d: b for d, b in mapping.items() if spm.token_bytes[d] is not None}
    assert len(ordinary) > 200  # all 256 byte-fallback tokens + common words
    for d, b in ordinary.items():
        assert spm.token_bytes[d] == bpe.token_bytes[b]
    # "▁the" (SentencePiece) is the same token as "Ġthe" (byte-level).
    assert mapping[spm_tokenizer.convert_tokens_to_ids("\u2581the")] == \
        bpe_tokenizer.convert_tokens_to_ids("Ġthe")


def test_byte_index_prefers_ordinary_piece_over_byte_fallback(spm_tokenizer):
    spm = vocabulary(spm_tokenizer)
    space_id = spm.byte_index()[b" "]
    assert space_id not in spm.byte_fallback_ids
    assert spm_tokenizer.convert_ids_to_tokens(space_id) == "\u2581"


def test_greedy_segmentation_covers_bytes(bpe_tokenizer):
    vocab = vocabulary(bpe_tokenizer)
    index = vocab.byte_index()
    data = "naïve 🙂 clips".encode()
    ids = encode_bytes_greedy(data, index, max(len(b) for b in index))
    assert b"".join(vocab.token_bytes[i] for i in ids) == data
    assert encode_bytes_greedy(b"\xff", {b"a": 0}, 1) is None


def test_vocabulary_mismatch_names_the_difference_and_is_none_when_equal():
    from tokensurgeon.token_identity import vocabulary_mismatch

    vocab = {"a": 0, "b": 1}
    assert vocabulary_mismatch(vocab, 2, dict(vocab), 2) is None
    assert "1 entries differ" in vocabulary_mismatch(vocab, 2, {"a": 0}, 2)
    assert "3 vs 2 rows" in vocabulary_mismatch(vocab, 2, dict(vocab), 3)
