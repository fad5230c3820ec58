"""Our ALM loss against tokenkit's (ALM's reference implementation, JAX), on one batch.

The comparison is bench/tokenkit_check.py's; it runs in the slow tier when ``$TOKENKIT_SRC``
names a copy of tokenkit's source and jax, flax, optax, editdistance and wandb are
importable, and is skipped with the reason otherwise (the default environment has no jax).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# Loaded from its file: bench/ is not put on sys.path, where bench/distill.py would shadow the
# distill package for later tests.
_spec = importlib.util.spec_from_file_location(
    "bench_tokenkit_check", Path(__file__).resolve().parents[2] / "bench" / "tokenkit_check.py")
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check  # its dataclasses look their module up
_spec.loader.exec_module(check)


@pytest.fixture(scope="module")
def tokenkit_src() -> Path:
    src = check.tokenkit_source(None)
    reason = check.unavailable(src)
    if reason:
        pytest.skip(reason)
    return src


def test_without_tokenkit_the_check_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(check.SRC_ENV, raising=False)
    assert check.tokenkit_source(None) is None
    assert "--tokenkit-src" in check.unavailable(None)
    assert "tokenkit/training/losses.py" in check.unavailable(tmp_path)


@pytest.mark.slow
def test_alm_value_and_gradients_match_tokenkit(tokenkit_src):
    result = check.compare(tokenkit_src)
    assert result["alignment"]["same_chunks"] and result["alignment"]["same_boundary_set"]
    assert len(result["cases"]) == len(check.CASES)
    assert check.failures(result) == []
    for name, row in result["cases"].items():
        assert row["units"] > 0 and row["grad_logits_scale"] > 0, name


@pytest.mark.slow
def test_a_wrong_tau_is_caught(tokenkit_src):
    cases = [check.AlmCase("probability", 1.0, 0.0, True),
             check.AlmCase("nats", 100.0, 0.1, True)]
    result = check.compare(tokenkit_src, cases, tau_factor=1.05)
    for case in cases:
        assert result["max_abs_diff_same_divisor"][case.name] > check.TOLERANCE, case.name
    assert len(check.failures(result)) >= len(cases)
