"""Transplant at scale: peak memory and write throughput of the streaming path vs model shape.

Builds synthetic multi-shard Llama models with random bf16 weights, tied or untied, at
hidden sizes 1,024 and 2,048 and a given size in GB (the layer count follows), that carry
SmolLM2-135M's real tokenizer (49,152 tokens); gives each Gemma-3's tokenizer (262,144
tokens, builtin:gemma3-270m as DONOR) with ``--method mean`` so that the copy, not the math,
dominates; and runs every transplant as its own process. Per run: wall and CPU seconds,
peak RSS (the kernel's, from ``wait4``), and the peaks of its anonymous and file-backed
parts (``RssAnon`` / ``RssFile`` of ``/proc/PID/status``, sampled every 10 ms), against the
bound ``1.5 x (OUT's new embedding and lm_head + BASE's and DONOR's embedding matrices)``,
each in its stored dtype. The in-memory path (``--no-stream``) runs next to it where it fits
the per-process memory budget. Models are built under ``bench/runs/transplant_scale`` and
deleted after each run; raw per-run rows go to ``bench/results/transplant_scale.jsonl``.

Example (CPU, ~10 minutes on 2 shared cores)::

    python bench/transplant_scale.py --shapes tied-1024 untied-1024 tied-2048 untied-2048 --sizes 1

The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "runs" / "transplant_scale"
RESULTS = ROOT / "bench" / "results" / "transplant_scale.jsonl"
HEAD_DIM, KV_HEADS = 64, 4
INTERMEDIATE = {1024: 2816, 2048: 8192}  # Llama-like MLP widths per hidden size
SHARD_BYTES = 1 << 30  # BASE is stored in 1 GiB shards
BOUND_FACTOR = 1.5


def layer_shapes(h: int, i: int) -> dict[str, tuple[int, ...]]:
    kv = KV_HEADS * HEAD_DIM
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


def parse_shape(text: str) -> tuple[bool, int]:
    """"tied-1024" / "untied-2048" -> (tied, hidden)."""
    kind, _, hidden = text.partition("-")
    if kind not in ("tied", "untied") or not hidden.isdigit():
        raise SystemExit(f"--shapes {text!r}: write tied-HIDDEN or untied-HIDDEN, e.g. untied-2048")
    return kind == "tied", int(hidden)


def build_base(directory: Path, size_gb: float, tokenizer_dir: Path, seed: int,
               hidden: int = 1024, tied: bool = True) -> dict:
    """A Llama of about ``size_gb`` GB in bf16 (hidden ``hidden``, an lm_head of its own
    unless ``tied``), random weights, SmolLM2's tokenizer, in 1 GiB shards."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    inter = INTERMEDIATE.get(hidden, hidden * 11 // 4)
    per_layer = sum(numel(s) for s in layer_shapes(hidden, inter).values()) * 2
    matrices = (1 if tied else 2) * vocab * hidden * 2
    layers = max(1, round((size_gb * 1e9 - matrices) / per_layer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=hidden // HEAD_DIM,
                         num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         tie_word_embeddings=tied, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         dtype="bfloat16")
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        shapes.update({f"model.layers.{layer}.{k}": s
                       for k, s in layer_shapes(hidden, inter).items()})
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    size = 0
    weight_map, total = {}, 0
    files: list[list[str]] = [[]]
    for name, shape in shapes.items():
        nbytes = numel(shape) * 2
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
    return {"layers": layers, "bytes": total, "shards": len(files), "vocab": vocab,
            "hidden": hidden, "intermediate": inter, "tied": tied}


def matrix_bytes(directory: Path) -> int:
    """Stored bytes of a model directory's input embedding and lm_head (when it has one)."""
    total = 0
    for shard in directory.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.endswith(("embed_tokens.weight", "lm_head.weight")):
                    piece = f.get_slice(key)
                    total += numel(piece.get_shape()) * torch.finfo(
                        getattr(torch, {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[
                            piece.get_dtype()])).bits // 8
    return total


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _status_kb(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of a live process, in kB ({} once it has gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0])
    return out


def timed(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` as a child; wall and CPU seconds, its peak RSS (``wait4``'s ru_maxrss,
    exact) and the peaks of its anonymous and file-backed RSS (sampled every 10 ms, so a
    spike shorter than that can be missed; the exact total bounds them)."""
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env={**(env or os.environ), "OMP_NUM_THREADS": "1"})
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for key, value in _status_kb(proc.pid).items():
                    peaks[key] = max(peaks[key], value)
                done.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "peak_anon_mb": round(peaks["RssAnon"] / 1024),
            "peak_file_mb": round(peaks["RssFile"] / 1024),
            "peak_shmem_mb": round(peaks["RssShmem"] / 1024),
            "loadavg_before": load_before,
            "loadavg_after": Path("/proc/loadavg").read_text().split()[:3]}


def code_version(checkout: Path) -> str:
    """``name@commit`` of a checkout (``+dirty`` with uncommitted changes outside
    bench/results, which this bench appends to)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True,
                              text=True, check=False).stdout.strip()

    dirty = "+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!bench/results") else ""
    return f"{checkout.name}@{git('rev-parse', '--short', 'HEAD')}{dirty}"


def transplant_run(base: Path, donor: str, out: Path, stream: bool, method: str, log: Path,
                   checkout: Path = ROOT) -> dict:
    """One ``tokensurgeon transplant`` process, running the code of ``checkout``."""
    exe = str(Path(sys.executable).parent / "tokensurgeon")
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    cmd = [exe, "transplant", str(base), donor, str(out), "--method", method,
           "--holdout", "0", "--threads", "1", "--quiet", "--overwrite",
           "--stream" if stream else "--no-stream"]
    help_text = subprocess.run([exe, "transplant", "--help"], capture_output=True, text=True,
                               env=env, check=False).stdout
    if "--leak-check" in help_text:
        # The leak check reloads OUT whole to run it on text: not part of the copy measured here.
        cmd.append("--no-leak-check")
    row = timed(cmd, log, env)
    manifest = json.loads((out / "transplant.json").read_text())
    seconds = manifest["seconds"]
    written = dir_bytes(out)
    copy_s = row["wall_s"] - seconds["math"]
    row.update({"path": "streamed" if stream else "in-memory", "method": method,
                "code": code_version(checkout),
                "out_bytes": written, "out_matrix_bytes": matrix_bytes(out),
                "out_tied": manifest["tied_embeddings"], "seconds": seconds,
                "mb_per_s_besides_math": round(written / 1e6 / copy_s, 1),
                "write_s": round(seconds["total"] - seconds["math"] - seconds["load"], 2)})
    row["mb_per_s_write_step"] = round(written / 1e6 / max(row["write_s"], 1e-9), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+",
                        default=["tied-1024", "untied-1024", "tied-2048", "untied-2048"],
                        help="BASE shapes: tied-HIDDEN or untied-HIDDEN")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0],
                        help="BASE sizes in GB (bf16); the layer count follows")
    parser.add_argument("--method", default="mean", help="transplant method (mean: copy dominates)")
    parser.add_argument("--donor", default="builtin:gemma3-270m")
    parser.add_argument("--in-memory-max-gb", type=float, default=0.5,
                        help="also run --no-stream up to this BASE size (it loads fp32: "
                             "~2x BASE plus the embeddings; the shared machine allows ~5 GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkouts", type=Path, nargs="+", default=[ROOT],
                        help="repository checkouts whose code transplants each BASE, in turn "
                             "(e.g. an older commit's worktree for a before/after table; "
                             "default: this one)")
    parser.add_argument("--label", default="", help="free text stored with every row "
                        "(e.g. which version of the code ran)")
    args = parser.parse_args()
    shapes = [parse_shape(s) for s in args.shapes]
    sys.path.insert(0, str(ROOT))
    from tokensurgeon import modelio

    tokenizer_dir = modelio.resolve("builtin:smollm2-135m").directory
    donor_bytes = matrix_bytes(modelio.resolve(args.donor).directory)
    RUNS.mkdir(parents=True, exist_ok=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        for tied, hidden in shapes:
            name = f"{'tied' if tied else 'untied'}-{hidden}-{size:g}GB"
            in_memory = size <= args.in_memory_max_gb
            need = size * 1e9 * 2.3 + (2 * size * 1e9 if in_memory else 0)
            free = shutil.disk_usage(RUNS).free
            if free < need + 2e9:
                print(f"skip {name}: {free / 1e9:.1f} GB free, need {need / 1e9:.1f}", flush=True)
                continue
            base = RUNS / f"base-{name}"
            shutil.rmtree(base, ignore_errors=True)
            t0 = time.perf_counter()
            info = build_base(base, size, tokenizer_dir, args.seed, hidden, tied)
            info["build_s"] = round(time.perf_counter() - t0, 1)
            base_bytes = matrix_bytes(base)
            try:
                runs = [(c, True) for c in args.checkouts] + (
                    [(c, False) for c in args.checkouts] if in_memory else [])
                for checkout, stream in runs:
                    out = RUNS / f"out-{name}-{'stream' if stream else 'memory'}"
                    row = transplant_run(base, args.donor, out, stream, args.method,
                                         RUNS / f"log-{name}-{stream}-{checkout.name}.txt",
                                         checkout.resolve())
                    bound = BOUND_FACTOR * (row["out_matrix_bytes"] + base_bytes + donor_bytes)
                    row.update({"shape": "tied" if tied else "untied", "hidden": hidden,
                                "size_gb": size, "base_bytes": info["bytes"],
                                "layers": info["layers"], "intermediate": info["intermediate"],
                                "base_shards": info["shards"], "build_s": info["build_s"],
                                "base_matrix_bytes": base_bytes, "donor": args.donor,
                                "donor_matrix_bytes": donor_bytes,
                                "bound_mb": round(bound / 2**20),
                                "within_bound": row["peak_rss_mb"] * 2**20 <= bound,
                                "seed": args.seed, "label": args.label})
                    rows.append(row)
                    with RESULTS.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{name} {row['path']:>9} {row['code']}: wall {row['wall_s']:7.1f} s, CPU "
                          f"{row['cpu_s']:7.1f} s, peak RSS {row['peak_rss_mb']:6d} MB (anon "
                          f"{row['peak_anon_mb']}, file {row['peak_file_mb']}), bound "
                          f"{row['bound_mb']} MB, load {row['loadavg_before']}", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
            finally:
                shutil.rmtree(base, ignore_errors=True)
    print("\n| shape | hidden | BASE GB | layers | path | code | bound MiB | peak RSS MiB | peak anon MiB "
          "| peak file MiB | within | wall s | CPU s | load s | math s | write s | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sec = r["seconds"]
        print(f"| {r['shape']} | {r['hidden']} | {r['base_bytes'] / 1e9:.2f} | {r['layers']} | "
              f"{r['path']} | {r['code']} | {r['bound_mb']:,} | {r['peak_rss_mb']:,} | {r['peak_anon_mb']:,} | "
              f"{r['peak_file_mb']:,} | {'yes' if r['within_bound'] else 'NO'} | {r['wall_s']} | "
              f"{r['cpu_s']} | {sec['load']} | {sec['math']} | {r['write_s']} | "
              f"{' '.join(r['loadavg_before'])} |")
    print(json.dumps({"rows": rows, "method": args.method, "bound_factor": BOUND_FACTOR,
                      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                  "torch": torch.__version__, "shared": True}}))


if __name__ == "__main__":
    main()
