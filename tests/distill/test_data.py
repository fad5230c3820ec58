"""Data loading: formats, packing and truncation, seeded order, one-line errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.alignment import shared_cuts
from distill.data import batch_indices, build_examples, epoch_order, fill_pieces, read_texts
from tokensurgeon.errors import UsageError
from tokensurgeon.token_identity import vocabulary


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_read_texts_formats(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1?", "answer": "2 #### 2"}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, {"text": "  "}])
    chat = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    txt = tmp_path / "a.txt"
    txt.write_text("line one\n" * 30)
    assert read_texts([qa], "auto", 100) == ["1+1?\n2 #### 2"]
    assert read_texts([text], "text", 100) == ["hello"]
    assert read_texts([chat], "messages", 100) == ["user: hi\nassistant: hello"]
    pieces = read_texts([str(txt)], "auto", 100)
    assert "".join(pieces) == "line one\n" * 30 and max(len(p) for p in pieces) <= 100
    with pytest.raises(UsageError, match="question and answer"):
        read_texts([text], "qa", 100)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UsageError, match="bad.jsonl:1 is not valid JSON"):
        read_texts([str(tmp_path / "bad.jsonl")], "auto", 100)
    with pytest.raises(UsageError, match="does not exist"):
        read_texts([str(tmp_path / "missing.txt")], "auto", 100)


def examples(bpe, spm, texts, max_length, pack):
    return build_examples(texts, bpe, spm, vocabulary(bpe).token_bytes,
                          vocabulary(spm).token_bytes, max_length, pack)


def test_pack_and_truncate_respect_max_length(bpe_tokenizer, spm_tokenizer):
    texts = ["To be, or not to be, that is the question."] * 6
    packed = examples(bpe_tokenizer, spm_tokenizer, texts, 80, pack="texts")
    single = examples(bpe_tokenizer, spm_tokenizer, texts, 80, pack="none")
    assert len(packed) < len(single) == 6
    for e in packed + single:
        assert len(e.teacher_ids) <= 80 and len(e.student_ids) <= 80
        assert e.teacher_ids[0] == bpe_tokenizer.bos_token_id
        assert e.student_ids[0] == spm_tokenizer.bos_token_id
    cut = examples(bpe_tokenizer, spm_tokenizer, ["word " * 50], 12, pack="none")[0]
    assert len(cut.teacher_ids) == 12 and len(cut.student_ids) == 12


def test_fill_packs_full_sequences_that_cover_the_stream(bpe_tokenizer, spm_tokenizer):
    texts = ["To be, or not to be, that is the question. Whether 'tis nobler in the mind.",
             "A short one.", "word " * 70] * 3
    filled = examples(bpe_tokenizer, spm_tokenizer, texts, 40, pack="fill")
    whole = examples(bpe_tokenizer, spm_tokenizer, texts, 40, pack="texts")
    # Nothing truncated: the sequences spell the joined texts, in order, on both sides.
    joined = "\n\n".join(texts).encode()
    for tok, side in ((bpe_tokenizer, "teacher"), (spm_tokenizer, "student")):
        ids = [i for e in filled for i in getattr(e, f"{side}_ids")[1:]]
        assert b"".join(vocabulary(tok).token_bytes[i] for i in ids) == joined
    assert sum(e.num_bytes for e in filled) == len(joined)
    assert all(len(e.teacher_ids) <= 40 and len(e.student_ids) <= 40 for e in filled)
    # Fuller than whole-text packing: more tokens per sequence on average.
    def fill(es):
        return sum(len(e.student_ids) for e in es) / len(es)
    assert fill(filled) > fill(whole) and fill(filled[:-1]) > 0.9 * 40 - 4


@st.composite
def two_tokenizations(draw):
    a = draw(st.lists(st.integers(0, 5), min_size=1, max_size=60))
    total = sum(a)
    cut_points = sorted(draw(st.sets(st.integers(1, max(total - 1, 1)), max_size=40)))
    ends = [c for c in cut_points if c < total] + [total]
    b, previous = [], 0
    for e in ends:
        b.append(e - previous)
        previous = e
    zeros = draw(st.lists(st.integers(0, len(b)), max_size=3))
    for z in zeros:
        b.insert(z, 0)
    return a, b


@settings(max_examples=200, deadline=None)
@given(two_tokenizations(), st.integers(1, 12), st.integers(1, 12))
def test_fill_pieces_cut_at_shared_ends_within_capacity(pair, cap_a, cap_b):
    a, b = pair
    cuts = shared_cuts(a, b)
    ends_a = [sum(a[:i]) for i in range(len(a) + 1)]
    ends_b = [sum(b[:j]) for j in range(len(b) + 1)]
    assert cuts == [(i, j) for i in range(1, len(a) + 1) for j in range(1, len(b) + 1)
                    if ends_a[i] == ends_b[j] and a[i - 1] > 0 and b[j - 1] > 0]
    pieces = fill_pieces(a, b, cap_a, cap_b)
    # Consecutive, starting at 0, ending at the last shared cut.
    position = (0, 0)
    for a0, a1, b0, b1 in pieces:
        assert (a0, b0) == position and (a1, b1) in cuts
        position = (a1, b1)
    assert position == (cuts[-1] if cuts else (0, 0))
    # Within capacity unless no shared cut fits; full: the next cut would not fit.
    following = {c: n for n, c in enumerate(cuts)}
    for n, (a0, a1, b0, b1) in enumerate(pieces):
        fits = a1 - a0 <= cap_a and b1 - b0 <= cap_b
        k = following[(a1, b1)]
        if not fits:
            earlier = [c for c in cuts[:k] if c[0] > a0 or c[1] > b0]
            assert not earlier
        if fits and n + 1 < len(pieces):
            nxt = cuts[k + 1]
            assert nxt[0] - a0 > cap_a or nxt[1] - b0 > cap_b


def test_dataset_errors(bpe_tokenizer, spm_tokenizer):
    with pytest.raises(UsageError, match="dataset is empty"):
        examples(bpe_tokenizer, spm_tokenizer, [], 32, pack="texts")
    # BOS + one token per side: 2 bytes of 🚀 (byte-level) vs 1 (byte fallback): no cut.
    with pytest.raises(UsageError, match="raise --max-length"):
        examples(bpe_tokenizer, spm_tokenizer, ["🚀 launch"], 2, pack="none")


def test_tokenizer_that_rewrites_text_is_rejected(bpe_tokenizer):
    import tiny
    from tokenizers import normalizers

    lower = tiny.byte_level_tokenizer()
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(UsageError, match="student tokenizer does not reproduce the text"):
        examples(bpe_tokenizer, lower, ["Hello World"], 32, pack="none")


def test_seeded_order_is_deterministic_and_covers_every_epoch():
    assert epoch_order(10, 3, 0) == epoch_order(10, 3, 0) != epoch_order(10, 4, 0)
    assert epoch_order(10, 3, 0) != epoch_order(10, 3, 1)
    seen = [i for step in range(5) for i in batch_indices(step, 4, 10, seed=1)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(3, 4, 10, seed=1) == seen[12:16]
