"""Drafts that pay (issue 19): our drafts against vLLM's own speculators, in one vLLM run.

For each target and each prompt set, one ``tokensurgeon spec bench`` (vLLM backend, compiled
unless --enforce-eager, batch 1, greedy, EOS ignored) times the target alone, vLLM's
``ngram`` prompt lookup, TLI (vLLM's ``use_heterogeneous_vocab`` with the donor's original
model, cross-tokenizer targets only) and each of our drafts, so every row shares one
machine state. Prompt sets, none of them trained on:
- ``gsm8k``: the first ``--num-prompts`` GSM8K **test** questions (chat template);
- ``prose``: the opening sentence of each of the first ``--num-prompts`` paragraphs of the
  last 20% of the WikiText-2 prose (drafts are trained on GSM8K **train** only).

Table per target x prompt set: c (draft s/token alone / target s/token alone), tau, tok/s and
speedup at each gamma, and the best gamma per proposer; with the load average before and
after each run. Raw reports go to OUT/<target>-<set>/report.json; the summary to
OUT/summary.json; the last stdout line is one JSON object.

Example (drafts made and trained as in docs/spec.md):

    python bench/spec_vllm.py --out bench/results/spec/issue19 --gamma 1,2,3 \\
        --num-prompts 8 --max-tokens 64 \\
        --smollm2-draft cut2-k4096=out/i19/fkl-s0 --gemma-draft smol-k8192=out/i19/gemma-smol
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository first on sys.path)
from common import (
    GSM8K_TEST,
    GSM8K_TRAIN,
    PROSE,
    SPEC_PROMPT_OPTIONS,
    add_config_options,
    add_data_root,
    load_average,
    portable,
    require,
    require_paths,
    resolve_options,
)

from spec_decode.bench import SpecBenchConfig, bench
from tokensurgeon import modelio
from tokensurgeon.errors import UsageError

# Greedy only (the targets of issue 19): every prompt option of the spec benches but T, and
# the vLLM engine options, all with SpecBenchConfig's defaults.
OPTIONS = tuple(o for o in SPEC_PROMPT_OPTIONS if o != "temperature") + (
    "vllm_memory", "max_model_len", "enforce_eager")
TARGETS = {"smollm2": "builtin:smollm2-135m", "gemma": "builtin:gemma3-270m"}
# TLI's draft for a cross-tokenizer target: the donor's original model.
TLI = {"gemma": "builtin:smollm2-135m"}


def prompt_files(data: Path, out: Path, n: int) -> dict[str, Path]:
    """GSM8K test questions (.jsonl) and held-out prose openings (.txt), n of each."""
    gsm, prose = data / GSM8K_TEST, data / PROSE
    out.mkdir(parents=True, exist_ok=True)
    rows = gsm.read_text().splitlines()[:n]
    (out / "prompts_gsm8k.jsonl").write_text("\n".join(rows) + "\n")
    paragraphs = [p.strip() for p in prose.read_text().split("\n\n") if p.strip()]
    held = paragraphs[int(0.8 * len(paragraphs)):]
    openings = []
    for p in held:
        first = re.split(r"(?<=[.!?])\s", p, maxsplit=1)[0].strip()
        if len(first) > 40:
            openings.append(first.replace("\n", " "))
        if len(openings) == n:
            break
    (out / "prompts_prose.txt").write_text("\n".join(openings) + "\n")
    return {"gsm8k": out / "prompts_gsm8k.jsonl", "prose": out / "prompts_prose.txt"}


def train_prompts(data: Path, path: Path, gsm8k_rows: int = 1500) -> int:
    """The drafts' training prompts, disjoint from both prompt sets: the first ``gsm8k_rows``
    GSM8K **train** questions and up to three opening sentences (> 40 characters) of each
    paragraph in the **first** 80% of the WikiText prose, shuffled with seed 0, as
    ``{"question": ...}`` rows (``spec make-data --prompts``). Returns the row count."""
    import random

    gsm = [json.loads(line)["question"] for line in (data / GSM8K_TRAIN).read_text().splitlines()
           if line.strip()][:gsm8k_rows]
    paragraphs = [p.strip() for p in (data / PROSE).read_text().split("\n\n") if p.strip()]
    openings = [s.strip().replace("\n", " ") for p in paragraphs[: int(0.8 * len(paragraphs))]
                for s in re.split(r"(?<=[.!?])\s", p)[:3] if len(s.strip()) > 40]
    rows = [json.dumps({"question": q}) for q in gsm + openings]
    random.Random(0).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return len(rows)


def table(report: dict) -> list[dict]:
    """One row per proposer x gamma, plus the target alone (from a spec bench report)."""
    rows = []
    for key, t in report["target_alone"].items():
        if key == "T0/b1":
            rows.append({"proposer": "target alone", "gamma": None, "c": None, "tau": None,
                         "tok_s": t["tokens_per_s"], "speedup": 1.0})
    for r in report["rows"]:
        rows.append({"proposer": r["draft"], "gamma": r["gamma"], "c": r.get("cost_ratio"),
                     "tau": r["tau"], "alpha": r["alpha"], "tok_s": r.get("tokens_per_s"),
                     "speedup": r.get("speedup"), "predicted": r.get("predicted_speedup"),
                     "same_as_target": r.get("same_as_target")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/spec-vllm")
    ap.add_argument("--targets", default="smollm2,gemma")
    ap.add_argument("--sets", default="gsm8k,prose")
    ap.add_argument("--smollm2-draft", action="append", default=[], help="NAME=DIR (repeat)")
    ap.add_argument("--gemma-draft", action="append", default=[], help="NAME=DIR (repeat)")
    ap.add_argument("--no-anchors", action="store_true", help="skip ngram and TLI")
    ap.add_argument("--make-train-prompts", metavar="FILE", default="",
                    help="only write the drafts' training prompts (GSM8K train + the first 80%% "
                         "of the prose, disjoint from both prompt sets) to FILE and stop")
    add_data_root(ap)
    add_config_options(ap, SpecBenchConfig, OPTIONS)
    args = ap.parse_args()
    if args.make_train_prompts:
        data = require(args, [GSM8K_TRAIN, PROSE])
        n = train_prompts(data, Path(args.make_train_prompts))
        print(json.dumps({"bench": "spec_vllm", "train_prompts": args.make_train_prompts, "rows": n}))
        return
    spec_options = resolve_options(args, SpecBenchConfig, OPTIONS)
    out = Path(args.out)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise UsageError(f"--targets: unknown {sorted(unknown)}; choose from {sorted(TARGETS)}")
    drafts_given = {t: list(getattr(args, f"{t}_draft")) for t in TARGETS}
    for entry in [e for t in targets for e in drafts_given[t]]:
        if "=" not in entry:
            raise UsageError(f"--*-draft {entry!r}: give NAME=DIR")
    require_paths((f"--{t}-draft", e.split("=", 1)[1]) for t in targets for e in drafts_given[t])
    data = require(args, [GSM8K_TEST, PROSE])
    prompts = prompt_files(data, out, spec_options["num_prompts"])
    results = {}
    for target in targets:
        drafts = list(drafts_given[target])
        if not args.no_anchors:
            drafts.append("ngram=ngram")
            if target in TLI:
                drafts.append(f"tli=tli:{modelio.resolve(TLI[target]).directory}")
        target_dir = str(modelio.resolve(TARGETS[target]).directory)
        for name in [s for s in args.sets.split(",") if s]:
            load_before = load_average()
            t0 = time.time()
            cfg = SpecBenchConfig(
                target=target_dir, draft=drafts, prompts=str(prompts[name]),
                out=str(out / f"{target}-{name}"), backend="vllm", batch_size=[1],
                overwrite=True, quiet=True,
                temperature=[0.0], **spec_options)
            report = bench(cfg)
            results[f"{target}-{name}"] = {
                "rows": table(report), "verdicts": report["verdicts"],
                "engine_options": report["raw"].get("engine_options"),
                "load_before": load_before, "load_after": load_average(),
                "wall_s": round(time.time() - t0, 1)}
            print(f"\n## {target} / {name} (load {load_before} -> {load_average()})")
            print("| proposer | gamma | c | tau | tok/s | speedup |\n|---|---|---|---|---|---|")
            for r in results[f"{target}-{name}"]["rows"]:
                f = lambda x, s=".3f": "-" if x is None else format(x, s)  # noqa: E731
                print(f"| {r['proposer']} | {r['gamma'] or '-'} | {f(r['c'])} | {f(r['tau'])} | "
                      f"{f(r['tok_s'], '.1f')} | {f(r['speedup'], '.2f')} |")
            (out / "summary.json").write_text(json.dumps(portable(results), indent=1) + "\n")
    speedups = {k: {r["proposer"] + (f"@{r['gamma']}" if r["gamma"] else ""): r["speedup"]
                    for r in v["rows"]} for k, v in results.items()}
    print(json.dumps({"bench": "spec_vllm", "options": portable(spec_options),
                      "speedups": speedups}))


if __name__ == "__main__":
    common.run(main, "spec_vllm")
