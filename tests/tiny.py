"""Tiny models on real (in-memory trained) tokenizers, for the fast test tier.

Two partly overlapping tokenizers, trained in memory on a few sentences:
- :func:`byte_level_tokenizer`: GPT-2 style byte-level BPE (``Ġ`` alphabet), like SmolLM2.
- :func:`sentencepiece_tokenizer`: ``▁``-marked BPE with ``<0xNN>`` byte fallback, like
  Gemma-3.
Models are random Llama / Gemma-3 text models with a few thousand parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer maps text to tokens; a model maps tokens to text.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "How many clips did Natalia sell altogether in April and May? 48 + 24 = 72",
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune.",
    "Embeddings of shared tokens are copied; new tokens are approximated.",
    "Café, naïve, 東京, 你好 and 🙂 are multibyte.",
    "def add(a, b):\n    return a + b\n",
]


def corpus(repeat: int = 20) -> list[str]:
    return CORPUS * repeat


def byte_level_tokenizer(vocab_size: int = 400, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE with <|endoftext|> (bos/eos/unk) and <|pad|> specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|pad|>",
    )


def sentencepiece_tokenizer(vocab_size: int = 500, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """``▁`` word-marker BPE with byte fallback and <pad>/<eos>/<bos>/<unk> specials."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.normalizer = normalizers.Replace(" ", "\u2581")
    draft.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    draft.train_from_iterator(texts or corpus(), trainer)
    state = draft.model
    vocab = draft.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in __import__("json").loads(draft.to_str())["model"]["merges"]]
    # Byte-fallback tokens go right after the specials, as in SentencePiece models.
    ordered = specials + [f"<0x{b:02X}>" for b in range(256)]
    ordered += [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in specials]
    full_vocab = {t: i for i, t in enumerate(dict.fromkeys(ordered))}
    del state
    tok = Tokenizer(models.BPE(vocab=full_vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>",
    )
    return fast


def tiny_llama(vocab_size: int, tied: bool = True, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma(vocab_size: int, tied: bool = True, hidden: int = 48, layers: int = 2, seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=256, tie_word_embeddings=tied, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"][:layers] if layers <= 2 else None,
    )
    return Gemma3ForCausalLM(cfg).eval()


def save(model, tokenizer, directory: Path) -> Path:
    """Save a model and tokenizer as an HF directory, with token ids synced to the config."""
    directory = Path(directory)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# Chat templates in the two families' layouts (written for these tests): Gemma's turns
# (``<start_of_turn>user``, the assistant called ``model``, a system prompt folded into the
# first user turn) and SmolLM2's ChatML (``<|im_start|>user``, a default system prompt).
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_prefix = messages[0]['content'] | trim + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first_prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role only first') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{% if loop.first %}{{ first_prefix }}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATML_STYLE_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a small test assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def with_chat_template(tokenizer: PreTrainedTokenizerFast, template: str,
                       turn_tokens: list[str]) -> PreTrainedTokenizerFast:
    """``tokenizer`` with ``turn_tokens`` added as special tokens and ``template`` set."""
    tokenizer.add_special_tokens({"additional_special_tokens": turn_tokens})
    tokenizer.chat_template = template
    return tokenizer


def gemma_chat_tokenizer() -> PreTrainedTokenizerFast:
    """The SentencePiece-style tokenizer with Gemma-style turns."""
    return with_chat_template(sentencepiece_tokenizer(), GEMMA_STYLE_TEMPLATE,
                              ["<start_of_turn>", "<end_of_turn>"])


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer with SmolLM2-style ChatML turns."""
    return with_chat_template(byte_level_tokenizer(), CHATML_STYLE_TEMPLATE,
                              ["<|im_start|>", "<|im_end|>"])
