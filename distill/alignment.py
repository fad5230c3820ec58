"""Byte alignment of two tokenizations of the same text into ALM chunks.

Boundary: pure functions over token ids and byte strings; no models and no tensors. Every
token is mapped to the bytes it stands for by :mod:`tokensurgeon.token_identity` (``Ġ`` and
``▁`` spaces, ``<0xNN>`` byte fallback), never by decoding strings token by token. Special
tokens stand for no bytes, so one-sided specials (a BOS only one tokenizer adds) belong to
no chunk and are dropped.

A chunk is a maximal-by-cut span: both token sequences are cut at every byte offset where
their cumulative byte counts agree, so chunk ``k`` covers the same bytes on both sides. A
multibyte character split across byte-fallback tokens on one side simply lands in one chunk
with the other side's whole-character token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

NO_CHUNK = -1


class AlignmentError(ValueError):
    """The two tokenizations do not spell the same bytes."""


def token_byte_lengths(ids: Sequence[int], token_bytes: Sequence[bytes | None]) -> list[int]:
    """Bytes per token; 0 for special tokens and ids outside the vocabulary."""
    lengths = []
    for i in ids:
        b = token_bytes[i] if 0 <= i < len(token_bytes) else None
        lengths.append(len(b) if b else 0)
    return lengths


def spelled_bytes(ids: Sequence[int], token_bytes: Sequence[bytes | None]) -> bytes:
    """The text bytes a token sequence spells (specials contribute nothing)."""
    return b"".join(token_bytes[i] or b"" for i in ids if 0 <= i < len(token_bytes))


def text_byte_lengths(ids: Sequence[int], token_bytes: Sequence[bytes | None],
                      text: bytes) -> list[int]:
    """Bytes per token, checked against ``text``; a SentencePiece dummy-prefix space
    (``▁`` added before the first word) counts as no text.

    Raises:
        AlignmentError: the tokens do not spell ``text`` (e.g. a normalizer rewrote it).
    """
    lengths = token_byte_lengths(ids, token_bytes)
    spelled = spelled_bytes(ids, token_bytes)
    if spelled == text:
        return lengths
    if spelled == b" " + text:
        first = next(i for i, n in enumerate(lengths) if n > 0)
        lengths[first] -= 1
        return lengths
    at = next((i for i, (a, b) in enumerate(zip(spelled, text)) if a != b),
              min(len(spelled), len(text)))
    raise AlignmentError(
        f"tokens spell {spelled[max(0, at - 10): at + 10]!r} where the text has "
        f"{text[max(0, at - 10): at + 10]!r} (byte {at})")


@dataclass(frozen=True)
class ChunkAlignment:
    """Per-token chunk ids of both sides.

    Attributes:
        chunk_a: for each token of side A, its chunk index, or ``NO_CHUNK`` (a special
            token, or trailing bytes the other side does not reach after truncation).
        chunk_b: the same for side B.
        num_chunks: chunks ``0 .. num_chunks-1`` each hold >= 1 token on both sides.
    """

    chunk_a: tuple[int, ...]
    chunk_b: tuple[int, ...]
    num_chunks: int


def shared_cuts(lengths_a: Sequence[int], lengths_b: Sequence[int]) -> list[tuple[int, int]]:
    """Token counts ``(i, j)`` after which side A's first i tokens and side B's first j
    tokens end at the same byte offset (a token of positive length ends there on both
    sides), in increasing order; zero-byte tokens stay with the piece after the cut."""
    cuts, i, j, end_a, end_b = [], 0, 0, 0, 0
    while i < len(lengths_a) or j < len(lengths_b):
        if j == len(lengths_b) or (i < len(lengths_a) and end_a <= end_b):
            end_a += lengths_a[i]
            i += 1
        else:
            end_b += lengths_b[j]
            j += 1
        if end_a == end_b and i and j and lengths_a[i - 1] > 0 and lengths_b[j - 1] > 0:
            cuts.append((i, j))
    return cuts


def align_chunks(lengths_a: Sequence[int], lengths_b: Sequence[int]) -> ChunkAlignment:
    """Cut two token sequences where their cumulative byte counts agree.

    Args:
        lengths_a: bytes per token of side A (0 = a special token, dropped).
        lengths_b: bytes per token of side B.
    Returns:
        The chunk id of every token. Tokens past the last common cut (one side truncated
        earlier) get ``NO_CHUNK``; sides need not cover the same total bytes.
    """
    def token_ends(lengths: Sequence[int]) -> list[int]:
        ends, total = [], 0
        for n in lengths:
            total += n
            ends.append(total)
        return ends

    ends_a, ends_b = token_ends(lengths_a), token_ends(lengths_b)
    # Cuts are byte offsets where a token ends on both sides; zero-byte tokens add none.
    cuts = [ends_a[i - 1] for i, _ in shared_cuts(lengths_a, lengths_b)]
    last_cut = cuts[-1] if cuts else 0

    def assign(lengths: Sequence[int], ends: list[int]) -> list[int]:
        chunks = [NO_CHUNK] * len(lengths)
        k = 0
        for t, (n, e) in enumerate(zip(lengths, ends)):
            if n == 0 or e > last_cut:
                continue
            while cuts[k] < e:
                k += 1
            chunks[t] = k
        return chunks

    chunk_a, chunk_b = assign(lengths_a, ends_a), assign(lengths_b, ends_b)
    chunk = len(cuts)
    return ChunkAlignment(tuple(chunk_a), tuple(chunk_b), chunk)
