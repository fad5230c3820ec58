"""Training data for distillation: files -> texts -> aligned, tokenized examples -> batches.

Boundary: reads text files and tokenizes; knows nothing about models or losses. Each
example holds the same text tokenized by the teacher and by the student (each side starts
with its own BOS when it has one, and is cut to ``max_length`` tokens), with the ALM chunk
of every token. The order of examples is a seeded permutation per epoch, so the data
position of any step is a pure function of (seed, step): resuming needs nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distill.alignment import AlignmentError, align_chunks, shared_cuts, text_byte_lengths
from tokensurgeon import validate
from tokensurgeon.errors import UsageError
from tokensurgeon.evaluate import jsonl_rows, segment_text

DATA_FORMATS = ("auto", "text", "qa", "messages")
# fill: texts joined into one stream and cut where both tokenizations end at the same byte,
# so every sequence is full; texts: whole texts per sequence (each truncated); none: one text.
PACK_MODES = ("fill", "texts", "none")
DOCUMENT_SEPARATOR = "\n\n"


def _row_text(row: object, data_format: str, where: str) -> str:
    if not isinstance(row, dict):
        raise UsageError(f"{where} is not a JSON object; each line must be an object")
    if data_format in ("auto", "text") and isinstance(row.get("text"), str):
        return row["text"]
    if data_format in ("auto", "qa") and isinstance(row.get("question"), str) \
            and isinstance(row.get("answer"), str):
        return row["question"].strip() + "\n" + row["answer"].strip()
    if data_format in ("auto", "messages") and isinstance(row.get("messages"), list):
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}"
                         for m in row["messages"] if isinstance(m, dict))
    wanted = {"auto": "text, question+answer or messages", "text": "text",
              "qa": "question and answer", "messages": "messages"}[data_format]
    raise UsageError(f"{where} has no {wanted} field; fix the file or pass --data-format")


def read_texts(paths: Sequence[str], data_format: str, segment_chars: int | None) -> list[str]:
    """Texts from .txt files (split at line ends into ~``segment_chars`` pieces; None: the
    whole file is one text) and .jsonl files (one text per line: ``text``,
    ``question``+``answer`` or ``messages``). Blank texts are dropped; a file with none is
    an error naming it."""
    texts: list[str] = []
    for path in paths:
        p = validate.check_input_file(path, "pass a .txt or .jsonl file with --data (repeat "
                                            "--data for several files)")
        if p.suffix == ".jsonl":
            found = [_row_text(row, data_format, f"{path}:{n}") for n, row in jsonl_rows(p)]
        elif segment_chars is None:
            found = [validate.read_text(p)]
        else:
            found = segment_text([validate.read_text(p)], segment_chars, 0)
        found = [t for t in found if t.strip()]
        if not found:
            raise UsageError(f"{path} holds no text; pass --data files that hold text (or drop "
                             "this one)")
        texts.extend(found)
    return texts


def check_data(paths: Sequence[str], data_format: str) -> None:
    """Read every ``--data`` file once, so a missing, empty or malformed one fails with its
    one-line error before any model or tokenizer is loaded."""
    if not paths:
        raise UsageError("pass at least one --data file")
    read_texts(paths, data_format, segment_chars=None)


@dataclass(frozen=True)
class Example:
    """One text on both sides; ``*_chunks`` give each token's chunk (-1: none)."""

    teacher_ids: tuple[int, ...]
    student_ids: tuple[int, ...]
    teacher_chunks: tuple[int, ...]
    student_chunks: tuple[int, ...]
    num_chunks: int
    num_bytes: int


def _usable(example: Example) -> bool:
    """True when some chunk has no token at position 0 on either side (it can be scored)."""
    first = {example.teacher_chunks[0], example.student_chunks[0]} - {-1}
    return any(k not in first for k in range(example.num_chunks))


def fill_pieces(lengths_a: Sequence[int], lengths_b: Sequence[int], capacity_a: int,
                capacity_b: int) -> list[tuple[int, int, int, int]]:
    """Cut two token streams covering the same bytes into consecutive pieces ``(a0, a1,
    b0, b1)`` at shared cuts, each as long as fits ``capacity_a`` / ``capacity_b`` tokens.
    A stretch with no shared cut within capacity becomes one over-long piece (the caller
    truncates it); the streams' tails after the last shared cut are dropped."""
    pieces, start = [], (0, 0)
    fit = None
    for cut in shared_cuts(lengths_a, lengths_b):
        if cut[0] - start[0] <= capacity_a and cut[1] - start[1] <= capacity_b:
            fit = cut
            continue
        end = fit or cut
        pieces.append((start[0], end[0], start[1], end[1]))
        start, fit = end, None
        if cut != end:
            if cut[0] - start[0] <= capacity_a and cut[1] - start[1] <= capacity_b:
                fit = cut
            else:
                pieces.append((start[0], cut[0], start[1], cut[1]))
                start = cut
    if fit:
        pieces.append((start[0], fit[0], start[1], fit[1]))
    return pieces


def build_examples(texts: Sequence[str], teacher_tokenizer, student_tokenizer,
                   teacher_bytes: Sequence[bytes | None], student_bytes: Sequence[bytes | None],
                   max_length: int, pack: str) -> list[Example]:
    """Tokenize ``texts`` on both sides, pack them (see ``PACK_MODES``) into sequences of
    at most ``max_length`` tokens per side and align chunks.

    Raises:
        UsageError: no texts; tokenizers that do not spell the text's bytes (a normalizer
            that rewrites text); no example long enough to give a scorable chunk.
    """
    if not texts:
        raise UsageError("the dataset is empty; pass --data files that hold text")
    if pack not in PACK_MODES:
        raise UsageError(f"unknown packing {pack!r}; use one of {', '.join(PACK_MODES)}")
    if pack == "texts":
        texts = [t + DOCUMENT_SEPARATOR for t in texts]
    elif pack == "fill":  # one stream: separators between texts only
        texts = [t + DOCUMENT_SEPARATOR for t in texts[:-1]] + list(texts[-1:])
    sides = []
    for tok, token_bytes in ((teacher_tokenizer, teacher_bytes),
                             (student_tokenizer, student_bytes)):
        ids = tok(list(texts), add_special_tokens=False)["input_ids"]
        lengths = []
        for n, (text, row) in enumerate(zip(texts, ids)):
            try:
                lengths.append(text_byte_lengths(row, token_bytes, text.encode("utf-8")))
            except AlignmentError as exc:
                which = "teacher" if tok is teacher_tokenizer else "student"
                raise UsageError(
                    f"the {which} tokenizer does not reproduce the text of example {n} ({exc}); "
                    "ALM needs tokenizers that keep the text's bytes (no rewriting normalizer)"
                ) from None
        sides.append((tok, ids, lengths))

    def prefix(tok) -> list[int]:
        return [tok.bos_token_id] if tok.bos_token_id is not None else []

    (t_tok, t_ids, t_len), (s_tok, s_ids, s_len) = sides
    t_pre, s_pre = prefix(t_tok), prefix(s_tok)
    # Each piece: teacher ids, student ids, their byte lengths, and the bytes it covers.
    pieces: list[tuple[list[int], list[int], list[int], list[int], int]] = []
    if pack == "fill":
        t_all, s_all = [i for row in t_ids for i in row], [i for row in s_ids for i in row]
        tl_all, sl_all = [x for row in t_len for x in row], [x for row in s_len for x in row]
        for a0, a1, b0, b1 in fill_pieces(tl_all, sl_all, max_length - len(t_pre),
                                          max_length - len(s_pre)):
            pieces.append((t_all[a0:a1], s_all[b0:b1], tl_all[a0:a1], sl_all[b0:b1],
                           sum(sl_all[b0:b1])))
    else:
        groups: list[list[int]] = []
        if pack == "texts":
            current: list[int] = []
            t_used = s_used = 0
            for n in range(len(texts)):
                t_n, s_n = len(t_ids[n]), len(s_ids[n])
                if current and (t_used + t_n > max_length - 1 or s_used + s_n > max_length - 1):
                    groups.append(current)
                    current, t_used, s_used = [], 0, 0
                current.append(n)
                t_used, s_used = t_used + t_n, s_used + s_n
            if current:
                groups.append(current)
        else:
            groups = [[n] for n in range(len(texts))]
        for group in groups:
            pieces.append(([i for n in group for i in t_ids[n]],
                           [i for n in group for i in s_ids[n]],
                           [x for n in group for x in t_len[n]],
                           [x for n in group for x in s_len[n]],
                           sum(len(texts[n].encode()) for n in group)))

    examples = []
    for t_body, s_body, tl_body, sl_body, num_bytes in pieces:
        t = (t_pre + t_body)[:max_length]
        s = (s_pre + s_body)[:max_length]
        tl = ([0] * len(t_pre) + tl_body)[:max_length]
        sl = ([0] * len(s_pre) + sl_body)[:max_length]
        aligned = align_chunks(tl, sl)
        example = Example(tuple(t), tuple(s), aligned.chunk_a, aligned.chunk_b,
                          aligned.num_chunks, num_bytes)
        if aligned.num_chunks and _usable(example):
            examples.append(example)
    if not examples:
        raise UsageError(f"no sequence gives an aligned chunk at --max-length {max_length}; "
                         "raise --max-length or pass longer texts")
    return examples


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of example indices for ``epoch``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=g).tolist()


def batch_indices(step: int, global_batch: int, num_examples: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step`` (consecutive slices of the epoch orders)."""
    out = []
    orders: dict[int, list[int]] = {}
    for position in range(step * global_batch, (step + 1) * global_batch):
        epoch = position // num_examples
        if epoch not in orders:
            orders[epoch] = epoch_order(num_examples, seed, epoch)
        out.append(orders[epoch][position % num_examples])
    return out


def collate(examples: Sequence[Example], side: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] ``ids``, ``mask`` and ``chunk_ids`` (-1 on padding) of one side."""
    rows = [getattr(e, f"{side}_ids") for e in examples]
    chunks = [getattr(e, f"{side}_chunks") for e in examples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    chunk_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, (r, c) in enumerate(zip(rows, chunks)):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
        chunk_ids[b, : len(c)] = torch.tensor(c)
    return {"ids": ids, "mask": mask, "chunk_ids": chunk_ids}
