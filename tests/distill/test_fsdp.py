"""``distill --fsdp``: a student sharded over 2 CPU processes (FSDP2 over gloo) trains exactly
as one unsharded process does: the same losses, the same updated weights, the same saved
model, checkpoints and resume.

Tolerances are those of the data-parallel test (loss rel 1e-5; weights rtol 1e-4, atol
1e-5): a sharded run sums the same float32 terms in another order (each process half the
batch, then a reduce-scatter), and AdamW's first steps (~lr x sign of the gradient) turn
that rounding into weight differences of ~1e-6 at lr 1e-2; a head or embedding used as a
shard, or a gradient not reduced, is off by orders of magnitude more.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

import cli

ROOT = Path(__file__).resolve().parents[2]
LOSS_REL, WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-4, 1e-5


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    out["OMP_NUM_THREADS"] = "1"
    out.pop("ACCELERATE_USE_FSDP", None)
    return {**out, **extra}


def port() -> str:
    return str(29500 + os.getpid() % 1000)


def _check_in_process(rank: int, master_port: str) -> None:
    """A forked process's share of tests/distill/fsdp_check.py; its exit code is the result."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=master_port)
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("fsdp_check",
                                                  Path(__file__).with_name("fsdp_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    os._exit(check.main())  # no pytest teardown in a forked child


def test_fused_head_under_fsdp_matches_one_process(capfd):
    """Fast twin of the end-to-end runs below: two processes shard a tied, soft-capped
    student; the fused head's statistics, every gradient and the weights after an AdamW
    step equal an unsharded copy's on the whole batch (tests/distill/fsdp_check.py). The
    processes are forked, so torch and transformers are not imported again."""
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_check_in_process, args=(rank, port())) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():  # a process waiting on its dead peer: end it, the test fails
            p.kill()
    out, err = capfd.readouterr()
    assert [p.exitcode for p in procs] == [0, 0], out + err[-3000:]
    assert out.count("0 mismatches") == 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text("\n".join(tiny.corpus(4)))
    (root / "held.txt").write_text("\n".join(tiny.CORPUS[::2]))
    return root


def args(model_dirs, data, out, *extra, student="gemma_spm"):
    return ["distill", "--teacher", str(model_dirs["llama_bpe"]), "--student",
            str(model_dirs[student]), "--data", str(data / "corpus.txt"), "--out", str(out),
            "--batch-size", "4", "--max-length", "48", "--lr", "1e-2", "--quiet", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_same_run(sharded: Path, reference: Path) -> None:
    """Same per-step losses, unit counts and held-out BPB, and the same saved weights."""
    rows, expected = metrics(sharded), metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for got, want in zip(rows, expected):
        for key, value in want.items():
            if key.startswith(("units_", "tokens")) and key != "tokens_per_s":
                assert got[key] == value, key
            elif key == "loss" or key.startswith(("loss_", "eval_bpb")):
                assert got[key] == pytest.approx(value, rel=LOSS_REL), (key, got["step"])
    assert_same_weights(load_file(str(sharded / "model.safetensors")),
                        load_file(str(reference / "model.safetensors")))


def launch(argv: list[str], accelerate: bool = False) -> subprocess.CompletedProcess:
    if accelerate:  # as accelerate users launch: --use_fsdp turns --fsdp on
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp",
                  "--num_processes", "2", "--main_process_port", port()]
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "--master_port", port()]
    done = subprocess.run([*prefix, "-m", "cli", *argv], check=False, cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es), sharded (FSDP)" in done.stdout
    return done


@pytest.mark.slow  # two launches of 2 processes
def test_fsdp_run_matches_one_process_and_saves_the_same_model(model_dirs, data, tmp_path):
    """The default loss (alm+sft: the fused head on the tied head and embeddings), full
    training, held-out BPB in the loop with its best checkpoint, checkpoints kept."""
    common = ["--steps", "4", "--eval-data", str(data / "held.txt"), "--eval-every", "2",
              "--checkpoint-every", "2", "--keep-checkpoints"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(args(model_dirs, data, one, *common)) == 0
    launch(args(model_dirs, data, two, *common, "--fsdp"))
    assert_same_run(two, one)
    assert all(r["units_alm"] > 0 for r in metrics(two) if "units_alm" in r)
    before = load_file(str(model_dirs["gemma_spm"] / "model.safetensors"))
    after = load_file(str(two / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # A full, loadable HF directory: the same files, config and weights as one process's.
    from transformers import AutoModelForCausalLM

    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (two / name).read_text() == (one / name).read_text(), name
    model = AutoModelForCausalLM.from_pretrained(two)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    for step in ("step-2", "step-4", "best/step-2"):
        assert_same_weights(
            load_file(str(two / "checkpoints" / step / "trainable.safetensors")),
            load_file(str(one / "checkpoints" / step / "trainable.safetensors")))


@pytest.mark.slow  # two launches of 2 processes
def test_fsdp_resume_continues_exactly(model_dirs, data, tmp_path):
    """A sharded run resumed (sharded) from its step-2 checkpoint ends as one process."""
    common = ["--steps", "4", "--checkpoint-every", "2", "--keep-checkpoints"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(args(model_dirs, data, one, *common)) == 0
    launch(args(model_dirs, data, two, *common, "--fsdp"))
    import shutil

    shutil.rmtree(two / "checkpoints" / "step-4")
    launch(args(model_dirs, data, two, *common, "--fsdp", "--resume"))
    assert_same_run(two, one)


@pytest.mark.slow  # a launch of 2 processes
def test_accelerate_fsdp_launch_untied_embeddings_checkpointed(model_dirs, data, tmp_path):
    """``accelerate launch --use_fsdp``; an untied head, embeddings-only training, gradient
    checkpointing and 2 micro-batches: only the two embedding matrices change, as in one
    process."""
    common = ["--steps", "3", "--train", "embeddings", "--gradient-checkpointing",
              "--grad-accum", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(args(model_dirs, data, one, *common, student="gemma_spm_untied")) == 0
    launch(args(model_dirs, data, two, *common, student="gemma_spm_untied"), accelerate=True)
    assert_same_run(two, one)
    before = load_file(str(model_dirs["gemma_spm_untied"] / "model.safetensors"))
    after = load_file(str(two / "model.safetensors"))
    assert {k for k in after if not torch.equal(before[k], after[k])} == \
        {"model.embed_tokens.weight", "lm_head.weight"}


@pytest.mark.parametrize("extra, expected", [
    ([], "launch 2 or more"),
    (["--train", "lora"], "not merged from shards"),
    (["--gradmag"], "which --fsdp shards"),
    (["--dtype", "fp16"], "loss scaling across shards"),
])
def test_fsdp_bad_input_gives_one_line_error(model_dirs, data, tmp_path, capsys, extra,
                                             expected):
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(args(model_dirs, data, out, "--steps", "1", "--fsdp", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokensurgeon distill: error: ") and "\n" not in err
    assert expected in err
    assert not out.exists()


def test_accelerate_use_fsdp_alone_names_the_fix(model_dirs, data, tmp_path, capsys,
                                                 monkeypatch):
    """``accelerate launch --use_fsdp`` with one process: the same one line."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    capsys.readouterr()
    assert cli.main(args(model_dirs, data, tmp_path / "out", "--steps", "1")) == 2
    assert "launch 2 or more" in capsys.readouterr().err
