"""Held-out bits per byte of the student during training (``--eval-data``).

Boundary: documents in, one figure out; no optimisation. Plain text is scored by the tool's
own yardstick, :func:`tokensurgeon.evaluate.bits_per_byte`, with the client's BOS
convention (what ``tokenizer(text)`` adds), exactly as ``tokensurgeon eval`` scores it.
Conversations and prompt/completion rows are rendered as in training (the student's chat
template) and only their trained text is scored: the NLL of the trained tokens over the
trained bytes, the same ratio over the same pieces (final hidden states, chunked head).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from distill.chat import Document
from distill.data import encode_pieces
from tokensurgeon import evaluate
from tokensurgeon.token_identity import vocabulary


def _eval_default(name: str):
    """A default of ``tokensurgeon eval`` (its config is their only home)."""
    return next(f.default for f in fields(evaluate.EvalConfig) if f.name == name)


@dataclass
class HeldOut:
    """The student's held-out set, encoded once: plain segments and masked sequences
    (``(ids, trained flags)``) with their trained byte count."""

    segments: list[str]
    sequences: list[tuple[list[int], list[int]]]
    masked_bytes: int


def prepare(docs: Sequence[Document], tokenizer, template: str | None,
            max_length: int) -> HeldOut:
    """Split ``docs`` into plain segments (cut like ``tokensurgeon eval`` cuts a file) and
    rendered, masked sequences (truncated to ``max_length`` tokens)."""
    plain = [d.trained_text() for d in docs if not d.masked]
    segments = evaluate.segment_text(plain, _eval_default("segment_chars"), 0) if plain else []
    masked = [d for d in docs if d.masked]
    sequences, masked_bytes = [], 0
    if masked:
        token_bytes = vocabulary(tokenizer).token_bytes
        for ids, lengths, trained in encode_pieces(masked, tokenizer, token_bytes, template,
                                                   "student"):
            ids, lengths, trained = ids[:max_length], lengths[:max_length], trained[:max_length]
            # Text bytes of scored tokens only (a token at position 0 has no prefix: not
            # scored; a SentencePiece dummy-prefix space is not text).
            masked_bytes += sum(n for t, (n, f) in enumerate(zip(lengths, trained))
                                if f and t > 0)
            sequences.append((ids, trained))
    return HeldOut(segments, sequences, masked_bytes)


def masked_nll(model, sequences: Sequence[tuple[list[int], list[int]]], pad_id: int,
               batch_size: int, logit_chunk: int) -> float:
    """Total NLL (nats) of the flagged tokens of ``sequences`` (each token predicted from
    its prefix)."""
    device = next(model.parameters()).device
    _, head, softcap = evaluate.decoder_and_head(model)
    total = 0.0
    with torch.no_grad():  # (not inference_mode: see evaluate.bits_per_byte)
        for s in range(0, len(sequences), batch_size):
            batch = sequences[s: s + batch_size]
            ids, mask, scored = evaluate.pad_batch(batch, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            hidden = evaluate.model_hidden_states(model, ids, mask)
            logp = evaluate.chunked_token_logprobs(hidden[:, :-1], head, ids[:, 1:],
                                                   logit_chunk, softcap)
            total -= float(logp[scored[:, 1:].to(device)].double().sum())
    return total


def bits_per_byte(model, tokenizer, held: HeldOut, logit_chunk: int) -> dict:
    """Held-out bits per byte over both kinds of documents, and its parts."""
    batch_size = _eval_default("batch_size")
    nll, num_bytes, out = 0.0, 0, {}
    if held.segments:
        plain = evaluate.bits_per_byte(model, tokenizer, held.segments, batch_size,
                                       logit_chunk, bos="auto")
        nll, num_bytes = nll + plain["nll_nats"], num_bytes + plain["bytes"]
        out["eval_bpb_plain"] = plain["bits_per_byte"]
    if held.sequences:
        pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
                   if t is not None)
        masked = masked_nll(model, held.sequences, pad, batch_size, logit_chunk)
        nll, num_bytes = nll + masked, num_bytes + held.masked_bytes
        out["eval_bpb_trained_text"] = masked / math.log(2) / max(held.masked_bytes, 1)
    out["eval_bpb"] = nll / math.log(2) / max(num_bytes, 1)
    return out
