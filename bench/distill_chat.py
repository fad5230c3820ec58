"""Benchmark chat distillation: each side's own template with assistant-only losses, against
the same conversations flattened to ``role: content`` text, at the same budget.

Gemma-3-270M (teacher; its GGUF carries no chat template, so Gemma 3's turn layout is given
as a file) -> SmolLM2-135M (student, its own ChatML template), default loss (``alm+sft`` in
nats). Training data: GSM8K train rows as conversations (user: question, assistant:
answer). Score: held-out GSM8K test rows rendered with the student's template, bits per
byte of the assistant text only (``eval_bpb_trained_text``), for both arms. Same steps,
batch and sequence length per arm; whole conversations per sequence (``--pack texts``).
Teacher statistics are cached per arm and reused by every seed.

    python bench/distill_chat.py --steps 10 --seeds 0,1,2
    python bench/distill_chat.py --tiny   # the same pipeline on tiny random models (seconds)

Per-run figures go to ``bench/results/distill/chat_runs.jsonl``; the last stdout line is one
JSON object with every figure, the hardware, load averages and the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import GSM8K_TEST, GSM8K_TRAIN, add_data_root, mean_se, require, run

from distill.trainer import DistillConfig, distill

RESULTS = ROOT / "bench" / "results" / "distill"
ARMS = ("template", "flat")
# Gemma 3's turn layout: <bos>, turns opened by <start_of_turn>ROLE and closed by
# <end_of_turn>, the assistant called "model", a system prompt folded into the first turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_prefix = messages[0]['content'] | trim + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first_prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{% if loop.first %}{{ first_prefix }}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gsm8k_chat(source: Path, target: Path, first: int, count: int) -> Path:
    """Rows ``first .. first+count`` of a GSM8K JSONL file as ``messages`` rows."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    with target.open("w") as f:
        for row in rows[first:first + count]:
            f.write(json.dumps({"messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row["answer"]}]}) + "\n")
    return target


def tiny_models(work: Path) -> tuple[str, str]:
    """Tiny teacher (Gemma's turn tokens, no template: the file gives it, as for the real
    Gemma GGUF) and ChatML student directories: a quick check of the pipeline."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    t_tok, s_tok = tiny.sentencepiece_tokenizer(), tiny.chatml_tokenizer()
    t_tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    teacher = tiny.save(tiny.tiny_gemma(len(t_tok), seed=2), t_tok, work / "teacher")
    student = tiny.save(tiny.tiny_llama(len(s_tok), seed=1), s_tok, work / "student")
    return str(teacher), str(student)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="tiny random models (a smoke run)")
    parser.add_argument("--work", default=None, help="work directory (default: a temp dir)")
    add_data_root(parser)
    args = parser.parse_args()
    data = require(args, [GSM8K_TRAIN, GSM8K_TEST])  # before anything is written
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="distill-chat-"))
    work.mkdir(parents=True, exist_ok=True)
    template_file = work / "gemma3_chat.jinja"
    template_file.write_text(GEMMA3_TEMPLATE)
    if args.tiny:
        teacher, student = tiny_models(work)
    else:
        teacher, student = "builtin:gemma3-270m", "builtin:smollm2-135m"
    train = gsm8k_chat(data / GSM8K_TRAIN, work / "train_chat.jsonl", 0,
                       args.train_rows)
    heldout = gsm8k_chat(data / GSM8K_TEST, work / "test_chat.jsonl", 0,
                         args.eval_rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in seeds:
        for arm in ARMS:
            began, cpu0 = time.time(), time.process_time()
            cfg = DistillConfig(
                teacher=teacher, student=student, data=[str(train)],
                out=str(work / f"{arm}-seed{seed}"), chat=arm,
                teacher_chat_template=str(template_file), eval_data=[str(heldout)],
                eval_chat="template", steps=args.steps, batch_size=args.batch_size,
                max_length=args.max_length, lr=args.lr, seed=seed, pack="texts",
                teacher_cache=str(work / f"cache-{arm}"), teacher_cache_shard=1,
                overwrite=True, quiet=True,
                device="cpu")
            summary = distill(cfg)
            last = summary["last"]
            run = {"arm": arm, "seed": seed, "heldout_assistant_bpb": last["eval_bpb_trained_text"],
                   "units_sft": last.get("units_sft"), "wall_s": round(time.time() - began, 1),
                   "cpu_s": round(time.process_time() - cpu0, 1)}
            print(json.dumps(run), flush=True)
            runs.append(run)
            if not args.tiny:
                with (RESULTS / "chat_runs.jsonl").open("a") as f:
                    f.write(json.dumps({**run, "steps": args.steps, "lr": args.lr}) + "\n")
    table = {}
    for arm in ARMS:
        table[arm] = mean_se([r["heldout_assistant_bpb"] for r in runs if r["arm"] == arm])
    paired = [a["heldout_assistant_bpb"] - b["heldout_assistant_bpb"]
              for a in runs if a["arm"] == "template"
              for b in runs if b["arm"] == "flat" and b["seed"] == a["seed"]]
    diff = mean_se(paired)
    print(f"{'arm':<10}{'held-out assistant BPB':>26}")
    for arm, (m, se) in table.items():
        print(f"{arm:<10}{m:>18.4f} ± {se:.4f}")
    print(f"{'template - flat (paired)':<26}{diff[0]:+.4f} ± {diff[1]:.4f} "
          f"({', '.join(f'{d:+.4f}' for d in paired)})")
    print(json.dumps({
        "bench": "distill_chat", "teacher": teacher, "student": student, "seeds": seeds,
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
        "lr": args.lr, "train_rows": args.train_rows, "eval_rows": args.eval_rows,
        "table": {a: {"mean": m, "se": se} for a, (m, se) in table.items()},
        "template_minus_flat": {"mean": diff[0], "se": diff[1], "per_seed": paired},
        "runs": runs, "hardware": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "load_avg": list(os.getloadavg())}))


if __name__ == "__main__":
    run(main, "bench/distill_chat.py")
