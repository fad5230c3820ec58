"""Every bad input gets a one-line error naming the fix, and nothing is left in OUT."""

from __future__ import annotations

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
    (d / "model.safetensors").write_bytes(b"")
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
