"""``tokensurgeon transplant``: give BASE the tokenizer of DONOR, without training.

Boundary: orchestration only. It loads BASE (whole model) and DONOR (tokenizer and
embedding matrices), matches tokens by canonical bytes (:mod:`token_identity`), copies
shared rows exactly, fills the rest with a registered method (:mod:`methods`), and saves
BASE speaking DONOR's tokenizer as a Hugging Face directory with a ``transplant.json``
manifest and ``transplant/anchors.safetensors`` (per-token anchors and coefficients).
It names no method and no method option: each method's options are flags of
:class:`TransplantConfig` through :func:`config.member_options`, reach the method as its
own options dataclass, and answer the orchestrator's questions through its hooks
(:class:`methods.MethodOptions`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokensurgeon import conventions, diagnostics, modelio, progress, streaming, validate
from tokensurgeon.calibration import CALIBRATION_TEXT
from tokensurgeon.config import config_to_dict, member_options, write_resolved_config
from tokensurgeon.errors import UsageError
from tokensurgeon.logits import decoder_and_head, final_hidden_states
from tokensurgeon.methods import (
    ANCHOR_MEAN,
    DEFAULT_METHOD,
    METHODS,
    MethodResult,
    TransplantProblem,
    method_names,
    options_for,
    shrink_rows,
)
from tokensurgeon.token_identity import Vocabulary, shared_token_map, vocabulary

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@member_options(METHODS, after="method")
@dataclass
class TransplantConfig:
    """Give BASE the tokenizer of DONOR. Shared tokens are copied exactly; the others are
    approximated from DONOR's embeddings by the chosen --method. OUT is a Hugging Face model
    directory that transformers and vLLM load unchanged."""

    base: str = field(default="builtin:gemma3-270m", metadata={
        "positional": True,
        "help": "model whose weights are kept: HF directory, .gguf file or builtin:NAME"})
    donor: str = field(default="builtin:smollm2-135m", metadata={
        "positional": True,
        "help": "model that supplies the new tokenizer and the embeddings the method fits in"})
    out: str = field(default="out/transplant", metadata={
        "positional": True, "help": "output directory (written atomically)"})
    method: str = field(default=DEFAULT_METHOD, metadata={
        "choices": method_names, "help": "how tokens BASE lacks get their embeddings"})
    calibration_text: str | None = field(default=None, metadata={
        "help": "training text (a .txt file) on which output-row weights are scored when the "
                "method leaves them to the run (its option says when); default a "
                "built-in ~3.2 kB text (GSM8K train answers and prose written for it). Never "
                "pass text you will evaluate on"})
    leak_check: bool = field(default=True, metadata={
        "help": "after writing, reload OUT and report in transplant.json the leak mass (the "
                "probability new tokens take where the gold token is a shared one) on a "
                "small built-in text; skipped, with a note, when OUT's weights would take more "
                "than LEAK_CHECK_MAX_BYTES in float32, so a large model's memory stays bounded"})
    untie: bool | None = field(default=None, metadata={
        "help": "when BASE ties its lm_head to its input embeddings, write a separate lm_head "
                "so input and output rows of new tokens can differ (loads the whole model; "
                "an error if the architecture cannot be untied). Unset: untie when the method "
                "makes output rows that differ from its input rows (see its options) and the "
                "architecture allows it"})
    batch_size: int = field(default=1024, metadata={"help": "new tokens per method batch"})
    holdout: int = field(default=512, metadata={
        "help": "shared tokens held out and re-predicted to report reconstruction error "
                "in transplant.json (0 skips it)"})
    device: str = field(default="auto", metadata={
        "help": "where the math runs: auto (cuda if available), cpu, cuda, cuda:N"})
    threads: int = field(default=0, metadata={"help": "CPU threads; 0 uses every core"})
    dtype: str = field(default="auto", metadata={
        "choices": ["auto", *DTYPES],
        "help": "dtype of the saved weights; auto keeps BASE's config dtype"})
    seed: int = field(default=0, metadata={"help": "seed for choosing held-out anchors"})
    overwrite: bool = field(default=False, metadata={"help": "replace OUT if it exists"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow custom model code from BASE/DONOR directories (off: safer)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
    conventions: str = field(default="base", metadata={
        "choices": ["base", "donor"],
        "help": "whose BOS / stop / chat-template conventions OUT follows: base (the weights'; "
                "missing chat and stop tokens are added with BASE's rows) or donor (DONOR's "
                "tokenizer unchanged, e.g. for a draft that must share DONOR's vocabulary)"})
    stream: bool = field(default=True, metadata={
        "help": "read only BASE's embeddings and copy its other tensors file to file, so memory "
                "is bounded by the embeddings (safetensors or GGUF BASE); --no-stream loads "
                "the whole model"})
    max_shard_size: str = field(default="50GB", metadata={
        "help": "largest weights file written when streaming, as in transformers' save_pretrained"})

    def validate(self) -> None:
        if self.method in METHODS:
            options_for(self.method, self).validate()
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.holdout < 0:
            raise UsageError(f"--holdout must be >= 0 (got {self.holdout})")


def check_supported(model, label: str) -> tuple[torch.nn.Embedding, torch.nn.Linear | None, bool]:
    """Return (input embeddings, output embeddings or None, tied) or explain what is unsupported."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(emb, torch.nn.Embedding):
        raise UsageError(f"{label}: input embeddings are {type(emb).__name__}, not an embedding "
                         "table; tokensurgeon cannot transplant this architecture")
    if head is not None and not isinstance(head, torch.nn.Linear):
        raise UsageError(f"{label}: the output layer is {type(head).__name__}, not a linear "
                         "lm_head; tokensurgeon cannot save this architecture")
    if head is not None and head.bias is not None:
        raise UsageError(f"{label}: the lm_head has a bias, which tokensurgeon cannot carry "
                         "over to a new vocabulary; this architecture is not supported")
    tied = head is None or head.weight is emb.weight
    return emb, (None if tied else head), tied


def check_untie(config, label: str) -> None:
    """--untie needs a config switch for tied embeddings (``tie_word_embeddings``)."""
    text = getattr(config, "text_config", None) or config
    if not hasattr(text, "tie_word_embeddings") and not hasattr(config, "tie_word_embeddings"):
        raise UsageError(f"{label}: its config has no tie_word_embeddings switch, so its lm_head "
                         "cannot be untied; drop --untie")


def _wants_untie(cfg: TransplantConfig, config, label: str,
                 output_shrink: float | None = None) -> bool:
    """--untie: yes (checked), --no-untie: no; unset: when the method's output rows differ
    (``output_shrink``: the factor chosen on text, else the method's own answer)."""
    if cfg.untie:
        check_untie(config, label)
        return True
    if cfg.untie is False:
        return False
    differs = options_for(cfg.method, cfg).output_rows_differ(output_shrink)
    text = getattr(config, "text_config", None) or config
    return differs and bool(getattr(text, "tie_word_embeddings", getattr(
        config, "tie_word_embeddings", False)))


def untie_model(model) -> None:
    """Give a tied model its own lm_head (a copy for now; filled by the caller)."""
    head = model.get_output_embeddings()
    if head is None:
        raise UsageError("BASE has no separate lm_head module to untie; drop --untie")
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).any(dim=-1).nonzero().flatten()[:5].tolist()
        raise UsageError(f"{name} contains NaN or Inf (rows {bad}...); repair or re-export "
                         "that model before transplanting")


def _select_holdout(anchor_donor_ids: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = min(n, max(0, anchor_donor_ids.numel() - 1))
    return torch.randperm(anchor_donor_ids.numel(), generator=gen)[:n]


@dataclass
class MatrixPlan:
    """Which donor ids are copied, approximated from DONOR rows, or have no DONOR row."""

    copy_donor: torch.Tensor  # donor ids copied from BASE
    copy_base: torch.Tensor  # the BASE ids they copy
    anchor_donor: torch.Tensor  # ordinary shared tokens usable as anchors
    anchor_base: torch.Tensor
    new_ids: torch.Tensor  # donor ids to approximate (have a DONOR row)
    orphan_ids: torch.Tensor  # ids beyond DONOR's matrix: get the anchor mean


def plan_vocabulary(base: Vocabulary, donor: Vocabulary, base_rows: int, donor_rows: int,
                    new_size: int) -> MatrixPlan:
    mapping = {d: b for d, b in shared_token_map(base, donor).items() if b < base_rows}
    if not mapping:
        raise UsageError("BASE and DONOR share no tokens (no equal byte strings), so there are "
                         "no anchors; pick a DONOR whose tokenizer overlaps BASE's")
    copy_donor = torch.tensor(sorted(mapping), dtype=torch.long)
    copy_base = torch.tensor([mapping[d] for d in copy_donor.tolist()], dtype=torch.long)
    ordinary = [d for d in copy_donor.tolist() if donor.token_bytes[d] is not None and d < donor_rows]
    if not ordinary:  # only special tokens (bos, eos, ...) match: nothing to build from
        raise UsageError("BASE and DONOR share no tokens (no equal byte strings), so there are "
                         "no anchors; pick a DONOR whose tokenizer overlaps BASE's")
    anchor_donor = torch.tensor(ordinary, dtype=torch.long)
    anchor_base = torch.tensor([mapping[d] for d in ordinary], dtype=torch.long)
    rest = [i for i in range(new_size) if i not in mapping]
    new_ids = torch.tensor([i for i in rest if i < donor_rows], dtype=torch.long)
    orphan_ids = torch.tensor([i for i in rest if i >= donor_rows], dtype=torch.long)
    return MatrixPlan(copy_donor, copy_base, anchor_donor, anchor_base, new_ids, orphan_ids)


def _problem(cfg: TransplantConfig, device: str, donor_matrix, base_matrix, anchor_donor,
             anchor_base, target_ids, donor_vocab: Vocabulary, base_index):
    return TransplantProblem(
        donor_targets=donor_matrix[target_ids],
        donor_anchors=donor_matrix[anchor_donor],
        base_anchors=base_matrix[anchor_base],
        base_matrix=base_matrix,
        target_bytes=[donor_vocab.token_bytes[i] if i < donor_vocab.size else None
                      for i in target_ids.tolist()],
        base_byte_index=base_index,
        options=options_for(cfg.method, cfg),
        batch_size=cfg.batch_size,
        device=device,
    )


def assemble_matrix(plan: MatrixPlan, base_matrix: torch.Tensor, new_rows: torch.Tensor,
                    new_size: int) -> torch.Tensor:
    """[new_size, Hb]: shared rows copied from ``base_matrix`` [Vb, Hb], ``new_rows``
    [len(plan.new_ids), Hb] for the new ids, the anchor mean for orphan ids."""
    base_matrix = base_matrix.detach().float().cpu()
    out = torch.empty(new_size, base_matrix.shape[1], dtype=torch.float32)
    out[plan.copy_donor] = base_matrix[plan.copy_base]
    out[plan.new_ids] = new_rows
    if plan.orphan_ids.numel():
        out[plan.orphan_ids] = base_matrix[plan.anchor_base].mean(0)
    return out


def build_matrix(cfg: TransplantConfig, device: str, plan: MatrixPlan, base_matrix: torch.Tensor,
                 donor_matrix: torch.Tensor, donor_vocab: Vocabulary, base_index: dict,
                 new_size: int, label: str, output: bool = False,
                 ) -> tuple[torch.Tensor, MethodResult, dict]:
    """New [new_size, Hb] matrix, the method's result for the new ids, and holdout stats.

    Pure: tensors in, tensors out (no files). ``output`` builds an output (lm_head) matrix
    from the method's ``output_rows`` when it gives them; otherwise its input rows are used.
    """
    base_matrix = base_matrix.detach().float().cpu()
    donor_matrix = donor_matrix.detach().float().cpu()
    method = METHODS[cfg.method]
    result = method(_problem(cfg, device, donor_matrix, base_matrix, plan.anchor_donor,
                             plan.anchor_base, plan.new_ids, donor_vocab, base_index))
    rows = result.output_rows if output and result.output_rows is not None else result.rows
    out = assemble_matrix(plan, base_matrix, rows, new_size)
    stats: dict = {}
    if cfg.holdout and plan.anchor_donor.numel() > options_for(cfg.method, cfg).min_anchors():
        held = _select_holdout(plan.anchor_donor, cfg.holdout, cfg.seed)
        keep = torch.ones(plan.anchor_donor.numel(), dtype=torch.bool)
        keep[held] = False
        with progress.get().phase(f"{cfg.method} {label} fake-new check"):
            held_result = method(_problem(cfg, device, donor_matrix, base_matrix,
                                          plan.anchor_donor[keep], plan.anchor_base[keep],
                                          plan.anchor_donor[held], donor_vocab, base_index))
        truth = base_matrix[plan.anchor_base[held]]
        held_rows = (held_result.output_rows if output and held_result.output_rows is not None
                     else held_result.rows)
        rel = (held_rows - truth).norm(dim=1) / truth.norm(dim=1).clamp_min(1e-12)
        cos = torch.nn.functional.cosine_similarity(held_rows, truth, dim=1)
        mean_rel = (truth - base_matrix[plan.anchor_base[keep]].mean(0)).norm(dim=1) \
            / truth.norm(dim=1).clamp_min(1e-12)
        stats = {"heldout_tokens": int(held.numel()),
                 "heldout_relative_error_base": float(rel.mean()),
                 "heldout_cosine_base": float(cos.mean()),
                 "heldout_relative_error_base_mean_init": float(mean_rel.mean())}
        if held_result.donor_error is not None:
            stats["heldout_relative_error_donor"] = float(held_result.donor_error.mean())
    if result.donor_error is not None and result.donor_error.numel():
        stats["new_token_relative_error_donor"] = float(result.donor_error.mean())
    return out, result, stats


def choose_output_weight(base, new_embed: torch.Tensor, plan: MatrixPlan,
                         base_out: torch.Tensor, result: MethodResult, tokenizer, new_size: int,
                         grid: list[float], text: str, text_name: str) -> dict:
    """The output-row weight of ``grid`` (offered by the method's result) with the lowest
    bits per byte on ``text`` (a training text).

    BASE's body runs once on ``text`` with ``new_embed`` [new_size, H] as its input rows; every
    candidate output matrix (shared rows of ``base_out`` [Vb, H], new rows
    ``mean + lam (raw - mean)`` from ``result``) is scored on those hidden states
    (:func:`diagnostics.output_weight_scores`). Ties keep the earlier weight of ``grid``.
    """
    totals: dict[float, dict] = {}
    n_bytes = len(text.encode("utf-8"))
    shared_rows = base_out.detach()[plan.copy_base].float()
    try:
        with streaming.body_on(base, new_embed) as model, torch.inference_mode():
            softcap = decoder_and_head(model)[2]
            for ids in diagnostics.text_windows(tokenizer, text):
                batch = ids.unsqueeze(0)
                hidden = final_hidden_states(model, batch, torch.ones_like(batch))[0, :-1]
                part = diagnostics.output_weight_scores(
                    hidden, ids[1:], new_size, plan.copy_donor, shared_rows, plan.new_ids,
                    result.raw_rows, result.mean_row, grid, softcap)
                for lam, sums in part.items():
                    diagnostics.add_sums(totals.setdefault(lam, {}), sums)
    except streaming.CannotStream as why:  # a body we cannot rebuild: the bounded choice
        return {"rule": "auto", "skipped": f"cannot run BASE's body ({why}); output rows "
                "are the anchor mean", "chosen": 0.0}
    scores = []
    for lam in grid:
        t = totals[lam]
        scores.append({"weight": lam,
                       "bpb": round((t["nll_shared"] + t["nll_new"]) / math.log(2) / n_bytes, 5),
                       "leak_mass": round(t["leak"] / max(1, t["n_shared"]), 5),
                       "bpb_new_gold": round(t["nll_new"] / math.log(2) / n_bytes, 5)})
    best = min(scores, key=lambda row: row["bpb"])  # min keeps the first of equal scores
    return {"rule": "auto", "text": text_name, "text_bytes": n_bytes,
            "tokens": int(totals[grid[0]]["n_shared"] + totals[grid[0]]["n_new"]),
            "scores": scores, "chosen": best["weight"]}


def _shrink_rows_in_place(matrix: torch.Tensor, ids: torch.Tensor, raw: torch.Tensor,
                          mean: torch.Tensor, lam: float, chunk: int = 1 << 15) -> None:
    """matrix[ids] = mean + lam * (raw - mean), ``raw`` [len(ids), H], a chunk at a time."""
    for s in range(0, ids.numel(), chunk):
        matrix[ids[s:s + chunk]] = shrink_rows(raw[s:s + chunk], mean, lam)


def _set_vocabulary(model, embed: torch.Tensor, head: torch.Tensor | None, tied: bool) -> None:
    """Give BASE the new vocabulary: ``embed`` [V, H] (and ``head`` [V, H] when untied)
    become its matrices themselves, not copied into resized ones (which would hold every
    matrix twice; transformers' ``resize_token_embeddings`` also initialises rows we
    overwrite). The config's vocab_size follows, as ``resize_token_embeddings`` sets it."""
    emb = model.get_input_embeddings()
    dtype = emb.weight.dtype
    emb.weight = torch.nn.Parameter(embed.to(dtype), requires_grad=False)
    emb.num_embeddings = embed.shape[0]
    out = model.get_output_embeddings()
    if tied:
        model.tie_weights()
    elif out is not None:
        out.weight = torch.nn.Parameter(head.to(out.weight.dtype), requires_grad=False)
        out.out_features = head.shape[0]
    model.config.get_text_config().vocab_size = embed.shape[0]
    model.vocab_size = embed.shape[0]


def transplant(cfg: TransplantConfig) -> dict:
    """Run the transplant; returns the manifest written to OUT/transplant.json."""
    t0 = time.perf_counter()
    cfg.validate()
    modelio.check_output_dir(cfg.out, cfg.overwrite)
    if cfg.method not in METHODS:
        raise UsageError(f"unknown --method {cfg.method!r}; choose one of {method_names()}")
    device = modelio.resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    progress.get().start("load")
    base_ref, donor_ref = modelio.resolve(cfg.base), modelio.resolve(cfg.donor)
    donor_tok = modelio.load_tokenizer(donor_ref, cfg.trust_remote_code)
    base_tok = modelio.load_tokenizer(base_ref, cfg.trust_remote_code)
    conv_ref, conv_tok = (base_ref, base_tok) if cfg.conventions == "base" else (donor_ref, donor_tok)
    conv = conventions.observe(conv_tok, modelio.load_generation_config(conv_ref))
    added_tokens = conventions.add_missing(donor_tok, conv)  # rows copied from BASE below
    calibration = (CALIBRATION_TEXT if cfg.calibration_text is None
                   else validate.read_text(cfg.calibration_text, option=None))
    donor_in, donor_out, _ = modelio.load_embeddings(donor_ref, cfg.trust_remote_code)
    base_config = modelio.load_config(base_ref, cfg.trust_remote_code)
    want_untie = _wants_untie(cfg, base_config, base_ref.label)
    base = streaming.load_base(base_ref, cfg.trust_remote_code, cfg.stream,
                               None if cfg.dtype == "auto" else cfg.dtype, cfg.max_shard_size,
                               cfg.out)
    emb, head, tied = check_supported(base, base_ref.label)
    check_finite(f"BASE {base_ref.label} input embeddings", emb.weight)
    if head is not None:
        check_finite(f"BASE {base_ref.label} lm_head", head.weight)
    check_finite(f"DONOR {donor_ref.label} input embeddings", donor_in)
    if donor_out is not None:
        check_finite(f"DONOR {donor_ref.label} lm_head", donor_out)
    t_loaded = time.perf_counter()

    progress.get().start("match tokens")
    base_vocab, donor_vocab = vocabulary(base_tok), vocabulary(donor_tok)
    donor_rows = donor_in.shape[0]
    new_size = max(donor_rows, len(donor_tok))
    plan = plan_vocabulary(base_vocab, donor_vocab, emb.weight.shape[0], donor_rows, new_size)
    options_for(cfg.method, cfg).check_anchors(plan.anchor_donor.numel())
    base_index = base_vocab.byte_index()
    emb_anchor_mean = emb.weight.detach()[plan.anchor_base].float().mean(0).cpu()
    head_anchor_mean = (None if head is None
                        else head.weight.detach()[plan.anchor_base].float().mean(0).cpu())
    progress.get().start(f"{cfg.method} embed")
    new_embed, embed_result, embed_stats = build_matrix(
        cfg, device, plan, emb.weight, donor_in, donor_vocab, base_index, new_size, "embed")
    matrices = {"embed": (embed_result, embed_stats)}
    new_head = None
    out_result, out_base = embed_result, emb.weight
    if not tied:
        progress.get().start(f"{cfg.method} lm_head")
        new_head, head_result, head_stats = build_matrix(
            cfg, device, plan, head.weight, donor_out if donor_out is not None else donor_in,
            donor_vocab, base_index, new_size, "lm_head", output=True)
        matrices["lm_head"] = (head_result, head_stats)
        out_result, out_base = head_result, head.weight
    output_choice = None
    if out_result.raw_rows is not None:  # the method left the output factor to us: score it
        progress.get().start("choose output rows")
        output_choice = choose_output_weight(
            base, new_embed, plan, out_base, out_result, donor_tok, new_size,
            out_result.output_grid, calibration,
            "built-in" if cfg.calibration_text is None else cfg.calibration_text)
        lam = output_choice["chosen"]
        out_result.shrink = (out_result.shrink[0], lam)
        want_untie = _wants_untie(cfg, base_config, base_ref.label, lam)
        if new_head is not None:  # untied BASE: its lm_head rows were the raw rows
            _shrink_rows_in_place(new_head, plan.new_ids, out_result.raw_rows,
                                  out_result.mean_row, lam)
    untied = tied and want_untie and base.get_output_embeddings() is not None
    if tied and cfg.untie and not untied:
        raise UsageError(f"{base_ref.label} has no separate lm_head module to untie; drop --untie")
    if untied:
        if output_choice is not None:
            new_head = assemble_matrix(plan, emb.weight, embed_result.raw_rows, new_size)
            _shrink_rows_in_place(new_head, plan.new_ids, embed_result.raw_rows,
                                  embed_result.mean_row, output_choice["chosen"])
        else:
            new_head = assemble_matrix(plan, emb.weight, embed_result.output_rows
                                       if embed_result.output_rows is not None
                                       else embed_result.rows, new_size)
        untie_model(base)
        tied = False
    # Only the new matrices are needed from here: free DONOR's embeddings and the method's
    # rows (the manifest keeps anchors and coefficients), which are ~1 GB each for 262k tokens.
    del donor_in, donor_out
    for result, _ in matrices.values():
        result.rows = result.output_rows = result.raw_rows = None
    t_math = time.perf_counter()

    progress.get().start("save")
    _set_vocabulary(base, new_embed, new_head, tied)
    del new_embed, new_head  # the model holds them now (cast to its dtype)
    save_dtype = cfg.dtype if cfg.dtype != "auto" else None
    if save_dtype is None:
        configured = getattr(base.config, "dtype", None) or getattr(base.config, "torch_dtype", None)
        save_dtype = str(configured).replace("torch.", "") if configured else "float32"
    if save_dtype in DTYPES:
        base.to(DTYPES[save_dtype])

    new_ids = plan.new_ids
    manifest = {
        "tool": "tokensurgeon transplant",
        "base": base_ref.label,
        "donor": donor_ref.label,
        "base_tokenizer_kind": base_vocab.kind,
        "donor_tokenizer_kind": donor_vocab.kind,
        "vocab_size": new_size,
        "tied_embeddings": tied,
        "untied": untied,
        "counts": {
            "copied": int(plan.copy_donor.numel()),
            "anchors": int(plan.anchor_donor.numel()),
            "approximated": _count(embed_result.how, int(plan.orphan_ids.numel())),
        },
        "matrices": {name: stats for name, (_, stats) in matrices.items()},
        "output_rows": output_choice if output_choice is not None else {
            "rule": "fixed", "output_shrink": out_result.shrink[1]},
        # Not a top-level *.safetensors: vLLM would try to load it as weights.
        "per_token": "transplant/anchors.safetensors",
        "options": config_to_dict(cfg),
        "device": device,
        "threads": torch.get_num_threads(),
        "seconds": {"load": round(t_loaded - t0, 2), "math": round(t_math - t_loaded, 2)},
    }
    tensors = {"copied_donor_ids": plan.copy_donor, "copied_base_ids": plan.copy_base,
               "new_donor_ids": new_ids, "orphan_donor_ids": plan.orphan_ids}
    method_codes = {name: i for i, name in enumerate(sorted(set(method_names()) | {ANCHOR_MEAN}))}
    mean_rows = {"embed": emb_anchor_mean} | ({"lm_head": head_anchor_mean} if head_anchor_mean
                                                is not None else {})
    for name, (result, _) in matrices.items():
        tensors[f"{name}.method"] = torch.tensor([method_codes[h] for h in result.how],
                                                 dtype=torch.uint8)
        if result.anchors is not None:
            # Anchors as BASE ids, so the file reads without re-deriving the anchor list.
            tensors[f"{name}.anchor_base_ids"] = plan.anchor_base[result.anchors].to(torch.int32)
            tensors[f"{name}.coef"] = result.coef.float()
            if result.mean_coef is not None:
                tensors[f"{name}.mean_coef"] = result.mean_coef.float()
                tensors[f"{name}.mean_row"] = mean_rows[name]
                tensors[f"{name}.shrink"] = torch.tensor(
                    result.shrink[1 if name == "lm_head" else 0], dtype=torch.float32)
    manifest["method_codes"] = method_codes
    with modelio.atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        (Path(tmp) / "transplant").mkdir()
        save_file({name: t.contiguous() for name, t in tensors.items()},
                  str(Path(tmp) / manifest["per_token"]))
        twins = conventions.copied_stop_ids(conv, conv_tok, dict(zip(
            plan.copy_donor.tolist(), plan.copy_base.tolist()))) if cfg.conventions == "base" else []
        manifest["conventions"] = {**modelio.save_model(base, donor_tok, Path(tmp), conv, twins),
                                   "source": cfg.conventions, "added_tokens": added_tokens}
        del base, emb, head  # written: the leak check reloads OUT
        if cfg.leak_check and (skip := _leak_check_too_big(Path(tmp))):
            manifest["leak_check"] = {"skipped": skip}
            if not cfg.quiet:
                print(f"leak check skipped: {skip}")
        elif cfg.leak_check:
            t_leak = time.perf_counter()
            manifest["leak_check"] = _leak_check(Path(tmp), plan, new_size)
            manifest["seconds"]["leak_check"] = round(time.perf_counter() - t_leak, 2)
        manifest["seconds"]["total"] = round(time.perf_counter() - t0, 2)
        manifest["seconds"]["phases"] = progress.get().seconds()
        write_resolved_config(Path(tmp), cfg)
        modelio.write_json(Path(tmp) / "transplant.json", manifest)
    progress.get().finish()
    return manifest


# The leak check reloads OUT whole in float32; above this it would undo streaming's bound
# on memory (the issue-12 budget allows about 1 GB beyond the embeddings and one shard).
LEAK_CHECK_MAX_BYTES = 2 << 30


def _leak_check_too_big(out_dir: Path) -> str | None:
    """Why the leak check is skipped for OUT, or None when it fits the memory bound."""
    from safetensors import safe_open

    params = 0
    for shard in out_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            params += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118 (safe_open is not a dict)
    float32_bytes = 4 * params
    if float32_bytes <= LEAK_CHECK_MAX_BYTES:
        return None
    return (f"OUT's weights take {float32_bytes / 2**30:.1f} GiB in float32, above the "
            f"{LEAK_CHECK_MAX_BYTES / 2**30:.0f} GiB bound; run tokensurgeon eval on OUT instead")


def _leak_check(out_dir: Path, plan: MatrixPlan, new_size: int) -> dict:
    """Reload the written model and measure its leak mass on the built-in text."""
    ref = modelio.resolve(str(out_dir))
    model = modelio.load_model(ref)
    is_new = torch.zeros(model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    is_new[plan.new_ids] = True
    is_new[plan.orphan_ids] = True
    stats = diagnostics.leak_on_text(model, modelio.load_tokenizer(ref), is_new)
    del model
    return stats


def _count(how: list[str], orphans: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for h in how:
        counts[h] = counts.get(h, 0) + 1
    if orphans:
        counts[ANCHOR_MEAN] = counts.get(ANCHOR_MEAN, 0) + orphans
    return counts
