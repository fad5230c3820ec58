"""``tokensurgeon spec make-draft``: build a draft model that speaks the target's tokenizer.

Boundary: model surgery and saving only. Two ways to get a draft:
- ``--keep-layers 0-5,28,29`` (or, with neither flag, ``--depth D``: the first and last
  layers, see :func:`depth_layers`): a copy of TARGET with only those decoder layers. The saved
  config is fixed so transformers and vLLM load it unchanged: ``num_hidden_layers`` and
  every per-layer list (``layer_types``, ...) are cut to the kept layers.
- ``--from SMALL_MODEL``: a foreign smaller model given TARGET's tokenizer by
  :func:`tokensurgeon.transplant.transplant` (vLLM needs draft and target to share one
  vocabulary); with ``--keep-layers`` only those decoder layers of the transplant are kept
  (a cheaper draft: the transplant's cost per token is that of all its layers).

Also holds :func:`check_shared_vocabulary`, the check that ``spec train`` and ``spec bench``
run before anything else (it loads both tokenizers; the comparison itself is
:func:`tokensurgeon.token_identity.vocabulary_mismatch`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spec_decode import reduced_head
from spec_decode.prompts import Example, encode_prompt, read_examples
from tokensurgeon import modelio, progress
from tokensurgeon.config import config_to_dict, write_resolved_config
from tokensurgeon.errors import UsageError
from tokensurgeon.token_identity import vocabulary_mismatch


@dataclass
class MakeDraftConfig:
    """Make a draft model for TARGET: a layer-pruned copy (--keep-layers) or a smaller model
    transplanted onto TARGET's tokenizer (--from). OUT is an HF directory vLLM loads."""

    target: str = field(metadata={
        "positional": True, "help": "target model: HF directory, .gguf file or builtin:NAME"})
    out: str = field(metadata={"help": "output directory (written atomically)"})
    keep_layers: str = field(default="", metadata={
        "help": "decoder layers to keep, e.g. 0-5,28,29 (0-based, ranges inclusive): of "
                "TARGET, or with --from of the transplanted model"})
    depth: int = field(default=2, metadata={
        "help": "without --keep-layers or --from: keep this many layers, the last "
                "min(2, depth - 1) and the rest from the start (2: the first and the last; "
                "the default is the depth sweep's pick, docs/spec.md)"})
    head_tokens: int = field(default=0, metadata={
        "help": "reduced-vocabulary head (FR-Spec): the draft scores only the K most frequent "
                "target tokens of --head-data plus every special and stop token, -inf "
                "elsewhere (verification stays exact); 0 = the full head"})
    head_data: str = field(default="", metadata={
        "help": "text whose target tokens are counted for --head-tokens: .jsonl rows "
                "(question/prompt + answer, formatted as spec train and bench see them) or .txt"})
    from_model: str = field(default="", metadata={
        "short": "--from",
        "help": "use this smaller model as the draft, transplanted onto TARGET's tokenizer"})
    overwrite: bool = field(default=False, metadata={"help": "replace OUT if it exists"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow custom model code (off: safer)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def validate(self) -> None:
        if self.depth < 1:
            raise UsageError(f"--depth {self.depth}: keep at least 1 layer")
        if self.keep_layers:
            parse_layers(self.keep_layers, None)
        if self.head_tokens < 0:
            raise UsageError(f"--head-tokens {self.head_tokens}: give K >= 1, or 0 for the full head")
        if self.head_tokens and not self.head_data:
            raise UsageError("--head-tokens needs --head-data FILE (the text whose frequent target "
                             "tokens the head keeps, e.g. the file you will train the draft on)")
        if self.head_data and not self.head_tokens:
            raise UsageError("--head-data is only read with --head-tokens K; add --head-tokens")


def depth_layers(depth: int, num_layers: int) -> list[int]:
    """The layers a ``depth``-layer cut keeps: the first ``depth - k`` and the last ``k``,
    k = min(2, depth - 1) (depth 2 -> [0, n-1]; 4 -> [0, 1, n-2, n-1]); the first layers
    read the embeddings and the last ones feed the (tied) head."""
    if not 1 <= depth <= num_layers:
        raise UsageError(f"--depth {depth} is out of range: the target has {num_layers} layers")
    last = min(2, depth - 1)
    return list(range(depth - last)) + list(range(num_layers - last, num_layers))


def parse_layers(spec: str, num_layers: int | None) -> list[int]:
    """``"0-5,28,29"`` -> [0, 1, 2, 3, 4, 5, 28, 29]; sorted, unique, checked against
    ``num_layers`` when given."""
    keep: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                keep.update(range(lo, hi + 1))
            else:
                keep.add(int(part))
        except ValueError:
            raise UsageError(f"--keep-layers {spec!r}: {part!r} is not a layer or an a-b range; "
                             "write e.g. 0-5,28,29") from None
    if not keep:
        raise UsageError("--keep-layers is empty; name at least one layer, e.g. 0-7")
    if num_layers is not None and (min(keep) < 0 or max(keep) >= num_layers):
        raise UsageError(f"--keep-layers {spec!r} is out of range: the target has {num_layers} "
                         f"layers, numbered 0-{num_layers - 1}")
    return sorted(keep)


def _text_config(config):
    return getattr(config, "text_config", None) or config


def _decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UsageError(f"{type(model).__name__} keeps no model.layers list; --keep-layers "
                         "supports Llama-style decoders (Llama, Gemma, Qwen, Mistral, ...)")
    return layers


def prune_layers(model, keep: list[int]) -> None:
    """Keep only decoder layers ``keep`` (in order), in place, and fix the config.

    Per-layer config lists (``layer_types`` and any other list as long as the layer count)
    are cut the same way; each kept attention module's ``layer_idx`` is renumbered so the
    KV cache indexes it correctly.
    """
    layers = _decoder_layers(model)
    config = _text_config(model.config)
    n = config.num_hidden_layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for name, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and not name.startswith("_"):
            setattr(config, name, type(value)(value[i] for i in keep))
    config.num_hidden_layers = len(keep)
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx


def vocabulary_of(ref: modelio.ModelRef, trust_remote_code: bool = False) -> tuple[dict, int]:
    """(token -> id map, embedding rows from config) of a model."""
    tok = modelio.load_tokenizer(ref, trust_remote_code)
    rows = _text_config(modelio.load_config(ref, trust_remote_code)).vocab_size
    return tok.get_vocab(), rows


def check_shared_vocabulary(target: modelio.ModelRef, draft: modelio.ModelRef,
                            trust_remote_code: bool = False) -> None:
    """One-line UsageError unless DRAFT uses exactly TARGET's tokenizer and vocabulary size."""
    mismatch = vocabulary_mismatch(*vocabulary_of(target, trust_remote_code),
                                   *vocabulary_of(draft, trust_remote_code))
    if mismatch:
        raise UsageError(
            f"draft {draft.label} and target {target.label} have different vocabularies "
            f"({mismatch}); run: tokensurgeon spec make-draft {target.label} "
            f"--from {draft.label} --out DRAFT")


def special_and_stop_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id a reduced head must keep: the tokenizer's special and added special tokens,
    its EOS/BOS/PAD, and the generation config's stop ids."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None)


def choose_head_tokens(tokenizer, examples: list[Example], k: int, vocab_size: int,
                       always: list[int], chat: bool = True) -> torch.Tensor:
    """The reduced head's ids [K'] (sorted): the ``k`` target tokens most frequent in
    ``examples`` formatted as ``spec train``/``spec bench`` see them (prompt through the chat
    template, then the reference continuation), plus ``always``."""
    lists = []
    for e in examples:
        ids = encode_prompt(tokenizer, e.prompt, chat)
        if e.reference:
            ids = ids + tokenizer(e.reference, add_special_tokens=False)["input_ids"]
        lists.append(ids)
    return reduced_head.frequent_tokens(reduced_head.token_counts(lists, vocab_size), k, always)


def record_head(out_dir: Path, token_ids: torch.Tensor) -> None:
    """Write a reduced head into a saved model's config.json (ids and architecture name;
    transformers' save_pretrained rewrites the name, so this runs after every save)."""
    import json

    path = Path(out_dir) / "config.json"
    config = reduced_head.with_head(json.loads(path.read_text()), token_ids)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)


def head_for(tokenizer, target_ref, examples: list[Example], k: int, vocab_size: int,
             chat: bool = True) -> torch.Tensor | None:
    """The reduced head [K'] that ``make-draft --head-tokens`` and ``spec train --head-tokens``
    give a draft of ``target_ref``: :func:`choose_head_tokens` on ``examples`` with every
    special and stop token of the target; None (the full head) when ``k`` is 0 or keeps the
    whole vocabulary anyway."""
    if not k or k >= vocab_size:
        return None
    always = special_and_stop_ids(tokenizer, modelio.load_generation_config(target_ref))
    return choose_head_tokens(tokenizer, examples, k, vocab_size, always, chat)


def _head_ids(cfg: MakeDraftConfig, head_examples, target_ref) -> torch.Tensor | None:
    if not cfg.head_tokens:
        return None
    tokenizer = modelio.load_tokenizer(target_ref, cfg.trust_remote_code)
    vocab = _text_config(modelio.load_config(target_ref, cfg.trust_remote_code)).vocab_size
    return head_for(tokenizer, target_ref, head_examples, cfg.head_tokens, vocab)


def _load_pruned(ref, keep: list[int], trust_remote_code: bool):
    """Load ``ref`` and keep only its decoder layers ``keep``: (model, tokenizer, parameters
    before, parameters after)."""
    progress.get().start("load")
    tokenizer = modelio.load_tokenizer(ref, trust_remote_code)
    model = modelio.load_model(ref, trust_remote_code=trust_remote_code)
    progress.get().start("prune")
    total = sum(p.numel() for p in model.parameters())
    prune_layers(model, keep)
    return model, tokenizer, total, sum(p.numel() for p in model.parameters())


def _prune_saved(out: Path, cfg: MakeDraftConfig) -> dict:
    """Keep only ``cfg.keep_layers`` of the model saved in ``out`` (the transplant), rewritten
    atomically with every other file of ``out`` (the transplant's reports) beside it."""
    ref = modelio.resolve(str(out))
    layers = _text_config(modelio.load_config(ref, cfg.trust_remote_code)).num_hidden_layers
    keep = parse_layers(cfg.keep_layers, layers)
    model, tokenizer, total, kept = _load_pruned(ref, keep, cfg.trust_remote_code)
    with modelio.atomic_output_dir(out, overwrite=True) as tmp:
        modelio.save_model(model, tokenizer, Path(tmp))
        for item in out.iterdir():  # the transplant's reports; the model files are new
            if not (Path(tmp) / item.name).exists():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, Path(tmp) / item.name)
    return {"kept_layers": keep, "from_layers": layers, "parameters": kept,
            "from_parameters": total}


def make_draft(cfg: MakeDraftConfig) -> dict:
    """Build the draft; returns the manifest written to OUT/draft.json."""
    t0 = time.perf_counter()
    cfg.validate()
    modelio.check_output_dir(cfg.out, cfg.overwrite)
    target_ref = modelio.resolve(cfg.target)
    head_examples = read_examples(cfg.head_data) if cfg.head_tokens else None
    head_ids = _head_ids(cfg, head_examples, target_ref)
    head = {} if head_ids is None else {
        "head_tokens": int(head_ids.numel()), "head_data": cfg.head_data}
    if cfg.from_model:
        from tokensurgeon.transplant import TransplantConfig, transplant

        # The draft keeps SMALL_MODEL's weights and takes TARGET's tokenizer.
        report = transplant(TransplantConfig(
            base=cfg.from_model, donor=cfg.target, out=cfg.out, overwrite=cfg.overwrite,
            trust_remote_code=cfg.trust_remote_code, quiet=cfg.quiet,
            # A draft reads TARGET's token stream: it keeps TARGET's vocabulary and framing.
            conventions="donor"))
        manifest = {"kind": "transplant", "target": target_ref.label, "from": cfg.from_model,
                    "vocab_size": report["vocab_size"], **head, "options": config_to_dict(cfg)}
        if cfg.keep_layers:
            manifest.update(_prune_saved(Path(cfg.out), cfg))
        if head_ids is not None:
            record_head(Path(cfg.out), head_ids)
        manifest["seconds"] = round(time.perf_counter() - t0, 2)
        modelio.write_json(Path(cfg.out) / "draft.json", manifest)
        write_resolved_config(Path(cfg.out), cfg)  # replaces the inner transplant's
        return manifest
    config = _text_config(modelio.load_config(target_ref, cfg.trust_remote_code))
    keep = parse_layers(cfg.keep_layers, config.num_hidden_layers) if cfg.keep_layers \
        else depth_layers(cfg.depth, config.num_hidden_layers)
    model, tokenizer, total, kept = _load_pruned(target_ref, keep, cfg.trust_remote_code)
    manifest = {
        "kind": "layer_pruned", "target": target_ref.label, "kept_layers": keep,
        "target_layers": config.num_hidden_layers, "parameters": kept,
        "target_parameters": total, **head, "options": config_to_dict(cfg),
    }
    progress.get().start("save")
    with modelio.atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        modelio.save_model(model, tokenizer, Path(tmp))
        if head_ids is not None:
            record_head(Path(tmp), head_ids)
        manifest["seconds"] = round(time.perf_counter() - t0, 2)
        modelio.write_json(Path(tmp) / "draft.json", manifest)
        write_resolved_config(Path(tmp), cfg)
    return manifest
