"""Transplant benchmark: tokensurgeon vs mergekit-tokensurgeon 0.1.5 on the real pair.

Directions (k = 64):
  1. Gemma-3-270M given SmolLM2-135M's tokenizer (3,004 new tokens).
  2. SmolLM2-135M given Gemma-3-270M's tokenizer (~216k new tokens).

For each: wall time, peak RSS and cores used (CPU time / wall time) of our transplant and of
mergekit (direction 2: mergekit's own OMP timed on a fixed subset of tokens and extrapolated,
plus its measured direction-1 load/save overhead), the OMP reconstruction error of our fast
OMP against exact OMP on a fixed subset, and bits per byte on held-out text (GSM8K test
answers, WikiText-2 valid) of the original BASE and every transplanted model.

Runnable example (CPU; the full run takes about an hour on 2 cores):
    python bench/transplant.py --workdir bench/runs/transplant
    python bench/transplant.py --directions 1 --eval-bytes 20000   # quicker
mergekit runs from its own environment (it pins other packages):
    python3 -m venv ../venv-mergekit && ../venv-mergekit/bin/pip install torch==2.13.0 mergekit==0.1.5
and is found through --mergekit-env (default ../venv-mergekit, beside the repository). Results already in the
workdir are reused, so an interrupted run resumes. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokensurgeon import modelio, omp
from tokensurgeon.evaluate import bits_per_byte, read_documents, segment_text
from tokensurgeon.token_identity import vocabulary
from tokensurgeon.transplant import plan_vocabulary

DATA = ROOT.parent / "shared" / "data"
GEMMA, SMOL = "builtin:gemma3-270m", "builtin:smollm2-135m"
DIRECTIONS = {1: (GEMMA, SMOL), 2: (SMOL, GEMMA)}
TIME_FMT = "%e %M %U %S"


def timed(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run a command under /usr/bin/time; return wall s, peak RSS MB, cores used."""
    with open(log, "w") as f:
        proc = subprocess.run(["/usr/bin/time", "-f", TIME_FMT, *cmd], stdout=f,
                              stderr=subprocess.STDOUT, env=env, check=False)
    last = log.read_text().strip().splitlines()[-1].split()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}); see {log}")
    wall, rss_kb, user, system = float(last[0]), int(last[1]), float(last[2]), float(last[3])
    return {"wall_s": wall, "peak_rss_mb": round(rss_kb / 1024), "cpu_s": round(user + system, 1),
            "cores_used": round((user + system) / max(wall, 1e-9), 2)}


def cached(path: Path, fn):
    if path.exists():
        return json.loads(path.read_text())
    result = fn()
    path.write_text(json.dumps(result, indent=2))
    return result


def run_ours(work: Path, direction: int, method: str, refreshes: int | None) -> dict:
    base, donor = DIRECTIONS[direction]
    out = work / f"d{direction}-{method}"
    cmd = [sys.executable, str(ROOT / "cli.py"), "transplant", base, donor, str(out),
           "--method", method, "--quiet", "--overwrite", "-k", "64"]
    if refreshes is not None:
        cmd += ["--refreshes", str(refreshes)]
    result = timed(cmd, work / f"d{direction}-{method}.log")
    manifest = json.loads((out / "transplant.json").read_text())
    result["manifest_seconds"] = manifest["seconds"]
    result["heldout"] = manifest["matrices"]["embed"]
    result["counts"] = manifest["counts"]
    result["refreshes"] = manifest["options"]["refreshes"]
    return result


def run_mergekit_full(work: Path, direction: int, env_dir: Path) -> dict:
    base, donor = DIRECTIONS[direction]
    out = work / f"d{direction}-mergekit"
    exe = env_dir / "bin" / "mergekit-tokensurgeon"
    if not exe.exists():
        raise SystemExit(f"{exe} not found; install mergekit==0.1.5 there (see the docstring)")
    cmd = [str(exe), str(modelio.resolve(base).directory), str(modelio.resolve(donor).directory),
           str(out), "-k", "64", "--approximation-method", "omp"]
    return timed(cmd, work / f"d{direction}-mergekit.log")


MERGEKIT_SUBSET = r'''
import json, sys, time, torch
from mergekit.tokensurgeon.omp import batch_omp
data = torch.load(sys.argv[1], weights_only=True)
targets, anchors = data["targets"], data["anchors"]
torch.set_num_threads(int(sys.argv[3]))
t = time.perf_counter()
for s in range(0, targets.shape[0], 512):  # mergekit's default --batch-size
    idx, coef = batch_omp(targets[s:s + 512], anchors, 64)
json.dump({"seconds": time.perf_counter() - t, "tokens": targets.shape[0]}, open(sys.argv[2], "w"))
'''


def problem_subset(direction: int, n: int, seed: int = 0):
    """(targets [n, D], anchors [N, D], total new tokens) in DONOR space, as we match them."""
    base, donor = DIRECTIONS[direction]
    b_ref, d_ref = modelio.resolve(base), modelio.resolve(donor)
    b_emb, _, _ = modelio.load_embeddings(b_ref)
    d_emb, _, _ = modelio.load_embeddings(d_ref)
    plan = plan_vocabulary(vocabulary(modelio.load_tokenizer(b_ref)),
                           vocabulary(modelio.load_tokenizer(d_ref)),
                           b_emb.shape[0], d_emb.shape[0], d_emb.shape[0])
    gen = torch.Generator().manual_seed(seed)
    pick = plan.new_ids[torch.randperm(plan.new_ids.numel(), generator=gen)[:n]]
    return d_emb[pick].float(), d_emb[plan.anchor_donor].float(), int(plan.new_ids.numel())


def mergekit_extrapolated(work: Path, env_dir: Path, n: int) -> dict:
    targets, anchors, total = problem_subset(2, n)
    blob = work / "d2-mergekit-subset.pt"
    torch.save({"targets": targets, "anchors": anchors}, blob)
    out = work / "d2-mergekit-subset.result.json"
    t = timed([str(env_dir / "bin" / "python"), "-c", MERGEKIT_SUBSET, str(blob), str(out),
               str(os.cpu_count())], work / "d2-mergekit-subset.log")
    measured = json.loads(out.read_text())
    per_token = measured["seconds"] / measured["tokens"]
    return {
        "subset_tokens": n, "subset_omp_s": round(measured["seconds"], 1),
        "new_tokens": total, "cores_used": t["cores_used"],
        "extrapolated_wall_s": round(per_token * total, 1),
        "note": "mergekit's batch_omp timed on a fixed subset of direction-2 tokens and scaled "
                "to all new tokens; OMP only, without loading and saving",
    }


def fast_vs_exact(direction: int, n: int) -> dict:
    targets, anchors, _ = problem_subset(direction, n, seed=1)
    t = time.perf_counter()
    e_idx, e_coef = omp.omp_exact(targets, anchors, 64)
    exact_s = time.perf_counter() - t
    exact = float(omp.relative_error(targets, omp.reconstruct(anchors, e_idx, e_coef)).mean())
    row = {"tokens": n, "exact_error": round(exact, 4), "exact_s": round(exact_s, 1)}
    for refreshes in (0, 5, 10):
        t = time.perf_counter()
        idx, coef = omp.omp_fast(targets, anchors, 64, 256, refresh=omp.refresh_schedule(64, refreshes))
        err = float(omp.relative_error(targets, omp.reconstruct(anchors, idx, coef)).mean())
        row[f"fast_r{refreshes}_error"] = round(err, 4)
        row[f"fast_r{refreshes}_ratio"] = round(err / exact, 4)
        row[f"fast_r{refreshes}_s"] = round(time.perf_counter() - t, 1)
    return row


def eval_model(path: str, segments: dict[str, list[str]]) -> dict:
    ref = modelio.resolve(path)
    model, tok = modelio.load_model(ref), modelio.load_tokenizer(ref)
    return {name: round(bits_per_byte(model, tok, segs)["bits_per_byte"], 4)
            for name, segs in segments.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "runs" / "transplant"))
    ap.add_argument("--directions", default="1,2")
    ap.add_argument("--methods", default="omp,mean,zero,subword")
    ap.add_argument("--eval-bytes", type=int, default=40_000, help="bytes of each held-out text")
    ap.add_argument("--mergekit-env", default=str(Path(__file__).resolve().parents[2] / "venv-mergekit"))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit-subset", type=int, default=1024)
    ap.add_argument("--exact-subset", type=int, default=256)
    ap.add_argument("--d2-refreshes", type=int, default=None,
                    help="--refreshes for direction 2 (default: the tool's default)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    directions = [int(d) for d in args.directions.split(",")]
    methods = args.methods.split(",")
    env_dir = Path(args.mergekit_env)
    for ref in (GEMMA, SMOL):
        modelio.resolve(ref)  # convert the GGUF files once, outside the timings

    results: dict = {"directions": {}}
    for d in directions:
        r: dict = {"ours": {}, "bpb": {}}
        for m in methods:
            refreshes = args.d2_refreshes if d == 2 else None
            r["ours"][m] = cached(work / f"d{d}-{m}.timing.json",
                                  lambda d=d, m=m, r=refreshes: run_ours(work, d, m, r))
            print(f"direction {d} {m}: {r['ours'][m]['wall_s']} s", flush=True)
        if not args.skip_mergekit:
            if d == 1:
                r["mergekit"] = cached(work / "d1-mergekit.timing.json",
                                       lambda: run_mergekit_full(work, 1, env_dir))
            else:
                r["mergekit"] = cached(work / "d2-mergekit.extrapolated.json",
                                       lambda: mergekit_extrapolated(
                                           work, env_dir, args.mergekit_subset))
            print(f"direction {d} mergekit: {r['mergekit']}", flush=True)
        r["fast_vs_exact"] = cached(work / f"d{d}-fast-vs-exact.json",
                                    lambda d=d: fast_vs_exact(d, args.exact_subset))
        results["directions"][d] = r

    gsm = [json.loads(x)["answer"] for x in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    segments = {"gsm8k_test": segment_text(gsm, 2000, args.eval_bytes),
                "wikitext_valid": segment_text(read_documents(DATA / "wikitext2-valid.txt"),
                                               2000, args.eval_bytes)}
    for d in directions:
        r = results["directions"][d]
        models = {"base": DIRECTIONS[d][0]}
        models.update({m: str(work / f"d{d}-{m}") for m in methods})
        if d == 1 and not args.skip_mergekit:
            models["mergekit"] = str(work / "d1-mergekit")
        for name, path in models.items():
            r["bpb"][name] = cached(work / f"d{d}-{name}.bpb-{args.eval_bytes}.json",
                                    lambda p=path: eval_model(p, segments))
            print(f"direction {d} bpb {name}: {r['bpb'][name]}", flush=True)

    print_table(results, directions, methods, args)
    results.update({
        "k": 64, "eval_bytes": args.eval_bytes, "seeds": {"holdout": 0, "subsets": [0, 1]},
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()},
    })
    print(json.dumps(results))


def print_table(results: dict, directions: list[int], methods: list[str], args) -> None:
    names = {1: "Gemma-3-270M + SmolLM2 tokenizer", 2: "SmolLM2-135M + Gemma-3 tokenizer"}
    for d in directions:
        r = results["directions"][d]
        print(f"\n## Direction {d}: {names[d]}")
        print("| model | wall s | peak RSS MB | cores used | GSM8K BPB | WikiText BPB |")
        print("|---|---|---|---|---|---|")
        base = r["bpb"]["base"]
        print(f"| original BASE | - | - | - | {base['gsm8k_test']} | {base['wikitext_valid']} |")
        for m in methods:
            t, b = r["ours"][m], r["bpb"][m]
            label = f"{m} ({t['refreshes']} refreshes)" if m == "omp" else m
            print(f"| tokensurgeon {label} | {t['wall_s']} | {t['peak_rss_mb']} | {t['cores_used']} | "
                  f"{b['gsm8k_test']} | {b['wikitext_valid']} |")
        if "mergekit" in r:
            mk = r["mergekit"]
            wall = mk.get("wall_s", mk.get("extrapolated_wall_s"))
            suffix = "" if "wall_s" in mk else " (OMP only, extrapolated)"
            b = r["bpb"].get("mergekit", {"gsm8k_test": "-", "wikitext_valid": "-"})
            print(f"| mergekit 0.1.5 omp{suffix} | {wall} | {mk.get('peak_rss_mb', '-')} | "
                  f"{mk['cores_used']} | {b['gsm8k_test']} | {b['wikitext_valid']} |")
        fe = r["fast_vs_exact"]
        print(f"\nfast vs exact OMP on {fe['tokens']} new tokens: exact error {fe['exact_error']}; "
              + "; ".join(f"{n} refreshes: x{fe[f'fast_r{n}_ratio']}" for n in (0, 5, 10)))


if __name__ == "__main__":
    main()
