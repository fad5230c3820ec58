"""Cross-tokenizer drafts for Gemma-3-270M (issue 10): TLI against a transplanted draft.

Target: Gemma-3-270M (builtin:gemma3-270m). Drafts, all from SmolLM2-135M's weights:
- ``tli``: SmolLM2-135M with its own tokenizer, TLI as vLLM's ``use_heterogeneous_vocab``
  does it (string intersection after the leading Ġ/▁ mark, greedy drafting, unk for target
  tokens outside it): ``spec_decode.backends.hf`` path ``tli:DIR``;
- ``tli-bytes``: the same with the intersection taken on decoded bytes (``tli-bytes:DIR``);
- ``transplant``: SmolLM2-135M transplanted onto Gemma's tokenizer, untrained
  (``tokensurgeon spec make-draft builtin:gemma3-270m --from builtin:smollm2-135m``);
- ``distilled``: ``transplant`` after a short ``tokensurgeon spec train`` against the target;
- ``hf-uag``: transformers' own cross-tokenizer assisted generation,
  ``generate(assistant_model=SmolLM2, tokenizer=..., assistant_tokenizer=...)``: at T=0
  Universal Assisted Generation (text re-tokenised, greedy match), at T>0 Universal
  Speculative Decoding (assistant head pruned to the intersection, speculative sampling).

Sections (``--sections``, comma list):
- ``acceptance``: the exact rules of the HF backend on the target's own continuations of
  GSM8K **test** prompts (per-token alpha under each drafting rule, tau from the exact
  greedy replay at T=0 and independent positions at T>0), plus ``hf-uag`` measured by
  counting target forward passes in ``generate`` (tau = new tokens / target calls).
  Acceptance does not depend on machine load.
- ``timing``: batch-1 wall clock with HF ``generate`` (1 torch thread): target alone, each
  draft alone (c = draft s/token / target s/token), and assisted generation with each
  draft (our TLI and transplanted drafts through ``assistant_model=``; ``hf-uag``), so
  speedup = target s/token / assisted s/token. Valid only on a quiet machine.
- ``cost``: parameters touched per token, draft / target (a load-free estimate of c).

Writes OUT/<section>.json and ends with one JSON line. Example (the lead's quiet run):

    OMP_NUM_THREADS=1 python bench/spec_crosstok.py --sections timing,cost \\
        --out bench/results/spec/crosstok
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from common import (
    GSM8K_TEST,
    SPEC_PROMPT_OPTIONS,
    add_config_options,
    add_data_root,
    load_average,
    portable,
    require,
    resolve_options,
    run,
)

from spec_decode.backends.base import BenchPlan
from spec_decode.backends.hf import load_draft, run_hf, split_draft_path
from spec_decode.bench import SpecBenchConfig, summarise, weights_per_token
from spec_decode.prompts import encode_prompt, read_examples
from tokensurgeon import modelio
from tokensurgeon.errors import UsageError

# The data root: set once in main() (--data-root / $TOKENSURGEON_DATA / data/) after its
# files are checked.
DATA = Path()
SECTIONS = ("acceptance", "cost", "timing")
DRAFTS = ("tli", "tli-bytes", "transplant", "distilled", "hf-uag")
# How to make the two drafts this bench reads from disk (the recorded run's recipe).
MAKE = {
    "transplant": "tokensurgeon spec make-draft builtin:gemma3-270m --from builtin:smollm2-135m "
                  "--out {path}",
    "distilled": "tokensurgeon spec train builtin:gemma3-270m out/crosstok/transplant --config "
                 "bench/results/spec/crosstok/train_distilled.yaml --data data/gsm8k/train.jsonl "
                 "--out {path}",
}


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def write(out: Path, name: str, payload: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(portable(payload), indent=1))
    tmp.replace(path)
    return path


def prompts(target: str, n: int, offset: int = 0) -> list[list[int]]:
    tok = modelio.load_tokenizer(modelio.resolve(target))
    rows = read_examples(DATA / GSM8K_TEST, limit=n, offset=offset)
    return [encode_prompt(tok, r.prompt, chat=True) for r in rows]


def drafts_of(args) -> dict[str, str]:
    out = {}
    for name in args.drafts.split(","):
        if name == "tli":
            out[name] = "tli:" + args.smol
        elif name == "tli-bytes":
            out[name] = "tli-bytes:" + args.smol
        elif name == "transplant":
            out[name] = args.transplant
        elif name == "distilled":
            out[name] = args.distilled
        elif name != "hf-uag":
            raise SystemExit(f"unknown draft {name!r}")
    return {k: v for k, v in out.items() if split_draft_path(v)[0] and Path(split_draft_path(v)[0]).exists()}


class CallCounter:
    """Counts forward calls of a model (target verification steps in ``generate``)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_hook(lambda *a: self.bump())

    def bump(self):
        self.n += 1


def assistant_config(model, gamma: int) -> None:
    gc = model.generation_config
    gc.num_assistant_tokens = gamma
    gc.num_assistant_tokens_schedule = "constant"
    gc.assistant_confidence_threshold = 0.0


def sampling(temperature: float, max_tokens: int) -> dict:
    kw = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens}
    if temperature == 0:
        return {**kw, "do_sample": False}
    return {**kw, "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


def run_generate(target, prompt_ids, temperature, max_tokens, seed, **assist) -> dict:
    """One ``generate`` per prompt; tokens, target calls, wall and CPU seconds."""
    counter = CallCounter(target)
    tokens = 0
    wall = cpu = 0.0
    try:
        for i, p in enumerate(prompt_ids):
            torch.manual_seed(seed + i)
            ids = torch.tensor([p])
            t0, c0 = time.perf_counter(), cpu_seconds()
            with torch.inference_mode():
                out = target.generate(ids, attention_mask=torch.ones_like(ids),
                                      **sampling(temperature, max_tokens), **assist)
            wall += time.perf_counter() - t0
            cpu += cpu_seconds() - c0
            tokens += out.shape[1] - len(p)
    finally:
        counter.handle.remove()
    return {"output_tokens": tokens, "target_calls": counter.n, "seconds": wall,
            "cpu_seconds": cpu, "tau": tokens / counter.n if counter.n else None,
            "s_per_token": wall / tokens if tokens else None}


def hf_uag(args, target, prompt_ids, temperatures, gammas, timed=False) -> list[dict]:
    """transformers' cross-tokenizer assisted generation (UAG at T=0, USD at T>0)."""
    t_tok = modelio.load_tokenizer(modelio.resolve(args.target))
    rows = []
    for temp in temperatures:
        for gamma in gammas:
            # USD prunes the assistant's head in place: a fresh assistant per run.
            smol = modelio.load_model(modelio.resolve(args.smol))
            s_tok = modelio.load_tokenizer(modelio.resolve(args.smol))
            assistant_config(smol, gamma)
            if timed:  # warm-up
                run_generate(target, prompt_ids[:1], temp, 4, args.seed, assistant_model=smol,
                             tokenizer=t_tok, assistant_tokenizer=s_tok)
            r = run_generate(target, prompt_ids, temp, args.max_tokens, args.seed,
                             assistant_model=smol, tokenizer=t_tok, assistant_tokenizer=s_tok)
            rows.append({"draft": "hf-uag", "method": "UAG" if temp == 0 else "USD",
                         "temperature": temp, "gamma": gamma, **r, "load_average": load_average()})
            print(f"hf-uag T={temp:g} gamma={gamma}: tau {r['tau']:.3f} "
                  f"({r['output_tokens']} tokens / {r['target_calls']} target calls)", flush=True)
            del smol
    return rows


def section_acceptance(args, out: Path) -> dict:
    target_dir = str(modelio.resolve(args.target).directory)
    ps = prompts(args.target, args.num_prompts, args.prompt_offset)
    temps, gammas = list(args.temperature), list(args.gamma)
    drafts = drafts_of(args)
    t0, c0 = time.perf_counter(), cpu_seconds()
    plan = BenchPlan(target=target_dir, drafts=drafts, prompts=ps, gammas=gammas,
                     temperatures=temps, batch_sizes=[1], max_tokens=args.max_tokens,
                     timed_prompts=0, seed=args.seed, device="cpu", vllm_memory=0.0,
                     max_model_len=0, dtype="float32", quiet=True)
    rows = summarise(run_hf(plan), gammas)["rows"] if drafts else []  # none: hf-uag only
    table = [{k: r[k] for k in ("draft", "temperature", "draft_sample", "gamma",
                                "token_acceptance", "alpha", "tau", "acceptance_per_position")}
             for r in rows]
    for r in table:
        print(f"{r['draft']:>11} T={r['temperature']:g} {r['draft_sample']:>13} gamma={r['gamma']} "
              f"alpha(per token) {r['token_acceptance']:.3f}  tau {r['tau']:.3f}", flush=True)
    payload = {"target": args.target, "drafts": drafts, "num_prompts": len(ps),
               "prompt_offset": args.prompt_offset, "max_tokens": args.max_tokens,
               "seed": args.seed, "rows": table, "hf_uag": [],
               "torch_threads": torch.get_num_threads()}

    def save():
        payload.update(seconds=round(time.perf_counter() - t0, 1),
                       cpu_seconds=round(cpu_seconds() - c0, 1), load_average=load_average())
        write(out, "acceptance", payload)

    save()  # the exact rows first: the slower generate() runs below may be cut short
    if "hf-uag" in args.drafts.split(","):
        target = modelio.load_model(modelio.resolve(args.target))
        payload["hf_uag"] = hf_uag(args, target, ps, temps, gammas)
        save()
    return payload


def section_cost(args, out: Path) -> dict:
    target = modelio.load_model(modelio.resolve(args.target))
    t = weights_per_token(target)
    del target
    rows = {"target": t}
    for name, path in drafts_of(args).items():
        m = load_draft(args.target, path, "cpu")
        rows[name] = {**weights_per_token(m), }
        rows[name]["c_params"] = rows[name]["per_token"] / t["per_token"]
        del m
    payload = {"rows": rows, "note": "c_params = (body + head weights) per draft token / the "
               "target's; speedup ~ tau / (1 + gamma * c)"}
    for name, r in rows.items():
        print(f"{name:>11}: {r['per_token'] / 1e6:.1f}M weights per token"
              + (f", c_params {r['c_params']:.3f}" if "c_params" in r else ""), flush=True)
    write(out, "cost", payload)
    return payload


def section_timing(args, out: Path) -> dict:
    torch.set_num_threads(args.threads)
    ps = prompts(args.target, args.timed_prompts, args.prompt_offset)
    gammas = [int(x) for x in args.timing_gamma.split(",")]
    temps = [float(x) for x in args.timing_temperature.split(",")]
    target = modelio.load_model(modelio.resolve(args.target))
    target.generation_config.cache_implementation = None
    t0 = time.perf_counter()
    run_generate(target, ps[:1], 0.0, 4, args.seed)  # warm-up
    alone = {temp: run_generate(target, ps, temp, args.max_tokens, args.seed) for temp in temps}
    rows, draft_alone = [], {}
    for name, path in drafts_of(args).items():
        draft = load_draft(args.target, path, "cpu")
        run_generate(draft, ps[:1], 0.0, 4, args.seed)
        draft_alone[name] = run_generate(draft, ps, 0.0, args.max_tokens, args.seed)
        c = draft_alone[name]["s_per_token"] / alone[0.0]["s_per_token"] if 0.0 in alone else None
        for temp in temps:
            for gamma in gammas:
                assistant_config(draft, gamma)
                run_generate(target, ps[:1], temp, 4, args.seed, assistant_model=draft)
                r = run_generate(target, ps, temp, args.max_tokens, args.seed, assistant_model=draft)
                r.update(draft=name, temperature=temp, gamma=gamma, c=c,
                         speedup=alone[temp]["s_per_token"] / r["s_per_token"],
                         predicted=r["tau"] / (1 + gamma * c) if c else None,
                         load_average=load_average())
                rows.append(r)
                print(f"{name:>11} T={temp:g} gamma={gamma}: tau {r['tau']:.2f} c {c:.3f} "
                      f"speedup {r['speedup']:.2f} (predicted {r['predicted']:.2f})", flush=True)
        del draft
    if "hf-uag" in args.drafts.split(","):
        for r in hf_uag(args, target, ps, temps, gammas, timed=True):
            r["speedup"] = alone[r["temperature"]]["s_per_token"] / r["s_per_token"]
            rows.append(r)
            print(f"     hf-uag T={r['temperature']:g} gamma={r['gamma']}: speedup "
                  f"{r['speedup']:.2f}", flush=True)
    payload = {"target_alone": {str(k): v for k, v in alone.items()}, "drafts_alone": draft_alone,
               "rows": rows, "timed_prompts": len(ps), "max_tokens": args.max_tokens,
               "threads": args.threads, "load_average": load_average(),
               "seconds": round(time.perf_counter() - t0, 1)}
    write(out, "timing", payload)
    return payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/spec/crosstok")
    ap.add_argument("--sections", default="cost,acceptance")
    ap.add_argument("--target", default="builtin:gemma3-270m")
    ap.add_argument("--smol", default=str(modelio.builtin_dir("smollm2-135m")),
                    help="SmolLM2-135M HF directory (its own tokenizer), for tli and hf-uag")
    ap.add_argument("--transplant", default="out/crosstok/transplant")
    ap.add_argument("--distilled", default="out/crosstok/distilled")
    ap.add_argument("--drafts", default=",".join(DRAFTS))
    add_config_options(ap, SpecBenchConfig, SPEC_PROMPT_OPTIONS)
    ap.add_argument("--timed-prompts", type=int, default=8)
    ap.add_argument("--timing-gamma", default="2")
    ap.add_argument("--timing-temperature", default="0")
    ap.add_argument("--threads", type=int, default=1)
    add_data_root(ap)
    args = ap.parse_args()
    # Every input is checked before anything is written (OUT, the model cache).
    resolve_options(args, SpecBenchConfig, SPEC_PROMPT_OPTIONS)
    SpecBenchConfig(target=args.target, draft=["d"], prompts="p", **{
        k: getattr(args, k) for k in SPEC_PROMPT_OPTIONS}).validate()
    sections = [x for x in args.sections.split(",") if x]
    if not sections or set(sections) - set(SECTIONS):
        raise UsageError(f"--sections {args.sections}: choose from {','.join(SECTIONS)}")
    names = [x for x in args.drafts.split(",") if x]
    if set(names) - set(DRAFTS):
        raise UsageError(f"--drafts: unknown {sorted(set(names) - set(DRAFTS))}; choose from "
                         f"{','.join(DRAFTS)}")
    for name in (n for n in names if n in MAKE):
        path = getattr(args, name)
        if not Path(path).is_dir():
            raise UsageError(f"--{name} {path} does not exist; make it with `"
                             f"{MAKE[name].format(path=path)}`, or leave {name} out of --drafts")
    global DATA
    DATA = require(args, [GSM8K_TEST])
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()
    result = {"load_average_start": load_average()}
    for section in sections:
        result[section] = {"acceptance": section_acceptance, "cost": section_cost,
                           "timing": section_timing}[section](args, out)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["load_average_end"] = load_average()
    print(json.dumps(result))


if __name__ == "__main__":
    run(main, "bench/spec_crosstok.py")
