"""``tokensurgeon spec make-data``: the target's own continuations of a prompt file, as
fixed training data for ``spec train``.

DistillSpec's finding, and the standard recipe for greedy serving: a draft trained on what
the target actually says (its greedy continuations) is accepted more often than one trained
on reference answers the target would not have written. Generating them inside the training
loop (``spec train --target-generated``) costs one HF generation per row per step; here
they are generated once, in batches (vLLM when it is installed, else HF), and written as
``{"prompt", "completion"}`` rows that ``spec train --data`` reads as fixed data.

Boundary: prompts in, OUT/data.jsonl + OUT/config.yaml + OUT/summary.json out, written
atomically. Prompts are encoded exactly as ``spec train`` and ``spec bench`` encode them
(:func:`spec_decode.prompts.encode_prompt`, chat template by default).
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spec_decode.prompts import MAX_NEW_TOKENS, chat_option, encode_prompt, read_examples
from tokensurgeon import modelio, progress
from tokensurgeon.config import write_resolved_config
from tokensurgeon.errors import UsageError

DATA_FILE = "data.jsonl"
BACKENDS = ("auto", "vllm", "hf")


@dataclass
class MakeDataConfig:
    """Write TARGET's own continuations of --prompts as fixed training data for ``spec
    train --data OUT/data.jsonl`` (a draft trained on what the target says is accepted more
    often than one trained on reference answers)."""

    target: str = field(metadata={
        "positional": True, "help": "target model: HF directory, .gguf file or builtin:NAME"})
    prompts: str = field(default="", metadata={
        "help": ".jsonl (question/prompt/text field) or .txt (one prompt per line)"})
    out: str = field(default="out/target-data", metadata={
        "help": "output directory: data.jsonl ({prompt, completion} rows), config.yaml, summary.json"})
    max_new_tokens: int = field(default=MAX_NEW_TOKENS, metadata={
        "help": "most tokens per continuation (it stops earlier at the target's stop tokens)"})
    num_examples: int = field(default=0, metadata={"help": "use the first N prompts (0 = all)"})
    temperature: float = field(default=0.0, metadata={
        "help": "0: greedy (what greedy serving verifies against); > 0: sampled, seeded by --seed"})
    seed: int = field(default=0, metadata={"help": "sampling seed (T > 0)"})
    backend: str = field(default="auto", metadata={
        "choices": BACKENDS, "help": "auto: vllm when installed (batched, fast), else hf"})
    batch_size: int = field(default=64, metadata={
        "help": "prompts generated together (vLLM's max_num_seqs; hf: one batch of this many)"})
    chat: bool = chat_option()
    device: str = field(default="auto", metadata={"help": "hf backend: auto, cpu, cuda, cuda:N"})
    overwrite: bool = field(default=False, metadata={"help": "replace OUT if it exists"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow custom model code (off: safer)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def validate(self) -> None:
        if not self.prompts:
            raise UsageError("no --prompts given; pass a .jsonl of questions (GSM8K train "
                             "works) or a .txt with one prompt per line")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if self.num_examples < 0:
            raise UsageError("--num-examples must be >= 0 (0 = every prompt)")
        if self.temperature < 0:
            raise UsageError(f"--temperature {self.temperature}: give 0 (greedy) or more")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            from spec_decode.backends.vllm_engine import VLLM_MISSING

            raise UsageError(VLLM_MISSING)


def chosen_backend(name: str) -> str:
    """``auto`` -> ``vllm`` when it is importable, else ``hf``."""
    if name != "auto":
        return name
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def cut_at_stop(ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """The ids before the first stop id, and whether a stop id ended them."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i], True
    return ids, False


def stop_ids(tokenizer, generation_config) -> set[int]:
    """The target's stop ids: its generation config's EOS (one or a list), else the
    tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}


def generate_hf(model, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                seed: int, stops: set[int], batch_size: int,
                bar: Any = None) -> tuple[list[list[int]], list[bool]]:
    """Continuations of each prompt (token ids before the first stop id) and whether a stop
    id ended each, from spec train's left-padded HF ``generate``, ``batch_size`` prompts at
    a time. Greedy at T = 0."""
    from spec_decode.train import generate

    eos = min(stops) if stops else None
    out: list[tuple[list[int], bool]] = []
    torch.manual_seed(seed)
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        out += [cut_at_stop(c, stops)
                for c in generate(model, chunk, max_new_tokens, temperature, eos or 0, eos)]
        if bar is not None:
            bar.update(len(chunk))
    return [c for c, _ in out], [s for _, s in out]


def generate_vllm(cfg: MakeDataConfig, model_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    """Continuations from one vLLM engine (a worker subprocess: vLLM spawns)."""
    from spec_decode.backends.vllm_engine import engine_defaults, run_worker

    job = {"kind": "generate", "label": "make-data", "model": model_dir, "prompts": prompts,
           "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed,
           "batch_size": cfg.batch_size, **engine_defaults(),
           "max_model_len": max(len(p) for p in prompts) + cfg.max_new_tokens}
    return run_worker(job, cfg.quiet)["token_ids"]


def make_data(cfg: MakeDataConfig) -> dict:
    """Generate and write OUT/data.jsonl; return the summary."""
    cfg.validate()
    examples = read_examples(cfg.prompts, cfg.num_examples)  # bad prompts fail before loading
    modelio.check_output_dir(cfg.out, cfg.overwrite)
    progress.get().start("load")
    ref = modelio.resolve(cfg.target)
    tokenizer = modelio.load_tokenizer(ref, cfg.trust_remote_code)
    stops = stop_ids(tokenizer, modelio.load_generation_config(ref))
    prompts = [encode_prompt(tokenizer, e.prompt, cfg.chat) for e in examples]
    backend = chosen_backend(cfg.backend)
    t0 = time.time()
    if backend == "vllm":
        progress.get().start("generate (vllm)")
        cut = [cut_at_stop(c, stops) for c in generate_vllm(cfg, str(ref.directory), prompts)]
        conts, stopped = [c for c, _ in cut], [s for _, s in cut]
    else:
        model = modelio.load_model(ref, device=modelio.resolve_device(cfg.device),
                                   trust_remote_code=cfg.trust_remote_code)
        bar = progress.get().start("generate (hf)", total=len(prompts), unit="prompt")
        conts, stopped = generate_hf(model, prompts, cfg.max_new_tokens, cfg.temperature,
                                     cfg.seed, stops, cfg.batch_size, bar)
    seconds = time.time() - t0
    # "stopped": false marks a continuation cut at --max-new-tokens: spec train then puts no
    # EOS after it (the target did not stop there)
    rows = [{"prompt": e.prompt, "completion": tokenizer.decode(c, skip_special_tokens=True),
             "stopped": s} for e, c, s in zip(examples, conts, stopped)]
    ended = sum(stopped)
    summary = {"target": str(cfg.target), "backend": backend, "rows": len(rows),
               "tokens": sum(map(len, conts)), "stopped_before_limit": ended,
               "seconds": round(seconds, 1),
               "tokens_per_s": round(sum(map(len, conts)) / max(seconds, 1e-9), 1)}
    with modelio.atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        with open(tmp / DATA_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_resolved_config(tmp, cfg)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {**summary, "out": str(Path(cfg.out) / DATA_FILE)}


def render(summary: dict) -> str:
    return (f"wrote {summary['rows']} rows ({summary['tokens']} target tokens, "
            f"{summary['stopped_before_limit']} ended at a stop token) to {summary['out']} "
            f"in {summary['seconds']} s with {summary['backend']}\n"
            f"train a draft on it: tokensurgeon spec train TARGET DRAFT --data {summary['out']}")
