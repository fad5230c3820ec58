"""Why does OMP lose to `mean` in direction 2? Input x output rows, leak mass, BPB by gold kind.

Direction 2: SmolLM2-135M (tied embeddings) given Gemma-3's 262k tokenizer (216k new
tokens). Everything happens in memory: BASE's transformer body runs on an input matrix
built from one row set, and the log-probabilities come from a *separate* output matrix
built from another, so the 2x2 grid {mean, OMP} x {mean, OMP} needs no saved models.

Cost control: rows are only computed for the new tokens that occur in the texts, plus a
fixed random sample of the other new tokens. The partition function's new-token part is
``sum_{in text} e^l + (n_other / n_sample) * sum_{sample} e^l`` (an unbiased estimate of the
sum over all new tokens; exact for `mean`, where all new rows are equal).

Metrics per text: bits per byte (BOS prepended by hand, as `tokensurgeon eval` did before
it followed the tokenizer); its split into bits on positions whose gold token is shared vs
new (the two add up to the total); the leak mass, mean probability that all new tokens
together take at positions whose gold token is shared.

Runnable example (CPU, ~10-20 min on 2 shared cores):
    python bench/transplant_diagnose.py --grid --texts eval
The last stdout line is one JSON object; results go to bench/results/transplant_diagnose*.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from common import (
    GSM8K_TEST,
    GSM8K_TRAIN,
    OMP_V1,
    PROSE,
    ROOT,
    add_data_root,
    portable,
    require,
    run,
)

from tokensurgeon import modelio, omp
from tokensurgeon.evaluate import segment_text
from tokensurgeon.token_identity import vocabulary
from tokensurgeon.transplant import plan_vocabulary

BASE, DONOR = "builtin:smollm2-135m", "builtin:gemma3-270m"


def texts(data: Path, kind: str, n_bytes: int) -> dict[str, list[str]]:
    """Held-out evaluation texts (``eval``) or training texts for tuning (``train``)."""
    prose = (data / PROSE).read_text(encoding="utf-8")
    cut = int(len(prose) * 0.8)
    if kind == "eval":
        gsm = [json.loads(x)["answer"] for x in (data / GSM8K_TEST).read_text().splitlines()]
        prose_part = prose[cut:]
        prose_part = prose_part[prose_part.index("\n") + 1:]
    else:
        gsm = [json.loads(x)["answer"] for x in (data / GSM8K_TRAIN).read_text().splitlines()]
        prose_part = prose[:cut]
    return {"gsm8k": segment_text(gsm, 2000, n_bytes),
            "prose": segment_text([prose_part], 2000, n_bytes)}


class Setup:
    """BASE model, DONOR tokenizer and embeddings, the vocabulary plan, encoded texts."""

    def __init__(self, data: Path, text_kind: str, n_bytes: int, n_sample: int, seed: int = 0):
        b_ref, d_ref = modelio.resolve(BASE), modelio.resolve(DONOR)
        self.tok = modelio.load_tokenizer(d_ref)
        self.model = modelio.load_model(b_ref)
        self.model.eval()
        d_emb, _, _ = modelio.load_embeddings(d_ref)
        self.donor = d_emb.float()
        self.base = self.model.get_input_embeddings().weight.detach().float().clone()
        self.plan = plan_vocabulary(vocabulary(modelio.load_tokenizer(b_ref)), vocabulary(self.tok),
                                    self.base.shape[0], self.donor.shape[0], self.donor.shape[0])
        prefix = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        self.texts = texts(data, text_kind, n_bytes)
        self.encoded = {name: [[prefix] + self.tok(s, add_special_tokens=False)["input_ids"]
                               for s in segs] for name, segs in self.texts.items()}
        self.bytes = {name: sum(len(s.encode()) for s in segs) for name, segs in self.texts.items()}
        new_set = set(self.plan.new_ids.tolist())
        in_text = sorted({t for segs in self.encoded.values() for s in segs for t in s} & new_set)
        gen = torch.Generator().manual_seed(seed)
        rest = torch.tensor(sorted(new_set - set(in_text)), dtype=torch.long)
        self.sample = rest[torch.randperm(rest.numel(), generator=gen)[:n_sample]]
        self.in_text = torch.tensor(in_text, dtype=torch.long)
        self.sample_weight = rest.numel() / max(1, self.sample.numel())
        self.needed = torch.cat([self.in_text, self.sample])  # donor ids with computed rows
        self.shared_ids = self.plan.copy_donor
        self.is_new = torch.zeros(self.donor.shape[0], dtype=torch.bool)
        self.is_new[self.plan.new_ids] = True

    # Row sets for the needed new ids: [len(needed), H]
    def anchors(self):
        return self.donor[self.plan.anchor_donor], self.base[self.plan.anchor_base]

    def input_matrix(self, rows: torch.Tensor) -> torch.Tensor:
        mat = self.base[self.plan.anchor_base].mean(0).expand(self.donor.shape[0], -1).clone()
        mat[self.plan.copy_donor] = self.base[self.plan.copy_base]
        mat[self.needed] = rows
        return mat

    def hidden(self, in_rows: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        emb = self.input_matrix(in_rows)
        out = {}
        with torch.inference_mode():
            for name, segs in self.encoded.items():
                out[name] = [self.model.model(inputs_embeds=emb[torch.tensor(s)].unsqueeze(0))
                             .last_hidden_state[0] for s in segs]
        return out

    def score(self, hidden: dict, out_rows: torch.Tensor) -> dict:
        """BPB, its split by gold kind, and leak mass, per text."""
        shared_w = self.base[self.plan.copy_base]  # [S, H]
        n_text = self.in_text.numel()
        new_w = out_rows  # [len(needed), H]
        log_w = torch.zeros(new_w.shape[0])
        log_w[n_text:] = math.log(self.sample_weight)
        col_of = torch.full((self.donor.shape[0],), -1, dtype=torch.long)
        col_of[self.plan.copy_donor] = torch.arange(shared_w.shape[0])
        col_of[self.needed] = shared_w.shape[0] + torch.arange(new_w.shape[0])
        W = torch.cat([shared_w, new_w])
        result = {}
        with torch.inference_mode():
            for name, hs in hidden.items():
                nll_shared = nll_new = 0.0
                leak, n_shared, n_new = 0.0, 0, 0
                for h, ids in zip(hs, self.encoded[name]):
                    gold = torch.tensor(ids[1:])
                    logits = h[:-1] @ W.T  # [T, S + n]
                    lz_shared = torch.logsumexp(logits[:, : shared_w.shape[0]], 1)
                    lz_new = torch.logsumexp(logits[:, shared_w.shape[0]:] + log_w, 1)
                    lz = torch.logaddexp(lz_shared, lz_new)
                    lp = logits.gather(1, col_of[gold].unsqueeze(1)).squeeze(1) - lz
                    new_gold = self.is_new[gold]
                    nll_new -= float(lp[new_gold].double().sum())
                    nll_shared -= float(lp[~new_gold].double().sum())
                    leak += float((lz_new - lz)[~new_gold].exp().double().sum())
                    n_shared += int((~new_gold).sum())
                    n_new += int(new_gold.sum())
                nb = self.bytes[name] * math.log(2)
                result[name] = {"bpb": round((nll_shared + nll_new) / nb, 4),
                                "bpb_shared_gold": round(nll_shared / nb, 4),
                                "bpb_new_gold": round(nll_new / nb, 4),
                                "leak_mass": round(leak / max(1, n_shared), 4),
                                "tokens_shared_gold": n_shared, "tokens_new_gold": n_new}
        return result


def rows_mean(s: Setup) -> torch.Tensor:
    mu = s.base[s.plan.anchor_base].mean(0)
    return mu.expand(s.needed.numel(), -1).clone()


def rows_omp_old(s: Setup, refreshes: int) -> torch.Tensor:
    """The v1 method: uncentred least-squares OMP over raw DONOR anchors (OMP_V1's k and
    candidates)."""
    k, candidates = OMP_V1["k"], OMP_V1["candidates"]
    A, B = s.anchors()
    T = s.donor[s.needed]
    out = []
    sched = omp.refresh_schedule(k, refreshes)
    for i in range(0, T.shape[0], 512):
        idx, coef = omp.omp_fast(T[i:i + 512], A, k, candidates, refresh=sched)
        out.append(omp.reconstruct(B, idx, coef))
    return torch.cat(out)


def rows_v2(s: Setup, **options) -> dict[str, torch.Tensor]:
    """The v2 method's raw rows (shrink 1) for the needed ids, from the registered method."""
    from tokensurgeon.methods import TransplantProblem
    from tokensurgeon.methods.omp import OmpOptions, omp_rows

    A, B = s.anchors()
    problem = TransplantProblem(s.donor[s.needed], A, B, s.base, [None] * s.needed.numel(), {},
                                options=OmpOptions(**options), batch_size=512)
    return omp_rows(problem).rows


def shrunk(rows: torch.Tensor, mu: torch.Tensor, lam: float) -> torch.Tensor:
    return mu + lam * (rows - mu)


def tune(s: Setup, cache: Path, tag: str, search: str) -> dict:
    """Output rows mu + lambda (row - mu) for v2 rows (lstsq and softmax), on training text."""
    mu = s.base[s.plan.anchor_base].mean(0)
    raw = {}
    for coefficients in ("lstsq", "softmax"):
        t = time.time()
        raw[coefficients] = cached_rows(
            cache / f"v2-{coefficients}-{tag}.pt",
            lambda c=coefficients: rows_v2(s, k=32, candidates=128, refreshes=3, search=search,
                                           coefficients=c))
        print(f"v2 {coefficients}: {time.time() - t:.0f}s", flush=True)
    results = {}
    hidden = {"mean": s.hidden(rows_mean(s)), "lstsq": s.hidden(raw["lstsq"])}
    for in_name, h in hidden.items():
        for coefficients, rows in raw.items():
            for lam in (0.0, 0.25, 0.5, 0.75, 1.0):
                if lam == 0.0 and coefficients == "softmax":
                    continue
                key = f"in={in_name} out={coefficients} lambda={lam}"
                results[key] = s.score(h, shrunk(rows, mu, lam))
                print(key, json.dumps(results[key]), flush=True)
    return results


def cached_rows(path: Path, fn) -> torch.Tensor:
    if path.exists():
        return torch.load(path, weights_only=True)
    rows = fn()
    torch.save(rows, path)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", default="eval", choices=["eval", "train"])
    ap.add_argument("--bytes", type=int, default=12_000)
    ap.add_argument("--sample", type=int, default=2048)
    ap.add_argument("--cache", default=str(ROOT / "bench" / "runs" / "transplant_diagnose"),
                    help="rows computed once and reused (not committed)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--grid", action="store_true", help="the v1 diagnosis grid")
    ap.add_argument("--tune", action="store_true", help="v2 output shrink on these texts")
    ap.add_argument("--search", default="exact", help="v2 candidate search for --tune")
    add_data_root(ap)
    args = ap.parse_args()
    data = require(args, [PROSE, GSM8K_TEST if args.texts == "eval" else GSM8K_TRAIN])
    out = Path(args.out or ROOT / "bench" / "results" / f"transplant_diagnose_{args.texts}.json")
    torch.set_num_threads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    s = Setup(data, args.texts, args.bytes, args.sample)
    tag = f"{args.texts}-{args.bytes}-{args.sample}"
    print(f"setup {time.time() - t0:.0f}s: {s.in_text.numel()} new tokens in the texts, "
          f"sample {s.sample.numel()} (weight {s.sample_weight:.1f})", flush=True)
    result = {"texts": args.texts, "bytes": s.bytes, "sample": s.sample.numel(),
              "in_text_new_tokens": s.in_text.numel(), "bos": "prepended by hand (tokenizer bos)"}
    if args.tune:
        result["tune"] = tune(s, cache, tag, args.search)
    if not args.grid:
        result["seconds"] = round(time.time() - t0)
        out.write_text(json.dumps(portable(result), indent=1))
        print(json.dumps(result))
        return
    rows = {"mean": rows_mean(s)}
    for r in (0, 10):
        t = time.time()
        rows[f"omp_r{r}"] = cached_rows(cache / f"omp_r{r}-{tag}.pt", lambda r=r: rows_omp_old(s, r))
        print(f"omp refreshes={r}: {time.time() - t:.0f}s", flush=True)
    grid = {}
    for in_name in rows:
        h = s.hidden(rows[in_name])
        for out_name in rows:
            if in_name != "mean" and out_name != "mean" and in_name != out_name:
                continue
            key = f"in={in_name} out={out_name}"
            grid[key] = s.score(h, rows[out_name])
            print(key, json.dumps(grid[key]), flush=True)
    result.update({"grid": grid, "seconds": round(time.time() - t0)})
    out.write_text(json.dumps(portable(result), indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    run(main, "bench/transplant_diagnose.py")
