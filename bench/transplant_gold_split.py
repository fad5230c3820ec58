"""Where a transplanted model's extra bits go: BPB split by whether the gold token is new.

For each transplanted model, on the held-out texts of ``bench/transplant.py`` (same
segments, BOS prepended by hand): bits per byte at positions whose gold token BASE already
had (shared) and at positions whose gold token is new, and the leak mass. The new-gold share
bounds what any choice of new rows could win on the output side: a perfect prediction of
every new-gold token still leaves the shared-gold bits.

    python bench/transplant_gold_split.py --models base=builtin:gemma3-270m \\
        omp=bench/runs/transplant3/d1-omp --eval-bytes 12000

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import ROOT, add_data_root, portable, require, require_paths, run
from safetensors import safe_open
from transplant import TEXT_FILES, eval_segments

from tokensurgeon import diagnostics, modelio
from tokensurgeon.errors import UsageError


def split(path: str, segments: dict[str, list[str]]) -> dict:
    ref = modelio.resolve(path)
    model, tok = modelio.load_model(ref), modelio.load_tokenizer(ref)
    vocab = model.get_output_embeddings().weight.shape[0]
    is_new = torch.zeros(vocab, dtype=torch.bool)
    per_token = ref.directory / "transplant" / "anchors.safetensors"
    if per_token.is_file():  # a transplant: its new and orphan ids
        with safe_open(str(per_token), "pt") as f:
            is_new[f.get_tensor("new_donor_ids")] = True
            is_new[f.get_tensor("orphan_donor_ids")] = True
    out = {}
    for name, segs in segments.items():
        tot: dict = {}
        for seg in segs:
            row = diagnostics.leak_on_text(model, tok, is_new, seg)
            n_bytes = row["text_bytes"]
            for key in ("bpb", "bpb_shared_gold", "bpb_new_gold"):
                tot[key] = tot.get(key, 0.0) + row[key] * n_bytes
            tot["leak_sum"] = tot.get("leak_sum", 0.0) + row["leak_mass"] * row["tokens_shared_gold"]
            for key in ("tokens_shared_gold", "tokens_new_gold", "text_bytes"):
                tot[key] = tot.get(key, 0) + row[key]
        n = tot["text_bytes"]
        out[name] = {"bpb": round(tot["bpb"] / n, 4),
                     "bpb_shared_gold": round(tot["bpb_shared_gold"] / n, 4),
                     "bpb_new_gold": round(tot["bpb_new_gold"] / n, 4),
                     "leak_mass": round(tot["leak_sum"] / max(1, tot["tokens_shared_gold"]), 5),
                     "tokens_shared_gold": tot["tokens_shared_gold"],
                     "tokens_new_gold": tot["tokens_new_gold"], "bytes": n}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", required=True, help="NAME=PATH pairs")
    ap.add_argument("--eval-bytes", type=int, default=12_000)
    ap.add_argument("--texts", default="gsm8k_test,prose_heldout")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "transplant_gold_split.json"))
    add_data_root(ap)
    args = ap.parse_args()
    texts = [t for t in args.texts.split(",") if t]
    if not texts or set(texts) - set(TEXT_FILES):
        raise UsageError(f"--texts {args.texts}: choose from {','.join(TEXT_FILES)}")
    if any("=" not in item for item in args.models):
        raise UsageError("--models takes NAME=PATH pairs, e.g. omp=bench/runs/transplant3/d1-omp")
    require_paths((f"--models {item.split('=', 1)[0]}", item.split("=", 1)[1])
                  for item in args.models if not item.split("=", 1)[1].startswith("builtin:"))
    data = require(args, [TEXT_FILES[t] for t in texts])
    segments = eval_segments(data, texts, args.eval_bytes)
    results = {"eval_bytes": args.eval_bytes, "bos": "always (prepended by hand)", "models": {}}
    for item in args.models:
        name, path = item.split("=", 1)
        results["models"][name] = {"path": path, **split(path, segments)}
        print(name, json.dumps(results["models"][name]), flush=True)
    Path(args.out).write_text(json.dumps(portable(results), indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    run(main, "bench/transplant_gold_split.py")
