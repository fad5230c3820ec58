"""Transplant benchmark: every method, both directions, and mergekit-tokensurgeon 0.1.5.

Directions:
  1. Gemma-3-270M given SmolLM2-135M's tokenizer (3,004 new tokens).
  2. SmolLM2-135M given Gemma-3-270M's tokenizer (~216k new tokens).

Methods: ``omp`` (the default: v2 input rows, output rows chosen per run by
``--output-shrink auto``), ``omp-out0`` / ``omp-out1`` (the same input rows with the output
weight fixed at 0, the anchor mean, or 1, the OMP rows; not run by default), ``omp-v1`` (the
v1 settings: raw anchors, exact GEMM candidates, k = 64, 10 refreshes; too slow for
direction 2 on 2 cores, so skipped there by default), ``mean``, ``zero``, ``subword``. For each: wall time, CPU time, peak RSS (from
/usr/bin/time, with the load average at the start), transplant.json's held-out and leak
figures, and bits per byte with a BOS prepended by hand (``bos="always"``, the evaluator's
convention before it followed the tokenizer) on held-out text: GSM8K test answers, the last
20% of ``wikitext2-valid-prose.txt`` (other benches train on the first 80%) and the raw
``wikitext2-valid.txt`` (secondary: its " @-@ " spacing favours some tokenizers).
mergekit: direction 1 in full, direction 2 its OMP on a subset, extrapolated; when its
environment is not installed the run says so and the table cites issue 8's measurements.

Runnable example (CPU; ~1 hour on 2 shared cores; texts from data/, or --data-root DIR):
    python bench/transplant.py --directions 1,2 --methods omp,mean,zero,subword --eval-bytes 12000
    python bench/transplant.py --directions 1 --eval-bytes 8000   # quicker
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
from common import (
    GSM8K_TEST,
    OMP_V1,
    PROSE,
    ROOT,
    WIKITEXT_RAW,
    add_data_root,
    cli_flags,
    portable,
    require,
    run,
)

from tokensurgeon import modelio, omp
from tokensurgeon.errors import UsageError
from tokensurgeon.evaluate import bits_per_byte, read_documents, segment_text
from tokensurgeon.token_identity import vocabulary
from tokensurgeon.transplant import plan_vocabulary

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


# name -> CLI arguments
METHODS = {
    "omp": ["--method", "omp"],
    # The two fixed output-row weights that --output-shrink auto chooses between.
    "omp-out0": ["--method", "omp", "--output-shrink", "0"],
    "omp-out1": ["--method", "omp", "--output-shrink", "1"],
    "omp-v1": ["--method", "omp", *cli_flags(OMP_V1)],
    "mean": ["--method", "mean"],
    "zero": ["--method", "zero"],
    "subword": ["--method", "subword"],
}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def run_ours(work: Path, direction: int, method: str) -> dict:
    base, donor = DIRECTIONS[direction]
    out = work / f"d{direction}-{method}"
    cmd = [sys.executable, str(ROOT / "cli.py"), "transplant", base, donor, str(out),
           *METHODS[method], "--quiet", "--overwrite"]
    load = loadavg()
    result = timed(cmd, work / f"d{direction}-{method}.log")
    result["loadavg_at_start"] = load
    manifest = json.loads((out / "transplant.json").read_text())
    result["manifest_seconds"] = manifest["seconds"]
    result["heldout"] = manifest["matrices"]["embed"]
    result["leak_check"] = manifest.get("leak_check")
    result["counts"] = manifest["counts"]
    result["output_rows"] = manifest.get("output_rows")
    result["options"] = {k: manifest["options"].get(k) for k in (
        "k", "candidates", "refreshes", "search", "centre", "coefficients", "shrink",
        "output_shrink", "output_grid", "untie")}
    return result


def run_mergekit_full(work: Path, direction: int, env_dir: Path) -> dict:
    base, donor = DIRECTIONS[direction]
    out = work / f"d{direction}-mergekit"
    exe = env_dir / "bin" / "mergekit-tokensurgeon"
    if not exe.exists():
        raise SystemExit(f"{exe} not found; install mergekit==0.1.5 there (see the docstring)")
    cmd = [str(exe), str(modelio.resolve(base).directory), str(modelio.resolve(donor).directory),
           str(out), "-k", str(OMP_V1["k"]), "--approximation-method", "omp"]
    return timed(cmd, work / f"d{direction}-mergekit.log")


MERGEKIT_SUBSET = r'''
import json, sys, time, torch
from mergekit.tokensurgeon.omp import batch_omp
data = torch.load(sys.argv[1], weights_only=True)
targets, anchors = data["targets"], data["anchors"]
torch.set_num_threads(int(sys.argv[3]))
t = time.perf_counter()
for s in range(0, targets.shape[0], 512):  # mergekit's default --batch-size
    idx, coef = batch_omp(targets[s:s + 512], anchors, int(sys.argv[4]))
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
               str(os.cpu_count()), str(OMP_V1["k"])], work / "d2-mergekit-subset.log")
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
    k, candidates = OMP_V1["k"], OMP_V1["candidates"]
    e_idx, e_coef = omp.omp_exact(targets, anchors, k)
    exact_s = time.perf_counter() - t
    exact = float(omp.relative_error(targets, omp.reconstruct(anchors, e_idx, e_coef)).mean())
    row = {"tokens": n, "exact_error": round(exact, 4), "exact_s": round(exact_s, 1)}
    for refreshes in (0, 5, 10):
        t = time.perf_counter()
        idx, coef = omp.omp_fast(targets, anchors, k, candidates,
                                 refresh=omp.refresh_schedule(k, refreshes))
        err = float(omp.relative_error(targets, omp.reconstruct(anchors, idx, coef)).mean())
        row[f"fast_r{refreshes}_error"] = round(err, 4)
        row[f"fast_r{refreshes}_ratio"] = round(err / exact, 4)
        row[f"fast_r{refreshes}_s"] = round(time.perf_counter() - t, 1)
    return row


def eval_model(path: str, segments: dict[str, list[str]]) -> dict:
    ref = modelio.resolve(path)
    model, tok = modelio.load_model(ref), modelio.load_tokenizer(ref)
    return {name: round(bits_per_byte(model, tok, segs, bos="always")["bits_per_byte"], 4)
            for name, segs in segments.items()}


# Held-out text name -> the data file it is cut from.
TEXT_FILES = {"gsm8k_test": GSM8K_TEST, "prose_heldout": PROSE, "wikitext_raw": WIKITEXT_RAW}


def eval_segments(data: Path, names: list[str], n_bytes: int) -> dict[str, list[str]]:
    out = {}
    if "gsm8k_test" in names:
        gsm = [json.loads(x)["answer"] for x in (data / GSM8K_TEST).read_text().splitlines()]
        out["gsm8k_test"] = segment_text(gsm, 2000, n_bytes)
    if "prose_heldout" in names:
        prose = (data / PROSE).read_text(encoding="utf-8")
        held = prose[int(len(prose) * 0.8):]
        held = held[held.index("\n") + 1:]  # start at a line
        out["prose_heldout"] = segment_text([held], 2000, n_bytes)
    if "wikitext_raw" in names:
        out["wikitext_raw"] = segment_text(read_documents(data / WIKITEXT_RAW), 2000, n_bytes)
    return out


# Issue 8's measurements of mergekit 0.1.5 on this machine, cited when its env is absent.
MERGEKIT_CITED = {1: {"wall_s": 226, "peak_rss_mb": 2048, "prose_increase": 0.097,
                      "source": "issue 8 (3 min 46 s, 2.0 GB; +0.097 BPB on prose)"},
                  2: {"extrapolated_wall_s": "3.8-9 h", "source": "issue 8 (OMP alone)"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "runs" / "transplant3"))
    ap.add_argument("--directions", default="1,2")
    ap.add_argument("--methods", default="omp,omp-v1,mean,zero,subword")
    ap.add_argument("--skip", default="2:omp-v1",
                    help="direction:method pairs not run (comma-separated)")
    ap.add_argument("--eval-bytes", type=int, default=12_000, help="bytes of each held-out text")
    ap.add_argument("--mergekit-env", default=str(ROOT.parent / "venv-mergekit"),
                    help="venv with mergekit 0.1.5 (default: venv-mergekit beside the repository)")
    ap.add_argument("--mergekit-subset", type=int, default=1024)
    ap.add_argument("--texts", default="gsm8k_test,prose_heldout,wikitext_raw")
    ap.add_argument("--eval-models", default="",
                    help="comma-separated models to evaluate (default: base and every method)")
    ap.add_argument("--exact-subset", type=int, default=0,
                    help="new tokens for the fast-vs-exact OMP check (0 skips it)")
    add_data_root(ap)
    args = ap.parse_args()
    # Every input is checked before anything is written (workdir, results, the model cache).
    directions = [int(d) for d in args.directions.split(",") if d.strip().isdigit()]
    if not directions or set(directions) - set(DIRECTIONS) or \
            len(directions) != len(args.directions.split(",")):
        raise UsageError(f"--directions {args.directions}: give 1, 2 or 1,2")
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        raise UsageError(f"--methods: unknown {sorted(unknown)}; choose from {','.join(METHODS)}")
    texts = [t for t in args.texts.split(",") if t]
    if not texts or set(texts) - set(TEXT_FILES):
        raise UsageError(f"--texts {args.texts}: choose from {','.join(TEXT_FILES)}")
    data = require(args, [TEXT_FILES[t] for t in texts])
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    env_dir = Path(args.mergekit_env)
    have_mergekit = (env_dir / "bin" / "mergekit-tokensurgeon").exists()
    for ref in (GEMMA, SMOL):
        modelio.resolve(ref)  # convert the GGUF files once, outside the timings

    results: dict = {"directions": {}}
    for d in directions:
        methods = [m for m in args.methods.split(",") if f"{d}:{m}" not in skip]
        r: dict = {"ours": {}, "bpb": {}, "methods": methods}
        for m in methods:
            r["ours"][m] = cached(work / f"d{d}-{m}.timing.json", lambda d=d, m=m: run_ours(work, d, m))
            print(f"direction {d} {m}: {r['ours'][m]['wall_s']} s", flush=True)
        if have_mergekit:
            if d == 1:
                r["mergekit"] = cached(work / "d1-mergekit.timing.json",
                                       lambda: run_mergekit_full(work, 1, env_dir))
            else:
                r["mergekit"] = cached(work / "d2-mergekit.extrapolated.json",
                                       lambda: mergekit_extrapolated(work, env_dir, args.mergekit_subset))
        else:
            r["mergekit"] = {"not_run": f"{env_dir} not installed", **MERGEKIT_CITED[d]}
        print(f"direction {d} mergekit: {r['mergekit']}", flush=True)
        if args.exact_subset:
            r["fast_vs_exact"] = cached(work / f"d{d}-fast-vs-exact.json",
                                        lambda d=d: fast_vs_exact(d, args.exact_subset))
        results["directions"][d] = r

    segments = eval_segments(data, texts, args.eval_bytes)
    for d in directions:
        r = results["directions"][d]
        models = {"base": DIRECTIONS[d][0]}
        models.update({m: str(work / f"d{d}-{m}") for m in r["methods"]})
        if d == 1 and have_mergekit:
            models["mergekit"] = str(work / "d1-mergekit")
        if args.eval_models:
            models = {m: p for m, p in models.items() if m in args.eval_models.split(",")}
        tag = "-".join(sorted(segments))
        for name, path in models.items():
            r["bpb"][name] = cached(work / f"d{d}-{name}.bpb-{args.eval_bytes}-{tag}.json",
                                    lambda p=path: eval_model(p, segments))
            print(f"direction {d} bpb {name}: {r['bpb'][name]}", flush=True)

    print_table(results, directions)
    results.update({
        "eval_bytes": args.eval_bytes, "bos": "always (prepended by hand)",
        "seeds": {"holdout": 0, "subsets": [0, 1]}, "loadavg_at_end": loadavg(),
        "machine_shared": "yes: other helpers' jobs ran on the same 2 cores",
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()},
    })
    out = ROOT / "bench" / "results" / "transplant_v2.json"
    out.write_text(json.dumps(portable(results), indent=1))
    print(json.dumps(results))


def print_table(results: dict, directions: list[int]) -> None:
    names = {1: "Gemma-3-270M + SmolLM2 tokenizer", 2: "SmolLM2-135M + Gemma-3 tokenizer"}
    texts = ("gsm8k_test", "prose_heldout", "wikitext_raw")
    for d in directions:
        r = results["directions"][d]
        print(f"\n## Direction {d}: {names[d]}")
        print("| model | wall s | CPU s | peak RSS MB | load | leak mass | GSM8K BPB | prose BPB | "
              "raw WikiText BPB |")
        print("|---|---|---|---|---|---|---|---|---|")
        texts = [t for t in texts if any(t in b for b in r["bpb"].values())]
        if "base" in r["bpb"]:
            base = r["bpb"]["base"]
            print("| original BASE | - | - | - | - | - | "
                  + " | ".join(str(base.get(t, "-")) for t in texts) + " |")
        for m in r["methods"]:
            t, b = r["ours"][m], r["bpb"].get(m, {})
            leak = (t.get("leak_check") or {}).get("leak_mass", "-")
            print(f"| tokensurgeon {m} | {t['wall_s']} | {t['cpu_s']} | {t['peak_rss_mb']} | "
                  f"{t['loadavg_at_start']} | {leak} | " + " | ".join(str(b.get(x, "-")) for x in texts)
                  + " |")
        mk = r["mergekit"]
        b = r["bpb"].get("mergekit")
        wall = mk.get("wall_s") or f"{mk.get('extrapolated_wall_s')} (OMP alone, extrapolated)"
        print(f"| mergekit 0.1.5 | {wall} | {mk.get('cpu_s', '-')} | "
              f"{mk.get('peak_rss_mb', '-')} | - | - | "
              + (" | ".join(str(b[x]) for x in texts) if b
                 else f"not evaluated ({mk.get('source') or mk.get('note', '')})") + " |")


if __name__ == "__main__":
    run(main, "bench/transplant.py")
