"""Fixtures shared by the spec_decode tests."""

from __future__ import annotations

import pytest
import tiny


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, bpe_tokenizer):
    """A saved 4-layer tiny Llama target (one per test module)."""
    root = tmp_path_factory.mktemp("spec")
    return tiny.save(tiny.tiny_llama(len(bpe_tokenizer), layers=4, seed=5), bpe_tokenizer,
                     root / "target")
