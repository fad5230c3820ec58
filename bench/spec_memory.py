"""Peak RSS and time per step of ``tokensurgeon spec train`` on a 262k vocabulary.

The run of issue 19's memory target: Gemma-3-270M as target, SmolLM2-135M transplanted onto
its tokenizer as draft, ``spec train`` with its defaults (the recipe, batch, length,
held-out set) for a few steps on GSM8K train. Each variant runs in a child process; its peak
RSS is the kernel's (``wait4``'s ``ru_maxrss``: anonymous and file-backed pages, the mapped
weights included), with the child's CPU seconds, the seconds of each optimizer step (from
its metrics.jsonl) and the load average beside.

Make the draft first (once, ~15-40 min on 2 cores; ``--head-tokens`` as docs/spec.md):

    tokensurgeon spec make-draft builtin:gemma3-270m --from builtin:smollm2-135m \\
        --out out/drafts/smol-on-gemma --head-tokens 8192 --head-data data/gsm8k/train.jsonl

then

    python bench/spec_memory.py --draft out/drafts/smol-on-gemma --steps 3 \\
        --variant default= --variant no-checkpointing=--no-gradient-checkpointing

Prints a table, then one JSON line (also written to bench/results/spec/memory/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import GSM8K_TRAIN, ROOT, load_average, portable, require, require_paths, run

RESULTS = ROOT / "bench" / "results" / "spec" / "memory"
MIB = 1024 * 1024


def measure(argv: list[str], log: Path) -> dict:
    """Run ``argv`` as a child; its peak RSS (MiB and bytes), CPU and wall seconds."""
    began = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"spec train exited with {code}; see {log}")
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "wall_seconds": round(time.perf_counter() - began, 1)}


def step_seconds(metrics: Path) -> list[float]:
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    return [round(r["tokens"] / r["tokens_per_s"], 1) for r in rows if "tokens_per_s" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="builtin:gemma3-270m")
    ap.add_argument("--draft", required=True,
                    help="the draft directory (spec make-draft TARGET --from builtin:smollm2-135m)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--num-examples", type=int, default=64, help="rows of GSM8K train read")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="a run with these extra spec train flags (repeatable; default: one "
                         "run named default with no flags)")
    ap.add_argument("--out", default="out/spec-memory", help="work folder (trained drafts, logs)")
    ap.add_argument("--data-root", default=None, metavar="DIR")
    args = ap.parse_args()
    data = require(args, [GSM8K_TRAIN])
    require_paths([("--draft", args.draft)])
    variants = [v.split("=", 1) for v in (args.variant or ["default="])]
    if any(len(v) != 2 or not v[0] for v in variants):
        ap.error("--variant takes NAME=FLAGS, e.g. no-checkpointing=--no-gradient-checkpointing")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, flags in variants:
        argv = [sys.executable, "-m", "cli", "spec", "train", args.target, args.draft,
                "--data", str(data / GSM8K_TRAIN), "--num-examples", str(args.num_examples),
                "--steps", str(args.steps), "--out", str(out / name), "--overwrite", "--quiet",
                *shlex.split(flags)]
        load_before = load_average()
        figures = measure(argv, out / f"{name}.log")
        seconds = step_seconds(out / name / "metrics.jsonl")
        rows.append({"variant": name, "flags": flags, **figures, "step_seconds": seconds,
                     "load_before": load_before, "load_after": load_average()})
        print(f"{name}: {rows[-1]}", flush=True)
    print("\n| variant | flags | peak RSS MiB | peak RSS GB (1e9) | CPU s | s per step | load |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | `{r['flags']}` | {r['peak_rss_mib']} | "
              f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['cpu_seconds']} | "
              f"{', '.join(map(str, r['step_seconds']))} | {r['load_before'][0]}-{r['load_after'][0]} |")
    result = portable({"bench": "spec_memory", "target": args.target, "draft": args.draft,
                       "steps": args.steps, "num_examples": args.num_examples, "runs": rows,
                       "machine": platform.machine(), "cpu_count": os.cpu_count(),
                       "python": platform.python_version(), "time": int(time.time())})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"spec_memory_{result['time']}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    run(main, "spec_memory")
