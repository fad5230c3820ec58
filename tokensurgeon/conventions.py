"""Conventions: how a model expects its token stream to be framed, whatever the vocabulary.

Boundary: pure functions over Hugging Face tokenizers and generation configs; no weights,
no files. A model's conventions belong to its *weights* (what it was trained on), not to
whichever tokenizer is saved next to it:

- the tokens prepended (BOS) and appended (EOS) to every encoded text;
- the bos / eos / pad tokens by role;
- the tokens generation stops on (end of text, end of turn);
- the chat template and the special tokens it spells out.

:func:`observe` records them from a tokenizer's *behaviour* (what ``tokenizer(text)``
actually adds) plus a generation config; :func:`stop_tokens_from_gguf` reads the stop set a
GGUF file implies. When a model gets a new vocabulary (transplant), :func:`add_missing`
adds the base's chat and stop tokens the new tokenizer lacks, so that their rows can be
copied exactly, and :func:`adopt` makes the new tokenizer frame text the base's way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokensurgeon.errors import UsageError

# Tokens llama.cpp treats as end-of-generation when a GGUF marks them as control tokens
# (llama-vocab.cpp); a GGUF records only one eos id, HF configs list them all.
END_OF_GENERATION = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<|return|>", "<|call|>",
)
ROLES = ("bos", "eos", "pad")
_PROBE = "Hello world"


@dataclass(frozen=True)
class Conventions:
    """What a model expects around its text, as token strings.

    Attributes:
        prefix: tokens ``tokenizer(text)`` puts before the text (``("<bos>",)`` or ``()``).
        suffix: tokens it puts after the text (usually ``()``).
        bos, eos, pad: the tokenizer's role tokens (None when it has none).
        stops: tokens generation stops on (eos first).
        chat_template: the Jinja chat template, or None.
        chat_tokens: special tokens the chat template spells out, in id order.
    """

    prefix: tuple[str, ...]
    suffix: tuple[str, ...]
    bos: str | None
    eos: str | None
    pad: str | None
    stops: tuple[str, ...]
    chat_template: str | None
    chat_tokens: tuple[str, ...]

    @property
    def add_bos(self) -> bool:
        return bool(self.prefix)

    def to_json(self) -> dict:
        out = asdict(self)
        out["chat_template"] = self.chat_template is not None
        return out


def framing(tokenizer, text: str = _PROBE) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids) that ``tokenizer(text)`` adds around the bare encoding."""
    full = tokenizer(text)["input_ids"]
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    for start in range(len(full) - len(body) + 1):
        if full[start : start + len(body)] == body:
            return full[:start], full[start + len(body) :]
    raise UsageError("the tokenizer's encoding with special tokens does not contain its plain "
                     "encoding; re-save the tokenizer with a standard post-processor")


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _template_text(template) -> str:
    if isinstance(template, dict):
        return "\n".join(str(v) for v in template.values())
    return str(template or "")


def special_tokens(tokenizer) -> dict[int, str]:
    """id -> content of every special token of ``tokenizer`` (added tokens flagged special)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {int(i): str(t) for i, t in decoder.items() if getattr(t, "special", False)}


def observe(tokenizer, generation_config=None) -> Conventions:
    """Record the conventions of a model from its tokenizer's behaviour and generation config."""
    prefix, suffix = framing(tokenizer)
    to_str = tokenizer.convert_ids_to_tokens
    roles = {r: (str(getattr(tokenizer, f"{r}_token")) if getattr(tokenizer, f"{r}_token", None)
                 is not None else None) for r in ROLES}
    stop_ids = _ids(getattr(generation_config, "eos_token_id", None))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
        stop_ids.insert(0, tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    text = _template_text(template)
    chat = tuple(s for _, s in sorted(special_tokens(tokenizer).items()) if text and s in text)
    return Conventions(
        prefix=tuple(to_str(prefix)), suffix=tuple(to_str(suffix)),
        bos=roles["bos"], eos=roles["eos"], pad=roles["pad"],
        stops=tuple(dict.fromkeys(to_str(stop_ids))),
        chat_template=template if template else None, chat_tokens=chat)


def stop_tokens_from_gguf(tokens: list[str], token_types: list[int], eos_id: int | None) -> list[int]:
    """The ids a GGUF model stops on: its eos plus control tokens llama.cpp treats as end of
    generation (``<end_of_turn>``, ``<|im_end|>``, ...). token type 3 is CONTROL."""
    stops = [eos_id] if eos_id is not None else []
    for i, (tok, kind) in enumerate(zip(tokens, token_types)):
        if kind == 3 and tok in END_OF_GENERATION and i not in stops:
            stops.append(i)
    return stops


def _role_of(conv: Conventions, token: str) -> str | None:
    return next((r for r in ROLES if getattr(conv, r) == token), None)


def resolve_token(conv: Conventions, token: str, tokenizer) -> str | None:
    """The token of ``tokenizer`` that plays the base's ``token``: the same string if the
    vocabulary has it, else the token with the same role (bos/eos/pad), else None."""
    if token in tokenizer.get_vocab():
        return token
    role = _role_of(conv, token)
    new = getattr(tokenizer, f"{role}_token", None) if role else None
    return str(new) if new is not None else None


def add_missing(tokenizer, conv: Conventions) -> list[str]:
    """Add to ``tokenizer`` (in place), as special tokens, the base's chat tokens it lacks and
    the base's stop / BOS / EOS tokens it has no counterpart for. Returns the added strings.

    Call this before matching vocabularies: the added tokens then match the base's special
    tokens by string, so a transplant copies their rows exactly.
    """
    vocab = tokenizer.get_vocab()
    # The chat template spells its tokens out, so they must exist literally; a stop or
    # BOS/EOS token may instead be the new tokenizer's token of the same role.
    missing = [t for t in conv.chat_tokens if t not in vocab]
    for t in conv.stops + conv.prefix + conv.suffix:
        if t not in missing and resolve_token(conv, t, tokenizer) is None:
            missing.append(t)
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                     replace_extra_special_tokens=False)
    return missing


def adopt(tokenizer, conv: Conventions) -> dict:
    """Make ``tokenizer`` frame text the way ``conv`` says (in place).

    Sets bos/eos/pad to the tokens playing the base's roles, prepends (appends) the base's
    prefix (suffix) token, installs the base's chat template (removing the tokenizer's own
    when the base had none). Returns ``{"bos_token_id", "eos_token_id" (list of stop ids),
    "pad_token_id"}`` for the model's generation config.
    """
    if len(conv.prefix) > 1 or len(conv.suffix) > 1:
        raise UsageError(f"the base adds {len(conv.prefix)} tokens before and {len(conv.suffix)} "
                         "after each text; only one BOS and one EOS are supported")

    def need(token: str) -> str:
        found = resolve_token(conv, token, tokenizer)
        if found is None:
            raise UsageError(f"the new tokenizer has no token playing the base's {token!r}; "
                             "add it first with conventions.add_missing")
        return found

    if conv.prefix:
        tokenizer.bos_token = need(conv.prefix[0])
    elif conv.bos is not None and resolve_token(conv, conv.bos, tokenizer) is not None:
        tokenizer.bos_token = resolve_token(conv, conv.bos, tokenizer)
    if conv.eos is not None:
        tokenizer.eos_token = need(conv.eos)
    if conv.suffix:
        tokenizer.eos_token = need(conv.suffix[0])
    if conv.pad is not None and resolve_token(conv, conv.pad, tokenizer) is not None:
        tokenizer.pad_token = resolve_token(conv, conv.pad, tokenizer)
    # The setters rebuild the post-processor from bos_token / eos_token.
    tokenizer.add_bos_token = conv.add_bos
    tokenizer.add_eos_token = bool(conv.suffix)
    tokenizer.chat_template = conv.chat_template
    prefix, suffix = framing(tokenizer)
    if len(prefix) != len(conv.prefix) or len(suffix) != len(conv.suffix):
        raise UsageError(f"{type(tokenizer).__name__} cannot be made to add "
                         f"{list(conv.prefix)} / {list(conv.suffix)}; use a fast tokenizer")
    vocab = tokenizer.get_vocab()
    stops = [vocab[need(t)] for t in conv.stops]
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": list(dict.fromkeys(stops)),
            "pad_token_id": tokenizer.pad_token_id}


def copied_stop_ids(conv: Conventions, base_tokenizer, copied: dict[int, int]) -> list[int]:
    """New ids whose rows are copies of a base stop token's row (``copied``: new id -> base
    id). A tied head gives such twins the same logit as the stop token, so greedy decoding may
    pick either: both must stop generation."""
    base_stops = set(base_tokenizer.convert_tokens_to_ids(list(conv.stops)))
    return sorted(new for new, base in copied.items() if base in base_stops)
