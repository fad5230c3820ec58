"""Data loading: formats, packing and truncation, seeded order, one-line errors."""

from __future__ import annotations

import json

import pytest

from distill.data import batch_indices, build_examples, epoch_order, read_texts
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
    packed = examples(bpe_tokenizer, spm_tokenizer, texts, 80, pack=True)
    single = examples(bpe_tokenizer, spm_tokenizer, texts, 80, pack=False)
    assert len(packed) < len(single) == 6
    for e in packed + single:
        assert len(e.teacher_ids) <= 80 and len(e.student_ids) <= 80
        assert e.teacher_ids[0] == bpe_tokenizer.bos_token_id
        assert e.student_ids[0] == spm_tokenizer.bos_token_id
    cut = examples(bpe_tokenizer, spm_tokenizer, ["word " * 50], 12, pack=False)[0]
    assert len(cut.teacher_ids) == 12 and len(cut.student_ids) == 12


def test_dataset_errors(bpe_tokenizer, spm_tokenizer):
    with pytest.raises(UsageError, match="dataset is empty"):
        examples(bpe_tokenizer, spm_tokenizer, [], 32, pack=True)
    # BOS + one token per side: 2 bytes of 🚀 (byte-level) vs 1 (byte fallback): no cut.
    with pytest.raises(UsageError, match="raise --max-length"):
        examples(bpe_tokenizer, spm_tokenizer, ["🚀 launch"], 2, pack=False)


def test_tokenizer_that_rewrites_text_is_rejected(bpe_tokenizer):
    import tiny
    from tokenizers import normalizers

    lower = tiny.byte_level_tokenizer()
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(UsageError, match="student tokenizer does not reproduce the text"):
        examples(bpe_tokenizer, lower, ["Hello World"], 32, pack=False)


def test_seeded_order_is_deterministic_and_covers_every_epoch():
    assert epoch_order(10, 3, 0) == epoch_order(10, 3, 0) != epoch_order(10, 4, 0)
    assert epoch_order(10, 3, 0) != epoch_order(10, 3, 1)
    seen = [i for step in range(5) for i in batch_indices(step, 4, 10, seed=1)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(3, 4, 10, seed=1) == seen[12:16]
