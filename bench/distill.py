"""Benchmark ``tokensurgeon distill``: throughput, teacher -> student, tokenizer transfer, memory.

Sections (``--sections``, comma list):

- ``throughput``: student tokens per CPU-second (and per wall-second) of one training step
  on the tokenizer-transfer configuration (teacher SmolLM2-135M, student SmolLM2-135M on
  Gemma-3's 262k tokenizer, ``alm+sft``, 4 x 128 tokens, 1 thread), each configuration in
  a fresh process, the first step excluded: ``before`` (online teacher, autograd log-probs
  under checkpointing: the earlier path) and ``after`` (teacher cache, fused log-probs) for
  full / LoRA / embeddings-only training; the teacher-cache fill rate; an fp32 vs bf16
  matmul probe; each against the FLOP limit 6 x trainable-path parameters x tokens.
- ``teacher_student`` (experiment a): Gemma-3-270M -> SmolLM2-135M on the first 80% of
  ``wikitext2-valid-prose.txt``; held-out bits per byte on its last 20% (47 kB), GSM8K
  test answers and Shakespeare (retention), per method and seed, at the same budget. The
  teacher's ALM statistics are cached once and reused by every alm/sft run. Per-chunk
  mean |L_student - L_teacher| on the held-out prose, before and after.
- ``transfer`` (experiment b; ``transfer1`` / ``transfer2`` for one direction): tokenizer
  transfer by self-distillation. Student = the original model with the other model's
  tokenizer (the default transplant, made once under the modelio work dir), teacher = the
  original (d1: Gemma-3-270M on SmolLM2's tokenizer, d2: SmolLM2-135M on Gemma-3's).
  Trained on GSM8K train answers; scored on in-domain GSM8K test answers and on text the
  training data does not contain: the last 20% of the WikiText prose (the primary, >= 40 kB)
  and Shakespeare. Per-chunk |dL| on the held-out prose; method - sft paired by seed.
- ``memory``: peak RSS of a Gemma-3-270M teacher's ALM statistics, chunked vs naive.

Evaluation prepends the BOS token by hand (``bos="always"``, as every earlier figure did),
whatever ``tokensurgeon eval`` defaults to.

    python bench/distill.py --sections throughput
    python bench/distill.py --sections teacher_student --steps 12 --seeds 0,1,2
    python bench/distill.py --sections transfer1 --steps 12 --seeds 0,1,2 \
        --methods "sft,alm nats,alm+sft nats" --cache-dir out/teacher-cache --resume-runs

Raw per-run results (per-step metrics, evaluations) go to ``bench/results/distill/``;
the figure to ``bench/results/distill/heldout_bpb.png``; the last stdout line is one JSON
object with every figure, the hardware, load averages and seeds.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    GSM8K_TEST,
    GSM8K_TRAIN,
    PROSE,
    ROOT,
    SHAKESPEARE,
    add_data_root,
    load_average,
    mean_se,
    portable,
    require,
    run,
)

from distill.data import build_examples
from distill.trainer import DistillConfig, boundary_ids, distill
from tokensurgeon import modelio, training
from tokensurgeon.errors import UsageError
from tokensurgeon.evaluate import bits_per_byte, read_documents, segment_text
from tokensurgeon.logits import decoder_and_head, position_statistics
from tokensurgeon.token_identity import vocabulary

# The data root: set once in main() from --data-root / $TOKENSURGEON_DATA / data/, after the
# files the chosen sections read are checked.
DATA = Path()
RESULTS = ROOT / "bench" / "results" / "distill"
WORK = modelio.cache_dir() / "work"
METHODS = {  # name -> (loss, gradmag, ALM units)
    "alm+sft": ("alm+sft", False, "probability"),
    "alm": ("alm", False, "probability"),
    "sft": ("sft", False, "probability"),
    "uld+sft": ("uld+sft", False, "probability"),
    "alm+sft GradMag": ("alm+sft", True, "probability"),
    # ALM in nats (tau x the binarised KL): equal weights compare like with like.
    "alm+sft nats": ("alm+sft", False, "nats"),
    "alm nats": ("alm", False, "nats"),
}


# Data files each section reads (checked before anything is written).
SECTION_DATA = {"throughput": [SHAKESPEARE], "diagnose": [PROSE],
                "teacher_student": [PROSE, GSM8K_TEST, SHAKESPEARE],
                "transfer": [GSM8K_TRAIN, GSM8K_TEST, PROSE, SHAKESPEARE],
                "transfer1": [GSM8K_TRAIN, GSM8K_TEST, PROSE, SHAKESPEARE],
                "transfer2": [GSM8K_TRAIN, GSM8K_TEST, PROSE, SHAKESPEARE], "memory": []}


# ----------------------------------------------------------------------------- evaluation


def bpb(model, tok, segments: list[str]) -> float:
    """Bits per byte with the BOS prepended by hand (comparable with earlier figures)."""
    extra = {"bos": "always"} if "bos" in inspect.signature(bits_per_byte).parameters else {}
    was_training = model.training
    model.eval()
    try:
        return round(bits_per_byte(model, tok, segments, batch_size=2, logit_chunk=128,
                                   **extra)["bits_per_byte"], 5)
    finally:
        model.train(was_training)


def heldout_chunk_stats(model, tok, examples, side: str, bound: torch.Tensor) -> list:
    """Per example: ALM chunk log-likelihoods (debiased, unmerged) of ``side`` [K]."""
    from distill.data import collate
    from distill.losses import (
        LossSettings,
        Side,
        alm_chunk_logliks,
        side_statistics,
    )

    dec, head, cap = decoder_and_head(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    settings = LossSettings(logit_chunk=128)
    out = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for a in range(0, len(examples), 4):
            batch = examples[a:a + 4]
            t = collate(batch, side, pad)
            hidden = dec(input_ids=t["ids"], attention_mask=t["mask"]).last_hidden_state
            s = Side(t["ids"], t["mask"], t["chunk_ids"], hidden, head, bound, cap)
            realised, boundary = side_statistics(s, settings, True)
            k = max(e.num_chunks for e in batch)
            groups = torch.arange(k).expand(len(batch), k)
            ll, ok = alm_chunk_logliks(realised, boundary, s.predicted, s.chunk_ids, groups, True)
            for b, e in enumerate(batch):
                out.append((ll[b, :e.num_chunks].clone(), ok[b, :e.num_chunks].clone()))
    model.train(was_training)
    return out


def mean_abs_gap(student_ll: list, teacher_ll: list) -> float:
    total, n = 0.0, 0
    for (s, s_ok), (t, t_ok) in zip(student_ll, teacher_ll):
        ok = s_ok & t_ok
        total += float((s[ok] - t[ok]).abs().sum())
        n += int(ok.sum())
    return round(total / max(n, 1), 5)


# ----------------------------------------------------------------------------- throughput


def transfer_student() -> Path:
    """SmolLM2-135M's body with Gemma-3's 262k tokenizer: the tokenizer-transfer student's
    shape. The transplant (``tokensurgeon transplant builtin:smollm2-135m
    builtin:gemma3-270m DIR``) when it exists; otherwise a same-shape stand-in with resized
    embeddings (the cost of a step does not depend on the weights' values)."""
    real = WORK / "smollm2-gemmatok"
    if (real / "config.json").is_file():
        return real
    stand_in = WORK / "smollm2-gemma-vocab-standin"
    if not (stand_in / "config.json").is_file():
        gemma = modelio.load_tokenizer(modelio.resolve("builtin:gemma3-270m"))
        model = modelio.load_model(modelio.resolve("builtin:smollm2-135m"))
        model.resize_token_embeddings(len(gemma), mean_resizing=False)
        model.config.bos_token_id = gemma.bos_token_id
        model.config.eos_token_id = gemma.eos_token_id
        model.config.pad_token_id = gemma.pad_token_id
        with modelio.atomic_output_dir(stand_in, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            gemma.save_pretrained(tmp)
    return stand_in


def matmul_probe() -> dict:
    """fp32 vs bf16 GFLOP per CPU-second of a head-shaped matmul (128 x 576 @ 576 x 8192),
    one thread."""
    torch.set_num_threads(1)
    out = {}
    m, k, n = 128, 576, 8192
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        began = time.process_time()
        for _ in range(5):
            a @ b
        out[str(dtype).split(".")[-1]] = round(5 * 2 * m * k * n / (time.process_time() - began) / 1e9, 1)
    return out


BEFORE_COMMIT = "a44fea8"  # the trainer before the cache and fused paths: online teacher


def before_tree(work: Path) -> Path:
    """The source tree at ``BEFORE_COMMIT``, exported from this repository's history."""
    tree = work / f"tree-{BEFORE_COMMIT}"
    if not (tree / "distill").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_COMMIT],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def run_children(argvs: list[list[str]]) -> list[dict]:
    """Run child probes at the same time (one thread each); their JSON lines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *a], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for a in argvs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        out.append(json.loads(stdout.strip().splitlines()[-1]) if p.returncode == 0
                   else {"error": (stderr.strip().splitlines() or ["killed"])[-1]})
    return out


def section_throughput(args, work: Path) -> dict:
    """Student tokens per CPU-second of the tokenizer-transfer shape: the trainer at
    ``BEFORE_COMMIT`` and today's, each in a fresh child process, then today's trainable
    sets and process layouts. Cache fills run first so timed steps never fill a shard."""
    student = str(transfer_student())
    teacher = str(modelio.resolve("builtin:smollm2-135m").directory)
    text = (DATA / SHAKESPEARE).read_text(encoding="utf-8")[:60_000]
    data = work / "shakespeare60k.txt"
    data.write_text(text, encoding="utf-8")
    cache = work / "throughput-cache"
    base = {"teacher": teacher, "student": student, "data": [str(data)], "loss": "alm+sft",
            "steps": args.throughput_steps, "out": str(work / "tp-out"), "train": "full"}
    today = {**base, "options": {"logits": "fused", "teacher_cache": str(cache)}}
    whole = {**base, "options": {"logits": "fused", "teacher_cache": str(cache) + "-texts",
                                 "pack": "texts"}}
    configs = [  # name -> (source tree, spec, processes at once)
        ("before full", (None, base, 1)),
        ("cache fill (whole-text packing)", (ROOT, whole, 1)),
        ("after full (whole-text packing)", (ROOT, whole, 1)),
        ("cache fill", (ROOT, today, 1)),
        ("after full", (ROOT, today, 1)),
        ("after lora", (ROOT, {**today, "train": "lora"}, 1)),
        ("after embeddings", (ROOT, {**today, "train": "embeddings"}, 1)),
        ("after full (1 process x 2 threads)", (ROOT, {**today, "threads": 2}, 1)),
        ("after full (2 processes x 1 thread)", (ROOT, today, 2)),
    ]
    skip = set(filter(None, args.throughput_skip.split(",")))
    saved = RESULTS / "throughput.json"
    previous = json.loads(saved.read_text()) if saved.is_file() else {}
    results = {}
    for name, (tree, spec, processes) in configs:
        if name in skip:  # a skipped configuration keeps its last measured figures
            if "error" not in previous.get(name, {"error": None}):
                results[name] = {**previous[name], "carried_over": True}
            continue
        tree = tree or before_tree(work)
        runs = run_children([[str(ROOT / "bench" / "throughput_probe.py"), str(tree),
                              json.dumps({**spec, "out": f"{spec['out']}-{k}"})]
                             for k in range(processes)])
        results[name] = runs[0] if processes == 1 else {
            "processes": runs,
            "tokens_per_wall_s": round(sum(r.get("tokens_per_wall_s", 0.0) for r in runs), 2)}
        print(f"throughput {name}: {results[name]}", flush=True)
    results["matmul_gflops_1_thread"] = matmul_probe()
    cfg = modelio.load_config(modelio.resolve(student))
    n_vocab, hidden = cfg.vocab_size, cfg.hidden_size
    from safetensors import safe_open
    with safe_open(str(Path(student) / "model.safetensors"), framework="pt") as f:
        total = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    head = n_vocab * hidden
    results["flops_per_token"] = {
        # 6 x params; the tied embedding is used as lm_head (a matmul) and as a lookup (free).
        "full": 6 * total,
        "limit_note": "6 x parameters (the embedding table counted once, as the lm_head)",
        "parameters": total, "lm_head": head}
    return results


# ------------------------------------------------------------------------ ALM diagnosis


def section_diagnose(args, work: Path) -> dict:
    """What ALM's gradient pushes, on training text only (a slice of the first 80% of the
    prose, never the held-out 20%): per ALM chunk (merged on theta, debiased, as in
    training) u = -L_teacher and v = -L_student in nats; the push-up rate of each loss on
    the student's chunk log-likelihood (SFT: 1 per token; ALM: -d loss / d L_S); and the
    cosine between the ALM and SFT gradients of the student's last layer."""
    from distill.data import collate
    from distill.losses import LOSSES, LossInputs, LossSettings, Side, _alm_parts, binarised_kl
    from distill.trainer import last_layer_params

    teacher_ref, student_ref = modelio.resolve("builtin:gemma3-270m"), modelio.resolve(
        "builtin:smollm2-135m")
    train_path, _ = split_prose(work, 0.8)
    text = train_path.read_text(encoding="utf-8")
    dev = text[text.rfind("\n", 0, len(text) - args.diagnose_bytes) + 1:]
    segments = segment_text([dev], 2 * args.max_length, 0)
    t_tok, s_tok = modelio.load_tokenizer(teacher_ref), modelio.load_tokenizer(student_ref)
    t_vocab, s_vocab = vocabulary(t_tok), vocabulary(s_tok)
    examples = build_examples(segments, t_tok, s_tok, t_vocab.token_bytes, s_vocab.token_bytes,
                              args.max_length, pack="none")
    t_bound, s_bound = boundary_ids(t_vocab.token_bytes), boundary_ids(s_vocab.token_bytes)
    teacher, student = modelio.load_model(teacher_ref), modelio.load_model(student_ref)
    t_dec, t_head, t_cap = decoder_and_head(teacher)
    s_dec, s_head, s_cap = decoder_and_head(student)
    settings = LossSettings(tau=args.tau_probe, logit_chunk=128)
    ell = last_layer_params(student)
    us, vs, ntok, cosines, norms = [], [], 0, [], []
    for a in range(0, len(examples), 4):
        batch = examples[a:a + 4]
        t = collate(batch, "teacher", t_tok.pad_token_id or 0)
        s = collate(batch, "student", s_tok.pad_token_id or 0)
        with torch.no_grad():
            th = t_dec(input_ids=t["ids"], attention_mask=t["mask"]).last_hidden_state
        sh = s_dec(input_ids=s["ids"], attention_mask=s["mask"]).last_hidden_state
        x = LossInputs(
            student=Side(s["ids"], s["mask"], s["chunk_ids"], sh, s_head, s_bound, s_cap),
            teacher=Side(t["ids"], t["mask"], t["chunk_ids"], th, t_head, t_bound, t_cap),
            num_chunks=max(e.num_chunks for e in batch), settings=settings)
        t_ll, s_ll, valid = _alm_parts(x)
        us.append(-t_ll[valid].detach())
        vs.append(-s_ll[valid].detach())
        ntok += LOSSES["sft"].count(x)
        if a < 4 * args.diagnose_grad_batches:
            alm = LOSSES["alm"].total(x) / max(LOSSES["alm"].count(x), 1)
            sft = LOSSES["sft"].total(x) / max(LOSSES["sft"].count(x), 1)
            g = [torch.cat([q.reshape(-1) for q in torch.autograd.grad(
                part, ell, retain_graph=True, materialize_grads=True)]) for part in (alm, sft)]
            cosines.append(float(torch.nn.functional.cosine_similarity(g[0], g[1], dim=0)))
            norms.append([float(g[0].norm()), float(g[1].norm())])
    u, v = torch.cat(us).double(), torch.cat(vs).double()
    excess = v - u  # > 0: the student under-predicts the chunk
    # Push-up rate of ALM on the student's chunk log-likelihood, exact at tau, and the
    # tau -> infinity limit times 1 / tau: (1 - u / v) / tau.
    ls = (-v).clone().requires_grad_(True)
    binarised_kl(-u, ls, args.tau_probe).sum().backward()
    push = -ls.grad
    limit = (1 - u / v) / args.tau_probe
    pos = excess.clamp(min=0)
    order = torch.sort(pos, descending=True).values

    def top(f: float) -> float:
        return float(order[: max(1, int(f * len(order)))].sum() / pos.sum())
    n = len(u)
    out = {
        "dev_bytes": len(dev.encode()), "chunks": n, "student_tokens": ntok,
        "tokens_per_chunk": round(ntok / n, 3),
        "mean_u_teacher_nats": round(float(u.mean()), 4),
        "mean_v_student_nats": round(float(v.mean()), 4),
        "mean_excess_v_minus_u": round(float(excess.mean()), 4),
        "mean_abs_dL": round(float(excess.abs().mean()), 4),
        "share_chunks_student_under": round(float((excess > 0).double().mean()), 4),
        "positive_excess_sum_over_total_excess": round(float(pos.sum() / excess.sum()), 3),
        "negative_excess_sum": round(float(excess.clamp(max=0).sum()), 2),
        "positive_excess_sum": round(float(pos.sum()), 2),
        "share_of_positive_excess_in_top_10pct_chunks": round(top(0.1), 3),
        "share_of_positive_excess_in_top_20pct_chunks": round(top(0.2), 3),
        "alm_push_mean_abs_tau_units": round(float(push.abs().mean() * args.tau_probe), 4),
        "alm_push_mean_tau_units": round(float(push.mean() * args.tau_probe), 4),
        "alm_push_share_negative": round(float((push < 0).double().mean()), 4),
        "alm_push_vs_limit_max_rel_err": round(float(((push - limit).abs() / limit.abs()
                                                      .clamp(min=1e-12)).max()), 4),
        "sft_push_per_chunk_tokens": round(ntok / n, 3),
        "tau": args.tau_probe,
        "grad_cosine_alm_vs_sft_last_layer": [round(c, 4) for c in cosines],
        "grad_norm_alm_sft_last_layer": [[round(a, 5), round(b, 4)] for a, b in norms],
        "load_avg": load_average(),
    }
    # Push-up per chunk, bucketed by the student's excess (quintiles).
    qs = torch.quantile(excess, torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64))
    bucket = torch.bucketize(excess, qs)
    out["by_excess_quintile"] = [{
        "excess_mean": round(float(excess[bucket == b].mean()), 3),
        "alm_push_tau_units_mean": round(float(push[bucket == b].mean() * args.tau_probe), 4),
        "v_mean": round(float(v[bucket == b].mean()), 3)} for b in range(5)]
    print(json.dumps(out, indent=1), flush=True)
    (RESULTS / "diagnose.json").write_text(json.dumps(portable(out), indent=1))
    return out


# -------------------------------------------------------------------- teacher -> student


def split_prose(work: Path, fraction: float) -> tuple[Path, str]:
    """First ``fraction`` of the prose file (cut at a line end) to a training file; the
    rest is returned as held-out text."""
    text = (DATA / PROSE).read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * fraction)) + 1
    path = work / "prose-train.txt"
    write_if_changed(path, text[:cut])
    return path, text[cut:]


def write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically unless ``path`` holds it already: benches sharing a work
    folder never see a half-written training file."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def heldout_sets(heldout_prose: str, retention_bytes: int, order: tuple[str, ...]) -> dict:
    """The held-out texts, as 2,000-character segments, in ``order`` (the key order of the
    saved baselines): the prose after the training cut (all of it), and the first
    ``retention_bytes`` of GSM8K test answers and of Shakespeare's last 200 kB."""
    sets = {
        "prose_heldout": lambda: segment_text([heldout_prose], 2000, 0),
        "gsm8k_test": lambda: segment_text(read_documents(DATA / GSM8K_TEST, "answer"),
                                           2000, retention_bytes),
        "shakespeare": lambda: segment_text([(DATA / SHAKESPEARE).read_text(encoding="utf-8")
                                             [-200_000:]], 2000, retention_bytes),
    }
    return {name: sets[name]() for name in order}


def cached_baselines(saved: Path, key: str, teacher_ref, student_ref, sets: dict,
                     gap_segments: int) -> tuple[dict, dict]:
    """Teacher and student-before BPB on every held-out set, and the student's mean |dL| per
    chunk against the teacher on the first ``gap_segments`` held-out prose segments; read from
    ``saved`` when its ``key`` (the held-out sets and options) matches, else computed and saved.

    Returns (baselines, reference): reference holds what ``run_grid`` scores runs with
    (``s_tok``, ``gap_examples``, ``s_bound``, ``teacher_ll``)."""
    t_tok, s_tok = modelio.load_tokenizer(teacher_ref), modelio.load_tokenizer(student_ref)
    t_vocab, s_vocab = vocabulary(t_tok), vocabulary(s_tok)
    gap_examples = build_examples(sets["prose_heldout"][:gap_segments], t_tok, s_tok,
                                  t_vocab.token_bytes, s_vocab.token_bytes, 256, pack="none")
    t_bound, s_bound = boundary_ids(t_vocab.token_bytes), boundary_ids(s_vocab.token_bytes)
    baselines = json.loads(saved.read_text()) if saved.is_file() else {}
    if baselines.get("key") != key:
        began = time.process_time()
        model = modelio.load_model(teacher_ref)
        baselines = {"key": key, "teacher": {n: bpb(model, t_tok, s) for n, s in sets.items()}}
        teacher_ll = heldout_chunk_stats(model, t_tok, gap_examples, "teacher", t_bound)
        baselines["teacher_ll"] = [[a.tolist(), b.tolist()] for a, b in teacher_ll]
        del model
        gc.collect()
        model = modelio.load_model(student_ref)
        baselines["student_before"] = {n: bpb(model, s_tok, s) for n, s in sets.items()}
        baselines["gap_before"] = mean_abs_gap(
            heldout_chunk_stats(model, s_tok, gap_examples, "student", s_bound), teacher_ll)
        baselines["cpu_s"] = round(time.process_time() - began, 1)
        baselines["load_avg"] = load_average()
        del model
        gc.collect()
        RESULTS.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(baselines))
    teacher_ll = [(torch.tensor(a), torch.tensor(b, dtype=torch.bool))
                  for a, b in baselines["teacher_ll"]]
    print(f"teacher {baselines['teacher']}\nstudent before {baselines['student_before']} "
          f"|dL| {baselines['gap_before']}", flush=True)
    return baselines, {"s_tok": s_tok, "gap_examples": gap_examples, "s_bound": s_bound,
                       "teacher_ll": teacher_ll}


def section_teacher_student(args, work: Path) -> dict:
    teacher_ref, student_ref = modelio.resolve("builtin:gemma3-270m"), modelio.resolve(
        "builtin:smollm2-135m")
    train_path, heldout_text = split_prose(work, 0.8)
    sets = heldout_sets(heldout_text, args.retention_bytes,
                        ("prose_heldout", "gsm8k_test", "shakespeare"))
    sizes = {k: sum(len(s.encode()) for s in v) for k, v in sets.items()}
    print(f"held-out bytes: {sizes}", flush=True)
    baselines, reference = cached_baselines(
        RESULTS / "teacher_student_baselines.json",
        json.dumps(sizes, sort_keys=True) + f"|{args.gap_segments}",
        teacher_ref, student_ref, sets, args.gap_segments)
    cache = work / "teacher-cache" if args.cache_dir is None else Path(args.cache_dir)
    runs = run_grid(args, work, teacher_dir=teacher_ref.directory,
                    student_dir=student_ref.directory, train_path=train_path, sets=sets,
                    final_sets=("gsm8k_test", "shakespeare"), **reference,
                    runs_path=RESULTS / "teacher_student_runs.jsonl", cache=cache,
                    budget_extra={}, prefix="ts")
    return summarise(baselines, runs, args)


def run_grid(args, work: Path, *, teacher_dir, student_dir, train_path: Path, sets: dict,
             final_sets: tuple, s_tok, gap_examples, s_bound, teacher_ll, runs_path: Path,
             cache: Path, budget_extra: dict, prefix: str) -> list[dict]:
    """Train every (seed, method) of ``args`` at the same budget (same steps, batch, length,
    lr and, per seed, data order), appending one record per run to ``runs_path``; score
    ``sets["prose_heldout"]`` at ``--eval-steps`` and the last step, and ``final_sets`` and
    the per-chunk |dL| on ``gap_examples`` at the last step. Returns this budget's runs."""
    done = {}
    if runs_path.is_file() and args.resume_runs:
        for line in runs_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r["seed"], r["budget_key"])] = r
    budget = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
              "lr": args.lr, "warmup_steps": args.warmup_steps, "train": "full", **budget_extra}
    budget_key = json.dumps(budget, sort_keys=True)
    eval_steps = sorted({int(s) for s in args.eval_steps.split(",") if s} | {args.steps})
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            if (method, seed, budget_key) in done:
                continue
            loss, gradmag, units = METHODS[method]
            out = work / f"{prefix}-{method.replace('+', '_').replace(' ', '_')}-{seed}"
            curve = {}
            original = training.save_checkpoint

            def save_and_eval(root, step, model, *rest, **kw):
                if step in eval_steps:
                    began = time.process_time()
                    curve[step] = {"prose_heldout": bpb(model, s_tok, sets["prose_heldout"])}
                    if step == args.steps:
                        for name in final_sets:
                            curve[step][name] = bpb(model, s_tok, sets[name])
                        curve[step]["abs_dL"] = mean_abs_gap(heldout_chunk_stats(
                            model, s_tok, gap_examples, "student", s_bound), teacher_ll)
                    curve[step]["eval_cpu_s"] = round(time.process_time() - began, 1)
                    print(f"  {method} seed {seed} step {step}: {curve[step]}", flush=True)
                return original(root, step, model, *rest, **kw) if step == args.steps else None

            training.save_checkpoint = save_and_eval
            cfg = DistillConfig(
                teacher=str(teacher_dir), student=str(student_dir),
                data=[str(train_path)], out=str(out), loss=loss, gradmag=gradmag,
                alm_units=units,
                steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                lr=args.lr, warmup_steps=args.warmup_steps, seed=seed,
                teacher_cache=str(cache) if not loss.startswith("uld") else None,
                teacher_cache_shard=1, checkpoint_every=min(eval_steps), overwrite=True,
                quiet=True, device="cpu",
                # Whole texts per sequence: the packing every recorded run used (the budget
                # key predates pack="fill", so those runs stay comparable and resumable).
                pack="texts")
            began_cpu, began = time.process_time(), time.perf_counter()
            try:
                distill(cfg)
            finally:
                training.save_checkpoint = original
            metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            record = {"method": method, "seed": seed, "budget_key": budget_key,
                      "budget": budget, "curve": {str(k): v for k, v in curve.items()},
                      "train_tokens_per_step": [m["tokens"] for m in metrics],
                      "cpu_s": round(time.process_time() - began_cpu, 1),
                      "wall_s": round(time.perf_counter() - began, 1), "load_avg": load_average(),
                      "metrics": metrics}
            with runs_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            done[(method, seed, budget_key)] = record
            shutil.rmtree(out, ignore_errors=True)
            gc.collect()
    return [r for r in done.values() if r["budget_key"] == budget_key]


def summarise(baselines: dict, runs: list[dict], args) -> dict:
    methods = [m for m in args.methods.split(",") if any(r["method"] == m for r in runs)]
    table = {}
    final = str(args.steps)
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        row = {"seeds": sorted(r["seed"] for r in rs)}
        for key in ("prose_heldout", "gsm8k_test", "shakespeare", "abs_dL"):
            vals = [r["curve"][final][key] for r in rs if key in r["curve"].get(final, {})]
            if vals:
                row[key] = [round(x, 5) for x in mean_se(vals)]
        row["train_tokens"] = sum(rs[0]["train_tokens_per_step"])
        row["train_cpu_s_mean"] = round(sum(r["cpu_s"] for r in rs) / len(rs), 1)
        table[m] = row
    # Paired by seed (the same data order): method - sft on held-out prose.
    sft = {r["seed"]: r["curve"][final]["prose_heldout"] for r in runs
           if r["method"] == "sft" and final in r["curve"]}
    for m, row in table.items():
        diffs = [r["curve"][final]["prose_heldout"] - sft[r["seed"]] for r in runs
                 if r["method"] == m and m != "sft" and r["seed"] in sft and final in r["curve"]]
        if diffs:
            row["paired_minus_sft"] = [round(x, 5) for x in mean_se(diffs)]
            row["paired_minus_sft_per_seed"] = [round(x, 5) for x in diffs]
    before, teacher = baselines["student_before"]["prose_heldout"], baselines["teacher"]["prose_heldout"]
    for m, row in table.items():
        if "prose_heldout" in row:
            row["gap_closed"] = round((before - row["prose_heldout"][0]) / (before - teacher), 4)
    print("\nTeacher Gemma-3-270M -> student SmolLM2-135M (prose held-out = last 20%)")
    print(f"{'model':<18}{'prose BPB':>20}{'GSM8K BPB':>20}{'Shakesp. BPB':>20}{'|dL|':>18}{'gap':>8}")
    print(f"{'teacher':<18}{teacher:>20.4f}{baselines['teacher']['gsm8k_test']:>20.4f}"
          f"{baselines['teacher']['shakespeare']:>20.4f}")
    sb = baselines["student_before"]
    print(f"{'student before':<18}{before:>20.4f}{sb['gsm8k_test']:>20.4f}{sb['shakespeare']:>20.4f}"
          f"{baselines['gap_before']:>18.4f}")

    def fmt(v):
        return f"{v[0]:.4f} ± {v[1]:.4f}" if v else ""
    for m, row in table.items():
        print(f"{m:<18}{fmt(row.get('prose_heldout')):>20}{fmt(row.get('gsm8k_test')):>20}"
              f"{fmt(row.get('shakespeare')):>20}{fmt(row.get('abs_dL')):>18}"
              f"{row.get('gap_closed', float('nan')):>8.3f}")
    for m, row in table.items():
        if "paired_minus_sft" in row:
            print(f"{m} - sft, paired by seed: {fmt(row['paired_minus_sft'])} "
                  f"({row['paired_minus_sft_per_seed']})")
    plot(baselines, runs, methods, args)
    return {"baselines": {k: v for k, v in baselines.items() if k != "teacher_ll"},
            "table": table, "budget": runs[0]["budget"] if runs else None}


def plot(baselines: dict, runs: list[dict], methods: list[str], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    before = baselines["student_before"]["prose_heldout"]
    for i, m in enumerate(methods):
        rs = [r for r in runs if r["method"] == m]
        steps = sorted({int(s) for r in rs for s in r["curve"]})
        xs, ys, es = [0], [before], [0.0]
        for s in steps:
            vals = [r["curve"][str(s)]["prose_heldout"] for r in rs if str(s) in r["curve"]]
            tokens = sum(rs[0]["train_tokens_per_step"][:s])
            mean, se = mean_se(vals)
            xs.append(tokens + i * 20)  # tiny offset so error bars do not overlap
            ys.append(mean)
            es.append(0.0 if math.isnan(se) else se)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    ax.axhline(baselines["teacher"]["prose_heldout"], color="k", ls="--", lw=1,
               label="teacher Gemma-3-270M")
    ax.set_xlabel("student training tokens")
    ax.set_ylabel("held-out prose bits per byte")
    seeds = {m: len({r["seed"] for r in runs if r["method"] == m}) for m in methods}
    ax.set_title("Gemma-3-270M -> SmolLM2-135M, mean ± s.e. over seeds ("
                 + ", ".join(f"{m}: {n}" for m, n in seeds.items()) + ")", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "heldout_bpb.png", dpi=110)


# ----------------------------------------------------------------------------- transfer (b)

TRANSFER = {  # direction -> (original model = base of the transplant and teacher, donor)
    1: ("builtin:gemma3-270m", "builtin:smollm2-135m"),
    2: ("builtin:smollm2-135m", "builtin:gemma3-270m"),
}


def transfer_transplant(direction: int) -> Path:
    """The project's default transplant of the original onto the donor's tokenizer, made once
    (``tokensurgeon transplant BASE DONOR OUT``, 1 thread) under the modelio work dir."""
    base, donor = TRANSFER[direction]
    out = WORK / f"transfer-d{direction}"
    if not (out / "config.json").is_file():
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cli", "transplant", base, donor, str(out),
                        "--threads", "1", "--quiet"], check=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        (WORK / f"transfer-d{direction}.timing.json").write_text(json.dumps(
            {"wall_s": round(time.perf_counter() - began, 1), "load_avg": load_average()}))
    return out


def section_transfer(args, work: Path, direction: int) -> dict:
    """Experiment (b), one direction: student = the original with the donor's tokenizer
    (default transplant), teacher = the original. Train on GSM8K train answers; score
    in-domain GSM8K test answers and out-of-domain text the training data does not contain:
    the last 20% of the WikiText prose (>= 40 kB, the primary figure) and Shakespeare."""
    base, donor = TRANSFER[direction]
    teacher_ref = modelio.resolve(base)
    student_ref = modelio.resolve(str(transfer_transplant(direction)))
    student_dir = student_ref.directory
    train_path = work / "gsm8k-train-answers.jsonl"
    train_path.write_text("".join(json.dumps({"text": a}) + "\n" for a in read_documents(
        DATA / GSM8K_TRAIN, "answer")), encoding="utf-8")
    _, heldout_text = split_prose(work, 0.8)
    sets = heldout_sets(heldout_text, args.retention_bytes,
                        ("prose_heldout", "shakespeare", "gsm8k_test"))
    sizes = {k: sum(len(s.encode()) for s in v) for k, v in sets.items()}
    print(f"transfer d{direction}: {base} on {donor}'s tokenizer; held-out bytes {sizes}",
          flush=True)
    baselines, reference = cached_baselines(
        RESULTS / f"transfer_d{direction}_baselines.json",
        json.dumps(sizes, sort_keys=True) + f"|{args.gap_segments}|{direction}",
        teacher_ref, student_ref, sets, args.gap_segments)
    cache = (work if args.cache_dir is None else Path(args.cache_dir)) / f"transfer-d{direction}"
    runs = run_grid(args, work, teacher_dir=teacher_ref.directory, student_dir=student_dir,
                    train_path=train_path, sets=sets, final_sets=("shakespeare", "gsm8k_test"),
                    **reference, runs_path=RESULTS / "transfer_runs.jsonl",
                    cache=cache, budget_extra={"direction": direction,
                                               "data": "gsm8k train answers"},
                    prefix=f"tr{direction}")
    return summarise_transfer(direction, baselines, runs, args)


def summarise_transfer(direction: int, baselines: dict, runs: list[dict], args) -> dict:
    """Mean ± s.e. per method and held-out set, method - sft paired by seed, % of the
    student-teacher gap closed; target (b): alm or alm+sft below sft on the out-of-domain
    prose by more than 2 standard errors of the paired difference."""
    final = str(args.steps)
    runs = [r for r in runs if final in r["curve"]]
    methods = [m for m in args.methods.split(",") if any(r["method"] == m for r in runs)]
    names = ("prose_heldout", "shakespeare", "gsm8k_test")
    sft = {r["seed"]: r["curve"][final] for r in runs if r["method"] == "sft"}
    table = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        row = {"seeds": sorted(r["seed"] for r in rs)}
        for key in (*names, "abs_dL"):
            row[key] = [round(x, 5) for x in mean_se([r["curve"][final][key] for r in rs])]
        for key in names:
            before, teacher = baselines["student_before"][key], baselines["teacher"][key]
            row[f"{key}_gap_closed"] = round((before - row[key][0]) / (before - teacher), 4)
            diffs = [r["curve"][final][key] - sft[r["seed"]][key] for r in rs
                     if m != "sft" and r["seed"] in sft]
            if diffs:
                row[f"{key}_minus_sft"] = [round(x, 5) for x in mean_se(diffs)]
                row[f"{key}_minus_sft_per_seed"] = [round(x, 5) for x in diffs]
        row["train_tokens"] = sum(rs[0]["train_tokens_per_step"])
        row["cpu_s_mean"] = round(sum(r["cpu_s"] for r in rs) / len(rs), 1)
        row["eval_cpu_s_mean"] = round(sum(r["curve"][final]["eval_cpu_s"] for r in rs) / len(rs), 1)
        table[m] = row
    wins = {m: row["prose_heldout_minus_sft"] for m, row in table.items()
            if m.startswith("alm") and "prose_heldout_minus_sft" in row}
    met = any(len(table[m]["seeds"]) >= 3 and d[0] < 0 and -d[0] > 2 * d[1]
              for m, d in wins.items())
    print(f"\nTransfer d{direction}: {TRANSFER[direction][0]} on "
          f"{TRANSFER[direction][1]}'s tokenizer, teacher = the original")
    print(f"{'model':<16}" + "".join(f"{n:>28}" for n in (*names, "abs_dL")))
    for who in ("teacher", "student_before"):
        print(f"{who:<16}" + "".join(f"{baselines[who][n]:>28.4f}" for n in names)
              + f"{(0.0 if who == 'teacher' else baselines['gap_before']):>28.4f}")

    def fmt(v):
        return f"{v[0]:.4f} ± {v[1]:.4f}"
    for m, row in table.items():
        print(f"{m:<16}" + "".join(f"{fmt(row[n]):>28}" for n in (*names, "abs_dL")))
        for n in names:
            if f"{n}_minus_sft" in row:
                print(f"   {n} - sft paired: {fmt(row[f'{n}_minus_sft'])} "
                      f"{row[f'{n}_minus_sft_per_seed']}; gap closed {row[f'{n}_gap_closed']:.3f}")
    print(f"target (b) d{direction}: {'MET' if met else 'MISSED'} {wins}", flush=True)
    summary = {"direction": direction, "original": TRANSFER[direction][0],
               "donor": TRANSFER[direction][1],
               "baselines": {k: v for k, v in baselines.items() if k != "teacher_ll"},
               "table": table, "budget": runs[0]["budget"] if runs else None,
               "target_b_met": met, "paired_prose_minus_sft": wins}
    (RESULTS / f"transfer_d{direction}_steps{args.steps}_lr{args.lr:g}_summary.json").write_text(
        json.dumps(summary, indent=1))
    plot_transfer(args)
    return summary


def plot_transfer(args) -> None:
    """Held-out prose BPB against student training tokens per method and direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(x) for x in (RESULTS / "transfer_runs.jsonl").read_text().splitlines()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, direction in zip(axes, (1, 2)):
        saved = RESULTS / f"transfer_d{direction}_baselines.json"
        rs_d = [r for r in runs if r["budget"].get("direction") == direction
                and r["budget"]["steps"] == args.steps]
        if not saved.is_file() or not rs_d:
            ax.set_axis_off()
            continue
        base = json.loads(saved.read_text())
        series = list(dict.fromkeys((r["method"], r["budget"]["lr"]) for r in rs_d))
        for i, (m, lr) in enumerate(series):
            rs = [r for r in rs_d if r["method"] == m and r["budget"]["lr"] == lr]
            xs, ys, es = [0], [base["student_before"]["prose_heldout"]], [0.0]
            for s in sorted({int(s) for r in rs for s in r["curve"]}):
                mean, se = mean_se([r["curve"][str(s)]["prose_heldout"] for r in rs
                                    if str(s) in r["curve"]])
                xs.append(sum(rs[0]["train_tokens_per_step"][:s]) + i * 30)
                ys.append(mean)
                es.append(0.0 if math.isnan(se) else se)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, ls="-" if lr >= 1e-4 else ":",
                        label=f"{m}, lr {lr:g} ({len(rs)} seeds)")
        ax.axhline(base["teacher"]["prose_heldout"], color="k", ls="--", lw=1,
                   label="teacher (original)")
        ax.set_xlabel("student training tokens (GSM8K train answers)")
        ax.set_ylabel("held-out WikiText prose bits per byte (out of domain)")
        ax.set_title(f"d{direction}: {TRANSFER[direction][0]} on "
                     f"{TRANSFER[direction][1]}'s tokenizer", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"transfer_bpb_steps{args.steps}.png", dpi=110)


# ----------------------------------------------------------------------------- memory


def memory_probe(mode: str, batch: int, length: int, logit_chunk: int) -> None:
    """Child process: peak RSS of the teacher's ALM statistics, one JSON line."""
    from tokensurgeon.logits import naive_position_statistics

    ref = modelio.resolve("builtin:gemma3-270m")
    tok = modelio.load_tokenizer(ref)
    model = modelio.load_model(ref)
    dec, head, cap = decoder_and_head(model)
    boundary = boundary_ids(vocabulary(tok).token_bytes)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(300, len(tok), (batch, length), generator=g)
    began = time.perf_counter()
    with torch.no_grad():
        hidden = dec(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        if mode == "naive":
            naive_position_statistics(hidden, head, ids, boundary, cap)
        else:
            position_statistics(hidden, head, ids, boundary, logit_chunk, cap)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "batch": batch, "length": length,
                      "rss_after_load_mib": round(loaded), "peak_rss_mib": round(peak),
                      "seconds": round(time.perf_counter() - began, 1)}))


def section_memory(args) -> list[dict]:
    mem = []
    for probe in args.memory_probes.split(","):
        mode, batch = probe.split(":")
        mem.append(run_children([[__file__, "--memory-probe", mode, "--memory-batch", batch,
                                  "--memory-length", str(args.memory_length),
                                  "--logit-chunk", str(args.logit_chunk)]])[0])
        print(f"memory {probe}: {mem[-1]}", flush=True)
    return mem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="throughput,teacher_student")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--eval-steps", default="",
                   help="extra steps (besides the last) at which held-out prose is scored")
    p.add_argument("--retention-bytes", type=int, default=8000,
                   help="bytes of GSM8K test answers and of Shakespeare's last 200 kB scored")
    p.add_argument("--gap-segments", type=int, default=24,
                   help="held-out prose segments (2,000 chars) for per-chunk |dL|")
    p.add_argument("--cache-dir", help="teacher cache directory (default: a temporary one)")
    p.add_argument("--resume-runs", action="store_true",
                   help="skip (method, seed, budget) runs already in the runs JSONL")
    p.add_argument("--diagnose-bytes", type=int, default=16000,
                   help="diagnose: bytes at the end of the training 80%% analysed")
    p.add_argument("--diagnose-grad-batches", type=int, default=3)
    p.add_argument("--tau-probe", type=float, default=100.0)
    p.add_argument("--throughput-steps", type=int, default=3)
    p.add_argument("--throughput-skip", default="")
    p.add_argument("--memory-probes", default="chunked:8,chunked:2,naive:2")
    p.add_argument("--memory-batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--memory-length", type=int, default=1024)
    p.add_argument("--logit-chunk", type=int, default=128)
    p.add_argument("--memory-probe", choices=("chunked", "naive"), help=argparse.SUPPRESS)
    add_data_root(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.memory_probe:
        memory_probe(args.memory_probe, args.memory_batch, args.memory_length, args.logit_chunk)
        return
    # Every input is checked before anything is written (results, the work dir, the cache).
    sections = set(filter(None, args.sections.split(",")))
    if not sections or sections - set(SECTION_DATA):
        raise UsageError(f"--sections {args.sections}: choose from {','.join(SECTION_DATA)}")
    unknown = {m.strip() for m in args.methods.split(",")} - set(METHODS)
    if unknown:
        raise UsageError(f"--methods: unknown {sorted(unknown)}; choose from {','.join(METHODS)}")
    global DATA
    DATA = require(args, sorted({f for s in sections for f in SECTION_DATA[s]}))
    result: dict = {"hardware": {
        "machine": platform.machine(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "dtype": "float32", "shared_machine": True},
        "load_average_at_start": load_average(), "args": vars(args)}
    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "throughput" in sections:
        result["throughput"] = section_throughput(args, work)
        (RESULTS / "throughput.json").write_text(json.dumps(portable(result["throughput"]),
                                                            indent=1))
    if "diagnose" in sections:
        result["diagnose"] = section_diagnose(args, work)
    if "teacher_student" in sections:
        result["teacher_student"] = section_teacher_student(args, work)
    for direction in (1, 2):
        if f"transfer{direction}" in sections or "transfer" in sections:
            result[f"transfer_d{direction}"] = section_transfer(args, work, direction)
    if "memory" in sections:
        result["memory"] = section_memory(args)
    result["load_average_at_end"] = load_average()
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    run(main, "bench/distill.py")
