"""``--output-shrink auto``: the output-row weight is chosen per run on a training text.

The rule scores every candidate output matrix from one pass of final hidden states; these
tests check that its scores are the candidates' real bits per byte (each candidate written
and evaluated as a model of its own) and that it keeps the lowest.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokensurgeon.diagnostics import leak_stats, output_weight_scores, text_windows
from tokensurgeon.errors import UsageError
from tokensurgeon.transplant import TransplantConfig, transplant

TEXT = ("The harbour town woke slowly, and the market stalls were covered with crates of "
        "fish. A baker sells 48 loaves in the morning and 24 in the afternoon, 72 in all.\n")


def run(base, donor, out, **kw):
    cfg = TransplantConfig(base=str(base), donor=str(donor), out=str(out), quiet=True,
                           holdout=0, k=8, candidates=32, leak_check=False, **kw)
    return transplant(cfg)


def model_bpb(out_dir, text: str) -> float:
    """Bits per byte of a written model on ``text``, from its own forward pass."""
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out_dir)
    nll = 0.0
    with torch.inference_mode():
        for ids in text_windows(tok, text):
            logits = model(ids.unsqueeze(0)).logits[0, :-1].float()
            nll -= torch.log_softmax(logits, -1).gather(1, ids[1:, None]).sum().item()
    return nll / math.log(2) / len(text.encode("utf-8"))


@pytest.mark.parametrize("n_new,n_other", [(15, 5), (20, 0), (0, 20)])
def test_scores_equal_the_materialised_candidate_matrices(n_new, n_other):
    """The one-product shortcut equals building every candidate matrix and scoring it."""
    gen = torch.Generator().manual_seed(0)
    vocab, h_dim, t = 40, 8, 30
    hidden = torch.randn(t, h_dim, generator=gen)
    perm = torch.randperm(vocab, generator=gen)
    shared, new = perm[:20], perm[20:20 + n_new]
    shared_rows = torch.randn(20, h_dim, generator=gen)
    raw = 2 * torch.randn(n_new, h_dim, generator=gen)
    mean = torch.randn(h_dim, generator=gen)
    gold = torch.randint(0, vocab, (t,), generator=gen)
    weights = [0.0, 0.3, 1.0, 1.7]
    for softcap in (None, 5.0):
        got = output_weight_scores(hidden, gold, vocab, shared, shared_rows, new, raw, mean,
                                   weights, softcap, chunk=7)
        is_new = torch.ones(vocab, dtype=torch.bool)
        is_new[shared] = False
        for lam in weights:
            head = mean.expand(vocab, h_dim).clone()
            head[shared] = shared_rows
            head[new] = mean + lam * (raw - mean)
            want = leak_stats(hidden, head, gold, is_new, softcap)
            for key in want:
                assert got[lam][key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (lam, key)
        if n_new:
            assert len({round(got[lam]["nll_shared"], 3) for lam in weights}) > 1  # they differ


@pytest.mark.parametrize("base_name,donor_name", [("gemma_spm", "llama_bpe"),
                                                  ("llama_bpe", "gemma_spm")])
def test_auto_keeps_the_candidate_with_the_lowest_real_bpb(model_dirs, tmp_path, base_name,
                                                          donor_name):
    """Each candidate weight, written with --output-shrink fixed to it and evaluated as a
    model, has the bits per byte the rule reported; the rule chose the lowest of them."""
    text_file = tmp_path / "train.txt"
    text_file.write_text(TEXT)
    grid = [0.0, 1.0, 8.0, 30.0]  # wide, so that the candidates differ on a tiny model
    base, donor = model_dirs[base_name], model_dirs[donor_name]
    manifest = run(base, donor, tmp_path / "auto", output_grid=grid,
                   calibration_text=str(text_file))
    choice = manifest["output_rows"]
    assert choice["rule"] == "auto" and choice["text"] == str(text_file)
    reported = {row["weight"]: row["bpb"] for row in choice["scores"]}
    real = {}
    for lam in grid:
        run(base, donor, tmp_path / f"w{lam}", output_shrink=str(lam), untie=True)
        real[lam] = model_bpb(tmp_path / f"w{lam}", TEXT)
        assert reported[lam] == pytest.approx(real[lam], abs=2e-3), (lam, reported, real)
    assert max(real.values()) - min(real.values()) > 0.01, real  # the choice matters here
    assert real[choice["chosen"]] == min(real.values()), (choice, real)
    assert model_bpb(tmp_path / "auto", TEXT) == pytest.approx(min(real.values()), abs=2e-3)


def test_auto_unties_only_when_the_chosen_rows_differ_from_the_input_rows(model_dirs, tmp_path):
    base, donor = model_dirs["gemma_spm"], model_dirs["llama_bpe"]
    same = run(base, donor, tmp_path / "same", output_grid=[1.0])
    assert same["output_rows"]["chosen"] == 1.0 and not same["untied"]
    assert same["tied_embeddings"]
    mean = run(base, donor, tmp_path / "mean", output_grid=[0.0])
    assert mean["untied"] and not mean["tied_embeddings"]
    with safe_open(str(tmp_path / "mean" / "transplant" / "anchors.safetensors"), "pt") as f:
        new_ids = f.get_tensor("new_donor_ids")
        mean_row = f.get_tensor("embed.mean_row")
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "mean")
    head = out.get_output_embeddings().weight.detach()
    assert torch.allclose(head[new_ids], mean_row.expand(new_ids.numel(), -1), atol=1e-6)
    assert not torch.allclose(out.get_input_embeddings().weight[new_ids], head[new_ids])


def test_fixed_output_shrink_keeps_the_old_behaviour(model_dirs, tmp_path):
    manifest = run(model_dirs["gemma_spm"], model_dirs["llama_bpe"], tmp_path / "out",
                   output_shrink="0")
    assert manifest["output_rows"] == {"rule": "fixed", "output_shrink": 0.0}
    assert manifest["untied"]


@pytest.mark.parametrize("options,message", [({"output_shrink": "most"}, "auto or a number"),
                                             ({"output_grid": []}, "at least one weight")])
def test_bad_output_options_are_one_line_errors(model_dirs, tmp_path, options, message):
    with pytest.raises(UsageError, match=message):
        run(model_dirs["gemma_spm"], model_dirs["llama_bpe"], tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
