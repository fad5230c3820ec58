"""Transplant on tiny models: exact copies, reload-and-generate, methods, manifest."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokensurgeon.methods import method_names
from tokensurgeon.token_identity import shared_token_map, vocabulary
from tokensurgeon.transplant import TransplantConfig, transplant


def run(base, donor, out, **kw):
    cfg = TransplantConfig(base=str(base), donor=str(donor), out=str(out), quiet=True,
                           holdout=kw.pop("holdout", 16), k=kw.pop("k", 8),
                           candidates=kw.pop("candidates", 32), **kw)
    return transplant(cfg)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


PAIRS = [
    ("gemma_spm", "llama_bpe"),
    ("llama_bpe", "gemma_spm"),
    ("gemma_spm_untied", "llama_bpe_untied"),
    ("llama_bpe_untied", "gemma_spm"),
]


@pytest.mark.parametrize("base_name,donor_name", PAIRS)
def test_shared_tokens_copied_bit_exactly(model_dirs, tmp_path, base_name, donor_name):
    base_dir, donor_dir = model_dirs[base_name], model_dirs[donor_name]
    manifest = run(base_dir, donor_dir, tmp_path / "out")
    base, base_tok = load(base_dir)
    out, out_tok = load(tmp_path / "out")
    donor_tok = AutoTokenizer.from_pretrained(donor_dir)
    assert out_tok.get_vocab() == donor_tok.get_vocab()
    mapping = shared_token_map(vocabulary(base_tok), vocabulary(donor_tok))
    donor_ids = torch.tensor(sorted(mapping))
    base_ids = torch.tensor([mapping[i] for i in donor_ids.tolist()])
    assert manifest["counts"]["copied"] == len(mapping)
    assert torch.equal(out.get_input_embeddings().weight[donor_ids],
                       base.get_input_embeddings().weight[base_ids])
    assert torch.equal(out.get_output_embeddings().weight[donor_ids],
                       base.get_output_embeddings().weight[base_ids])
    tied = base.config.tie_word_embeddings
    # The default omp writes mean output rows for new tokens, so a tied BASE is untied.
    assert out.config.tie_word_embeddings == (tied and not manifest["untied"])
    if not tied:
        assert not torch.equal(out.get_output_embeddings().weight, out.get_input_embeddings().weight)
    # Everything outside the embeddings is BASE, untouched.
    base_state, out_state = base.state_dict(), out.state_dict()
    for name, tensor in base_state.items():
        if "embed" not in name and "lm_head" not in name:
            assert torch.equal(tensor, out_state[name]), name


@pytest.mark.parametrize("base_name,donor_name", PAIRS[:2])
def test_output_reloads_and_generates_with_new_token_ids(model_dirs, tmp_path, base_name, donor_name):
    run(model_dirs[base_name], model_dirs[donor_name], tmp_path / "out")
    model, tok = load(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == len(tok)
    assert config["eos_token_id"] == tok.eos_token_id
    assert config["bos_token_id"] == tok.bos_token_id
    # vLLM loads every top-level *.safetensors as weights: only the model may be there.
    assert [p.name for p in (tmp_path / "out").glob("*.safetensors")] == ["model.safetensors"]
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    stops = generation["eos_token_id"]  # a list when BASE stops on several tokens
    assert tok.eos_token_id in (stops if isinstance(stops, list) else [stops])
    ids = tok("The quick brown fox", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
    assert int(out.max()) < len(tok)


def test_omp_rows_are_the_manifest_combination_of_base_anchor_rows(model_dirs, tmp_path):
    base_dir, donor_dir = model_dirs["gemma_spm"], model_dirs["llama_bpe"]
    manifest = run(base_dir, donor_dir, tmp_path / "out")
    base, _ = load(base_dir)
    out, _ = load(tmp_path / "out")
    with safe_open(str(tmp_path / "out" / manifest["per_token"]), "pt") as f:
        new_ids = f.get_tensor("new_donor_ids")
        anchors = f.get_tensor("embed.anchor_base_ids").long()
        coef = f.get_tensor("embed.coef")
        mean_coef = f.get_tensor("embed.mean_coef")
        mean_row = f.get_tensor("embed.mean_row")
        shrink = f.get_tensor("embed.shrink")
    assert anchors.shape == (new_ids.numel(), 8)
    base_w = base.get_input_embeddings().weight
    raw = torch.einsum("bk,bkh->bh", coef, base_w[anchors]) + mean_coef[:, None] * mean_row
    expected = mean_row + shrink * (raw - mean_row)
    torch.testing.assert_close(out.get_input_embeddings().weight[new_ids], expected)
    assert manifest["counts"]["approximated"] == {"omp": new_ids.numel()}
    stats = manifest["matrices"]["embed"]
    assert stats["heldout_tokens"] == 16 and 0 <= stats["heldout_relative_error_donor"] < 1


@pytest.mark.parametrize("method", method_names())
def test_every_method_runs_and_records_itself(model_dirs, tmp_path, method):
    manifest = run(model_dirs["gemma_spm"], model_dirs["llama_bpe"], tmp_path / "out", method=method)
    approximated = manifest["counts"]["approximated"]
    assert sum(approximated.values()) == manifest["vocab_size"] - manifest["counts"]["copied"]
    assert method in approximated
    out, _ = load(tmp_path / "out")
    assert torch.isfinite(out.get_input_embeddings().weight).all()


def test_zero_and_mean_rows(model_dirs, tmp_path):
    run(model_dirs["gemma_spm"], model_dirs["llama_bpe"], tmp_path / "z", method="zero")
    m = run(model_dirs["gemma_spm"], model_dirs["llama_bpe"], tmp_path / "m", method="mean")
    with safe_open(str(tmp_path / "z" / m["per_token"]), "pt") as f:
        new_ids = f.get_tensor("new_donor_ids")
    z, _ = load(tmp_path / "z")
    mean, _ = load(tmp_path / "m")
    assert torch.count_nonzero(z.get_input_embeddings().weight[new_ids]) == 0
    rows = mean.get_input_embeddings().weight[new_ids]
    assert torch.allclose(rows, rows[0].expand_as(rows))


def test_subword_is_mean_of_base_pieces(model_dirs, tmp_path, bpe_tokenizer):
    # SentencePiece donor onto a byte-level base: every donor token's bytes are spellable.
    manifest = run(model_dirs["llama_bpe"], model_dirs["gemma_spm"], tmp_path / "out", method="subword")
    base, base_tok = load(model_dirs["llama_bpe"])
    out, out_tok = load(tmp_path / "out")
    vocab = vocabulary(out_tok)
    index = vocabulary(base_tok).byte_index()
    with safe_open(str(tmp_path / "out" / manifest["per_token"]), "pt") as f:
        new_ids = f.get_tensor("new_donor_ids").tolist()
    checked = 0
    for i in new_ids:
        data = vocab.token_bytes[i]
        if data and len(data) == 2 and data[:1] in index and data[1:] in index:
            pieces = [index[data[:1]], index[data[1:]]]
            if data not in index:
                expected = base.get_input_embeddings().weight[pieces].mean(0)
                torch.testing.assert_close(out.get_input_embeddings().weight[i], expected)
                checked += 1
    assert checked > 0


def test_exact_and_fast_omp_agree_when_candidates_cover_all_anchors(model_dirs, tmp_path):
    a = run(model_dirs["gemma_spm"], model_dirs["llama_bpe"], tmp_path / "a", candidates=0)
    b = run(model_dirs["gemma_spm"], model_dirs["llama_bpe"], tmp_path / "b", candidates=100000)
    x, _ = load(tmp_path / "a")
    y, _ = load(tmp_path / "b")
    torch.testing.assert_close(x.get_input_embeddings().weight, y.get_input_embeddings().weight)
    assert a["counts"] == b["counts"]


def test_overwrite_replaces_and_leaves_no_temporaries(model_dirs, tmp_path):
    out = tmp_path / "out"
    run(model_dirs["gemma_spm"], model_dirs["llama_bpe"], out)
    run(model_dirs["gemma_spm"], model_dirs["llama_bpe"], out, overwrite=True, method="mean")
    assert json.loads((out / "transplant.json").read_text())["options"]["method"] == "mean"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_untie_writes_a_separate_lm_head_that_reloads(model_dirs, tmp_path):
    base_dir, donor_dir = model_dirs["llama_bpe"], model_dirs["gemma_spm"]  # tied base
    manifest = run(base_dir, donor_dir, tmp_path / "out", untie=True, shrink=1.0,
                   output_shrink=0.25)
    assert manifest["untied"] and not manifest["tied_embeddings"]
    base, _ = load(base_dir)
    out, tok = load(tmp_path / "out")
    assert not out.config.tie_word_embeddings
    emb, head = out.get_input_embeddings().weight, out.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr()
    with safe_open(str(tmp_path / "out" / manifest["per_token"]), "pt") as f:
        new_ids, copied = f.get_tensor("new_donor_ids"), f.get_tensor("copied_donor_ids")
        copied_base, mean_row = f.get_tensor("copied_base_ids"), f.get_tensor("embed.mean_row")
    base_w = base.get_input_embeddings().weight
    assert torch.equal(emb[copied], base_w[copied_base])
    assert torch.equal(head[copied], base_w[copied_base])
    torch.testing.assert_close(head[new_ids], mean_row + 0.25 * (emb[new_ids] - mean_row))
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    generated = out.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3


def test_untie_refuses_a_model_without_an_lm_head_module():
    from tokensurgeon.errors import UsageError
    from tokensurgeon.transplant import untie_model

    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(UsageError, match="drop --untie"):
        untie_model(NoHead())


def test_leak_mass_is_reported_and_default_leaks_no_more_than_mean(model_dirs, tmp_path):
    """The default's output rows of new tokens are the anchor mean (output_shrink 0), so its
    leak is mean-init's up to the effect of its input rows on the context (equal here: the
    built-in text's tiny-tokenizer inputs hold no new token); a tied v1 leaks more."""
    base_dir, donor_dir = model_dirs["gemma_spm"], model_dirs["llama_bpe"]
    leak = {}
    runs = {"omp": {}, "mean": {"method": "mean"},
            "omp-tied-v1": {"untie": False, "output_shrink": 1.0, "centre": False}}
    for name, options in runs.items():
        manifest = run(base_dir, donor_dir, tmp_path / name, **options)
        check = manifest["leak_check"]
        assert 0 <= check["leak_mass"] <= 1 and check["tokens_shared_gold"] > 0
        leak[name] = check["leak_mass"]
    assert leak["omp"] <= leak["mean"] + 1e-6, leak
    assert leak["omp-tied-v1"] > leak["omp"], leak


def test_leak_check_is_skipped_above_its_memory_bound(model_dirs, tmp_path, monkeypatch):
    """The leak check reloads OUT whole; above the bound it must not (streaming's memory
    promise), and the manifest says why."""
    import tokensurgeon.transplant as transplant_module

    monkeypatch.setattr(transplant_module, "LEAK_CHECK_MAX_BYTES", 1024)
    monkeypatch.setattr(transplant_module, "_leak_check",
                        lambda *a, **k: pytest.fail("reloaded OUT above the bound"))
    manifest = run(model_dirs["gemma_spm"], model_dirs["llama_bpe"], tmp_path / "out")
    assert "above the 0 GiB bound" in manifest["leak_check"]["skipped"]
    on_disk = json.loads((tmp_path / "out" / "transplant.json").read_text())
    assert on_disk["leak_check"] == manifest["leak_check"]
