"""``omp``: Orthogonal Matching Pursuit over shared anchor tokens (the default).

Each new token's DONOR row is written as a sparse combination of at most k anchor rows in
DONOR's space; the same coefficients applied to BASE's rows of those anchors give its BASE
row. The math is in :mod:`tokensurgeon.omp`; this module batches it and moves it to the
chosen device.
"""

from __future__ import annotations

import psutil
import torch
from tqdm.auto import tqdm

from tokensurgeon import omp as omp_math
from tokensurgeon.methods import MethodResult, TransplantProblem, register

# Keep the shared [N, N] anchor Gram matrix only when it takes at most this share of the
# available memory; otherwise each batch builds per-token candidate Grams instead.
GRAM_MEMORY_SHARE = 0.4


def use_shared_gram(n_targets: int, n_atoms: int, candidates: int, free_bytes: int) -> bool:
    """The shared Gram costs N²·D once; per-token candidate Grams cost B·C²·D. Pick the
    cheaper one, if the shared one fits in memory."""
    fits = n_atoms * n_atoms * 4 <= GRAM_MEMORY_SHARE * free_bytes
    return fits and n_atoms * n_atoms < n_targets * candidates * candidates


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


@register("omp")
def omp_rows(problem: TransplantProblem) -> MethodResult:
    """OMP coefficients in DONOR space, applied to BASE anchors. Rows [B, Hb]."""
    device = torch.device(problem.device)
    anchors = problem.donor_anchors.to(device, torch.float32)
    base_anchors = problem.base_anchors.to(device, torch.float32)
    n_targets, n_atoms = problem.donor_targets.shape[0], anchors.shape[0]
    k = min(problem.k, n_atoms)
    exact = problem.candidates <= 0 or problem.candidates >= n_atoms
    gram = None
    # Each refresh rebuilds the candidate Grams, so count them in the comparison.
    width = n_atoms if exact else problem.candidates
    passes = 1 + len(omp_math.refresh_schedule(k, problem.refreshes))
    if use_shared_gram(n_targets * passes, n_atoms, width, _free_bytes(device)):
        gram = omp_math.gram_matrix(anchors)
    rows = torch.empty(n_targets, base_anchors.shape[1], dtype=torch.float32)
    all_idx = torch.empty(n_targets, k, dtype=torch.long)
    all_coef = torch.empty(n_targets, k, dtype=torch.float32)
    errors = torch.empty(n_targets, dtype=torch.float32)
    schedule = omp_math.refresh_schedule(k, problem.refreshes)
    batch = problem.batch_size
    bar = tqdm(total=n_targets, desc=problem.progress, unit="tok", disable=problem.progress is None)
    for start in range(0, n_targets, batch):
        targets = problem.donor_targets[start : start + batch].to(device, torch.float32)
        if exact:
            idx, coef = omp_math.omp_exact(targets, anchors, k, gram=gram)
        else:
            idx, coef = omp_math.omp_fast(targets, anchors, k, problem.candidates, gram=gram,
                                          refresh=schedule)
        approx = omp_math.reconstruct(anchors, idx, coef)
        end = start + targets.shape[0]
        errors[start:end] = omp_math.relative_error(targets, approx).cpu()
        rows[start:end] = omp_math.reconstruct(base_anchors, idx, coef).cpu()
        all_idx[start:end] = idx.cpu()
        all_coef[start:end] = coef.cpu()
        bar.update(targets.shape[0])
    bar.close()
    return MethodResult(rows, ["omp"] * n_targets, all_idx, all_coef, errors)
