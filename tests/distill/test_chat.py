"""Chat data: each side renders a conversation with its own template, only assistant
turns are trained, and ALM chunks cover the same assistant bytes on both sides."""

from __future__ import annotations

import json

import pytest
import tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.chat import chat_template, render, row_messages
from distill.data import build_examples, collate, read_documents
from tokensurgeon.errors import UsageError
from tokensurgeon.token_identity import vocabulary


@pytest.fixture(scope="module")
def gemma_chat():
    return tiny.gemma_chat_tokenizer()


@pytest.fixture(scope="module")
def chatml():
    return tiny.chatml_tokenizer()


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def build(docs, teacher, student, max_length=4096, pack="none"):
    return build_examples(docs, teacher, student, vocabulary(teacher).token_bytes,
                          vocabulary(student).token_bytes, max_length, pack)


def spelled(tok, ids, keep):
    token_bytes = vocabulary(tok).token_bytes
    return b"".join(token_bytes[i] or b"" for i, k in zip(ids, keep) if k)


TEMPLATE_TOKENS = {"<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<bos>",
                   "<|endoftext|>"}

# Contents the tiny tokenizers must spell: letters, digits, punctuation, spaces and
# newlines inside, multibyte characters (byte fallback on the SentencePiece side).
content = st.lists(st.sampled_from(list("abcdefgh XYZ 0123 .,?!+=\n\t") +
                                   ["é", "東", "🙂", "user", "model", "<|im"]),
                   min_size=1, max_size=30).map("".join).filter(lambda t: t.strip())


@st.composite
def conversations(draw):
    turns = draw(st.integers(1, 3))
    messages = [{"role": "system", "content": draw(content)}] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(content)},
                     {"role": "assistant", "content": draw(content)}]
    return messages


@settings(max_examples=60, deadline=None)
@given(conversations(), st.booleans())
def test_assistant_bytes_match_on_both_sides_and_templates_stay_outside_chunks(
        gemma_chat, chatml, messages, swap):
    teacher, student = (chatml, gemma_chat) if swap else (gemma_chat, chatml)
    doc = row_messages({"messages": messages}, "chat.jsonl:1")
    assistant = "".join(m["content"].strip() for m in messages
                        if m["role"] == "assistant").encode()
    (example,) = build([doc], teacher, student)
    sides = ((teacher, example.teacher_ids, example.teacher_chunks, example.teacher_trained),
             (student, example.student_ids, example.student_chunks, example.student_trained))
    covered = []
    for tok, ids, chunks, trained in sides:
        # Round trip: the ids are the side's own rendering of the conversation ...
        # (contents are stripped when read, as Gemma's template does)
        rendered = tok.apply_chat_template(
            [{**m, "content": m["content"].strip()} for m in messages], tokenize=False)
        pieces = render(doc, tok, None, "teacher")
        assert "".join(p.text for p in pieces) == rendered
        assert tok.decode(list(ids), skip_special_tokens=False) == rendered
        # ... and its trained tokens spell exactly the assistant text.
        assert spelled(tok, ids, trained) == assistant
        covered.append(spelled(tok, ids, [c >= 0 for c in chunks]))
        # No template token is in a chunk; every chunked token is trained.
        for i, c, t in zip(ids, chunks, trained):
            if c >= 0:
                assert t == 1 and tok.convert_ids_to_tokens(i) not in TEMPLATE_TOKENS
    assert covered[0] == covered[1] == assistant
    # Chunk k holds the same bytes on both sides.
    for k in range(example.num_chunks):
        assert len({spelled(tok, ids, [c == k for c in chunks])
                    for tok, ids, chunks, _ in sides}) == 1


def test_collated_trained_mask_and_plain_text_trains_everything(gemma_chat, chatml):
    chat = row_messages({"messages": [{"role": "user", "content": "How many clips?"},
                                      {"role": "assistant", "content": "48 + 24 = 72"}]}, "c:1")
    examples = build([chat, "To be, or not to be."], gemma_chat, chatml, pack="texts")
    plain = next(e for e in examples if not e.student_trained)
    masked = next(e for e in examples if e.student_trained)
    batch = collate([plain, masked], "student", chatml.pad_token_id)
    assert batch["trained"][0, : len(plain.student_ids)].all()
    assert not batch["trained"][0, len(plain.student_ids):].any()
    assert batch["trained"][1].sum() == sum(masked.student_trained) > 0
    assert masked.num_bytes == len(b"48 + 24 = 72")


def test_prompt_completion_rows(gemma_chat, chatml, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "Q: 2+2?\nA: ", "completion": "4"},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                    {"role": "user", "content": "Count"}],
         "completion": [{"role": "assistant", "content": "one two"}]}])
    plain, chat = read_documents([path], "auto", None)
    assert plain.trained_text() == "4" and chat.trained_text() == "one two"
    examples = build([plain, chat], gemma_chat, chatml)
    for e, text in zip(examples, (b"4", b"one two")):
        assert spelled(gemma_chat, e.teacher_ids, e.teacher_trained) == text
        assert spelled(chatml, e.student_ids, e.student_trained) == text
    # A plain prompt/completion starts with each side's BOS, as plain text does.
    assert examples[0].teacher_ids[0] == gemma_chat.bos_token_id
    flat = read_documents([path], "auto", None, chat="flat")
    assert not any(d.masked for d in flat) and flat[0].trained_text() == "Q: 2+2?\nA: 4"


def test_parquet_and_saved_datasets_are_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"messages": [[{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]]}
    table = datasets.Dataset.from_dict(rows)
    table.to_parquet(str(tmp_path / "chat.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "chat.parquet", tmp_path / "saved"):
        (doc,) = read_documents([str(path)], "auto", None)
        assert doc.trained_text() == "Hello" and doc.where == f"{path} row 1"


@pytest.mark.parametrize("row, message", [
    ({"messages": []}, "chat.jsonl:2 has an empty conversation"),
    ({"messages": [{"role": "robot", "content": "x"}]},
     "chat.jsonl:2: message 0 has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "chat.jsonl:2 has no assistant message"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "chat.jsonl:2: message 0 \\(user\\) has no text content"),
    ({"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]},
     "chat.jsonl:2: prompt and completion must both be"),
])
def test_bad_rows_give_one_line_naming_the_row(tmp_path, row, message):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, row])
    with pytest.raises(UsageError, match=message) as info:
        read_documents([path], "auto", None)
    assert "\n" not in str(info.value)


def test_templates_that_refuse_drop_or_lack_are_named(gemma_chat, chatml):
    # Gemma's layout takes a system prompt only first: the template raises.
    doc = row_messages({"messages": [
        {"role": "user", "content": "a"}, {"role": "system", "content": "b"},
        {"role": "assistant", "content": "c"}]}, "chat.jsonl:7")
    with pytest.raises(UsageError, match="teacher's chat template refuses chat.jsonl:7 "
                                         r"\(System role only first\)"):
        render(doc, gemma_chat, None, "teacher")
    dropping = "{% for m in messages if m['role'] != 'system' %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(UsageError, match="drops, repeats or reorders message 0 \\(system\\)"):
        render(row_messages({"messages": [{"role": "system", "content": "s"},
                                          {"role": "assistant", "content": "c"}]}, "x:1"),
               chatml, dropping, "student")
    rewriting = "{% for m in messages %}{{ m['content'] | upper }}|{% endfor %}"
    with pytest.raises(UsageError, match="rewrites a message of x:1"):
        render(row_messages({"messages": [{"role": "assistant", "content": "c"}]}, "x:1"),
               chatml, rewriting, "student")
    with pytest.raises(UsageError, match="the student tokenizer has no chat template.*"
                                         "--student-chat-template"):
        chat_template(tiny.byte_level_tokenizer(), None, "student")
