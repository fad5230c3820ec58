"""Documents for distillation: plain text, prompt/completion pairs and conversations, and
how each side renders them into pieces of text that are or are not trained.

Boundary: rows in, pieces of text out; no token ids, no models. A conversation is rendered
by each tokenizer's own chat template (or a template file given for it), so the teacher
sees Gemma's ``<start_of_turn>user`` where the student sees SmolLM2's ``<|im_start|>user``;
the same message contents sit between different template text on each side.

How the template text is found: the template renders the conversation once with each
message's content replaced by a unique placeholder; the text between placeholders is
template text, and the placeholders are the contents. Rendering the real conversation must
give exactly the placeholder rendering with the contents put back, otherwise the template
rewrites contents and the row is refused (one line naming the row and the side).

Which pieces are trained: every assistant message of a ``messages`` row; the completion of
a ``prompt``/``completion`` row (its assistant messages when it is conversational). Template
text and all other contents are context only: they are read by the models but never scored
and never aligned.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tokensurgeon.errors import UsageError

ROLES = ("system", "user", "assistant", "tool")
TRAINED_ROLE = "assistant"
# Private-use code points: no real text and no template uses them.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    trained: bool


@dataclass(frozen=True)
class Piece:
    """A stretch of one side's rendered text. ``template``: written by the chat template
    (read as context, never aligned); ``trained``: content the losses score."""

    text: str
    trained: bool
    template: bool = False


@dataclass(frozen=True)
class Document:
    """One row. ``pieces``: the text with its trained parts when no chat template applies
    (plain text, a plain prompt/completion); ``messages``: a conversation, rendered per side
    by :func:`render`. ``where`` names the row in errors (``file.jsonl:12``)."""

    where: str
    pieces: tuple[Piece, ...] = ()
    messages: tuple[Message, ...] = ()

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)

    @property
    def masked(self) -> bool:
        """Some text is context only (so documents are packed whole, never cut)."""
        return self.is_chat or any(not p.trained for p in self.pieces)

    def trained_text(self) -> str:
        """The text the losses score, in order (the same on both sides)."""
        if self.is_chat:
            return "".join(m.content for m in self.messages if m.trained)
        return "".join(p.text for p in self.pieces if p.trained)


def text_document(text: str, where: str) -> Document:
    return Document(where, pieces=(Piece(text, trained=True),))


def _messages(value: object, where: str, trained: bool | None) -> list[Message]:
    """Messages of a list; ``trained`` None: assistant messages are trained."""
    if not isinstance(value, list):
        raise UsageError(f"{where}: messages must be a list of {{role, content}} objects")
    out = []
    for n, m in enumerate(value):
        if not isinstance(m, dict):
            raise UsageError(f"{where}: message {n} is not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UsageError(f"{where}: message {n} has unknown role {role!r}; use one of "
                             f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UsageError(f"{where}: message {n} ({role}) has no text content (a string); "
                             "multimodal parts are not supported")
        is_trained = role == TRAINED_ROLE if trained is None else trained and role == TRAINED_ROLE
        # Stripped as most templates do (Gemma's trims), so every side renders the same bytes.
        out.append(Message(role, content.strip(), is_trained))
    return out


def conversation(messages: list[Message], where: str) -> Document:
    if not messages:
        raise UsageError(f"{where} has an empty conversation; drop the row")
    if not any(m.trained and m.content for m in messages):
        raise UsageError(f"{where} has no assistant message with text to train on; drop the "
                         "row or add the assistant's answer")
    return Document(where, messages=tuple(messages))


def flatten(doc: Document) -> Document:
    """The conversation as ``role: content`` lines, every byte trained (no template)."""
    if not doc.is_chat:
        return text_document("".join(p.text for p in doc.pieces), doc.where)
    return text_document("\n".join(f"{m.role}: {m.content}" for m in doc.messages), doc.where)


def row_messages(row: dict, where: str) -> Document:
    """A ``messages`` row: every assistant message is trained."""
    return conversation(_messages(row["messages"], where, None), where)


def row_prompt_completion(row: dict, where: str) -> Document:
    """TRL's ``prompt``/``completion`` row: two strings (no template; the completion is
    trained) or two message lists (rendered as one conversation; the completion's assistant
    messages are trained)."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise UsageError(f"{where} has an empty completion; drop the row")
        return Document(where, pieces=(Piece(prompt, trained=False),
                                       Piece(completion, trained=True)))
    if isinstance(prompt, list) and isinstance(completion, list):
        return conversation(_messages(prompt, where, False) + _messages(completion, where, True),
                            where)
    raise UsageError(f"{where}: prompt and completion must both be strings or both be lists "
                     "of messages")


def _placeholder(n: int) -> str:
    return f"{_OPEN}{n}{_CLOSE}"


def _apply(tokenizer, template: str | None, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)


def render(doc: Document, tokenizer, template: str | None, side: str) -> list[Piece]:
    """The pieces of ``doc`` as ``tokenizer`` renders it with its chat template (or
    ``template``, jinja text that replaces it); plain documents are their own pieces.

    Raises:
        UsageError: the template refuses the conversation (e.g. no system role), drops or
            repeats a message, or rewrites a message's content.
    """
    if not doc.is_chat:
        return list(doc.pieces)
    if any(_OPEN in m.content or _CLOSE in m.content for m in doc.messages):
        raise UsageError(f"{doc.where} holds the private-use characters U+E000/U+E001; "
                         "remove them")
    from jinja2 import TemplateError

    try:
        marked = _apply(tokenizer, template,
                        [{"role": m.role, "content": _placeholder(n)}
                         for n, m in enumerate(doc.messages)])
        real = _apply(tokenizer, template, [{"role": m.role, "content": m.content}
                                            for m in doc.messages])
    # raise_exception() in a template raises TemplateError ("System role not supported").
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise UsageError(f"the {side}'s chat template refuses {doc.where} "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                         "fix the row or pass a --" + side + "-chat-template file") from None
    pieces: list[Piece] = []
    at, expected = 0, 0
    for match in _PLACEHOLDER.finditer(marked):
        n = int(match.group(1))
        if n != expected:
            break
        if match.start() > at:
            pieces.append(Piece(marked[at:match.start()], trained=False, template=True))
        message = doc.messages[n]
        if message.content:
            pieces.append(Piece(message.content, trained=message.trained))
        at, expected = match.end(), expected + 1
    if expected != len(doc.messages):
        role = doc.messages[min(expected, len(doc.messages) - 1)].role
        raise UsageError(f"the {side}'s chat template drops, repeats or reorders message "
                         f"{expected} ({role}) of {doc.where}; fix the row or pass a --"
                         f"{side}-chat-template file")
    if at < len(marked):
        pieces.append(Piece(marked[at:], trained=False, template=True))
    if "".join(p.text for p in pieces) != real:
        raise UsageError(f"the {side}'s chat template rewrites a message of {doc.where} "
                         f"(its rendering depends on the content); pass a --{side}-chat-template "
                         "file that inserts contents verbatim")
    return pieces


def chat_template(tokenizer, override: str | None, side: str) -> str | None:
    """The template text for ``side``: the file ``override`` when given, else the
    tokenizer's own.

    Raises:
        UsageError: neither exists (names the option that supplies one).
    """
    if override:
        from pathlib import Path

        path = Path(override).expanduser()
        if not path.is_file():
            raise UsageError(f"--{side}-chat-template {override} does not exist; pass a jinja "
                             "template file")
        return path.read_text(encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"the {side} tokenizer has no chat template, and the data holds "
                         f"conversations; pass --{side}-chat-template FILE (a jinja template) "
                         "or --chat flat")
    return None


def needs_templates(docs: Sequence[Document]) -> bool:
    return any(d.is_chat for d in docs)
