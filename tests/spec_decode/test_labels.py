"""``spec train --labels data``: the text's next tokens as the target's argmax."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import cli
from spec_decode.draft import MakeDraftConfig, make_draft
from spec_decode.prompts import encode_prompt, read_examples
from spec_decode.train import (
    SpecTrainConfig,
    fixed_continuation,
    next_tokens,
    pack,
    predictable,
    resolved_labels,
    train,
)
from tokensurgeon import modelio


@pytest.fixture(scope="module")
def greedy_data(tmp_path_factory, target_dir):
    """The target's greedy continuations (spec make-data, HF), kept only where re-encoding
    the text gives back the generated ids, so each next token IS the target's argmax."""
    import tiny

    root = tmp_path_factory.mktemp("labels")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(tiny.CORPUS) + "\n")
    assert cli.main(["spec", "make-data", str(target_dir), "--prompts", str(prompts), "--out",
                     str(root / "made"), "--max-new-tokens", "6", "--backend", "hf",
                     "--quiet"]) == 0
    ref = modelio.resolve(str(target_dir))
    tok, model = modelio.load_tokenizer(ref), modelio.load_model(ref)
    eos = tok.eos_token_id
    kept = []
    for line in (root / "made" / "data.jsonl").read_text().splitlines():
        row = json.loads(line)
        prompt = encode_prompt(tok, row["prompt"], True)
        cont = fixed_continuation(tok, row["completion"], 6, eos)
        ids, attn, mask = pack([prompt], [cont], 384, eos)
        with torch.no_grad():
            argmax = model(input_ids=ids, attention_mask=attn).logits[mask].argmax(-1)
        if torch.equal(argmax, ids[:, 1:][mask[:, :-1]]):  # each next token is the argmax
            kept.append(line)
    assert len(kept) >= 6, "too few rows whose text is the target's greedy output"
    path = root / "data.jsonl"
    path.write_text("\n".join(kept) + "\n")
    return path


def _run(tmp_path, target, draft, data, name, **options):
    cfg = {"target": str(target), "draft": str(draft), "data": str(data), "out": str(tmp_path / name),
               "steps": 3, "batch_size": 3, "lr": 1e-3, "warmup_steps": 0, "max_new_tokens": 6, "heldout": 2,
               "eval_every": 1, "quiet": True, "device": "cpu", "seed": 0}
    train(SpecTrainConfig(**{**cfg, **options}))
    log = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return log, load_file(str(tmp_path / name / "model.safetensors"))


def test_labels_from_data_equal_the_targets_argmax(tmp_path, target_dir, greedy_data, monkeypatch):
    """On text that is the target's greedy output, --labels data trains exactly as running the
    target does (losses, acceptance, held-out figures, weights), without loading the target."""
    make_draft(MakeDraftConfig(target=str(target_dir), out=str(tmp_path / "cut"),
                               keep_layers="0", quiet=True))
    log_t, w_t = _run(tmp_path, target_dir, tmp_path / "cut", greedy_data, "t", labels="target")
    loaded = []
    load_model = modelio.load_model
    monkeypatch.setattr(modelio, "load_model",
                        lambda ref, *a, **k: loaded.append(ref.directory) or load_model(ref, *a, **k))
    log_d, w_d = _run(tmp_path, target_dir, tmp_path / "cut", greedy_data, "d", labels="data")
    assert loaded == [modelio.resolve(str(tmp_path / "cut")).directory]  # never the target
    assert len(log_t) == len(log_d)
    for a, b in zip(log_t, log_d):
        for key in ("loss", "train_acceptance", "heldout_argmax_agreement", "tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert w_t.keys() == w_d.keys()
    for name in w_t:
        torch.testing.assert_close(w_d[name], w_t[name], rtol=1e-5, atol=1e-6)


def test_predictable_drops_tokens_outside_a_reduced_head():
    ids = torch.tensor([[5, 1, 2, 3, 0], [4, 2, 2, 9, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(predictable(ids, mask, None), mask)
    kept = predictable(ids, mask, torch.tensor([2, 3]))
    # Position j stays when the token at j + 1 is in the head.
    assert kept.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    assert next_tokens(ids, kept).tolist() == [2, 3, 2, 2]


@pytest.mark.parametrize("extra, message", [
    (["--on-policy", "0.5"], "--on-policy 0 --target-generated 0"),
    (["--verify", "probabilistic"], "--verify greedy"),
    (["--divergence", "jsd"], "--divergence fkl or tvd"),
    (["--temperature", "1", "--verify", "probabilistic"], "--temperature 0"),
])
def test_labels_data_bad_options_one_line(extra, message, capsys):
    assert cli.main(["spec", "train", "T", "D", "--data", "x.jsonl", "--labels", "data",
                     *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_labels_auto_reads_make_data_output_without_the_target(tmp_path, target_dir, greedy_data,
                                                                monkeypatch):
    """The default ``--labels auto`` takes the labels from spec make-data's greedy output of
    this target (the target is never loaded), and runs the target on any other text."""
    made = greedy_data.parent / "made" / "data.jsonl"  # make-data's own directory
    make_draft(MakeDraftConfig(target=str(target_dir), out=str(tmp_path / "cut"),
                               keep_layers="0", quiet=True))
    loaded = []
    load_model = modelio.load_model
    monkeypatch.setattr(modelio, "load_model",
                        lambda ref, *a, **k: loaded.append(ref.directory) or load_model(ref, *a, **k))
    _run(tmp_path, target_dir, tmp_path / "cut", made, "auto")
    assert loaded == [modelio.resolve(str(tmp_path / "cut")).directory]
    assert json.loads((tmp_path / "auto" / "train.json").read_text())["labels"] == "data"
    loaded.clear()
    _run(tmp_path, target_dir, tmp_path / "cut", greedy_data, "plain")  # no make-data files
    assert modelio.resolve(str(target_dir)).directory in loaded


def test_resolved_labels(tmp_path, target_dir, greedy_data):
    made = str(greedy_data.parent / "made" / "data.jsonl")

    def labels(**options):
        cfg = SpecTrainConfig(**{"target": str(target_dir), "draft": "D", "data": made, **options})
        return resolved_labels(cfg)[0]

    assert labels() == "data"
    assert labels(target=str(target_dir) + "/") == "data"  # the same directory, spelled apart
    assert labels(data=str(greedy_data)) == "target"  # not make-data's directory
    assert labels(target="builtin:gemma3-270m") == "target"  # made by another target
    assert labels(chat=False) == "target"  # encoded another way
    assert labels(on_policy=0.5) == "target"  # the run generates text the file does not hold
    assert labels(verify="probabilistic") == "target"
    assert labels(divergence="jsd") == "target"
    assert labels(labels="target") == "target"


def test_a_cut_make_data_row_gets_no_eos(tmp_path, target_dir):
    """A continuation make-data cut at its limit did not end there: no EOS label follows it."""
    tok = modelio.load_tokenizer(modelio.resolve(str(target_dir)))
    eos = tok.eos_token_id
    ids = tok("the cat sat", add_special_tokens=False)["input_ids"]
    assert fixed_continuation(tok, "the cat sat", 64, eos) == ids + [eos]
    assert fixed_continuation(tok, "the cat sat", 64, eos, ends=False) == ids
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b", "stopped": false}\n'
                    '{"prompt": "a", "completion": "b", "stopped": true}\n'
                    '{"question": "a", "answer": "b"}\n')
    assert [e.ends for e in read_examples(path)] == [False, True, True]
