"""Orthogonal Matching Pursuit, batched, in two formulations.

Boundary: pure tensor math. No I/O, no tokenizers, no models.

Both formulations share one greedy core (:func:`batch_omp_gram`), the Cholesky form of OMP
in correlation space ("Batch-OMP", Rubinstein et al., 2008). It never forms residual
vectors: with alpha = A t (correlations of the target with every atom) and G = A Aᵀ (the
atoms' Gram matrix), the correlations of the residual after selecting support I with
least-squares coefficients gamma are ``alpha - G[:, I] @ gamma``, and gamma solves
``G[I, I] gamma = alpha[I]`` through an incrementally grown Cholesky factor.

- :func:`omp_exact` searches every atom at every step. It selects exactly what
  scikit-learn's ``orthogonal_mp`` selects and is the reference for tests.
- :func:`omp_fast` first preselects, with one GEMM over all atoms, the ``candidates`` atoms
  most correlated with each target, then runs the same greedy core on that small
  dictionary using a per-target Gram matrix (one batched GEMM, AMX-friendly in bf16).
  Each of the k steps then costs O(candidates * k) per target instead of O(atoms * dim).
  With ``candidates >= atoms`` it selects exactly what :func:`omp_exact` selects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokensurgeon.ann import exact_top_abs

GramColumn = Callable[[torch.Tensor], torch.Tensor]
Search = Callable[[torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]


def batch_omp_gram(
    alpha: torch.Tensor,
    gram_column: GramColumn,
    k: int,
    eps: float = 1e-10,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OMP in correlation space for a batch of targets.

    The support grows one atom per step. Instead of re-solving the least-squares problem
    at every step, the method keeps the correlations of every atom with the orthonormal
    directions q_0..q_{t-1} spanned by the support (``proj[b, j, m] = ⟨a_m, q_j⟩``):
    the new atom's Cholesky row is read off ``proj``, its direction's correlations come
    from one Gram column, and the residual correlations drop by ``z_t * proj[:, t]``.

    Args:
        alpha: [B, M] correlations ⟨t_b, a_m⟩ of each target with each (candidate) atom.
        gram_column: maps selected local indices [B] to the Gram columns
            [B, M] with entries ⟨a_m, a_sel[b]⟩.
        k: number of atoms to select per target (k <= M).
        eps: floor for squared Cholesky pivots (guards linearly dependent atoms).
        forced: optional [B, s] local indices to take as the first s picks (s <= k), in
            order, instead of choosing them greedily (used to resume after a refresh).
    Returns:
        indices: [B, k] selected local atom indices, in selection order.
        coef: [B, k] least-squares coefficients for those atoms.
    """
    B, M = alpha.shape
    if k > M:
        raise ValueError(f"cannot select {k} atoms from {M}")
    dtype, device = alpha.dtype, alpha.device
    ar = torch.arange(B, device=device)
    corr = alpha.clone()
    chol = torch.zeros(B, k, k, dtype=dtype, device=device)  # G[I, I] = chol @ chol.T
    proj = torch.zeros(B, k, M, dtype=dtype, device=device)  # ⟨a_m, q_j⟩
    z = torch.zeros(B, k, dtype=dtype, device=device)  # ⟨t, q_j⟩
    indices = torch.zeros(B, k, dtype=torch.long, device=device)
    chosen = torch.zeros(B, M, dtype=torch.bool, device=device)
    n_forced = 0 if forced is None else forced.shape[1]
    for t in range(k):
        if t < n_forced:
            pick = forced[:, t]
        else:
            pick = corr.abs().masked_fill_(chosen, -1.0).argmax(dim=1)
        chosen[ar, pick] = True
        indices[:, t] = pick
        column = gram_column(pick).to(dtype)  # [B, M]
        w = proj[ar, :t, pick]  # [B, t] = ⟨a_pick, q_j⟩ = row t of chol
        pivot = (column[ar, pick] - (w * w).sum(1)).clamp_min(eps).sqrt()  # [B]
        chol[:, t, :t] = w
        chol[:, t, t] = pivot
        if t:
            column = column - torch.bmm(w.unsqueeze(1), proj[:, :t]).squeeze(1)
        proj[:, t] = column / pivot.unsqueeze(1)
        z[:, t] = (alpha[ar, pick] - (w * z[:, :t]).sum(1)) / pivot
        corr -= z[:, t : t + 1] * proj[:, t]
    coef = torch.linalg.solve_triangular(chol.transpose(1, 2), z.unsqueeze(-1), upper=True)
    return indices, coef.squeeze(-1)


def gram_matrix(atoms: torch.Tensor) -> torch.Tensor:
    """[N, N] Gram matrix A Aᵀ of the dictionary (computed once, shared by every batch)."""
    return atoms @ atoms.T


def omp_exact(
    targets: torch.Tensor, atoms: torch.Tensor, k: int, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact batched OMP: every atom is a candidate at every step.

    Args:
        targets: [B, D] vectors to approximate.
        atoms: [N, D] dictionary (rows are atoms).
        k: sparsity, k <= N.
        gram: optional precomputed [N, N] Gram matrix (see :func:`gram_matrix`).
    Returns:
        indices: [B, k] atom indices into ``atoms``.
        coef: [B, k] coefficients; ``coef[b] @ atoms[indices[b]]`` approximates targets[b].
    """
    alpha = targets @ atoms.T  # [B, N]

    def gram_column(pick: torch.Tensor) -> torch.Tensor:
        return gram[pick] if gram is not None else atoms[pick] @ atoms.T  # [B, N]

    return batch_omp_gram(alpha, gram_column, k)


def refresh_schedule(k: int, refreshes: int) -> list[int]:
    """Up to ``refreshes`` geometrically spaced steps in [1, k): 1, 2, 3, 5, 8, 12, ...

    Early refreshes matter most: the first picks remove the component all embeddings
    share, after which the residual correlates with quite different atoms.
    """
    if refreshes <= 0 or k <= 1:
        return []
    ratio = k ** (1.0 / (refreshes + 1))
    return sorted({min(k - 1, max(1, round(ratio**i))) for i in range(1, refreshes + 1)})


def omp_fast(
    targets: torch.Tensor,
    atoms: torch.Tensor,
    k: int,
    candidates: int = 256,
    gram: torch.Tensor | None = None,
    refresh: list[int] | None = None,
    search: Search | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP restricted to per-target preselected candidates, optionally refreshed.

    Args:
        targets: [B, D] vectors to approximate.
        atoms: [N, D] dictionary.
        k: sparsity, k <= min(candidates, N).
        candidates: atoms kept per target by each preselection GEMM.
        gram: optional precomputed [N, N] Gram matrix. Without it each target's
            [C, C] candidate Gram is built by one batched GEMM.
        refresh: steps (0 < s < k) after which the residual is correlated with all atoms
            again (one more GEMM) and the candidates become the support so far plus the
            atoms most correlated with the residual; the greedy search then resumes on
            them. See :func:`refresh_schedule`.
        search: ``search(queries [B, D], width, exclude [B, s] | None) -> [B, width]`` atom
            indices with the largest |correlation| (e.g. :meth:`tokensurgeon.ann.AnchorIndex.search`);
            default: exact GEMM search over every atom.
    Returns:
        indices: [B, k] atom indices into ``atoms``; coef: [B, k] coefficients.
    """
    n_atoms = atoms.shape[0]
    width = min(candidates, n_atoms)
    stops = sorted(s for s in set(refresh or []) if 0 < s < k) if width < n_atoms else []
    stops.append(k)
    support: torch.Tensor | None = None  # [B, t] global indices chosen so far
    residual = targets
    if search is None:
        def search(queries, n, exclude):
            return exact_top_abs(queries, atoms, n, exclude)
    for stop in stops:
        if support is None:
            cand = search(residual, width, None)  # [B, C]
        else:  # the support leads the new candidates
            fresh = search(residual, width - support.shape[1], support)
            cand = torch.cat([support, fresh], dim=1)
        forced = None if support is None else torch.arange(
            support.shape[1], device=targets.device).expand(targets.shape[0], -1)
        local_idx, coef = _omp_on_candidates(targets, atoms, cand, stop, gram, forced)
        support = cand.gather(1, local_idx)
        if stop < k:
            residual = targets - reconstruct(atoms, support, coef)
    return support, coef


def _omp_on_candidates(targets, atoms, cand, k, gram, forced):
    """Greedy OMP over each target's candidate atoms ``cand`` [B, C]."""
    local = torch.nn.functional.embedding(cand, atoms)  # [B, C, D]
    alpha = torch.bmm(local, targets.unsqueeze(-1)).squeeze(-1)  # [B, C]
    ar = torch.arange(targets.shape[0], device=targets.device)
    if gram is not None:
        del local

        def gram_column(pick: torch.Tensor) -> torch.Tensor:
            return gram[cand[ar, pick].unsqueeze(1), cand]  # [B, C]

    else:
        local_gram = torch.bmm(local, local.transpose(1, 2))  # [B, C, C]
        del local

        def gram_column(pick: torch.Tensor) -> torch.Tensor:
            return local_gram[ar, :, pick]

    return batch_omp_gram(alpha, gram_column, k, forced=forced)


def reconstruct(atoms: torch.Tensor, indices: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Apply sparse coefficients to a dictionary.

    Args:
        atoms: [N, H] rows to combine (may live in a different space than the OMP atoms,
            as long as row i is the same token).
        indices: [B, k]; coef: [B, k].
    Returns:
        [B, H] = sum_j coef[b, j] * atoms[indices[b, j]].
    """
    return torch.bmm(coef.unsqueeze(1).to(atoms.dtype), atoms[indices]).squeeze(1)


def relative_error(targets: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """[B] per-row ||t - approx|| / ||t|| (0 where t = 0 and approx = 0)."""
    num = (targets - approx).norm(dim=1)
    return num / targets.norm(dim=1).clamp_min(1e-12)
