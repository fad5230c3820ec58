"""Hypothesis strategies for fuzzing text parsers: any Unicode, weighted towards the cases
tokenizers get wrong (emoji ZWJ sequences, CJK, combining marks, control characters,
whitespace runs, byte-order marks)."""

from __future__ import annotations

from hypothesis import strategies as st

HARD_PIECES = [
    "👩\u200d👩\u200d👧", "🙂", "🏳️\u200d🌈", "🇯🇵",      # emoji, ZWJ sequences, flags
    "東京", "你好", "한국어", "ｶﾀｶﾅ",                        # CJK, Hangul, half-width
    "e\u0301", "a\u0308\u0323", "\u0915\u094d\u0937",   # combining marks, Devanagari conjunct
    "\x00", "\x07", "\x1b[0m", "\r\n", "\t", "\x7f", "\x85",  # control characters
    "  ", "\n\n", " \u00a0 ", "\u3000", "\u2028",        # whitespace runs, NBSP, separators
    "\ufeff", "\u200b", "\U0010fffd", "\U0001d11e",      # BOM, zero-width, astral planes
    "the", " the", "Hello,", " 42", "...",
]

# Every code point except surrogates (they are not text: no UTF-8 bytes exist for them).
ANY_CHAR = st.characters(blacklist_categories=("Cs",))


def unicode_text(exclude: str = "", max_pieces: int = 30) -> st.SearchStrategy[str]:
    """Random text mixing single arbitrary characters and the hard pieces above."""
    char = ANY_CHAR.filter(lambda c: c not in exclude) if exclude else ANY_CHAR
    pieces = [p for p in HARD_PIECES if not any(c in p for c in exclude)]
    return st.lists(st.one_of(char, st.sampled_from(pieces)), min_size=1,
                    max_size=max_pieces).map("".join)
