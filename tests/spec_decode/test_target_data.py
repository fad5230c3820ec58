"""``spec make-data``: the target's own continuations, as spec train's fixed data."""

from __future__ import annotations

import json

import pytest
import tiny
from hypothesis import given, settings
from hypothesis import strategies as st

import cli
from spec_decode.backends.hf import continuation
from spec_decode.prompts import encode_prompt, read_examples
from spec_decode.target_data import MakeDataConfig, cut_at_stop, generate_hf, make_data
from spec_decode.train import SpecTrainConfig, train
from tokensurgeon import modelio


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.txt"
    # Prompts of different lengths, so a batch is left-padded.
    path.write_text("\n".join(tiny.CORPUS[:5]) + "\n")
    return path


@settings(deadline=None)
@given(st.lists(st.integers(0, 9), max_size=12), st.sets(st.integers(0, 9), max_size=3))
def test_cut_at_stop(ids, stops):
    kept, stopped = cut_at_stop(ids, stops)
    assert ids[: len(kept)] == kept and not (set(kept) & stops)
    assert stopped == (len(kept) < len(ids))
    if stopped:
        assert ids[len(kept)] in stops


def test_batched_generation_equals_one_prompt_at_a_time(target_dir, prompts_file):
    """Left padding in a batch changes nothing: each row equals its own greedy continuation."""
    ref = modelio.resolve(str(target_dir))
    tok, model = modelio.load_tokenizer(ref), modelio.load_model(ref)
    prompts = [encode_prompt(tok, e.prompt, True) for e in read_examples(prompts_file)]
    assert len({len(p) for p in prompts}) > 1
    batched, stopped = generate_hf(model, prompts, 6, 0.0, 0, set(), batch_size=5)
    single = [continuation(model, p, 6, 0.0, 0, "cpu") for p in prompts]
    assert batched == single and stopped == [False] * len(prompts)  # no stop id given


def test_make_data_rows_are_the_targets_greedy_text(tmp_path, target_dir, prompts_file):
    out = tmp_path / "data"
    assert cli.main(["spec", "make-data", str(target_dir), "--prompts", str(prompts_file),
                     "--out", str(out), "--max-new-tokens", "5", "--backend", "hf",
                     "--batch-size", "2", "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    examples = read_examples(prompts_file)
    assert [r["prompt"] for r in rows] == [e.prompt for e in examples]
    ref = modelio.resolve(str(target_dir))
    tok, model = modelio.load_tokenizer(ref), modelio.load_model(ref)
    stops = {tok.eos_token_id}
    for row, e in zip(rows, examples):
        ids = cut_at_stop(continuation(model, encode_prompt(tok, e.prompt, True), 5, 0.0, 0,
                                       "cpu"), stops)[0]
        assert row["completion"] == tok.decode(ids, skip_special_tokens=True)
        assert row["stopped"] == (len(ids) < 5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == len(rows) and summary["backend"] == "hf"
    # spec train reads it as fixed data (every row has a completion).
    train(SpecTrainConfig(target=str(target_dir), draft=str(target_dir),
                          data=str(out / "data.jsonl"), out=str(tmp_path / "d"), steps=1,
                          batch_size=2, heldout=1, eval_every=1, quiet=True))
    # OUT exists: refused without --overwrite, before anything loads.
    with pytest.raises(Exception, match="overwrite"):
        make_data(MakeDataConfig(target=str(target_dir), prompts=str(prompts_file), out=str(out),
                                 backend="hf"))


@pytest.mark.parametrize("argv, message", [
    (["spec", "make-data", "T"], "no --prompts given"),
    (["spec", "make-data", "T", "--prompts", "p.txt", "--temperature", "-1"], "give 0 (greedy)"),
    (["spec", "make-data", "T", "--prompts", "p.txt", "--batch-size", "0"], "--batch-size must be"),
    (["spec", "make-data", "T", "--prompts", "missing.txt"], "does not exist"),
])
def test_bad_input_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
