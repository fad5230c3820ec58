"""Training data for distillation: files -> documents -> aligned, tokenized examples ->
batches.

Boundary: reads data files and tokenizes; knows nothing about models or losses. Each
example holds the same documents tokenized by the teacher and by the student (plain text
starts with each side's BOS when it has one; a conversation is rendered by each side's own
chat template, see :mod:`distill.chat`; each side is cut to ``max_length`` tokens), with the
ALM chunk of every token and which tokens are trained. The order of examples is a seeded permutation per epoch, so the data
position of any step is a pure function of (seed, step): resuming needs nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.alignment import AlignmentError, align_chunks, shared_cuts, text_byte_lengths
from distill.chat import (
    Document,
    flatten,
    render,
    row_messages,
    row_prompt_completion,
    text_document,
)
from tokensurgeon import validate
from tokensurgeon.errors import UsageError
from tokensurgeon.evaluate import jsonl_rows, segment_text

DATA_FORMATS = ("auto", "text", "qa", "messages", "completion")
# template: each side renders conversations with its own chat template and only assistant
# turns are trained; flat: the earlier layout, "role: content" lines trained as plain text.
CHAT_MODES = ("template", "flat")
# fill: texts joined into one stream and cut where both tokenizations end at the same byte,
# so every sequence is full; texts: whole texts per sequence (each truncated); none: one text.
# Documents with context-only text (conversations, prompt/completion) are always packed whole.
PACK_MODES = ("fill", "texts", "none")
DOCUMENT_SEPARATOR = "\n\n"
# Read through the ``datasets`` library (one table per file or saved directory).
DATASETS_SUFFIXES = {".parquet": "parquet", ".json": "json", ".csv": "csv"}


def _row_document(row: object, data_format: str, where: str) -> Document:
    if not isinstance(row, dict):
        raise UsageError(f"{where} is not a JSON object; each line must be an object")
    if data_format in ("auto", "text") and isinstance(row.get("text"), str):
        return text_document(row["text"], where)
    if data_format in ("auto", "qa") and isinstance(row.get("question"), str) \
            and isinstance(row.get("answer"), str):
        return text_document(row["question"].strip() + "\n" + row["answer"].strip(), where)
    if data_format in ("auto", "messages") and row.get("messages") is not None:
        return row_messages(row, where)
    if data_format in ("auto", "completion") and "prompt" in row and "completion" in row:
        return row_prompt_completion(row, where)
    wanted = {"auto": "text, question+answer, messages or prompt+completion", "text": "text",
              "qa": "question and answer", "messages": "messages",
              "completion": "prompt and completion"}[data_format]
    raise UsageError(f"{where} has no {wanted} field; fix the file or pass --data-format")


# Files that mark a folder written by datasets' save_to_disk.
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def _table_rows(path: Path):
    """Yield (row label, row dict) of a Parquet/JSON/CSV file or a ``save_to_disk``
    directory, through the ``datasets`` library."""
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{path} needs the datasets library; run: pip install "
                         "'tokensurgeon[data]' (or pass a .txt or .jsonl file)") from None
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                table = table["train"] if "train" in table else next(iter(table.values()))
        else:
            table = datasets.load_dataset(DATASETS_SUFFIXES[path.suffix], data_files=str(path),
                                          split="train")
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise UsageError(f"{path} cannot be read as a dataset ({str(exc).splitlines()[0]}); "
                         "pass a Parquet, JSON-lines or saved datasets directory") from None
    for n, row in enumerate(table, 1):
        yield f"{path} row {n}", row


def read_documents(paths: Sequence[str], data_format: str, segment_chars: int | None,
                   chat: str = CHAT_MODES[0]) -> list[Document]:
    """Documents from .txt files (split at line ends into ~``segment_chars`` pieces; None:
    the whole file is one text), .jsonl files (one row per line) and, through the
    ``datasets`` library, .parquet/.json/.csv files and ``save_to_disk`` directories. A row
    holds ``text``, ``question``+``answer``, ``messages`` or ``prompt``+``completion``.
    ``chat`` ``flat`` turns conversations into plain ``role: content`` text.

    Raises:
        UsageError: a missing file, a bad row (names it: unknown role, empty conversation,
            no assistant message, ...).
    """
    if chat not in CHAT_MODES:
        raise UsageError(f"unknown chat mode {chat!r}; use one of {', '.join(CHAT_MODES)}")
    fix = ("pass a .txt, .jsonl, .parquet, .json or .csv file with --data (repeat --data for "
           "several), or a folder written by datasets' save_to_disk")
    docs: list[Document] = []
    for path in paths:
        p = Path(path).expanduser()
        found: list[Document] = []
        if p.is_dir() and any((p / n).is_file() for n in SAVED_DATASET_FILES):
            rows = _table_rows(p)
        else:
            p = validate.check_input_file(path, fix)
            if p.suffix == ".jsonl":
                rows = ((f"{path}:{n}", row) for n, row in jsonl_rows(p))
            elif p.suffix in DATASETS_SUFFIXES:
                rows = _table_rows(p)
            else:
                rows = ()
                texts = ([validate.read_text(p)] if segment_chars is None
                         else segment_text([validate.read_text(p)], segment_chars, 0))
                found = [text_document(t, str(path)) for t in texts]
        for where, row in rows:
            doc = _row_document(row, data_format, where)
            found.append(flatten(doc) if chat == "flat" else doc)
        found = [d for d in found if d.masked or d.trained_text().strip()]
        if not found:
            raise UsageError(f"{path} holds no text; pass --data files that hold text (or drop "
                             "this one)")
        docs.extend(found)
    return docs


def read_texts(paths: Sequence[str], data_format: str, segment_chars: int | None) -> list[str]:
    """Plain texts of :func:`read_documents` with conversations flattened (every byte
    trained; the layout benches and the earlier trainer used)."""
    return [d.trained_text() for d in read_documents(paths, data_format, segment_chars, "flat")
            if not d.masked]


def check_data(paths: Sequence[str], data_format: str) -> None:
    """Read every ``--data`` file once, so a missing, empty or malformed one fails with its
    one-line error before any model or tokenizer is loaded."""
    if not paths:
        raise UsageError("pass at least one --data file")
    read_documents(paths, data_format, segment_chars=None)


@dataclass(frozen=True)
class Example:
    """One text on both sides; ``*_chunks`` give each token's chunk (-1: none);
    ``*_trained`` mark the tokens the losses score (empty: every token), so template text
    and prompts are read but not trained."""

    teacher_ids: tuple[int, ...]
    student_ids: tuple[int, ...]
    teacher_chunks: tuple[int, ...]
    student_chunks: tuple[int, ...]
    num_chunks: int
    num_bytes: int
    teacher_trained: tuple[int, ...] = ()
    student_trained: tuple[int, ...] = ()


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


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def encode_pieces(docs: Sequence[Document], tok, token_bytes: Sequence[bytes | None],
                  template: str | None, side: str) -> list[tuple[list[int], list[int], list[int]]]:
    """``(ids, aligned byte lengths, trained flags)`` of each document on one side.

    A conversation is rendered by ``side``'s chat template (:func:`distill.chat.render`);
    a plain document starts with the tokenizer's BOS when it has one. Each piece is
    tokenized on its own, so no token crosses from template text into a message. Only
    trained pieces have byte lengths (template text and prompts get 0: no ALM chunk).
    """
    rendered = [(render(d, tok, template, side), [] if d.is_chat else _bos(tok)) for d in docs]
    texts = [p.text for pieces, _ in rendered for p in pieces if p.text]
    ids_of = iter(tok(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for doc, (pieces, prefix) in zip(docs, rendered):
        ids, lengths, trained = list(prefix), [0] * len(prefix), [0] * len(prefix)
        for piece in pieces:
            if not piece.text:
                continue
            row = next(ids_of)
            if piece.trained:
                try:
                    lengths += text_byte_lengths(row, token_bytes, piece.text.encode("utf-8"))
                except AlignmentError as exc:
                    raise UsageError(
                        f"the {side} tokenizer does not reproduce the text of {doc.where} "
                        f"({exc}); ALM needs tokenizers that keep the text's bytes") from None
            else:
                lengths += [0] * len(row)
            ids += row
            trained += [int(piece.trained)] * len(row)
        out.append((ids, lengths, trained))
    return out


def _masked_examples(docs: Sequence[Document], teacher_tokenizer, student_tokenizer,
                     teacher_bytes, student_bytes, max_length: int, pack: str,
                     templates: tuple[str | None, str | None]) -> list[Example]:
    """Examples of documents with context-only text, packed whole (``none``: one per
    sequence) and truncated to ``max_length``; chunks cover trained bytes only."""
    sides = [encode_pieces(docs, tok, token_bytes, template, side) for tok, token_bytes,
             template, side in ((teacher_tokenizer, teacher_bytes, templates[0], "teacher"),
                                (student_tokenizer, student_bytes, templates[1], "student"))]
    groups: list[list[int]] = []
    used = (0, 0)
    for n in range(len(docs)):
        size = (len(sides[0][n][0]), len(sides[1][n][0]))
        if pack == "none" or not groups or used[0] + size[0] > max_length \
                or used[1] + size[1] > max_length:
            groups.append([])
            used = (0, 0)
        groups[-1].append(n)
        used = (used[0] + size[0], used[1] + size[1])
    examples = []
    for group in groups:
        (t, tl, tt), (s, sl, st) = ([[x for n in group for x in side[n][k]][:max_length]
                                     for k in range(3)] for side in sides)
        aligned = align_chunks(tl, sl)
        covered = sum(n for n, c in zip(sl, aligned.chunk_b) if c >= 0)
        example = Example(tuple(t), tuple(s), aligned.chunk_a, aligned.chunk_b,
                          aligned.num_chunks, covered, tuple(tt), tuple(st))
        if aligned.num_chunks and _usable(example):
            examples.append(example)
    return examples


def build_examples(docs: Sequence[str | Document], teacher_tokenizer, student_tokenizer,
                   teacher_bytes: Sequence[bytes | None], student_bytes: Sequence[bytes | None],
                   max_length: int, pack: str,
                   templates: tuple[str | None, str | None] = (None, None)) -> list[Example]:
    """Tokenize ``docs`` (plain strings or :class:`distill.chat.Document`) on both sides,
    pack them (see ``PACK_MODES``) into sequences of at most ``max_length`` tokens per side
    and align chunks. ``templates``: chat template texts replacing the teacher's and the
    student's own (None: the tokenizer's).

    Plain texts keep every byte trained and may be cut anywhere both sides agree
    (``fill``). Conversations and prompt/completion rows are packed whole: their template
    text and prompts are context (not trained, in no chunk), their trained bytes are
    chunked alike on both sides.

    Raises:
        UsageError: no texts; tokenizers that do not spell the text's bytes (a normalizer
            that rewrites text); a row a chat template refuses; no example long enough to
            give a scorable chunk.
    """
    if not docs:
        raise UsageError("the dataset is empty; pass --data files that hold text")
    if pack not in PACK_MODES:
        raise UsageError(f"unknown packing {pack!r}; use one of {', '.join(PACK_MODES)}")
    docs = [text_document(d, f"text {n}") if isinstance(d, str) else d
            for n, d in enumerate(docs)]
    plain = [d.trained_text() for d in docs if not d.masked]
    masked = [d for d in docs if d.masked]
    examples = []
    if plain:
        examples += _plain_examples(plain, teacher_tokenizer, student_tokenizer, teacher_bytes,
                                    student_bytes, max_length, pack)
    if masked:
        examples += _masked_examples(masked, teacher_tokenizer, student_tokenizer,
                                     teacher_bytes, student_bytes, max_length, pack, templates)
    if not examples:
        raise UsageError(f"no sequence gives an aligned chunk at --max-length {max_length}; "
                         "raise --max-length or pass longer texts")
    return examples


def _plain_examples(texts: Sequence[str], teacher_tokenizer, student_tokenizer,
                   teacher_bytes: Sequence[bytes | None], student_bytes: Sequence[bytes | None],
                   max_length: int, pack: str) -> list[Example]:
    """Examples of plain texts, every byte trained (see :func:`build_examples`)."""
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
    """Right-padded [B, T] ``ids``, ``mask``, ``chunk_ids`` (-1 on padding) and ``trained``
    (bool, False on padding) of one side."""
    rows = [getattr(e, f"{side}_ids") for e in examples]
    chunks = [getattr(e, f"{side}_chunks") for e in examples]
    flags = [getattr(e, f"{side}_trained") or (1,) * len(r) for e, r in zip(examples, rows)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    chunk_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    trained = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (r, c, f) in enumerate(zip(rows, chunks, flags)):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
        chunk_ids[b, : len(c)] = torch.tensor(c)
        trained[b, : len(f)] = torch.tensor(f, dtype=torch.bool)
    return {"ids": ids, "mask": mask, "chunk_ids": chunk_ids, "trained": trained}
