"""bench/distill_gold.py: the pieces GOLD is given are the pieces distill trains on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distill  # noqa: F401  (the package first: bench/distill.py must not shadow it)
from distill.data import batch_indices

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def gold_bench():
    sys.path.insert(0, str(BENCH))  # its `from common import ...`
    try:
        spec = importlib.util.spec_from_file_location("bench_distill_gold",
                                                      BENCH / "distill_gold.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


WORDS = st.lists(st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "of", "42", ","]),
                 min_size=2, max_size=12)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=WORDS, lead=st.booleans())
def test_prompt_is_a_whole_token_prefix_and_the_row_keeps_every_byte(gold_bench, bpe_tokenizer,
                                                                     words, lead):
    tok = bpe_tokenizer
    text = (" " if lead else "") + " ".join(words)
    row = gold_bench.prompt_completion(text, tok)
    assert row["prompt"] + row["completion"] == text
    assert row["prompt"].strip()
    # the prompt ends where a token ends, so GOLD keeps at least one prompt token
    ends = {end for _, end in tok(text, add_special_tokens=False,
                                  return_offsets_mapping=True)["offset_mapping"]}
    assert len(row["prompt"]) in ends


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), steps=st.integers(1, 8), batch=st.integers(1, 5),
       seed=st.integers(0, 3))
def test_run_order_is_distills_draw(gold_bench, n, steps, batch, seed):
    order = gold_bench.run_order(n, steps, batch, seed)
    assert order == [i for s in range(steps) for i in batch_indices(s, batch, n, seed)]


def test_every_gold_arm_uses_the_documented_cross_tokenizer_settings(gold_bench):
    for name, arm in gold_bench.ARMS.items():
        if arm.trainer == "gold":
            settings_ = {**gold_bench.GOLD_CROSS_TOKENIZER, **arm.options}
            assert settings_["use_uld_loss"] and settings_["uld_use_hybrid_loss"]
            assert settings_["use_extended_uld"] is False
            assert (settings_["lmbda"] > 0) == ("onpolicy" in name)


def test_train_cost_skips_evaluations_and_the_first_step(gold_bench):
    metrics = [{"step": 1, "tokens": 10, "cpu_end": 5.0}, {"step": 2, "tokens": 20, "cpu_end": 7.0},
               {"step": 3, "tokens": 30, "cpu_end": 12.0}]
    cost = gold_bench.train_cost(metrics, {"2": {"eval_cpu_s": 1.0}})
    assert cost == {"train_cpu_s": 6.0, "tokens_per_cpu_s": round(50 / 6.0, 2)}


def test_train_cost_counts_only_steps_whose_start_is_known(gold_bench):
    # steps 1-2 from a killed process (no CPU clock kept), 3-5 from the resumed one
    metrics = [{"step": 1, "tokens_seen": 10}, {"step": 2, "tokens_seen": 20},
               {"step": 3, "tokens_seen": 30, "cpu_end": 50.0},
               {"step": 4, "tokens_seen": 40, "cpu_end": 52.0},
               {"step": 5, "tokens_seen": 50, "cpu_end": 56.0}]
    assert gold_bench.train_cost(metrics, {}) == {"train_cpu_s": 6.0,
                                                   "tokens_per_cpu_s": round(20 / 6.0, 2)}
    assert gold_bench.train_cost(metrics[:3], {}) == {"train_cpu_s": None,
                                                       "tokens_per_cpu_s": None}
