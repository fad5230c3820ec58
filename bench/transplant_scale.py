"""Transplant at scale: peak memory and write throughput of the streaming path vs model size.

Builds synthetic multi-shard Llama models with random bf16 weights (~0.5, 2 and 8 GB) that
carry SmolLM2-135M's real tokenizer (49,152 tokens), gives each Gemma-3's tokenizer
(262,144 tokens, builtin:gemma3-270m as DONOR) with ``--method mean`` so that the copy, not
the math, dominates, and times every run as a whole process with ``/usr/bin/time -v``
(peak RSS, wall, CPU seconds). The in-memory path (``--no-stream``) runs next to it where
it fits the per-process memory budget. Models are built under ``bench/runs/transplant_scale``
and deleted after each size; raw per-run rows go to ``bench/results/transplant_scale.jsonl``.

Example (CPU, ~1 minute)::

    python bench/transplant_scale.py --sizes 0.5

The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "runs" / "transplant_scale"
RESULTS = ROOT / "bench" / "results" / "transplant_scale.jsonl"
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 1024, 2816, 16, 4
SHARD_BYTES = 1 << 30  # BASE is stored in 1 GiB shards


def layer_shapes(h: int = HIDDEN, i: int = INTERMEDIATE) -> dict[str, tuple[int, ...]]:
    kv = h // HEADS * KV_HEADS
    return {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
            "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i), "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,)}


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_base(directory: Path, size_gb: float, tokenizer_dir: Path, seed: int) -> dict:
    """A tied Llama of about ``size_gb`` GB in bf16, random weights, SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    per_layer = sum(numel(s) for s in layer_shapes().values()) * 2
    layers = max(1, round((size_gb * 1e9 - vocab * HIDDEN * 2) / per_layer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, dtype="bfloat16")
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for layer in range(layers):
        shapes.update({f"model.layers.{layer}.{k}": s for k, s in layer_shapes().items()})
    shapes["model.norm.weight"] = (HIDDEN,)
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    size = 0
    weight_map, total = {}, 0
    files: list[list[str]] = [[]]
    for name in shapes:
        nbytes = numel(shapes[name]) * 2
        if size and size + nbytes > SHARD_BYTES:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
        total += nbytes
    for i, group in enumerate(files):
        filename = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        state = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16)
                 for n in group}
        save_file(state, str(directory / filename), metadata={"format": "pt"})
        del state
        weight_map.update({n: filename for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(directory)
    tok.save_pretrained(directory)
    return {"layers": layers, "bytes": total, "shards": len(files), "vocab": vocab}


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; peak RSS, wall and CPU seconds."""
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with log.open("w") as f:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = log.read_text()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")

    def grab(pattern: str) -> str:
        return re.search(pattern, text).group(1)

    wall = grab(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)")
    parts = [float(p) for p in wall.split(":")]
    wall_s = parts[-1] + 60 * parts[-2] + (3600 * parts[-3] if len(parts) > 2 else 0)
    return {"wall_s": round(wall_s, 2),
            "cpu_s": round(float(grab(r"User time \(seconds\): (\S+)"))
                           + float(grab(r"System time \(seconds\): (\S+)")), 2),
            "peak_rss_mb": round(int(grab(r"Maximum resident set size \(kbytes\): (\d+)")) / 1024),
            "loadavg_before": load_before,
            "loadavg_after": Path("/proc/loadavg").read_text().split()[:3]}


def transplant_run(base: Path, out: Path, stream: bool, method: str, log: Path) -> dict:
    exe = str(Path(sys.executable).parent / "tokensurgeon")
    cmd = [exe, "transplant", str(base), "builtin:gemma3-270m", str(out), "--method", method,
           "--holdout", "0", "--threads", "1", "--quiet", "--overwrite",
           "--stream" if stream else "--no-stream"]
    help_text = subprocess.run([exe, "transplant", "--help"], capture_output=True, text=True).stdout
    if "--leak-check" in help_text:
        # The leak check reloads OUT whole to run it on text: not part of the copy measured here.
        cmd.append("--no-leak-check")
    row = timed(cmd, log)
    manifest = json.loads((out / "transplant.json").read_text())
    seconds = manifest["seconds"]
    written = dir_bytes(out)
    copy_s = row["wall_s"] - seconds["math"]
    row.update({"path": "streamed" if stream else "in-memory", "method": method,
                "out_bytes": written, "seconds": seconds,
                "mb_per_s_besides_math": round(written / 1e6 / copy_s, 1),
                "write_s": round(seconds["total"] - seconds["math"] - seconds["load"], 2)})
    row["mb_per_s_write_step"] = round(written / 1e6 / max(row["write_s"], 1e-9), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 2, 8],
                        help="BASE sizes in GB (bf16)")
    parser.add_argument("--method", default="mean", help="transplant method (mean: copy dominates)")
    parser.add_argument("--in-memory-max-gb", type=float, default=0.5,
                        help="also run --no-stream up to this BASE size (it loads fp32: "
                             "~2x BASE plus the embeddings; the shared machine allows ~5 GB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tokensurgeon import modelio

    tokenizer_dir = modelio.resolve("builtin:smollm2-135m").directory
    modelio.resolve("builtin:gemma3-270m")
    RUNS.mkdir(parents=True, exist_ok=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        need = size * 1e9 * 2.3 + (2 * size * 1e9 if size <= args.in_memory_max_gb else 0)
        free = shutil.disk_usage(RUNS).free
        if free < need + 2e9:
            print(f"skip {size} GB: {free / 1e9:.1f} GB free, need {need / 1e9:.1f}", flush=True)
            continue
        base = RUNS / f"base-{size:g}GB"
        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        info = build_base(base, size, tokenizer_dir, args.seed)
        info["build_s"] = round(time.perf_counter() - t0, 1)
        try:
            paths = [True] + ([False] if size <= args.in_memory_max_gb else [])
            for stream in paths:
                out = RUNS / f"out-{size:g}GB-{'stream' if stream else 'memory'}"
                row = transplant_run(base, out, stream, args.method,
                                     RUNS / f"log-{size:g}GB-{stream}.txt")
                row.update({"size_gb": size, "base_bytes": info["bytes"], "layers": info["layers"],
                            "base_shards": info["shards"], "seed": args.seed})
                rows.append(row)
                with RESULTS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{size:>5g} GB {row['path']:>9}: wall {row['wall_s']:7.1f} s, CPU "
                      f"{row['cpu_s']:7.1f} s, peak RSS {row['peak_rss_mb']:6d} MB, math "
                      f"{row['seconds']['math']:5.1f} s, {row['mb_per_s_besides_math']:6.1f} MB/s "
                      f"written besides math, load {row['loadavg_before']}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    print("\n| BASE GB | OUT GB | path | wall s | CPU s | peak RSS MB | load s | math s | write s "
          "| MB/s written besides math | MB/s in the write step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sec = r["seconds"]
        print(f"| {r['base_bytes'] / 1e9:.2f} | {r['out_bytes'] / 1e9:.2f} | {r['path']} | "
              f"{r['wall_s']} | {r['cpu_s']} | {r['peak_rss_mb']:,} | {sec['load']} | "
              f"{sec['math']} | {r['write_s']} | {r['mb_per_s_besides_math']} | "
              f"{r['mb_per_s_write_step']} |")
    print(json.dumps({"rows": rows, "method": args.method, "hidden": HIDDEN,
                      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                  "torch": torch.__version__, "shared": True}}))


if __name__ == "__main__":
    main()
