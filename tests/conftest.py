"""Shared fixtures: tiny models saved as HF directories on two partly overlapping tokenizers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return tiny.byte_level_tokenizer()


@pytest.fixture(scope="session")
def spm_tokenizer():
    return tiny.sentencepiece_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, bpe_tokenizer, spm_tokenizer):
    """HF directories: a byte-level Llama and a SentencePiece Gemma-3, tied and untied."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama_bpe": tiny.save(tiny.tiny_llama(len(bpe_tokenizer), tied=True), bpe_tokenizer,
                               root / "llama_bpe"),
        "llama_bpe_untied": tiny.save(tiny.tiny_llama(len(bpe_tokenizer), tied=False, seed=1),
                                      bpe_tokenizer, root / "llama_bpe_untied"),
        "gemma_spm": tiny.save(tiny.tiny_gemma(len(spm_tokenizer), tied=True, seed=2),
                               spm_tokenizer, root / "gemma_spm"),
        "gemma_spm_untied": tiny.save(tiny.tiny_gemma(len(spm_tokenizer), tied=False, seed=3),
                                      spm_tokenizer, root / "gemma_spm_untied"),
    }
