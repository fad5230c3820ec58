"""Candidate retrieval for OMP: the anchors most correlated (in absolute value) with a query.

Boundary: pure tensor math plus an optional faiss index built in memory. No files.

OMP's first pick and each refresh only need the ``width`` atoms with the largest
``|<query, atom>|``. Exact search is one GEMM over every atom per query; with 216k queries
and 46k atoms of dimension 640 that is ~1.3e13 flops per pass. :class:`AnchorIndex` answers
the same question approximately with a faiss inverted-file index (IVF, inner product) over
the atoms and their negatives, so one search touches ``nprobe / nlist`` of the atoms.
Without faiss, or for small problems, it falls back to the exact GEMM search.
"""

from __future__ import annotations

import math
import sys

import torch

_WARNED = False


def faiss_module():
    """The faiss module, or None (with one message on stderr) when it is not installed."""
    global _WARNED
    try:
        import faiss
    except ImportError:
        if not _WARNED:
            print("tokensurgeon: faiss is not installed; OMP candidates use exact GEMM search "
                  "(slower; pip install faiss-cpu)", file=sys.stderr)
            _WARNED = True
        return None
    return faiss


def exact_top_abs(queries: torch.Tensor, atoms: torch.Tensor, width: int,
                  exclude: torch.Tensor | None = None) -> torch.Tensor:
    """[B, width] indices of the atoms with the largest |<query, atom>| (exact GEMM search).

    Args:
        queries: [B, D]; atoms: [N, D]; width <= N.
        exclude: optional [B, s] atom indices never returned (e.g. the support so far).
    """
    scores = (queries @ atoms.T).abs_()  # [B, N]
    if exclude is not None:
        scores.scatter_(1, exclude, -1.0)
    return scores.topk(width, dim=1, sorted=False).indices


class AnchorIndex:
    """Search ``atoms`` [N, D] by absolute inner product, exactly or with faiss IVF.

    Args:
        atoms: [N, D] float32 CPU or CUDA tensor.
        backend: ``exact`` (GEMM), ``faiss`` (IVF; falls back to exact without faiss), or
            ``auto`` (faiss when the exact search would cost more than ``auto_flops``), or
            ``pca`` (exact GEMM search in the top ``pca_dim`` principal directions of the
            atoms for 4x ``width`` hits, re-ranked exactly in full dimension).
        n_queries: expected number of queries (for ``auto``).
        nprobe: inverted lists visited per query; nlist is ~4 sqrt(2N).
        seed: seed for the k-means training sample.
    """

    def __init__(self, atoms: torch.Tensor, backend: str = "auto", n_queries: int = 0,
                 nprobe: int = 8, seed: int = 0, auto_flops: float = 2e11,
                 pca_dim: int = 64):
        self.atoms = atoms
        self.n = atoms.shape[0]
        self.index = None
        self.proj = None
        exact_cost = 2.0 * n_queries * self.n * atoms.shape[1]
        want = backend == "faiss" or (backend == "auto" and exact_cost > auto_flops)
        if backend not in ("auto", "faiss", "exact", "pca"):
            raise ValueError(f"unknown search backend {backend!r}")
        if backend == "pca":
            self._build_pca(pca_dim)
            return
        faiss = faiss_module() if want else None
        if faiss is None:
            self.backend = "exact"
            return
        self.backend = "faiss"
        both = torch.cat([atoms, -atoms]).detach().float().cpu().contiguous().numpy()
        dim = both.shape[1]
        nlist = max(1, min(int(4 * math.sqrt(both.shape[0])), both.shape[0] // 39))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        gen = torch.Generator().manual_seed(seed)
        # k-means on a sample, few iterations: the lists only need to be roughly balanced.
        sample = torch.randperm(both.shape[0], generator=gen)[: 32 * nlist].numpy()
        faiss.omp_set_num_threads(torch.get_num_threads())
        index.cp.seed = seed
        index.cp.niter = 8
        index.cp.min_points_per_centroid = 1
        index.train(both[sample])
        index.add(both)
        index.nprobe = min(nprobe, nlist)
        self.index = index
        self._quantizer = quantizer  # the IVF index does not own it

    def _build_pca(self, pca_dim: int) -> None:
        self.backend = "pca"
        dim = min(pca_dim, self.atoms.shape[1])
        # Top right singular vectors of the atoms (they are centred by the caller).
        _, _, v = torch.linalg.svd(self.atoms[:: max(1, self.n // 20000)].float(),
                                   full_matrices=False)
        self.proj = v[:dim].T.contiguous()  # [D, d]
        self.low = self.atoms @ self.proj  # [N, d]

    def search(self, queries: torch.Tensor, width: int,
               exclude: torch.Tensor | None = None) -> torch.Tensor:
        """[B, width] atom indices with the largest |<query, atom>| (approximate under faiss).

        ``exclude`` [B, s] indices are never returned. Under faiss, rows the index cannot fill
        (fewer than ``width`` distinct hits) are completed from the exact search.
        """
        if self.proj is not None:
            extra = 0 if exclude is None else exclude.shape[1]
            pool = min(self.n, 4 * width + extra)
            coarse = exact_top_abs(queries @ self.proj, self.low, pool, exclude)  # [B, P]
            fine = torch.bmm(self.atoms[coarse], queries.unsqueeze(-1)).squeeze(-1).abs_()
            if exclude is not None:  # the coarse search ranks them last; keep them out
                fine.masked_fill_((coarse.unsqueeze(2) == exclude.unsqueeze(1)).any(2), -1.0)
            return coarse.gather(1, fine.topk(width, dim=1).indices)
        if self.index is None:
            return exact_top_abs(queries, self.atoms, width, exclude)
        extra = 0 if exclude is None else exclude.shape[1]
        want = 2 * (width + extra)  # an atom and its negative may both be hit
        q = queries.detach().float().cpu().contiguous().numpy()
        _, hits = self.index.search(q, want)
        hits = torch.from_numpy(hits)
        valid = hits >= 0
        hits = torch.where(valid, hits % self.n, torch.full_like(hits, -1))
        return self._dedupe(hits, queries, width, exclude).to(queries.device)

    def _dedupe(self, hits: torch.Tensor, queries: torch.Tensor, width: int,
                exclude: torch.Tensor | None) -> torch.Tensor:
        """First ``width`` distinct, non-excluded hits per row (hits are in score order)."""
        B, W = hits.shape
        n = self.n
        key = torch.where(hits >= 0, hits, torch.full_like(hits, n))
        # Mark repeats: sort each row's ids, flag equal neighbours, map flags back.
        sorted_ids, order = key.sort(dim=1, stable=True)
        dup_sorted = torch.zeros_like(sorted_ids, dtype=torch.bool)
        dup_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
        dup = torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)
        bad = dup | (key == n)
        if exclude is not None:
            ex = exclude.cpu()
            bad |= (key.unsqueeze(2) == ex.unsqueeze(1)).any(2)
        rank = torch.where(bad, torch.full_like(key, W + 1), torch.arange(W).expand(B, -1))
        pos = rank.argsort(dim=1, stable=True)[:, :width]
        out = key.gather(1, pos)
        short = bad.gather(1, pos)
        rows = short.any(1).nonzero().flatten()
        if rows.numel():  # rare: too few distinct hits; fill those rows exactly
            out[rows] = exact_top_abs(queries[rows].cpu().float(), self.atoms.cpu().float(), width,
                                      None if exclude is None else exclude[rows].cpu())
        return out
