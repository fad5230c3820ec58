"""Train only the rows of a draft's vocabulary matrices that its loss can reach.

Boundary: module surgery on a loaded draft, and back; no data, no losses, no I/O.

A draft on Gemma-3's 262k vocabulary holds a 262k x 576 input embedding and as large an
output head (untied: 151M weights each, 0.6 GB in float32). Trained whole, each costs its
gradient and AdamW's two moments besides (1.8 GB), although a step's gradient reaches only:
- the embedding rows of the tokens the draft reads (on fixed text: the tokens of the
  training file, about 10k ids for GSM8K);
- for a reduced head (:mod:`spec_decode.reduced_head`), its K rows (the loss is over the K
  tokens it is served with).
With weight decay 0, AdamW leaves a row whose gradient was always 0 exactly where it was
(both moments stay 0, so its update is 0), and those rows add nothing to the gradient norm
that clipping reads. So training only the reachable rows, as a small parameter of their own,
gives the same draft as training the whole matrices, with the gradient and moments of the
reachable rows only; the full matrices stay in memory, frozen, and get the trained rows back
(:meth:`DraftRows.restore`) before the draft is saved.

:func:`split_rows` decides per matrix and returns the head the loss uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class RowsHead(torch.nn.Module):
    """[..., H] -> [..., K] logits from rows ``index`` [K] of ``source`` [R, H] (a trained
    parameter held elsewhere; the gradient flows into it), plus ``bias[token_ids]`` [K]
    when the head has a bias [V]."""

    def __init__(self, source: torch.nn.Parameter, index: torch.Tensor,
                 token_ids: torch.Tensor, bias: torch.nn.Parameter | None = None):
        super().__init__()
        self._source = [source]  # a list: not registered here, so saved once, where it lives
        self._bias = [bias]
        self.register_buffer("index", index.to(torch.long), persistent=False)
        self.register_buffer("token_ids", token_ids.to(torch.long), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self._source[0].index_select(0, self.index)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = self._bias[0]
        return torch.nn.functional.linear(
            hidden, self.weight, None if bias is None else bias.index_select(0, self.token_ids))


def _slots(row_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    slot = torch.full((vocab,), -1, dtype=torch.long, device=row_ids.device)
    slot[row_ids] = torch.arange(row_ids.numel(), device=row_ids.device)
    return slot


class RowSubsetEmbedding(torch.nn.Module):
    """The input embedding ``base`` (frozen) with rows ``row_ids`` [R] read from the trained
    parameter ``rows`` [R, H] instead; keeps ``base``'s own scaling (Gemma's embed_scale)."""

    def __init__(self, base: torch.nn.Module, row_ids: torch.Tensor, rows: torch.nn.Parameter):
        super().__init__()
        self.base = base
        self.rows = rows
        self.register_buffer("row_ids", row_ids, persistent=False)
        self.register_buffer("slot", _slots(row_ids, base.weight.shape[0]), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        slot = self.slot[input_ids]
        own = torch.nn.functional.embedding(slot.clamp(min=0), self.rows)
        scale = getattr(self.base, "embed_scale", None)
        if scale is not None:
            own = own * scale.to(own.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), own.to(out.dtype), out)


class RowSubsetHead(torch.nn.Module):
    """The output head ``base`` (frozen) with rows ``row_ids`` [R] from ``rows`` [R, H]:
    full-vocabulary logits for the model's own forward (generation), current weights."""

    def __init__(self, base: torch.nn.Module, row_ids: torch.Tensor, rows: torch.nn.Parameter):
        super().__init__()
        self.base = base
        self.rows = rows
        self.register_buffer("row_ids", row_ids, persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # what readers of ``lm_head.weight`` expect
        return self.base.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.base(hidden)
        own = torch.nn.functional.linear(hidden, self.rows)
        bias = getattr(self.base, "bias", None)
        if bias is not None:
            own = own + bias[self.row_ids]
        return out.index_copy(-1, self.row_ids, own.to(out.dtype))


@dataclass
class DraftRows:
    """How a draft's vocabulary matrices train (see :func:`split_rows`).

    ``head`` is what the loss multiplies hidden states by: the draft's own head (full
    vocabulary) or a :class:`RowsHead` of K rows; ``head_ids`` [K] are the reduced head's
    token ids (None: full). ``trained_rows`` says, per matrix, how many rows train."""

    model: torch.nn.Module
    head: torch.nn.Module
    head_ids: torch.Tensor | None
    trained_rows: dict
    embedding: RowSubsetEmbedding | None = None
    output: RowSubsetHead | None = None

    def restore(self) -> None:
        """Write the trained rows into the full matrices and put the draft's own modules
        back (before saving the draft; a no-op when nothing was split off)."""
        with torch.no_grad():
            for part in (self.embedding, self.output):
                if part is not None:
                    part.base.weight[part.row_ids] = part.rows.to(part.base.weight.dtype)
                    part.base.weight.requires_grad_(True)
        if self.embedding is not None:
            self.model.set_input_embeddings(self.embedding.base)
        if self.output is not None:
            self.model.set_output_embeddings(self.output.base)
        self.embedding = self.output = None


def split_rows(model: torch.nn.Module, head_ids: torch.Tensor | None,
               input_ids: torch.Tensor | None, split: bool = True) -> DraftRows:
    """Set up which rows of ``model``'s input embedding and output head train, in place.

    Args:
        model: a loaded causal LM (HF), its parameters trainable.
        head_ids: [K] the reduced head's token ids, or None for a full head (every head row
            is reached through the softmax's normaliser).
        input_ids: every token id the draft will read during training (any order, repeats
            allowed), or None when that is not known in advance (generated text).
        split: split the reached rows off as parameters of their own (exact only with weight
            decay 0, which moves unreached rows too); False trains the whole matrices.
    Returns:
        The :class:`DraftRows`; train ``[p for p in model.parameters() if p.requires_grad]``
        and call ``restore()`` before saving.
    """
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    vocab = embedding.weight.shape[0]
    tied = output is not None and output.weight is embedding.weight
    device = embedding.weight.device
    ids = None if head_ids is None else head_ids.to(device)
    reads = None if input_ids is None else torch.unique(input_ids.to(device).reshape(-1))
    bias = getattr(output, "bias", None)
    full = {"embedding": vocab, "head": vocab if ids is None else int(ids.numel())}

    def subset(rows: torch.Tensor | None) -> bool:
        return split and rows is not None and rows.numel() < vocab

    if tied:
        rows = None if reads is None or ids is None else torch.unique(torch.cat([reads, ids]))
        if not subset(rows):
            head = output if ids is None else RowsHead(output.weight, ids, ids, bias)
            return DraftRows(model, head, ids, {"embedding": vocab, "head": full["head"],
                                                "tied": True})
        param = torch.nn.Parameter(embedding.weight.detach()[rows].clone())
        embedding.weight.requires_grad_(False)
        emb = RowSubsetEmbedding(embedding, rows, param)
        out = RowSubsetHead(output, rows, param)
        model.set_input_embeddings(emb)
        model.set_output_embeddings(out)
        return DraftRows(model, RowsHead(param, emb.slot[ids], ids, bias), ids,
                         {"embedding": int(rows.numel()), "head": int(ids.numel()), "tied": True},
                         emb, out)
    parts = DraftRows(model, output, ids, {"embedding": vocab, "head": full["head"]})
    if subset(reads):
        param = torch.nn.Parameter(embedding.weight.detach()[reads].clone())
        embedding.weight.requires_grad_(False)
        parts.embedding = RowSubsetEmbedding(embedding, reads, param)
        model.set_input_embeddings(parts.embedding)
        parts.trained_rows["embedding"] = int(reads.numel())
    if ids is None:
        return parts
    if subset(ids):
        param = torch.nn.Parameter(output.weight.detach()[ids].clone())
        output.weight.requires_grad_(False)
        parts.output = RowSubsetHead(output, ids, param)
        model.set_output_embeddings(parts.output)
        parts.head = RowsHead(param, torch.arange(ids.numel(), device=device), ids, bias)
    else:
        parts.head = RowsHead(output.weight, ids, ids, bias)
    return parts
