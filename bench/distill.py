"""Benchmark ``tokensurgeon distill``: tokenizer transfer, teacher -> student, and memory.

CPU-sized example (the README's figures; about 25 min per method on one core, ULD 60):

    python bench/distill.py --steps 30 --batch-size 4 --max-length 128 --lr 1e-4 \
        --warmup-steps 3 --gradmag --eval-bytes 12000 --skip memory

Experiments:
1. Tokenizer transfer: SmolLM2-135M transplanted onto Gemma-3's tokenizer
   (``tokensurgeon transplant builtin:smollm2-135m builtin:gemma3-270m DIR``) is
   self-distilled with the original SmolLM2 as teacher, on Shakespeare + GSM8K train, once
   per method (alm, alm+sft, sft, uld) at the same budget and seed. Held-out bits per byte
   on GSM8K test answers and WikiText-2 valid: teacher, student before, after each method,
   and the fraction of the teacher-student gap each method closes.
2. Teacher -> student: Gemma-3-270M -> SmolLM2-135M on GSM8K train, ALM vs SFT; the
   student's held-out GSM8K-test bits per byte before and after.
3. Memory: peak RSS of a Gemma-3-270M teacher's ALM statistics (realised-token and
   boundary-set log-probs) over ``--memory-length`` tokens, chunked vs naive (full logits).
   Each measurement runs in a fresh process.

Prints tables, then one JSON line with every figure, the hardware and the seeds.
"""

from __future__ import annotations

import argparse
import gc
import json
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.trainer import DistillConfig, boundary_ids, decoder_and_head, distill
from tokensurgeon import modelio
from tokensurgeon.evaluate import bits_per_byte, read_documents, segment_text
from tokensurgeon.token_identity import vocabulary

DATA = ROOT.parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
TRANSPLANTED = modelio.cache_dir() / "work" / "smollm2-gemmatok"


def heldout_sets(eval_bytes: int) -> dict[str, list[str]]:
    """GSM8K test answers and WikiText-2 valid, first ``eval_bytes`` bytes of each."""
    return {
        "gsm8k_test": segment_text(read_documents(DATA / "gsm8k" / "test.jsonl", "answer"),
                                   2000, eval_bytes),
        "wikitext_valid": segment_text(read_documents(DATA / "wikitext2-valid.txt"), 2000,
                                       eval_bytes),
    }


def bpb(model_dir: str, sets: dict[str, list[str]]) -> dict[str, float]:
    ref = modelio.resolve(model_dir)
    tok = modelio.load_tokenizer(ref)
    model = modelio.load_model(ref)
    out = {name: round(bits_per_byte(model, tok, segs, batch_size=2, logit_chunk=128)
                       ["bits_per_byte"], 4) for name, segs in sets.items()}
    del model
    gc.collect()
    return out


def train_data(work: Path, shakespeare_bytes: int, gsm8k_rows: int) -> list[str]:
    """A Shakespeare excerpt (.txt) and the first GSM8K train rows (.jsonl)."""
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:shakespeare_bytes]
    (work / "shakespeare.txt").write_text(text, encoding="utf-8")
    rows = (DATA / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:gsm8k_rows]
    (work / "gsm8k_train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return [str(work / "shakespeare.txt"), str(work / "gsm8k_train.jsonl")]


def run_method(teacher: str, student: str, data: list[str], out: Path, loss: str,
               args: argparse.Namespace) -> dict:
    cfg = DistillConfig(teacher=teacher, student=student, data=data, out=str(out), loss=loss,
                        steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                        lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
                        gradmag=args.gradmag,
                        checkpoint_every=args.steps, overwrite=True, quiet=True, device="cpu")
    began = time.perf_counter()
    summary = distill(cfg)
    gc.collect()
    return {"seconds": round(time.perf_counter() - began, 1), "final_loss": summary["last"]["loss"]}


def train_figures(out: Path) -> dict:
    """Mean student tokens/s and the first and last logged losses of a finished run."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": round(sum(r["tokens_per_s"] for r in rows) / len(rows), 2),
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}


def gap_closed(teacher: float, before: float, after: float) -> float:
    return (before - after) / (before - teacher) if before != teacher else float("nan")


def memory_probe(mode: str, batch: int, length: int, logit_chunk: int) -> None:
    """Child process: peak RSS of the teacher's ALM statistics, one JSON line."""
    from distill.logprobs import naive_position_statistics, position_statistics

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


def measure_memory(batch: int, length: int, logit_chunk: int, mode: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", mode, "--memory-batch", str(batch),
           "--memory-length", str(length), "--logit-chunk", str(logit_chunk),
           "--threads", str(threads)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        return {"mode": mode, "batch": batch, "length": length,
                "error": (done.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-bytes", type=int, default=12000)
    p.add_argument("--methods", default="alm,alm+sft,sft,uld")
    p.add_argument("--gradmag", action="store_true",
                   help="GradMag loss weights (1/|grad of the last layer|) for every method; "
                        "it only changes methods with several losses (alm+sft)")
    p.add_argument("--skip", default="",
                   help="comma list of: transfer, teacher_student, memory, before (the "
                        "transfer teacher / student-before evaluations)")
    p.add_argument("--memory-probes", default="chunked:8,chunked:2,naive:2",
                   help="MODE:BATCH list; naive at batch 8 would hold 8 x 1024 x 262k float32 "
                        "logits (8.6 GB) plus their log-softmax, more than this machine spares")
    p.add_argument("--memory-batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a shared 2-core CPU one thread ran 5x faster than two")
    p.add_argument("--memory-length", type=int, default=1024)
    p.add_argument("--logit-chunk", type=int, default=128)
    p.add_argument("--memory-probe", choices=("chunked", "naive"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.memory_probe:
        memory_probe(args.memory_probe, args.memory_batch, args.memory_length, args.logit_chunk)
        return
    skip = set(filter(None, args.skip.split(",")))
    sets = heldout_sets(args.eval_bytes)
    smollm = str(modelio.resolve("builtin:smollm2-135m").directory)
    gemma = str(modelio.resolve("builtin:gemma3-270m").directory)
    budget = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
              "lr": args.lr, "warmup_steps": args.warmup_steps, "train": "full",
              "gradmag": args.gradmag,
              "seed": args.seed, "eval_bytes_per_set": args.eval_bytes}
    result: dict = {"budget": budget, "hardware": {
        "machine": platform.machine(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__, "dtype": "float32"}, "seeds": [args.seed]}
    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))

    if "transfer" not in skip:
        if not (TRANSPLANTED / "config.json").is_file():
            sys.exit(f"{TRANSPLANTED} is missing; run: tokensurgeon transplant "
                     f"builtin:smollm2-135m builtin:gemma3-270m {TRANSPLANTED}")
        data = train_data(work, 300_000, 2000)
        rows = {}
        if "before" not in skip:  # lets several processes share the methods
            rows["teacher"] = bpb(smollm, sets)
            print(f"transfer teacher: {rows['teacher']}", flush=True)
            rows["student_before"] = bpb(str(TRANSPLANTED), sets)
            print(f"transfer student_before: {rows['student_before']}", flush=True)
        runs = {}
        for method in args.methods.split(","):
            out = work / f"transfer-{method.replace('+', '_')}"
            runs[method] = run_method(smollm, str(TRANSPLANTED), data, out, method, args)
            rows[method] = bpb(str(out), sets)
            runs[method].update(train_figures(out))
            shutil.rmtree(out, ignore_errors=True)  # ~4 GB of weights and optimizer state
            print(f"transfer {method}: {rows[method]} ({runs[method]['seconds']} s)", flush=True)
        closed = {m: {s: round(gap_closed(rows["teacher"][s], rows["student_before"][s],
                                          rows[m][s]), 4) for s in sets}
                  for m in runs} if "teacher" in rows else {}
        result["transfer"] = {"bits_per_byte": rows, "gap_closed": closed, "runs": runs}
        print("\nTokenizer transfer (SmolLM2-135M on Gemma-3 tokenizer, teacher SmolLM2-135M)")
        print(f"{'model':<16}{'gsm8k_test bpb':>16}{'wikitext bpb':>14}{'gap closed':>22}")
        for name, r in rows.items():
            gc_txt = (f"{closed[name]['gsm8k_test']:+.3f} / {closed[name]['wikitext_valid']:+.3f}"
                      if name in closed else "")
            print(f"{name:<16}{r['gsm8k_test']:>16.4f}{r['wikitext_valid']:>14.4f}{gc_txt:>22}")

    if "teacher_student" not in skip:
        data = train_data(work, 0, 4000)[1:]
        gsm = {"gsm8k_test": sets["gsm8k_test"]}
        rows = {"student_before": bpb(smollm, gsm)}
        runs = {}
        for method in ("alm", "sft"):
            out = work / f"t2s-{method}"
            runs[method] = run_method(gemma, smollm, data, out, method, args)
            rows[method] = bpb(str(out), gsm)
            runs[method].update(train_figures(out))
            shutil.rmtree(out, ignore_errors=True)
            print(f"teacher->student {method}: {rows[method]} ({runs[method]['seconds']} s)",
                  flush=True)
        result["teacher_student"] = {"bits_per_byte": rows, "runs": runs}
        print("\nTeacher -> student (Gemma-3-270M -> SmolLM2-135M, GSM8K train)")
        print(f"{'student':<16}{'gsm8k_test bpb':>16}")
        for name, r in rows.items():
            print(f"{name:<16}{r['gsm8k_test']:>16.4f}")

    if "memory" not in skip:
        mem = []
        for probe in args.memory_probes.split(","):
            mode, batch = probe.split(":")
            mem.append(measure_memory(int(batch), args.memory_length, args.logit_chunk, mode,
                                      args.threads))
            print(f"memory {probe}: {mem[-1]}", flush=True)
        result["memory"] = mem
        print("\nPeak RSS, Gemma-3-270M teacher ALM statistics (float32)")
        print(f"{'mode':<9}{'batch x len':>12}{'after load MiB':>16}{'peak MiB':>10}{'s':>7}")
        for m in mem:
            if "error" in m:
                print(f"{m['mode']:<9}{m['batch']:>5} x {m['length']:<5} error: {m['error']}")
            else:
                print(f"{m['mode']:<9}{m['batch']:>5} x {m['length']:<5}"
                      f"{m['rss_after_load_mib']:>16}{m['peak_rss_mib']:>10}{m['seconds']:>7}")
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
