"""Prompts and training text for ``spec train`` and ``spec bench``.

Boundary: files in, token ids out. A prompt file is ``.jsonl`` (GSM8K-style rows; the
prompt comes from ``question``, ``prompt`` or ``text``, an optional reference continuation
from ``answer``, ``completion`` or ``response``) or ``.txt`` (one prompt per line).
Prompts go through the tokenizer's chat template when it has one and ``chat`` is on, so the
draft is trained and benchmarked on what a served model actually sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokensurgeon import validate
from tokensurgeon.errors import UsageError

PROMPT_KEYS = ("question", "prompt", "text")
ANSWER_KEYS = ("answer", "completion", "response")
# tokens per continuation, generated or fixed: spec make-data's and spec train's default
# (128 keeps most GSM8K answers whole)
MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class Example:
    prompt: str
    reference: str | None  # a fixed continuation, when the file holds one
    # whether the text ends where the reference ends (so EOS follows it); False for rows
    # ``spec make-data`` cut at its --max-new-tokens (its ``"stopped": false``)
    ends: bool = True


def read_examples(path: str | Path, limit: int = 0, offset: int = 0) -> list[Example]:
    """Examples ``offset .. offset+limit`` of a .jsonl or .txt file (limit 0 = all)."""
    p = validate.check_input_file(path, "pass a .jsonl file with a question/prompt field or a "
                                        ".txt file with one prompt per line")
    examples: list[Example] = []
    for n, line in enumerate(validate.read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = validate.check_unicode(json.loads(line), f"{path}:{n}")
            except json.JSONDecodeError:
                raise UsageError(f"{path}:{n} is not valid JSON; fix the line") from None
            prompt = next((row[k] for k in PROMPT_KEYS if isinstance(row, dict) and k in row), None)
            if not isinstance(prompt, str):
                raise UsageError(f"{path}:{n} has no string field among {list(PROMPT_KEYS)}; "
                                 "add one or pass a .txt file")
            ref = next((row[k] for k in ANSWER_KEYS if k in row), None)
            examples.append(Example(prompt, ref if isinstance(ref, str) else None,
                                    row.get("stopped") is not False))
        else:
            examples.append(Example(line.replace("\\n", "\n"), None))
    examples = examples[offset:]
    if limit:
        examples = examples[:limit]
    if not examples:
        where = f" after its first {offset} rows" if offset else ""
        raise UsageError(f"{path} holds no prompts{where}; pass a file with at least one prompt")
    return examples


def chat_option() -> Any:
    """The ``--chat/--no-chat`` field of every command that encodes prompts (one default)."""
    return field(default=True, metadata={
        "help": "wrap prompts in the target tokenizer's chat template when it has one"})


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of one prompt, through the chat template when ``chat`` and one exists."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)
