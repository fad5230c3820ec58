"""Benchmark ``tokensurgeon distill`` against TRL's GOLD trainer (``trl.experimental.gold``),
its cross-tokenizer peer, on the same pieces of text, steps and held-out scoring.

Arms (``--arms``): ours ``sft``, ``alm+sft`` (distill's default loss), ``alm``; GOLD
off-policy (``lmbda=0``) with hybrid ULD and cross-entropy weight 0.1 (``gold-hybrid-ce0.1``)
or 0 (``gold-hybrid-ce0``), GOLD's cross-entropy alone (``gold-ce``, its SFT control), and
GOLD on-policy (``gold-onpolicy-ce0.1``, ``lmbda=0.5``; not in the default grid). GOLD runs
from the installed ``trl`` with its documented cross-tokenizer settings, unchanged:
``use_uld_loss=True``, ``uld_use_hybrid_loss=True`` and ``use_extended_uld=False`` (its
byte-offset alignment refuses Gemma's SentencePiece tokenizer).

Equal data: the training text is cut by distill's own packer (``--pack``, default ``fill``:
sequences of at most ``--max-length`` tokens on both sides, cut where both tokenizations
end at the same byte), and each run draws ``--steps`` x ``--batch-size`` of these pieces in
the order ``distill`` draws them for its seed. GOLD refuses packing and wants
prompt/completion rows with a non-empty prompt, so it gets exactly those pieces, one per
row: the first word is the prompt, the rest the completion (it shuffles them within the run
with the same seed). Both sides therefore see the same multiset of texts at equal steps;
ours scores every token after BOS, GOLD every token after the first word plus its EOS.

Sections (``--sections``): ``teacher_student`` (setting a: Gemma-3-270M -> SmolLM2-135M on
the first 80% of the WikiText prose), ``transfer1`` (setting b: Gemma-3-270M onto
SmolLM2's tokenizer by the default transplant, self-distilled from the original on GSM8K
train answers), ``throughput`` (student tokens per CPU-second and loss per step of ours,
full and LoRA, and GOLD on the same batch). Held-out scoring is bench/distill.py's
(``bpb``: bits per byte, BOS prepended): the last 20% of the prose at every ``--eval-every``
steps and at the end, GSM8K test answers and Shakespeare at the end.

Every (setting, arm, seed) is one run: checkpoints under the modelio work dir (ours:
``distill --resume``; GOLD: the HF Trainer's ``resume_from_checkpoint``), its record
(per-step metrics, held-out BPB per evaluation, wall and CPU seconds) appended to
``bench/results/distill/gold/runs.jsonl`` when it finishes; a re-run skips finished runs and
resumes an interrupted one. Plots: ``bench/results/distill/gold/<section>_<steps>steps_heldout_bpb.png``.
The last stdout line is one JSON object (tables, paired differences, costs, hardware).

    python bench/distill_gold.py --sections throughput --throughput-steps 3
    python bench/distill_gold.py --sections teacher_student --steps 20 --seeds 0,1,2
    python bench/distill_gold.py --sections transfer1 --steps 20 --seeds 0 \\
        --arms sft,alm+sft,gold-hybrid-ce0.1,gold-ce
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import itertools
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    GSM8K_TEST,
    GSM8K_TRAIN,
    PROSE,
    ROOT,
    SHAKESPEARE,
    add_data_root,
    load_average,
    portable,
    require,
    run,
)

from distill.alignment import text_byte_lengths
from distill.data import batch_indices, build_examples, read_documents
from distill.trainer import DistillConfig, distill
from tokensurgeon import modelio, training
from tokensurgeon.errors import UsageError
from tokensurgeon.evaluate import read_documents as read_eval_documents
from tokensurgeon.token_identity import vocabulary

# bench/distill.py's evaluation, data split and baselines (loaded by path: the name
# ``distill`` is the package).
_spec = importlib.util.spec_from_file_location("bench_distill", Path(__file__).with_name("distill.py"))
bench_distill = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_distill)
bpb, mean_se = bench_distill.bpb, bench_distill.mean_se

RESULTS = ROOT / "bench" / "results" / "distill" / "gold"
WORK = modelio.cache_dir() / "work" / "distill-gold"
INSTALL_HINT = "pip install 'tokensurgeon[bench]'"


# ----------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    """One method of the grid: its trainer (``train_ours`` or ``train_gold``) and the
    options it passes (DistillConfig fields, or GOLDConfig fields)."""

    trainer: str
    options: dict = field(default_factory=dict)


ARMS = {
    "sft": Arm("ours", {"loss": "sft"}),
    "alm+sft": Arm("ours", {}),  # distill's defaults: the default loss and ALM units
    "alm": Arm("ours", {"loss": "alm"}),
    "gold-hybrid-ce0.1": Arm("gold", {"uld_crossentropy_weight": 0.1}),
    "gold-hybrid-ce0": Arm("gold", {"uld_crossentropy_weight": 0.0}),
    "gold-ce": Arm("gold", {"uld_crossentropy_weight": 1.0, "uld_distillation_weight": 0.0}),
    "gold-onpolicy-ce0.1": Arm("gold", {"uld_crossentropy_weight": 0.1, "lmbda": 0.5}),
}
DEFAULT_ARMS = "sft,alm+sft,alm,gold-hybrid-ce0.1,gold-ce,gold-hybrid-ce0"
# GOLD's documented cross-tokenizer settings (the same in every GOLD arm).
GOLD_CROSS_TOKENIZER = {"use_uld_loss": True, "uld_use_hybrid_loss": True,
                        "use_extended_uld": False, "lmbda": 0.0}
TEXTS = ("prose_heldout", "gsm8k_test", "shakespeare")


def require_trl() -> None:
    """One line naming the install when trl (GOLD) is missing."""
    try:
        import trl  # noqa: F401
        from trl.experimental.gold import GOLDTrainer  # noqa: F401
    except ImportError:
        raise UsageError(f"the GOLD arms need trl>=1.16 (trl.experimental.gold); run: "
                         f"{INSTALL_HINT}") from None


# ----------------------------------------------------------------------------- settings


@dataclass
class Setting:
    """Teacher, student, training data file and held-out texts of one section."""

    name: str
    teacher: Any
    student: Any
    data: Path
    sets: dict
    baselines: dict


def setting_teacher_student(args, work: Path) -> Setting:
    teacher, student = (modelio.resolve("builtin:gemma3-270m"),
                        modelio.resolve("builtin:smollm2-135m"))
    train_path, heldout_text = bench_distill.split_prose(work, 0.8)
    sets = bench_distill.heldout_sets(heldout_text, args.retention_bytes, TEXTS)
    return _with_baselines("teacher_student", teacher, student, train_path, sets, args)


def setting_transfer1(args, work: Path) -> Setting:
    base, _ = bench_distill.TRANSFER[1]
    teacher = modelio.resolve(base)
    student = modelio.resolve(str(bench_distill.transfer_transplant(1)))
    train_path = work / "gsm8k-train-answers.jsonl"
    bench_distill.write_if_changed(train_path, "".join(
        json.dumps({"text": a}) + "\n"
        for a in read_eval_documents(bench_distill.DATA / GSM8K_TRAIN, "answer")))
    _, heldout_text = bench_distill.split_prose(work, 0.8)
    sets = bench_distill.heldout_sets(heldout_text, args.retention_bytes, TEXTS)
    return _with_baselines("transfer1", teacher, student, train_path, sets, args)


def _with_baselines(name, teacher, student, train_path, sets, args) -> Setting:
    sizes = {k: sum(len(s.encode()) for s in v) for k, v in sets.items()}
    print(f"{name}: held-out bytes {sizes}", flush=True)
    baselines, _ = bench_distill.cached_baselines(
        RESULTS / f"{name}_baselines.json", json.dumps(sizes, sort_keys=True) + f"|{name}",
        teacher, student, sets, args.gap_segments)
    return Setting(name, teacher, student, train_path,
                   sets, {k: v for k, v in baselines.items() if k != "teacher_ll"})


SETTINGS = {"teacher_student": setting_teacher_student, "transfer1": setting_transfer1}
SECTION_DATA = {"teacher_student": [PROSE, GSM8K_TEST, SHAKESPEARE],
                "transfer1": [GSM8K_TRAIN, GSM8K_TEST, PROSE, SHAKESPEARE],
                "throughput": [PROSE, GSM8K_TEST, SHAKESPEARE]}


# ----------------------------------------------------------------------------- data


def distill_config(setting: Setting, args, seed: int, out: Path, **options) -> DistillConfig:
    """The DistillConfig of an ours-run (and of the packer both sides share)."""
    return DistillConfig(teacher=str(setting.teacher.directory),
                         student=str(setting.student.directory), data=[str(setting.data)],
                         out=str(out), steps=args.steps, batch_size=args.batch_size,
                         max_length=args.max_length, lr=args.lr,
                         warmup_steps=args.warmup_steps, seed=seed, device="cpu", quiet=True,
                         **({"pack": args.pack} if args.pack else {}), **options)


def pieces(setting: Setting, cfg: DistillConfig) -> tuple[list, list[str]]:
    """distill's examples of ``cfg`` (its reader and packer) and each one's text (the
    student's tokens decoded, checked byte-exact against the bytes the piece covers)."""
    docs = read_documents(cfg.data, cfg.data_format,
                          None if cfg.pack == "fill" else 2 * cfg.max_length, cfg.chat)
    t_tok, s_tok = modelio.load_tokenizer(setting.teacher), modelio.load_tokenizer(setting.student)
    examples = build_examples(docs, t_tok, s_tok, vocabulary(t_tok).token_bytes,
                              vocabulary(s_tok).token_bytes, cfg.max_length, cfg.pack)
    skip = {s_tok.bos_token_id} if s_tok.bos_token_id is not None else set()
    texts = []
    for e in examples:
        ids = [i for n, i in enumerate(e.student_ids) if n > 0 or i not in skip]
        texts.append(s_tok.decode(ids, skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False))
    wrong = sum(len(t.encode()) != e.num_bytes for t, e in zip(texts, examples))
    if wrong:
        print(f"warning: {wrong} of {len(texts)} pieces do not decode to the bytes they cover",
              file=sys.stderr)
    return examples, texts


def prompt_completion(text: str, tokenizer) -> dict:
    """GOLD's row for a plain text: the first word(s) as the (non-empty, whole-token)
    prompt, the rest as the completion."""
    offsets = tokenizer(text, add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    ends = {end for _, end in offsets}
    cut = next((n for n in range(1, len(text)) if text[n] == " " and n in ends
                and text[:n].strip()), None)
    if cut is None:
        cut = offsets[0][1]
    return {"prompt": text[:cut], "completion": text[cut:]}


def run_order(examples_count: int, steps: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the pieces distill draws at steps 0..steps-1 for ``seed``."""
    return [i for step in range(steps)
            for i in batch_indices(step, batch_size, examples_count, seed)]


def positional_alignment(setting: Setting, args) -> dict:
    """How often GOLD's positional pairing (``use_extended_uld=False``: the i-th completion
    token of the student against the teacher's i-th) pairs tokens that end at the same byte,
    over the completions of seed 0's pieces; and the median first position where they part."""
    cfg = distill_config(setting, args, 0, WORK / "unused")
    examples, texts = pieces(setting, cfg)
    toks = [modelio.load_tokenizer(ref) for ref in (setting.teacher, setting.student)]
    spelled = [vocabulary(t).token_bytes for t in toks]
    shares, parted = [], []
    for i in sorted(set(run_order(len(examples), args.steps, args.batch_size, 0))):
        completion = prompt_completion(texts[i], toks[1])["completion"]
        ends = []
        for tok, token_bytes in zip(toks, spelled):
            lengths = text_byte_lengths(tok(completion, add_special_tokens=False)["input_ids"],
                                        token_bytes, completion.encode())
            ends.append(list(itertools.accumulate(lengths)))
        n = min(len(e) for e in ends)
        same = [a == b for a, b in zip(ends[0][:n], ends[1][:n])]
        shares.append(sum(same) / max(n, 1))
        parted.append(same.index(False) if False in same else n)
    parted.sort()
    return {"pieces": len(shares), "share_same_end": round(sum(shares) / len(shares), 3),
            "median_first_parting": parted[len(parted) // 2]}


# ----------------------------------------------------------------------------- runs


class RunState:
    """A run's progress beside its checkpoints: the held-out curve and the CPU and wall
    seconds of every finished segment (an interrupted segment's time after its last
    checkpoint is redone, so it is not counted)."""

    def __init__(self, path: Path):
        self.path = path
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.curve: dict[str, dict] = saved.get("curve", {})
        self.cpu_s, self.wall_s = saved.get("cpu_s", 0.0), saved.get("wall_s", 0.0)
        self.segments = saved.get("segments", 0) + 1
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def now(self) -> tuple[float, float]:
        return (self.cpu_s + time.process_time() - self._cpu,
                self.wall_s + time.perf_counter() - self._wall)

    def save(self) -> None:
        cpu, wall = self.now()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"curve": self.curve, "cpu_s": cpu, "wall_s": wall,
                                   "segments": self.segments}))
        tmp.replace(self.path)


def score(model, tok, setting: Setting, step: int, final: bool, state: RunState,
          tokens_seen: int, label: str) -> None:
    """Held-out BPB (prose; all texts at the end) into the run's curve."""
    began = time.process_time()
    row = {"student_tokens": tokens_seen,
           "prose_heldout": bpb(model, tok, setting.sets["prose_heldout"])}
    if final:
        for name in TEXTS[1:]:
            row[name] = bpb(model, tok, setting.sets[name])
    row["eval_cpu_s"] = round(time.process_time() - began, 1)
    state.curve[str(step)] = row
    state.save()
    print(f"  {label} step {step}: {row}", flush=True)


def eval_steps(args) -> set[int]:
    return ({s for s in range(args.eval_every, args.steps, args.eval_every)}
            if args.eval_every else set()) | {args.steps}


def train_ours(arm: Arm, setting: Setting, args, seed: int, run_dir: Path,
               state: RunState, label: str) -> dict:
    """One distill run with the bench's held-out scoring at checkpoints; resumable."""
    out = run_dir / "out"
    resume = training.latest_checkpoint(out / "checkpoints") is not None
    # The teacher's statistics are cached across the grid's runs (a shard per piece, filled
    # on first use); an arm with ``teacher_cache: None`` runs the teacher online.
    options = {"teacher_cache": str(WORK / f"teacher-cache-{setting.name}"),
               "teacher_cache_shard": 1, **arm.options}
    cfg = distill_config(setting, args, seed, out, resume=resume, overwrite=not resume,
                         checkpoint_every=args.eval_every or args.steps, **options)
    s_tok = modelio.load_tokenizer(setting.student)
    wanted = eval_steps(args)
    original_save, original_figures = training.save_checkpoint, training.step_figures

    def figures(step, loss, grad_norm, lr, n_tokens, seconds):
        return {**original_figures(step, loss, grad_norm, lr, n_tokens, seconds),
                "cpu_end": time.process_time()}

    def save_and_score(root, step, model, *rest, **kw):
        if step in wanted:
            # metrics.jsonl holds this step's row already (logged before the checkpoint)
            score(model, s_tok, setting, step, step == args.steps, state,
                  sum(_metrics(out)[:step]), label)
        return original_save(root, step, model, *rest, **kw)

    training.save_checkpoint, training.step_figures = save_and_score, figures
    try:
        distill(cfg)
    finally:
        training.save_checkpoint, training.step_figures = original_save, original_figures
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"metrics": metrics, "student_tokens": sum(m["tokens"] for m in metrics),
            "trained_tokens": sum(m["tokens"] - 1 * args.batch_size for m in metrics)}


def _metrics(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    return [r["tokens"] for r in rows if "tokens" in r]


def train_gold(arm: Arm, setting: Setting, args, seed: int, run_dir: Path,
               state: RunState, label: str) -> dict:
    """One GOLD run on the pieces distill draws for ``seed``; resumable (HF Trainer)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    cfg = distill_config(setting, args, seed, run_dir / "unused")
    examples, texts = pieces(setting, cfg)
    s_tok = modelio.load_tokenizer(setting.student)
    order = run_order(len(examples), args.steps, args.batch_size, seed)
    rows = [prompt_completion(texts[i], s_tok) for i in order]
    wanted = eval_steps(args)
    step_rows: dict[int, dict] = {}

    class Score(TrainerCallback):
        def on_step_end(self, _args, tstate, control, model=None, **kw):
            step = tstate.global_step
            step_rows[step] = {"step": step, "cpu_end": time.process_time(),
                               "tokens_seen": int(tstate.num_input_tokens_seen)}
            if step in wanted:
                score(model, s_tok, setting, step, step == args.steps, state,
                      int(tstate.num_input_tokens_seen), label)

    every = args.eval_every or args.steps
    gold_cfg = GOLDConfig(
        output_dir=str(run_dir / "trainer"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        warmup_steps=args.warmup_steps, lr_scheduler_type="linear",
        # distill's AdamW (betas 0.9/0.95, weight decay) and clipping (1.0), so the
        # optimiser is held equal too
        adam_beta2=0.95, weight_decay=cfg.weight_decay, max_grad_norm=1.0,
        seed=seed, data_seed=seed, use_cpu=True, report_to="none", logging_steps=1,
        save_strategy="steps", save_steps=every, save_total_limit=1,
        dataloader_drop_last=True, include_num_input_tokens_seen="non_padding",
        # one piece plus GOLD's EOS fits; nothing is truncated
        max_length=2 * args.max_length, max_completion_length=args.max_length,
        teacher_tokenizer_name_or_path=str(setting.teacher.directory),
        **{**GOLD_CROSS_TOKENIZER, **arm.options})
    student = modelio.load_model(setting.student)
    teacher = modelio.load_model(setting.teacher)
    trainer = GOLDTrainer(model=student, teacher_model=teacher, args=gold_cfg,
                          train_dataset=Dataset.from_list(rows), processing_class=s_tok,
                          callbacks=[Score()])
    checkpoints = sorted((run_dir / "trainer").glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    history = {r["step"]: r for r in trainer.state.log_history if "loss" in r}
    metrics = [{"step": s, **history.get(s, {}), **step_rows.get(s, {})}
               for s in sorted(set(history) | set(step_rows))]
    completion = sum(len(s_tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1
                     for r in rows)
    del trainer, student, teacher
    return {"metrics": metrics, "student_tokens": int(metrics[-1]["tokens_seen"]) if metrics
            else 0, "trained_tokens": completion, "pieces": len(rows)}


TRAINERS: dict[str, Callable] = {"ours": train_ours, "gold": train_gold}


def budget_of(args) -> dict:
    return {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
            "lr": args.lr, "warmup_steps": args.warmup_steps, "pack": args.pack or "default",
            "eval_every": args.eval_every, "retention_bytes": args.retention_bytes}


def run_grid(setting: Setting, args) -> list[dict]:
    """Every (arm, seed) of ``args`` not yet in runs.jsonl at this budget; returns them all."""
    runs_path = RESULTS / "runs.jsonl"
    budget = budget_of(args)
    key = json.dumps({"setting": setting.name, **budget}, sort_keys=True)
    done = {}
    if runs_path.is_file():
        for line in runs_path.read_text().splitlines():
            r = json.loads(line)
            if r["budget_key"] == key:
                done[(r["arm"], r["seed"])] = r
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.arms.split(","):
            if (name, seed) in done or args.summary_only:
                continue
            arm = ARMS[name]
            digest = hashlib.sha256(key.encode()).hexdigest()[:10]
            run_dir = WORK / setting.name / f"{name}-s{seed}-{digest}"
            run_dir.mkdir(parents=True, exist_ok=True)
            state = RunState(run_dir / "state.json")
            label = f"{setting.name} {name} seed {seed}"
            print(f"{label}: segment {state.segments}", flush=True)
            result = TRAINERS[arm.trainer](arm, setting, args, seed, run_dir, state, label)
            cpu, wall = state.now()
            metrics = result.pop("metrics")
            record = {"setting": setting.name, "arm": name, "seed": seed, "budget_key": key,
                      "budget": budget, "trainer": arm.trainer, "options": arm.options,
                      "curve": state.curve, **result, **train_cost(metrics, state.curve),
                      "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
                      "segments": state.segments, "load_avg": load_average(),
                      "metrics": metrics}
            with runs_path.open("a") as f:
                f.write(json.dumps(portable(record)) + "\n")
            done[(name, seed)] = record
            shutil.rmtree(run_dir, ignore_errors=True)
            gc.collect()
    return list(done.values())


def train_cost(metrics: list[dict], curve: dict) -> dict:
    """CPU seconds of the training steps after the first (evaluations excluded) and the
    student tokens they processed; None where a resumed run lacks the step ends."""
    tokens = dict(zip((m["step"] for m in metrics), _step_tokens(metrics)))
    ends = [(m["step"], m.get("cpu_end")) for m in metrics]
    cpu, counted = 0.0, 0
    for (s0, c0), (s1, c1) in itertools.pairwise(ends):
        # a step's CPU is known when the step before it ended in the same process
        if c0 is None or c1 is None or c1 < c0 or s1 != s0 + 1:
            continue
        cpu += c1 - c0 - (curve.get(str(s0), {}).get("eval_cpu_s", 0.0))
        counted += tokens[s1]
    return {"train_cpu_s": round(cpu, 1) if counted else None,
            "tokens_per_cpu_s": round(counted / cpu, 2) if counted and cpu > 0 else None}


def _step_tokens(metrics: list[dict]) -> list[int]:
    if all("tokens" in m for m in metrics):
        return [m["tokens"] for m in metrics]
    # GOLD: the trainer's running count (logged before a resume, kept by the callback after)
    seen = [m.get("tokens_seen", m.get("num_input_tokens_seen")) for m in metrics]
    return [b - a for a, b in zip([0] + seen, seen)]


# ----------------------------------------------------------------------------- summary


def summarise(setting: Setting, runs: list[dict], args) -> dict:
    """Mean ± s.e. per arm and text; per-seed paired differences against ``sft`` and
    against GOLD's best arm (lowest mean held-out prose); costs."""
    final = str(args.steps)
    arms = [a for a in args.arms.split(",") if any(r["arm"] == a for r in runs)]
    if not arms:
        return {"budget": budget_of(args), "table": {}}
    by = {(r["arm"], r["seed"]): r["curve"][final] for r in runs if final in r["curve"]}
    table = {}
    for a in arms:
        rs = [r for r in runs if r["arm"] == a]
        row = {"seeds": sorted(r["seed"] for r in rs)}
        for t in TEXTS:
            row[t] = [round(x, 5) for x in mean_se([by[(a, r["seed"])][t] for r in rs])]
        for r in rs:  # from the steps' records (a resumed run counts its known steps)
            r.update(train_cost(r["metrics"], r["curve"]))
        for k in ("cpu_s", "wall_s", "train_cpu_s", "tokens_per_cpu_s", "student_tokens",
                  "trained_tokens"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            row[k] = round(sum(vals) / len(vals), 2) if vals else None
        # each run's cost and the machine's load when it ended (a shared machine)
        row["runs"] = {r["seed"]: {k: r.get(k) for k in ("cpu_s", "wall_s", "train_cpu_s",
                                                         "tokens_per_cpu_s", "segments",
                                                         "load_avg")} for r in rs}
        table[a] = row
    gold_rate = [table[a]["tokens_per_cpu_s"] for a in table
                 if ARMS[a].trainer == "gold" and table[a]["tokens_per_cpu_s"]]
    if gold_rate:
        for a, row in table.items():
            if row["tokens_per_cpu_s"]:
                row["tokens_per_cpu_s_vs_gold"] = round(
                    row["tokens_per_cpu_s"] / (sum(gold_rate) / len(gold_rate)), 2)
    gold = [a for a in arms if ARMS[a].trainer == "gold"]
    best_gold = min(gold, key=lambda a: table[a]["prose_heldout"][0], default=None)
    paired = {}
    for ref in filter(None, ("sft", best_gold)):
        for a in arms:
            if a == ref:
                continue
            for t in TEXTS:
                diffs = {s: round(by[(a, s)][t] - by[(ref, s)][t], 5)
                         for s in table[a]["seeds"] if (ref, s) in by}
                if diffs:
                    m, se = mean_se(list(diffs.values()))
                    paired.setdefault(f"{a} - {ref}", {})[t] = {
                        "mean": round(m, 5), "se": round(se, 5), "per_seed": diffs,
                        "beats_by_2se": bool(len(diffs) >= 2 and m < 0 and -m > 2 * se)}
    b = setting.baselines
    print(f"\n{setting.name}: BPB at {args.steps} steps x {args.batch_size} x {args.max_length}")
    print(f"{'arm':<22}" + "".join(f"{t:>22}" for t in TEXTS) + f"{'tok/CPU-s':>11}{'CPU s':>8}")
    for who in ("teacher", "student_before"):
        print(f"{who:<22}" + "".join(f"{b[who][t]:>22.4f}" for t in TEXTS))
    for a, row in table.items():
        print(f"{a:<22}" + "".join(f"{row[t][0]:>13.4f} ± {row[t][1]:.4f}" for t in TEXTS)
              + f"{row['tokens_per_cpu_s'] or float('nan'):>11.1f}{row['cpu_s']:>8.0f}")
    for pair, per_text in paired.items():
        print(f"{pair:<30}" + "  ".join(f"{t} {v['mean']:+.4f} ± {v['se']:.4f}"
                                        + ("*" if v["beats_by_2se"] else "")
                                        for t, v in per_text.items()))
    plot(setting, runs, arms, args)
    return {"baselines": {k: v for k, v in b.items() if k in ("teacher", "student_before")},
            "table": table, "best_gold": best_gold, "paired": paired, "budget": budget_of(args)}


def plot(setting: Setting, runs: list[dict], arms: list[str], args) -> None:
    """Held-out prose BPB against student tokens, mean ± s.e. over seeds, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    before = setting.baselines["student_before"]["prose_heldout"]
    for a in arms:
        rs = [r for r in runs if r["arm"] == a]
        xs, ys, es = [0], [before], [0.0]
        for s in sorted({int(s) for r in rs for s in r["curve"]}):
            pts = [r["curve"][str(s)] for r in rs if str(s) in r["curve"]]
            mean, se = mean_se([p["prose_heldout"] for p in pts])
            xs.append(sum(p["student_tokens"] for p in pts) / len(pts))
            ys.append(mean)
            es.append(0.0 if math.isnan(se) else se)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3,
                    ls="-" if ARMS[a].trainer == "ours" else "--", label=f"{a} ({len(rs)} seeds)")
    ax.axhline(setting.baselines["teacher"]["prose_heldout"], color="k", ls=":", lw=1,
               label="teacher")
    ax.set_xlabel("student tokens")
    ax.set_ylabel("held-out prose bits per byte")
    ax.set_title(f"{setting.name}: ours (solid) vs TRL GOLD (dashed), "
                 f"{args.steps} steps x {args.batch_size} x {args.max_length}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{setting.name}_{args.steps}steps_heldout_bpb.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- throughput


def section_throughput(args, work: Path) -> dict:
    """Tokens per CPU-second and loss per step of ours (full and LoRA rank 64) and GOLD
    (hybrid, CE 0.1) on the same pieces of setting (a), seed 0, no held-out scoring."""
    setting = setting_teacher_student(args, work)
    saved = (args.steps, args.eval_every)
    args.steps, args.eval_every = args.throughput_steps, 0
    setting.sets = {t: v[:1] for t, v in setting.sets.items()}  # one segment: near-free
    out = {}
    online = {"teacher_cache": None}  # the teacher runs every step, as in GOLD
    probes = {"ours alm+sft full": (ARMS["alm+sft"], online),
              # tokenkit's LoRA recipe: rank 64, alpha 64
              "ours alm+sft lora64": (ARMS["alm+sft"], {**online, "train": "lora",
                                                        "lora_rank": 64, "lora_alpha": 64.0}),
              "ours sft full": (ARMS["sft"], online),
              "gold-hybrid-ce0.1": (ARMS["gold-hybrid-ce0.1"], {}),
              "gold-ce": (ARMS["gold-ce"], {}),
              # every step on-policy: the student generates each completion first
              "gold-onpolicy": (ARMS["gold-onpolicy-ce0.1"], {"lmbda": 1.0})}
    for name, (arm, extra) in probes.items():
        if args.throughput_skip and name in args.throughput_skip.split(";"):
            continue
        run_dir = work / f"tp-{len(out)}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        state = RunState(run_dir / "state.json")
        arm = Arm(arm.trainer, {**arm.options, **extra})
        result = TRAINERS[arm.trainer](arm, setting, args, 0, run_dir, state, name)
        cost = train_cost(result["metrics"], {})
        out[name] = {**cost, "loss_per_step": [round(m.get("loss", float("nan")), 4)
                                               for m in result["metrics"]],
                     "student_tokens": result["student_tokens"],
                     "load_avg": load_average()}
        print(f"throughput {name}: {out[name]}", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        gc.collect()
    args.steps, args.eval_every = saved
    # probes skipped this time keep their earlier figures (same steps and batch)
    path = RESULTS / "throughput.json"
    shape = {"steps": args.throughput_steps, "batch_size": args.batch_size,
             "max_length": args.max_length}
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    if {k: earlier.get(k) for k in shape} == shape:
        out = {**earlier["probes"], **out}
    ref = out.get("gold-hybrid-ce0.1", {}).get("tokens_per_cpu_s")
    for row in out.values():
        if ref and row.get("tokens_per_cpu_s"):
            row["x_gold_hybrid"] = round(row["tokens_per_cpu_s"] / ref, 2)
    path.write_text(json.dumps({**shape, "probes": out}, indent=1))
    return out


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="teacher_student")
    p.add_argument("--arms", default=DEFAULT_ARMS)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--pack", default=None, choices=("fill", "texts", "none"),
                   help="distill's packing for both sides (default: distill's)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="steps between held-out prose evaluations (0: the last step only)")
    p.add_argument("--retention-bytes", type=int, default=4000,
                   help="bytes of GSM8K test answers and of Shakespeare scored")
    p.add_argument("--gap-segments", type=int, default=4)
    p.add_argument("--summary-only", action="store_true",
                   help="train nothing: summarise and plot the finished runs of this budget")
    p.add_argument("--throughput-steps", type=int, default=3)
    p.add_argument("--throughput-skip", default="", help="probe names to skip, ';'-separated")
    add_data_root(p)
    args = p.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    if not sections or set(sections) - set(SECTION_DATA):
        raise UsageError(f"--sections {args.sections}: choose from {','.join(SECTION_DATA)}")
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        raise UsageError(f"--arms: unknown {sorted(unknown)}; choose from {','.join(ARMS)}")
    if any(ARMS[a].trainer == "gold" for a in args.arms.split(",")) or "throughput" in sections:
        require_trl()
    bench_distill.DATA = require(args, sorted({f for s in sections for f in SECTION_DATA[s]}))
    torch.set_num_threads(1)
    result: dict = {"hardware": {
        "machine": platform.machine(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "trl": _version("trl"),
        "transformers": _version("transformers"), "dtype": "float32", "shared_machine": True},
        "load_average_at_start": load_average(),
        # the data root is the machine's: only whether one was given is kept
        "args": {**vars(args), "data_root": "given" if args.data_root else None}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = WORK / "data"
    work.mkdir(parents=True, exist_ok=True)
    for section in sections:
        if section == "throughput":
            result["throughput"] = section_throughput(args, work)
            continue
        setting = SETTINGS[section](args, work)
        runs = run_grid(setting, args)
        result[section] = summarise(setting, runs, args)
        result[section]["gold_positional_alignment"] = positional_alignment(setting, args)
        print(f"GOLD's positional pairing: {result[section]['gold_positional_alignment']}")
    result["load_average_at_end"] = load_average()
    # One summary per budget: a 200-step grid does not overwrite the 20-step one.
    budget = "" if sections == ["throughput"] else f"_{args.steps}steps"
    (RESULTS / f"{'+'.join(sections)}{budget}_summary.json").write_text(
        json.dumps(portable(result), indent=1))
    print(json.dumps(portable(result)))


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    run(main, "bench/distill_gold.py")
