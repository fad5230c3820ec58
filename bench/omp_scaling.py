"""OMP speed at the shape of transplant direction 2, on any device (CPU or CUDA).

Direction 2 (SmolLM2-135M given Gemma-3's tokenizer) approximates ~216k new tokens from
~46k anchors in Gemma's 640-dimensional space. The real embeddings are ~0.6 GB,
too large to ship to a lent GPU machine, so this script times the exact transplant code path
(``tokensurgeon.methods.omp``) on random matrices of that shape, and compares the fast and
exact solvers' reconstruction error on a subset. Speed does not depend on the values; the
quality figures for real embeddings come from bench/transplant.py.

OMP options not given keep the library's defaults (``OmpOptions``); ``--preset v1`` starts
from transplant v1's settings (k = 64, 256 candidates, exact search), which the recorded GPU
table (bench/results/omp_scaling_h200.txt) used.

Runnable example (CPU, a reduced shape, ~1 minute):
    python bench/omp_scaling.py --targets 4096 --anchors 8000
On a GPU, as recorded:
    python bench/omp_scaling.py --device cuda --preset v1
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch
from common import OMP_V1, run

from tokensurgeon import omp
from tokensurgeon.methods import METHODS, TransplantProblem
from tokensurgeon.methods.omp import OmpOptions


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=int, default=216_000)
    ap.add_argument("--anchors", type=int, default=46_145)
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--base-dim", type=int, default=576)
    ap.add_argument("--preset", choices=["default", "v1"], default="default",
                    help="OMP options to start from: the library's defaults or transplant v1's")
    ap.add_argument("--k", type=int, help="OMP: anchors per token (default: the preset's)")
    ap.add_argument("--candidates", type=int, help="OMP: candidates (default: the preset's)")
    ap.add_argument("--search", help="OMP: exact, faiss, auto, pca (default: the preset's)")
    ap.add_argument("--refreshes", default="0,10", help="comma list: one fast run for each")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--exact-subset", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    given = {k: getattr(args, k) for k in ("k", "candidates", "search") if getattr(args, k) is not None}
    preset = {k: v for k, v in OMP_V1.items() if k in ("k", "candidates", "search")} \
        if args.preset == "v1" else {}
    base = OmpOptions(**{**preset, **given})
    base.validate()
    gen = torch.Generator().manual_seed(args.seed)
    # Anisotropic random embeddings with a shared offset, like trained ones.
    scales = torch.logspace(0, -1, args.dim)
    offset = torch.randn(args.dim, generator=gen)
    donor_targets = torch.randn(args.targets, args.dim, generator=gen) * scales + offset
    donor_anchors = torch.randn(args.anchors, args.dim, generator=gen) * scales + offset
    base_anchors = torch.randn(args.anchors, args.base_dim, generator=gen)
    rows = []
    for refreshes in (int(r) for r in args.refreshes.split(",")):
        problem = TransplantProblem(
            donor_targets=donor_targets, donor_anchors=donor_anchors, base_anchors=base_anchors,
            base_matrix=base_anchors, target_bytes=[None] * args.targets, base_byte_index={},
            options=dataclasses.replace(base, refreshes=refreshes),
            batch_size=args.batch_size, device=args.device)
        sync(args.device)
        t = time.perf_counter()
        result = METHODS["omp"](problem)
        sync(args.device)
        seconds = time.perf_counter() - t
        rows.append({"solver": f"fast, {refreshes} refreshes", "seconds": round(seconds, 1),
                     "tokens_per_s": round(args.targets / seconds),
                     "mean_error": round(float(result.donor_error.mean()), 4)})
        print(rows[-1], flush=True)
    # Exact vs fast on a subset, same device.
    sub = donor_targets[: args.exact_subset].to(args.device)
    atoms = donor_anchors.to(args.device)
    sync(args.device)
    t = time.perf_counter()
    gram = omp.gram_matrix(atoms)
    e_err = []
    for s in range(0, sub.shape[0], 512):
        idx, coef = omp.omp_exact(sub[s:s + 512], atoms, base.k, gram=gram)
        e_err.append(omp.relative_error(sub[s:s + 512], omp.reconstruct(atoms, idx, coef)))
    sync(args.device)
    exact_s = time.perf_counter() - t
    exact_err = float(torch.cat(e_err).mean())
    f_err = []
    for s in range(0, sub.shape[0], args.batch_size):
        chunk = sub[s:s + args.batch_size]
        idx, coef = omp.omp_fast(chunk, atoms, base.k, base.candidates, gram=gram,
                                 refresh=omp.refresh_schedule(base.k, 10))
        f_err.append(omp.relative_error(chunk, omp.reconstruct(atoms, idx, coef)))
    fast_err = float(torch.cat(f_err).mean())
    exact = {"subset": args.exact_subset, "exact_seconds": round(exact_s, 1),
             "exact_tokens_per_s": round(args.exact_subset / exact_s),
             "exact_error": round(exact_err, 4), "fast10_error": round(fast_err, 4),
             "fast10_over_exact": round(fast_err / exact_err, 4)}
    print(exact, flush=True)
    print("\n| solver | seconds | tokens/s | mean relative error |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['solver']} | {r['seconds']} | {r['tokens_per_s']} | {r['mean_error']} |")
    print(f"| exact (subset of {args.exact_subset}) | {exact['exact_seconds']} | "
          f"{exact['exact_tokens_per_s']} | {exact['exact_error']} |")
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else platform.processor() or platform.machine())
    print(json.dumps({"shape": {"targets": args.targets, "anchors": args.anchors, "dim": args.dim,
                                "k": base.k, "candidates": base.candidates,
                                "search": base.search, "preset": args.preset},
                      "device": args.device, "device_name": device_name, "torch": torch.__version__,
                      "fast": rows, "exact_subset": exact, "seed": args.seed}))


if __name__ == "__main__":
    run(main, "bench/omp_scaling.py")
