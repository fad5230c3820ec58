"""``tokensurgeon inspect``: what a model is, and how much two tokenizers share.

Boundary: read-only reporting over model configs and tokenizers; loads no weights, but
validates them (safetensors headers against the file and config.json) as loading would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokensurgeon import modelio, progress, validate
from tokensurgeon.token_identity import shared_token_map, vocabulary


@dataclass
class InspectConfig:
    """Describe MODEL (architecture, vocabulary, tokenizer kind, special tokens) and, with
    OTHER, the token overlap a transplant between them would use."""

    model: str = field(metadata={
        "positional": True, "help": "HF directory, .gguf file or builtin:NAME"})
    other: str | None = field(default=None, metadata={
        "positional": True, "help": "optional second model: report the shared tokens"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow custom model code (off: safer)"})


def describe(ref_str: str, trust_remote_code: bool) -> tuple[dict, object]:
    progress.get().start(f"reading {ref_str}")
    ref = modelio.resolve(ref_str)
    config = modelio.load_config(ref, trust_remote_code)
    if ref.gguf_file is None:  # the same weight checks as every loading command
        validate.check_weight_shapes(ref.directory, config, trust_remote_code=trust_remote_code)
    tok = modelio.load_tokenizer(ref, trust_remote_code)
    vocab = vocabulary(tok)
    info = {
        "model": ref.label,
        "architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
        "hidden_size": getattr(config, "hidden_size", None),
        "layers": getattr(config, "num_hidden_layers", None),
        "config_vocab_size": getattr(config, "vocab_size", None),
        "tokenizer_size": vocab.size,
        "tokenizer_kind": vocab.kind,
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "special_tokens": {i: list(keys) for i, keys in sorted(vocab.special_keys.items())[:20]},
    }
    return info, vocab


def inspect(cfg: InspectConfig) -> dict:
    info, vocab = describe(cfg.model, cfg.trust_remote_code)
    report = {"model": info}
    if cfg.other:
        other_info, other_vocab = describe(cfg.other, cfg.trust_remote_code)
        progress.get().start("shared tokens")
        shared = shared_token_map(vocab, other_vocab)
        report["other"] = other_info
        report["overlap"] = {
            "shared_tokens": len(shared),
            "other_tokens_new_to_model": other_vocab.size - len(shared),
            "share_of_other": round(len(shared) / max(other_vocab.size, 1), 4),
        }
    progress.get().finish()
    return report
