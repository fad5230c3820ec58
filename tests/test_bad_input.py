"""Every bad input gets a one-line error naming the fix, and nothing is left in OUT."""

from __future__ import annotations

import dataclasses
import json

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast, T5Config

import cli


def run_cli(capsys, *args):
    capsys.readouterr()  # drop output from building the fixtures
    code = cli.main(["transplant", *map(str, args), "--quiet", "-k", "4", "--candidates", "16",
                     "--holdout", "0"])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code, err, tmp_path, needle):
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert needle in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_path(capsys, tmp_path, model_dirs):
    code, err = run_cli(capsys, tmp_path / "nope", model_dirs["llama_bpe"], tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, "does not exist")


def test_not_a_causal_lm(capsys, tmp_path, model_dirs):
    d = tmp_path / "t5"
    d.mkdir()
    T5Config(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(d)
    save_file({"shared.weight": torch.zeros(64, 16)}, str(d / "model.safetensors"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((model_dirs["llama_bpe"] / f).read_bytes())
    code, err = run_cli(capsys, d, model_dirs["llama_bpe"], tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, "not a causal LM")


def test_no_shared_tokens(capsys, tmp_path, model_dirs):
    words = ["αλφα", "βητα", "γαμμα", "δελτα"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="αλφα"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    donor = tiny.save(tiny.tiny_llama(len(tok)), tok, tmp_path / "greek")
    code, err = run_cli(capsys, model_dirs["gemma_spm"], donor, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, "share no tokens")


def test_k_larger_than_anchors(capsys, tmp_path, model_dirs):
    capsys.readouterr()
    code = cli.main(["transplant", str(model_dirs["gemma_spm"]), str(model_dirs["llama_bpe"]),
                     str(tmp_path / "out"), "--quiet", "-k", "100000", "--candidates", "0"])
    err = capsys.readouterr().err.strip()
    assert_clean_failure(code, err, tmp_path, "larger than the")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_embeddings(capsys, tmp_path, model_dirs, value):
    src = model_dirs["llama_bpe"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(bad / "model.safetensors"))
    key = next(k for k in weights if "embed_tokens" in k)
    weights[key][5, 3] = value
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code, err = run_cli(capsys, model_dirs["gemma_spm"], bad, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, "NaN or Inf")
    code, err = run_cli(capsys, bad, model_dirs["gemma_spm"], tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, "NaN or Inf")


def test_existing_out_without_overwrite(capsys, tmp_path, model_dirs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, model_dirs["gemma_spm"], model_dirs["llama_bpe"], out)
    assert code == 2 and "--overwrite" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_architecture_we_cannot_save(capsys, tmp_path, model_dirs, bpe_tokenizer):
    cfg = PhiConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    phi = tiny.save(PhiForCausalLM(cfg), bpe_tokenizer, tmp_path / "phi")
    code, err = run_cli(capsys, phi, model_dirs["gemma_spm"], tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, "not supported")


def test_pickled_weights_are_refused(capsys, tmp_path, model_dirs):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    code, err = run_cli(capsys, d, model_dirs["llama_bpe"], tmp_path / "out")
    assert_clean_failure(code, err, tmp_path, "never loads")


def test_bad_option_values(capsys, tmp_path, model_dirs):
    capsys.readouterr()
    code = cli.main(["transplant", str(model_dirs["gemma_spm"]), str(model_dirs["llama_bpe"]),
                     str(tmp_path / "out"), "-k", "0"])
    err = capsys.readouterr().err.strip()
    assert_clean_failure(code, err, tmp_path, "--k must be >= 1")


# ---------------------------------------------------------------------------------------
# Table-driven: every bad input, fed to every command that takes that input, exits 2 with
# exactly one stderr line, no traceback, and leaves the file system as it was.

def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _truncate_half(d):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _truncate_20(d):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:20])


def _header_lies(d):
    """Grow one tensor's shape in the header without adding bytes (dtype/shape vs bytes)."""
    w = d / "model.safetensors"
    raw = w.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [x * 2 for x in header[name]["shape"]]
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    w.write_bytes(raw[:8] + new + raw[8 + n :])


def _config_shape_mismatch(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] += 7
    (d / "config.json").write_text(json.dumps(cfg))


def _config_not_json(d):
    (d / "config.json").write_text('{"model_type": "llama",, }')


def _config_no_model_type(d):
    cfg = json.loads((d / "config.json").read_text())
    del cfg["model_type"]
    (d / "config.json").write_text(json.dumps(cfg))


def _no_tokenizer(d):
    (d / "tokenizer.json").unlink()


def _tokenizer_not_json(d):
    (d / "tokenizer.json").write_text("{ this is not json")


BAD_MODELS = {
    "truncated_half": (_truncate_half, "truncated"),
    "truncated_20_bytes": (_truncate_20, "truncated"),
    "header_dtype_shape_vs_bytes": (_header_lies, "bytes"),
    "shape_vs_config": (_config_shape_mismatch, "config.json implies"),
    "config_not_json": (_config_not_json, "invalid JSON"),
    "config_without_model_type": (_config_no_model_type, "model_type"),
    "no_tokenizer": (_no_tokenizer, "no tokenizer"),
    "tokenizer_not_json": (_tokenizer_not_json, "tokenizer.json"),
}

BAD_TEXTS = {
    "latin1": (lambda p: p.write_bytes("café au lait\n".encode("latin-1")), "offset 3"),
    "binary": (lambda p: p.write_bytes(bytes(range(256)) * 4), "binary"),
    "missing": (lambda p: None, "does not exist"),
}


def _model_commands(bad, good, other, text, out):
    """(command name, argv) for every position that takes a model."""
    return {
        "transplant_base": ["transplant", bad, other, out, "-k", "4", "--holdout", "0"],
        "transplant_donor": ["transplant", other, bad, out, "-k", "4", "--holdout", "0"],
        "eval": ["eval", bad, text],
        "inspect": ["inspect", bad],
        "inspect_other": ["inspect", good, bad],
        "distill_teacher": ["distill", "--teacher", bad, "--student", good, "--data", text,
                            "--out", out, "--steps", "1", "--batch-size", "1"],
        "distill_student": ["distill", "--teacher", good, "--student", bad, "--data", text,
                            "--out", out, "--steps", "1", "--batch-size", "1"],
        "spec_make_draft": ["spec", "make-draft", bad, "--keep-layers", "0", "--out", out],
        # spec train reads --data before any model: make the 4-line text good data for it
        # (no rows held out; on-policy continuations, as a .txt has no answers).
        "spec_train_target": ["spec", "train", bad, good, "--data", text, "--out", out,
                              "--steps", "1", "--heldout", "0", "--on-policy", "1"],
        "spec_train_draft": ["spec", "train", good, bad, "--data", text, "--out", out,
                             "--steps", "1", "--heldout", "0", "--on-policy", "1"],
        "spec_bench_draft": ["spec", "bench", good, "--draft", bad, "--prompts", text,
                             "--backend", "hf", "--out", out],
    }


def _text_commands(good, text, out):
    return {
        "eval": ["eval", good, text],
        "distill": ["distill", "--teacher", good, "--student", good, "--data", text,
                    "--out", out, "--steps", "1", "--batch-size", "1"],
        "spec_train": ["spec", "train", good, good, "--data", text, "--out", out, "--steps", "1"],
        "spec_bench": ["spec", "bench", good, "--draft", good, "--prompts", text,
                       "--backend", "hf", "--out", out],
    }


def snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def run_and_check(capsys, tmp_path, argv, needle):
    before = snapshot(tmp_path)
    capsys.readouterr()
    name = " ".join(argv[:2]) if argv[0] == "spec" else argv[0]
    fields = {f.name for f in dataclasses.fields(cli.COMMANDS[name].config())}
    code = cli.main([str(a) for a in argv] + (["--quiet"] if "quiet" in fields else []))
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err + captured.out
    assert needle in err, err
    assert snapshot(tmp_path) == before, "the file system changed"


@pytest.fixture(scope="module")
def bad_model_dirs(tmp_path_factory, model_dirs):
    root = tmp_path_factory.mktemp("bad_models")
    out = {}
    for name, (damage, _) in BAD_MODELS.items():
        d = _copy_dir(model_dirs["llama_bpe"], root / name)
        damage(d)
        out[name] = d
    return out


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_every_bad_model_to_every_command(case, capsys, tmp_path, model_dirs, bad_model_dirs):
    text = tmp_path / "sample.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 4)
    good = model_dirs["llama_bpe"]
    commands = _model_commands(bad_model_dirs[case], good, model_dirs["gemma_spm"], text,
                               tmp_path / "sub" / "out")
    for name, argv in commands.items():
        try:
            run_and_check(capsys, tmp_path, argv, BAD_MODELS[case][1])
        except AssertionError as exc:
            raise AssertionError(f"{case} -> {name}: {exc}") from None


@pytest.mark.parametrize("case", sorted(BAD_TEXTS))
def test_every_bad_text_to_every_command(case, capsys, tmp_path, model_dirs):
    make, needle = BAD_TEXTS[case]
    text = tmp_path / "data.txt"
    make(text)
    commands = _text_commands(model_dirs["llama_bpe"], text, tmp_path / "sub" / "out")
    for name, argv in commands.items():
        try:
            run_and_check(capsys, tmp_path, argv, needle)
        except AssertionError as exc:
            raise AssertionError(f"{case} -> {name}: {exc}") from None


def test_malformed_jsonl_leaves_no_out(capsys, tmp_path, model_dirs):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n{"text": broken\n')
    good = model_dirs["llama_bpe"]
    for argv in (["distill", "--teacher", good, "--student", good, "--data", data,
                  "--out", tmp_path / "out", "--steps", "1", "--batch-size", "1"],
                 ["eval", good, data]):
        run_and_check(capsys, tmp_path, argv, "data.jsonl:2")


def test_lone_surrogate_in_jsonl_is_one_line(capsys, tmp_path, model_dirs):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "ok \\ud800", "question": "q \\ud800", "answer": "a"}\n')
    good = model_dirs["llama_bpe"]
    for argv in _text_commands(good, data, tmp_path / "sub" / "out").values():
        run_and_check(capsys, tmp_path, argv, "lone surrogate")


# ---------------------------------------------------------------------------------------
# Issue 23: errors that named the wrong fault or came too late, and killed runs' leftovers.

def _out_commands(good, other, text, out):
    """(command name, argv) for every command that writes an OUT."""
    return {
        "transplant": ["transplant", other, good, out, "-k", "4", "--holdout", "0"],
        "distill": ["distill", "--teacher", good, "--student", good, "--data", text,
                    "--out", out, "--steps", "1", "--batch-size", "1"],
        "spec_make_draft": ["spec", "make-draft", good, "--keep-layers", "0", "--out", out],
        "spec_train": ["spec", "train", good, good, "--data", text, "--out", out, "--steps", "1"],
        "spec_bench": ["spec", "bench", good, "--draft", good, "--prompts", text,
                       "--backend", "hf", "--out", out],
    }


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_that_is_a_file_is_named_as_a_file(capsys, tmp_path, model_dirs, overwrite):
    """Before: "pass --overwrite", then with it a second error. Now one line, either way."""
    text = tmp_path / "sample.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 4)
    out = tmp_path / "afile"
    out.write_text("mine")
    commands = _out_commands(model_dirs["llama_bpe"], model_dirs["gemma_spm"], text, out)
    for name, argv in commands.items():
        try:
            run_and_check(capsys, tmp_path, argv + (["--overwrite"] if overwrite else []),
                          "afile is a file, not a directory")
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    assert out.read_text() == "mine"


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if any model or tokenizer is looked up or read."""
    from tokensurgeon import modelio

    def touched(*args, **kwargs):
        raise AssertionError("a model was read before the data was checked")

    for name in ("resolve", "load_tokenizer", "load_model", "load_config", "load_embeddings"):
        monkeypatch.setattr(modelio, name, touched)


@pytest.mark.parametrize("content,needle", [
    ("", "data.txt holds no"),
    ("\n  \n\n", "data.txt holds no"),
])
def test_empty_text_is_refused_before_any_model(capsys, tmp_path, model_dirs, no_models,
                                                 content, needle):
    """Before: distill loaded both models, then "the dataset is empty" (no file named)."""
    text = tmp_path / "data.txt"
    text.write_text(content)
    for name, argv in _text_commands(model_dirs["llama_bpe"], text, tmp_path / "out").items():
        if name == "spec_bench":  # reads prompts after the target (not required here)
            continue
        try:
            run_and_check(capsys, tmp_path, argv, needle)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def test_jsonl_without_a_text_field_is_refused_before_any_model(capsys, tmp_path, model_dirs,
                                                               no_models):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n{"title": "no text here"}\n')
    for name, argv in _text_commands(model_dirs["llama_bpe"], data, tmp_path / "out").items():
        if name == "spec_bench":
            continue
        try:
            run_and_check(capsys, tmp_path, argv, "data.jsonl:2 has no")
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def test_text_that_is_a_folder_is_named_as_a_folder(capsys, tmp_path, model_dirs):
    """Before: eval said "somedir does not exist"."""
    folder = tmp_path / "somedir"
    folder.mkdir()
    (folder / "a.txt").write_text("text in a folder\n")
    for name, argv in _text_commands(model_dirs["llama_bpe"], folder, tmp_path / "out").items():
        try:
            run_and_check(capsys, tmp_path, argv, "somedir is a folder, not a file")
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


@pytest.mark.parametrize("pair", ["same_model", "same_tokenizer"])
def test_transplant_onto_the_same_tokenizer_is_refused_before_weights(
        capsys, tmp_path, model_dirs, monkeypatch, pair):
    """Before: BASE = DONOR ran, wrote a full copy and said "400 copied exactly, "."""
    from tokensurgeon import modelio, streaming

    def weights(*args, **kwargs):
        raise AssertionError("weights were read before the tokenizers were compared")

    monkeypatch.setattr(modelio, "load_embeddings", weights)
    monkeypatch.setattr(streaming, "load_base", weights)
    donor = model_dirs["llama_bpe"] if pair == "same_model" else model_dirs["llama_bpe_untied"]
    needle = "are the same model" if pair == "same_model" else "have the same tokenizer"
    run_and_check(capsys, tmp_path, ["transplant", model_dirs["llama_bpe"], donor,
                                     tmp_path / "out"], needle)


def test_eval_max_bytes_below_one_segment_scores_that_many_bytes(capsys, tmp_path, model_dirs):
    """Before: --max-bytes 1000 on a 20 kB file said the file "holds no text"."""
    text = tmp_path / "big.txt"
    line = "The quick brown fox jumps over the lazy dog and keeps on running.\n"
    text.write_text(line * (20_000 // len(line)))
    capsys.readouterr()
    assert cli.main(["eval", str(model_dirs["llama_bpe"]), str(text), "--max-bytes", "1000",
                     "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kept = (1000 // len(line)) * len(line)  # cut back to the last whole line
    assert result["segments"] == 1 and result["bytes"] <= kept
    assert result["bytes"] >= kept - len(line.split()[0])  # only the unscored first token
    one_line = tmp_path / "one_line.txt"
    one_line.write_text("word " * 4000)  # no line end at all: cut at a character
    assert cli.main(["eval", str(model_dirs["llama_bpe"]), str(one_line), "--max-bytes", "700",
                     "--quiet"]) == 0
    assert 0 < json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bytes"] <= 700
    blank_start = tmp_path / "blank_start.txt"
    blank_start.write_text("\n" * 50 + "text after blank lines\n")
    run_and_check(capsys, tmp_path, ["eval", model_dirs["llama_bpe"], blank_start,
                                     "--max-bytes", "10"], "raise --max-bytes")


# -- killed runs --------------------------------------------------------------------------

KILLED_WRITER = """
import os, signal, sys
from tokensurgeon import modelio
with modelio.atomic_output_dir(sys.argv[1], overwrite=False) as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 100_000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_run_killed_while_saving_leaves_a_sibling_the_next_run_removes(capsys, tmp_path,
                                                                        model_dirs):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], cwd=root,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)},
                          capture_output=True, check=False)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = _siblings(out)
    assert len(left) == 1 and left[0].startswith(".out.tmp-"), left
    assert not out.exists()
    capsys.readouterr()
    assert cli.main(["spec", "make-draft", str(model_dirs["llama_bpe"]), "--keep-layers", "0",
                     "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"removed {tmp_path / left[0]}" in err and "killed run" in err, err
    assert _siblings(out) == [] and (out / "config.json").is_file()


def _sibling(out, pid, host=None, kind="tmp"):
    from tokensurgeon import modelio

    path = out.parent / f".{out.name}.{kind}-{host or modelio._host()}-{pid}-abcd1234"
    path.mkdir()
    (path / "weights.bin").write_bytes(b"x" * 2000)
    return path


def test_leftovers_are_told_apart_by_their_writer(tmp_path, capsys):
    import os
    import subprocess
    import sys

    from tokensurgeon import modelio, progress

    out = tmp_path / "out"
    # A dead writer whose pid is now reused by a process that started after the folder was
    # last written (the parent of this test, backdated folder): stale.
    reused = _sibling(out, os.getppid())
    os.utime(reused, (0, 0))
    old = _sibling(out, os.getppid(), kind="old")
    os.utime(old, (0, 0))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _sibling(out, sleeper.pid)  # a run writing OUT right now: kept, named
        foreign = _sibling(out, 1234, host="another_machine")  # cannot be checked: named
        legacy = out.parent / ".out.tmp-k2j4h5g6"  # named before writers were recorded
        legacy.mkdir()
        other = _sibling(tmp_path / "out2", 999_999_999)  # another OUT's: not touched
        found = modelio.leftovers(out)
        assert found == {"stale": [old, reused], "unknown": [foreign, legacy], "live": [live]}
        stream = __import__("io").StringIO()
        with progress.use(progress.Progress(stream=stream, tty=False)):
            assert modelio.clean_leftovers(out) == [old, reused]
            modelio.clean_leftovers(out)  # a second look names nothing twice
        lines = stream.getvalue().splitlines()
        assert len(lines) == 5, lines
        assert sum("left by a killed run" in x for x in lines) == 2
        for kept in (live, foreign, legacy):
            assert kept.is_dir() and any(f"rm -rf '{kept}'" in x for x in lines)
        assert not reused.exists() and not old.exists() and other.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its writer gone (and reaped), the live one is stale now.
    assert modelio.leftovers(out)["stale"] == [live]
