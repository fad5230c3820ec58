"""Token identity: a canonical byte string for every token of any tokenizer.

Boundary: pure functions over a Hugging Face tokenizer's vocabulary; no models, no files.
Two tokenizers share a token when their canonical keys are equal:

- ordinary tokens are keyed by the exact bytes they stand for in text, whatever the
  tokenizer's surface alphabet (byte-level BPE's ``Ġ``/``Ċ`` byte-to-unicode map,
  SentencePiece's ``▁`` word marker and ``<0xNN>`` byte fallback, or plain strings);
- special tokens stand for no text. They are keyed by role (``bos``, ``eos``, ``pad``,
  ``unk``) when they have one, and otherwise by their string.

ALM alignment (``distill``) reuses :func:`token_bytes`: special tokens map to ``None`` there
and are dropped, because they cover no bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

TokenizerKind = Literal["byte_level", "sentencepiece", "plain"]
SPECIAL_ROLES = ("bos", "eos", "pad", "unk")
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPM_SPACE = "\u2581"  # "▁"


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: printable stand-in character -> the byte it encodes.

    Bytes that are printable Latin-1 characters stand for themselves; the remaining 68
    bytes (controls, space, a few Latin-1 gaps) are shifted to code points 256, 257, ...
    in byte order. This is the map GPT-2 introduced and every byte-level BPE reuses.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[str, int] = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


def _backend_json(tokenizer) -> dict:
    """The tokenizer's pipeline components as JSON, without serialising the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {}
    spec: dict = {}
    for name in ("normalizer", "pre_tokenizer", "decoder"):
        component = getattr(backend, name, None)
        if component is not None:
            spec[name] = json.loads(component.__getstate__())
    spec["model"] = {"byte_fallback": bool(getattr(backend.model, "byte_fallback", False))}
    return spec


def _components(node: dict | None) -> list[dict]:
    """Flatten a tokenizers component (possibly a Sequence) into a list of dicts."""
    if not node:
        return []
    for key in ("pretokenizers", "decoders", "normalizers", "processors"):
        if key in node:
            out: list[dict] = []
            for child in node[key]:
                out.extend(_components(child))
            return out
    return [node]


def tokenizer_kind(tokenizer) -> TokenizerKind:
    """Classify how a tokenizer's token strings spell bytes.

    Returns ``byte_level`` (GPT-2 style alphabet), ``sentencepiece`` (``▁`` marks a space,
    ``<0xNN>`` is a raw byte) or ``plain`` (token strings are the UTF-8 text itself).
    """
    spec = _backend_json(tokenizer)
    parts = _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return "byte_level"
    model = spec.get("model", {})
    normalizers = _components(spec.get("normalizer"))
    if (
        "Metaspace" in types
        or "ByteFallback" in types
        or model.get("byte_fallback")
        or any(n.get("type") == "Replace" and SPM_SPACE in json.dumps(n) for n in normalizers)
    ):
        return "sentencepiece"
    if spec:
        return "plain"
    # Slow (Python) tokenizers: SentencePiece ones expose an sp_model.
    if hasattr(tokenizer, "sp_model"):
        return "sentencepiece"
    return "plain"


def decode_token_string(token: str, kind: TokenizerKind) -> bytes | None:
    """The bytes a vocabulary string stands for, or None if it is not spelled validly."""
    if kind == "byte_level":
        alphabet = byte_level_alphabet()
        try:
            return bytes(alphabet[ch] for ch in token)
        except KeyError:
            return None
    if kind == "sentencepiece":
        m = _BYTE_FALLBACK.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace(SPM_SPACE, " ").encode("utf-8")
    return token.encode("utf-8")


@dataclass(frozen=True)
class Vocabulary:
    """Canonical identity of every id of one tokenizer.

    Attributes:
        size: number of ids (``len(tokenizer)``, including added tokens).
        kind: how ordinary token strings spell bytes.
        token_bytes: per id, the bytes of text the token stands for; ``None`` for special
            tokens and for ids with no token.
        special_keys: per special id, its identity keys (``"role:bos"``, ``"str:<s>"``...).
        byte_fallback_ids: ids of SentencePiece ``<0xNN>`` byte tokens.
    """

    size: int
    kind: TokenizerKind
    token_bytes: tuple[bytes | None, ...]
    special_keys: dict[int, tuple[str, ...]]
    byte_fallback_ids: frozenset[int] = frozenset()

    def byte_index(self) -> dict[bytes, int]:
        """bytes -> id. When several ids spell the same bytes (``▁`` and ``<0x20>``), prefer
        the ordinary piece over the byte-fallback token, then the lowest id."""
        index: dict[bytes, int] = {}
        for i, b in enumerate(self.token_bytes):
            if b is None:
                continue
            if b not in index or (
                index[b] in self.byte_fallback_ids and i not in self.byte_fallback_ids
            ):
                index[b] = i
        return index


def _special_ids(tokenizer) -> dict[int, str]:
    """id -> content for every special token (added tokens flagged special + role tokens)."""
    specials: dict[int, str] = {}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for i, added in decoder.items():
        if getattr(added, "special", False):
            specials[int(i)] = str(added)
    for role in SPECIAL_ROLES:
        tid = getattr(tokenizer, f"{role}_token_id", None)
        tok = getattr(tokenizer, f"{role}_token", None)
        if tid is not None and tok is not None:
            specials[int(tid)] = str(tok)
    return specials


def vocabulary(tokenizer) -> Vocabulary:
    """Compute the canonical identity of every token id of ``tokenizer``."""
    kind = tokenizer_kind(tokenizer)
    size = len(tokenizer)
    vocab = tokenizer.get_vocab()
    strings: list[str | None] = [None] * size
    for tok, i in vocab.items():
        if 0 <= i < size:
            strings[i] = tok
    specials = _special_ids(tokenizer)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    roles: dict[int, list[str]] = {}
    for role in SPECIAL_ROLES:
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None and int(tid) in specials:
            roles.setdefault(int(tid), []).append(f"role:{role}")

    token_bytes: list[bytes | None] = []
    special_keys: dict[int, tuple[str, ...]] = {}
    fallback: set[int] = set()
    for i, s in enumerate(strings):
        if i in specials:
            special_keys[i] = tuple(roles.get(i, [])) + (f"str:{specials[i]}",)
            token_bytes.append(None)
        elif s is None:
            token_bytes.append(None)
        elif i in decoder:
            # A non-special added token is matched literally against the text.
            token_bytes.append(str(decoder[i]).encode("utf-8"))
        else:
            if kind == "sentencepiece" and _BYTE_FALLBACK.match(s):
                fallback.add(i)
            token_bytes.append(decode_token_string(s, kind))
    return Vocabulary(size, kind, tuple(token_bytes), special_keys, frozenset(fallback))


def shared_token_map(base: Vocabulary, donor: Vocabulary) -> dict[int, int]:
    """donor id -> base id for every donor token that BASE also has.

    Ordinary tokens match when their bytes are equal. Special tokens match by role first
    (donor's bos is base's bos, whatever their strings), then by identical string.
    """
    mapping: dict[int, int] = {}
    base_bytes = base.byte_index()
    for i, b in enumerate(donor.token_bytes):
        if b is not None and b in base_bytes:
            mapping[i] = base_bytes[b]
    base_special: dict[str, int] = {}
    for i, keys in sorted(base.special_keys.items()):
        for key in keys:
            base_special.setdefault(key, i)
    for i, keys in donor.special_keys.items():
        for key in keys:
            if key in base_special:
                mapping[i] = base_special[key]
                break
    return mapping


def encode_bytes_greedy(data: bytes, index: dict[bytes, int], max_len: int) -> list[int] | None:
    """Segment ``data`` into vocabulary pieces by greedy longest match.

    Args:
        data: the bytes to cover.
        index: bytes -> id (see :meth:`Vocabulary.byte_index`).
        max_len: the longest piece length in ``index``.
    Returns:
        ids whose bytes concatenate to ``data``, or None if some byte has no piece.
    """
    ids: list[int] = []
    pos = 0
    while pos < len(data):
        for length in range(min(max_len, len(data) - pos), 0, -1):
            tid = index.get(data[pos : pos + length])
            if tid is not None:
                ids.append(tid)
                pos += length
                break
        else:
            return None
    return ids


def vocabulary_mismatch(target_vocab: dict[str, int], target_rows: int,
                        draft_vocab: dict[str, int], draft_rows: int) -> str | None:
    """Why two models cannot share one token stream (speculative decoding needs the exact
    same token -> id map and embedding rows), or None when they can."""
    if target_vocab == draft_vocab and target_rows == draft_rows:
        return None
    differ = len(set(target_vocab.items()) ^ set(draft_vocab.items()))
    return (f"{len(draft_vocab)} vs {len(target_vocab)} tokens, {differ} entries differ, "
            f"{draft_rows} vs {target_rows} rows")
