"""Build ALM loss inputs from tiny models and real (in-memory) tokenizers."""

from __future__ import annotations

import torch

from distill.data import build_examples, collate
from distill.losses import LossInputs, LossSettings, Side
from distill.trainer import boundary_ids
from tokensurgeon.logits import decoder_and_head
from tokensurgeon.token_identity import vocabulary

TEXTS = [
    "The quick brown fox jumps over the lazy dog. 🚀 東京",
    "How many clips did Natalia sell altogether in April and May? 48 + 24 = 72",
    "To be, or not to be, that is the question.\n\tWhether 'tis nobler",
]


def side(model, tokenizer, batch, name, grad: bool) -> Side:
    tensors = collate(batch, name, tokenizer.pad_token_id)
    decoder, head, softcap = decoder_and_head(model)
    with torch.set_grad_enabled(grad):
        hidden = decoder(input_ids=tensors["ids"], attention_mask=tensors["mask"]).last_hidden_state
    return Side(tensors["ids"], tensors["mask"], tensors["chunk_ids"], hidden, head,
                boundary_ids(vocabulary(tokenizer).token_bytes), softcap)


def loss_inputs(teacher, t_tok, student, s_tok, texts=TEXTS, max_length=64,
                teacher_grad: bool = False, **settings) -> LossInputs:
    examples = build_examples(texts, t_tok, s_tok, vocabulary(t_tok).token_bytes,
                              vocabulary(s_tok).token_bytes, max_length, pack="none")
    return LossInputs(
        student=side(student, s_tok, examples, "student", grad=True),
        teacher=side(teacher, t_tok, examples, "teacher", grad=teacher_grad),
        num_chunks=max(e.num_chunks for e in examples),
        settings=LossSettings(**{"logit_chunk": 7, **settings}),
    )
