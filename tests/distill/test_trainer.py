"""The ``tokensurgeon distill`` command end to end on tiny models: output, errors, training
modes, 2-process data parallelism and SIGKILL-then-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(tiny.corpus(4)))
    return path


def args(model_dirs, data_file, out, *extra, teacher="llama_bpe", student="gemma_spm"):
    return ["distill", "--teacher", str(model_dirs[teacher]), "--student",
            str(model_dirs[student]), "--data", str(data_file), "--out", str(out),
            "--batch-size", "4", "--max-length", "48", "--quiet", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_distill_writes_a_model_directory(model_dirs, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(args(model_dirs, data_file, out, "--steps", "3", "--loss", "alm+sft",
                         "--checkpoint-every", "2")) == 0
    assert "wrote" in capsys.readouterr().out
    from tokensurgeon import modelio

    ref = modelio.resolve(str(out))
    model = modelio.load_model(ref)
    assert modelio.load_tokenizer(ref).get_vocab() == modelio.load_tokenizer(
        modelio.resolve(str(model_dirs["gemma_spm"]))).get_vocab()
    assert model.config.model_type == "gemma3_text"
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss_alm", "loss_sft", "units_alm", "units_sft", "tokens_per_s", "grad_norm"):
        assert all(key in r for r in rows)
    assert all(r["units_alm"] > 0 for r in rows)
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["loss"] == "alm+sft" and resolved["tau"] == 100.0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    before = weights(model_dirs["gemma_spm"])
    assert any(not torch.equal(before[k], v) for k, v in weights(out).items())


@pytest.mark.parametrize("case", [
    "unwritable_out", "existing_out", "empty_dataset", "kl_across_tokenizers", "bad_loss",
    "indivisible_batch", "resume_without_checkpoint", "rewriting_tokenizer", "too_short"])
def test_bad_input_gives_one_line_error(model_dirs, data_file, tmp_path, capsys, case):
    out = tmp_path / "out"
    extra: list[str] = ["--steps", "1"]
    kwargs = {}
    data = data_file
    if case == "unwritable_out":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    elif case == "existing_out":
        out.mkdir()
    elif case == "empty_dataset":
        data = tmp_path / "empty.txt"
        data.write_text("  \n")
    elif case == "kl_across_tokenizers":
        extra += ["--loss", "kl"]
    elif case == "bad_loss":
        extra += ["--loss", "alm+magic"]
    elif case == "indivisible_batch":
        extra += ["--grad-accum", "3"]
    elif case == "resume_without_checkpoint":
        extra += ["--resume"]
    elif case == "rewriting_tokenizer":
        from tokenizers import normalizers

        tok = tiny.byte_level_tokenizer()
        tok.backend_tokenizer.normalizer = normalizers.Lowercase()
        model_dirs = {**model_dirs, "lower": tiny.save(tiny.tiny_llama(len(tok)), tok,
                                                      tmp_path / "lower")}
        kwargs["student"] = "lower"
    elif case == "too_short":
        data = tmp_path / "short.txt"
        data.write_text("🚀")
        # Whole-text packing truncates to BOS + one token per side, which never align;
        # (fill cuts the stream into aligned one-token pieces, so it can train on it.)
        extra += ["--max-length", "2", "--pack", "texts"]
    capsys.readouterr()  # drop setup output (tiny.save progress bars)
    assert cli.main(args(model_dirs, data, out, *extra, **kwargs)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokensurgeon distill: error: ") and "\n" not in err
    expected = {
        "unwritable_out": "choose a writable OUT", "existing_out": "--overwrite",
        "empty_dataset": "dataset is empty", "kl_across_tokenizers": "share one tokenizer",
        "bad_loss": "unknown loss 'magic'", "indivisible_batch": "multiple of processes",
        "resume_without_checkpoint": "no checkpoint", "rewriting_tokenizer": "reproduce the text",
        "too_short": "raise --max-length"}[case]
    assert expected in err


def test_embeddings_only_training_changes_only_embeddings(model_dirs, data_file, tmp_path):
    out = tmp_path / "emb"
    assert cli.main(args(model_dirs, data_file, out, "--steps", "2", "--train", "embeddings",
                         "--lr", "1e-2")) == 0
    before, after = weights(model_dirs["gemma_spm"]), weights(out)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed == {"model.embed_tokens.weight"}


def test_lora_training_writes_a_merged_model(model_dirs, data_file, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    assert cli.main(args(model_dirs, data_file, out, "--steps", "2", "--train", "lora",
                         "--lr", "1e-2", "--lora-rank", "4")) == 0
    before, after = weights(model_dirs["gemma_spm"]), weights(out)
    assert set(after) == set(before)  # no adapter keys: LoRA is merged into the weights
    assert any(not torch.equal(before[k], after[k]) for k in after if "proj" in k)
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_gradmag_and_baselines_run(model_dirs, data_file, tmp_path):
    out = tmp_path / "gm"
    assert cli.main(args(model_dirs, data_file, out, "--steps", "1", "--loss", "alm+sft+uld",
                         "--gradmag")) == 0
    same = tmp_path / "kl"
    assert cli.main(args(model_dirs, data_file, same, "--steps", "1", "--loss",
                         "kl+kl_reverse+hidden", student="llama_bpe_untied")) == 0
    assert metrics(same)[0]["units_kl"] > 0


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow  # torchrun / a killed process; fast in-process twin below
def test_two_processes_match_one_with_the_same_global_batch(model_dirs, data_file, tmp_path):
    common = ["--steps", "3", "--loss", "alm+sft", "--lr", "1e-2"]
    one = tmp_path / "one"
    assert cli.main(args(model_dirs, data_file, one, *common)) == 0
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(29500 + os.getpid() % 1000), "-m", "cli"]
    done = subprocess.run(launch + args(model_dirs, data_file, two, *common), check=False,
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 process(es)" in done.stdout
    for a, b in zip(metrics(one), metrics(two), strict=True):
        # Each process held half the batch; the logged loss is the global one.
        assert b["units_alm"] == a["units_alm"] and b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for k, v in weights(one).items():
        torch.testing.assert_close(weights(two)[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # torchrun / a killed process; fast in-process twin below
def test_sigkill_then_resume_reaches_the_same_final_loss(model_dirs, data_file, tmp_path):
    common = ["--steps", "60", "--checkpoint-every", "10", "--loss", "alm+sft", "--lr", "5e-3"]
    reference = tmp_path / "reference"
    assert cli.main(args(model_dirs, data_file, reference, *common)) == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args(model_dirs, data_file, out, *common)],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-10").is_dir() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-training, not finished
    assert not (out / "config.json").exists()
    done = subprocess.run([sys.executable, "-m", "cli",
                           *args(model_dirs, data_file, out, *common, "--resume")],
                          check=False, cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed, expected = metrics(out), metrics(reference)
    assert [r["step"] for r in resumed] == list(range(1, 61))
    assert resumed[-1]["loss"] == pytest.approx(expected[-1]["loss"], rel=1e-6, abs=1e-7)
    for k, v in weights(reference).items():
        torch.testing.assert_close(weights(out)[k], v, rtol=1e-5, atol=1e-6)


def test_grad_accum_matches_one_micro_batch(model_dirs, data_file, tmp_path):
    """Fast twin of the 2-process test: the same global batch split into 2 micro-batches
    (each loss divided by the whole batch's unit count) gives the same losses and update."""
    common = ["--steps", "3", "--loss", "alm+sft", "--lr", "1e-2"]
    one, two = tmp_path / "one", tmp_path / "accum"
    assert cli.main(args(model_dirs, data_file, one, *common)) == 0
    assert cli.main(args(model_dirs, data_file, two, *common, "--grad-accum", "2")) == 0
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert b["units_alm"] == a["units_alm"] and b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for k, v in weights(one).items():
        torch.testing.assert_close(weights(two)[k], v, rtol=1e-4, atol=1e-5)


def test_resume_from_an_earlier_checkpoint_reaches_the_same_final_loss(model_dirs, data_file,
                                                                      tmp_path):
    """Fast twin of the SIGKILL test: drop the last checkpoint, as if the run had died after
    step 3, and --resume; steps 4-6 are redone and the result is bit-for-bit the same."""
    common = ["--steps", "6", "--checkpoint-every", "3", "--loss", "alm+sft", "--lr", "5e-3"]
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    assert cli.main(args(model_dirs, data_file, reference, *common)) == 0
    assert cli.main(args(model_dirs, data_file, out, *common)) == 0
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-6")
    assert cli.main(args(model_dirs, data_file, out, *common, "--resume")) == 0
    resumed, expected = metrics(out), metrics(reference)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert resumed[-1]["loss"] == pytest.approx(expected[-1]["loss"], rel=1e-6, abs=1e-7)
    for k, v in weights(reference).items():
        torch.testing.assert_close(weights(out)[k], v, rtol=1e-5, atol=1e-6)


def test_a_new_loss_runs_through_the_trainer_by_its_traits(model_dirs, data_file, tmp_path,
                                                           monkeypatch):
    """A loss registered by a test, with an option of its own and reading nothing of the
    teacher: the trainer trains with it, logs it under its name, hands it its option, and
    never loads the teacher model (it asks the loss, it does not know its name)."""
    from dataclasses import dataclass, field

    from distill import losses
    from distill.trainer import DistillConfig, distill
    from tokensurgeon import modelio
    from tokensurgeon.config import member_options

    @dataclass
    class NormOptions:
        norm_weight: float = field(default=1.0, metadata={"help": "factor on the norm"})

    def total(x):  # a stand-in objective: the student's squared final hidden states
        h = x.student.hidden.float().pow(2).mean(-1) * x.settings.norm_weight
        return torch.where(x.student.predicted, h, torch.zeros_like(h)).sum()

    losses.register(losses.Loss("hidden_norm", lambda x: int(x.student.predicted.sum()), total,
                                teacher="none", options=NormOptions))
    loaded = []
    real_load = modelio.load_model
    monkeypatch.setattr(modelio, "load_model",
                        lambda ref, **kw: loaded.append(ref.label) or real_load(ref, **kw))
    try:  # what importing a module that registers it does: the configs gain its option
        monkeypatch.setattr(losses, "LossSettings", member_options(
            losses.LOSSES, after="student_boundary")(losses.LossSettings))
        config = member_options(losses.LOSSES, after="loss")(DistillConfig)

        def run(name: str, weight: float) -> list[dict]:
            distill(config(teacher=str(model_dirs["llama_bpe"]),
                           student=str(model_dirs["gemma_spm"]), data=[str(data_file)],
                           out=str(tmp_path / name), batch_size=4, max_length=48, steps=3,
                           lr=1e-2, quiet=True, loss="hidden_norm", norm_weight=weight,
                           teacher_cache=str(tmp_path / "cache")))
            return metrics(tmp_path / name)

        one, three = run("one", 1.0), run("three", 3.0)
    finally:
        del losses.LOSSES["hidden_norm"]
    assert [r["step"] for r in one] == [1, 2, 3]
    assert all(r["units_hidden_norm"] > 0 and r["loss"] == r["loss_hidden_norm"] for r in one)
    assert one[-1]["loss"] < one[0]["loss"]
    assert three[0]["loss"] == pytest.approx(3 * one[0]["loss"], rel=1e-5)
    assert loaded == [str(model_dirs["gemma_spm"])] * 2  # the student only
    assert not (tmp_path / "cache").exists()  # nothing of the teacher to cache
