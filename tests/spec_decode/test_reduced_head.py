"""Reduced-vocabulary draft heads: the token set, the head, make-draft, the HF backend."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spec_decode import reduced_head
from spec_decode.backends.hf import load_draft
from spec_decode.draft import MakeDraftConfig, make_draft
from spec_decode.speculative import speculative_generate, target_generate
from tokensurgeon import modelio
from tokensurgeon.errors import UsageError


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 20), min_size=1, max_size=60),
       k=st.integers(0, 70), always=st.lists(st.integers(0, 80), max_size=5))
def test_frequent_tokens_keeps_the_top_k_and_every_always_id(counts, k, always):
    c = torch.tensor(counts)
    ids = reduced_head.frequent_tokens(c, k, always)
    vocab = len(counts)
    kept = ids.tolist()
    assert kept == sorted(set(kept))  # sorted, unique
    assert all(0 <= i < vocab for i in kept)
    assert {a for a in always if a < vocab} <= set(kept)
    chosen = [i for i in kept if i not in always]
    assert len(kept) <= min(k, vocab) + len({a for a in always if a < vocab})
    # Nothing left out is more frequent than the least frequent of the top k.
    top = reduced_head.frequent_tokens(c, k)
    assert top.numel() == min(k, vocab)
    if top.numel():
        floor = int(c[top].min())
        assert all(int(c[i]) <= floor for i in range(vocab) if i not in set(top.tolist()))
    assert set(top.tolist()) <= set(kept) and set(chosen) <= set(top.tolist())


def test_token_counts_ignore_out_of_range_ids():
    counts = reduced_head.token_counts([[0, 1, 1, 5], [2, 99, -1]], 6)
    assert counts.tolist() == [1, 2, 1, 0, 0, 1]


def test_full_set_equals_the_full_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(3, 5, 16)
    ids = torch.arange(40)
    for cap in (None, 30.0):
        full = head(hidden)
        if cap:
            full = torch.tanh(full / cap) * cap
        scattered = reduced_head.rows_head(head, ids, ids, 40, cap)(hidden)
        assert torch.allclose(scattered, full, atol=1e-6)


def test_a_token_outside_the_set_is_never_proposed():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 30, bias=True)
    ids = torch.tensor([2, 3, 11, 17, 29])
    logits = reduced_head.rows_head(head, ids, ids, 30, None)(torch.randn(200, 8))
    outside = torch.ones(30, dtype=torch.bool)
    outside[ids] = False
    assert set(logits.argmax(-1).tolist()) <= set(ids.tolist())
    probs = torch.softmax(logits, -1)
    assert float(probs[:, outside].abs().max()) == 0.0
    g = torch.Generator().manual_seed(0)
    assert set(torch.multinomial(probs, 5, replacement=True, generator=g).flatten().tolist()) \
        <= set(ids.tolist())


def test_restricted_logits_equal_the_full_heads_on_the_set():
    torch.manual_seed(2)
    head = torch.nn.Linear(8, 30, bias=True)
    ids = torch.tensor([0, 4, 9, 21])
    hidden = torch.randn(6, 8)
    assert torch.allclose(reduced_head.rows_head(head, ids, ids, 30, None)(hidden)[:, ids],
                          head(hidden)[:, ids], atol=1e-6)


@pytest.fixture(scope="module")
def head_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("rhdata") / "train.jsonl"
    rows = [{"question": q, "answer": a} for q, a in zip(tiny.CORPUS, tiny.CORPUS[1:])]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_make_draft_head_options_are_checked_first(tmp_path, target_dir, head_data):
    out = tmp_path / "d"
    with pytest.raises(UsageError, match="--head-data"):
        make_draft(MakeDraftConfig(target=str(target_dir), out=str(out), head_tokens=8))
    with pytest.raises(UsageError, match="--head-tokens"):
        make_draft(MakeDraftConfig(target=str(target_dir), out=str(out), head_data=str(head_data)))
    with pytest.raises(UsageError, match="does not exist"):
        make_draft(MakeDraftConfig(target=str(target_dir), out=str(out), head_tokens=8,
                                   head_data=str(tmp_path / "missing.jsonl")))
    assert not out.exists()


def test_reduced_draft_keeps_greedy_output_and_loads_in_hf(tmp_path, target_dir, head_data):
    """make-draft --head-tokens writes the set into config.json; the HF backend serves it
    with the reduced head; greedy speculative decoding still emits the target's text."""
    out = tmp_path / "cut"
    manifest = make_draft(MakeDraftConfig(target=str(target_dir), out=str(out), depth=2,
                                          head_tokens=12, head_data=str(head_data)))
    config = json.loads((out / "config.json").read_text())
    ids = config[reduced_head.CONFIG_KEY]
    tok = modelio.load_tokenizer(modelio.resolve(str(target_dir)))
    assert config["architectures"] == ["ReducedHeadLlamaForCausalLM"]
    assert manifest["head_tokens"] == len(ids)
    assert 12 <= len(ids) <= 12 + len(tok.all_special_ids) + 2
    assert set(tok.all_special_ids) <= set(ids)
    draft = load_draft(str(target_dir), str(out), "cpu")
    assert isinstance(draft.get_output_embeddings(), reduced_head.ScatterHead)
    assert draft.get_output_embeddings().weight.shape[0] == len(ids)
    target = modelio.load_model(modelio.resolve(str(target_dir)))

    def next_logits(model):
        def f(prefix):
            with torch.inference_mode():
                return model(input_ids=torch.tensor([prefix])).logits[0, -1].float()
        return f

    prompt = tok("def add(a, b):", add_special_tokens=False)["input_ids"]
    expected = target_generate(next_logits(target), prompt, 12, temperature=0.0)
    for gamma in (1, 3):
        run = speculative_generate(next_logits(target), next_logits(draft), prompt, 12, gamma,
                                   temperature=0.0)
        assert run.tokens == expected
    # Every drafted token lies in the set.
    with torch.inference_mode():
        logits = draft(input_ids=torch.tensor([prompt + expected])).logits[0]
    assert set(logits.argmax(-1).tolist()) <= set(ids)


def test_spec_train_keeps_the_reduced_head(tmp_path, target_dir, head_data):
    from spec_decode.train import SpecTrainConfig, train

    cut = tmp_path / "cut"
    make_draft(MakeDraftConfig(target=str(target_dir), out=str(cut), depth=2, head_tokens=10,
                               head_data=str(head_data)))
    before = json.loads((cut / "config.json").read_text())[reduced_head.CONFIG_KEY]
    out = tmp_path / "trained"
    train(SpecTrainConfig(target=str(target_dir), draft=str(cut), data=str(head_data),
                          out=str(out), steps=1, batch_size=2, warmup_steps=0, head_tokens=3,
                          max_new_tokens=4, heldout=0, quiet=True))
    assert json.loads((out / "train.json").read_text())["head"] == {
        "tokens": len(before), "source": "draft"}  # its own set, not one chosen anew
    config = json.loads((out / "config.json").read_text())
    assert config[reduced_head.CONFIG_KEY] == before
    assert config["architectures"] == ["ReducedHeadLlamaForCausalLM"]


def test_spec_train_gives_a_full_head_draft_the_make_draft_head(tmp_path, target_dir, head_data):
    """spec train --head-tokens K on a full-head draft saves the head make-draft --head-tokens K
    --head-data would have chosen on the same rows; 0, or K >= V, keeps the full head."""
    from spec_decode.train import SpecTrainConfig, train

    full = tmp_path / "full"
    make_draft(MakeDraftConfig(target=str(target_dir), out=str(full), depth=2))
    reduced = tmp_path / "reduced"
    make_draft(MakeDraftConfig(target=str(target_dir), out=str(reduced), depth=2, head_tokens=10,
                               head_data=str(head_data)))
    expected = json.loads((reduced / "config.json").read_text())[reduced_head.CONFIG_KEY]
    vocab = json.loads((full / "config.json").read_text())["vocab_size"]
    for k, want in ((10, expected), (0, None), (vocab, None)):
        out = tmp_path / f"trained-{k}"
        train(SpecTrainConfig(target=str(target_dir), draft=str(full), data=str(head_data),
                              out=str(out), steps=1, batch_size=2, warmup_steps=0, head_tokens=k,
                              max_new_tokens=4, heldout=0, quiet=True))
        config = json.loads((out / "config.json").read_text())
        summary = json.loads((out / "train.json").read_text())
        assert config.get(reduced_head.CONFIG_KEY) == want
        if want is None:
            assert summary["head"] == {"tokens": None, "source": "full"}
            assert not config["architectures"][0].startswith(reduced_head.ARCH_PREFIX)
        else:
            assert summary["head"] == {"tokens": len(want), "source": "data"}
            assert config["architectures"] == ["ReducedHeadLlamaForCausalLM"]
            # the saved draft serves with that head
            assert load_draft(str(target_dir), str(out), "cpu").get_output_embeddings() \
                .weight.shape[0] == len(want)


def test_spec_train_moves_only_the_rows_its_loss_reaches(tmp_path, target_dir, head_data):
    """On fixed text, a reduced-head draft's embedding/head rows move only for the tokens it
    reads and its K head tokens; the loss is over the K tokens (finite, with a gradient)."""
    from spec_decode.prompts import encode_prompt, read_examples
    from spec_decode.train import SpecTrainConfig, fixed_continuation, train

    cut = tmp_path / "cut"
    make_draft(MakeDraftConfig(target=str(target_dir), out=str(cut), depth=2, head_tokens=10,
                               head_data=str(head_data)))
    out = tmp_path / "trained"
    train(SpecTrainConfig(target=str(target_dir), draft=str(cut), data=str(head_data),
                          out=str(out), steps=3, batch_size=2, warmup_steps=0, lr=1e-2,
                          max_new_tokens=4, heldout=0, quiet=True))
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 and r["loss"] > 0 for r in steps)
    before = modelio.load_model(modelio.resolve(str(cut))).get_input_embeddings().weight
    after = modelio.load_model(modelio.resolve(str(out))).get_input_embeddings().weight
    moved = set((before != after).any(-1).nonzero().flatten().tolist())
    tok = modelio.load_tokenizer(modelio.resolve(str(target_dir)))
    eos = tok.eos_token_id
    reads = {tok.pad_token_id if tok.pad_token_id is not None else eos}
    for e in read_examples(str(head_data)):
        reads |= set(encode_prompt(tok, e.prompt, True) + fixed_continuation(tok, e.reference, 4, eos))
    head = set(json.loads((cut / "config.json").read_text())[reduced_head.CONFIG_KEY])
    assert moved and moved <= reads | head  # the cut is tied: one matrix for both
    assert len(moved) < before.shape[0]


def test_engine_options_for_hybrid_kv_caches():
    from spec_decode.backends.vllm_engine import engine_options

    assert engine_options({"layer_types": ["full_attention"] * 4}) == {}
    assert engine_options({}) == {}
    gemma = {"text_config": {"layer_types": ["sliding_attention"] * 5 + ["full_attention"]}}
    assert engine_options(gemma) == {"disable_hybrid_kv_cache_manager": True}


def test_plugin_is_registered_for_vllm():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins")
           if ep.name == "tokensurgeon_reduced_head"]
    assert eps and eps[0].value == "spec_decode.vllm_plugin:register"
