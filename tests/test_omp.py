"""OMP: the exact mode is scikit-learn's OMP; the fast mode reconstructs as well."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp

from tokensurgeon import omp


@pytest.mark.parametrize("seed", range(4))
def test_exact_matches_sklearn(seed):
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(200, 32, generator=gen, dtype=torch.float64)
    targets = torch.randn(6, 32, generator=gen, dtype=torch.float64)
    k = 3 + seed * 3
    idx, coef = omp.omp_exact(targets, atoms, k)
    for b in range(targets.shape[0]):
        ref = orthogonal_mp(atoms.T.numpy(), targets[b].numpy(), n_nonzero_coefs=k)
        support = np.flatnonzero(ref)
        assert sorted(support.tolist()) == sorted(idx[b].tolist())
        np.testing.assert_allclose(ref[idx[b].numpy()], coef[b].numpy(), rtol=1e-7, atol=1e-9)


def test_fast_with_all_candidates_is_exact():
    gen = torch.Generator().manual_seed(7)
    atoms = torch.randn(150, 24, generator=gen, dtype=torch.float64)
    targets = torch.randn(9, 24, generator=gen, dtype=torch.float64)
    idx, coef = omp.omp_exact(targets, atoms, 10)
    for gram in (None, omp.gram_matrix(atoms)):
        f_idx, f_coef = omp.omp_fast(targets, atoms, 10, candidates=150, gram=gram)
        assert torch.equal(f_idx, idx)
        torch.testing.assert_close(f_coef, coef)


def test_shared_gram_equals_per_token_gram():
    gen = torch.Generator().manual_seed(3)
    atoms = torch.randn(500, 32, generator=gen, dtype=torch.float64)
    targets = torch.randn(16, 32, generator=gen, dtype=torch.float64)
    a = omp.omp_fast(targets, atoms, 8, candidates=64)
    b = omp.omp_fast(targets, atoms, 8, candidates=64, gram=omp.gram_matrix(atoms))
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def _embedding_like(n_atoms: int, n_targets: int, dim: int, seed: int, noise: float = 0.6):
    """Atoms and targets with the structure of trained embeddings: clusters of related
    tokens around a few hundred directions, plus an offset that all of them share."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_atoms // 20, dim, generator=gen)
    offset = 2.0 * torch.randn(dim, generator=gen)

    def sample(n):
        c = centres[torch.randint(0, centres.shape[0], (n,), generator=gen)]
        return c + noise * torch.randn(n, dim, generator=gen) + offset

    return sample(n_atoms), sample(n_targets)


def test_fast_reconstruction_within_one_percent_of_exact():
    """The default schedule (256 candidates, 10 refreshes) on embedding-like data."""
    atoms, targets = _embedding_like(4000, 256, 64, seed=0)
    k = 16
    e_idx, e_coef = omp.omp_exact(targets, atoms, k)
    f_idx, f_coef = omp.omp_fast(targets, atoms, k, candidates=256,
                                 refresh=omp.refresh_schedule(k, 10))
    exact_err = omp.relative_error(targets, omp.reconstruct(atoms, e_idx, e_coef)).mean()
    fast_err = omp.relative_error(targets, omp.reconstruct(atoms, f_idx, f_coef)).mean()
    assert fast_err <= exact_err * 1.01, (float(fast_err), float(exact_err))


def test_preselection_alone_is_not_enough():
    """Why refreshes exist: one preselection loses far more than 1% on the same data."""
    atoms, targets = _embedding_like(4000, 256, 64, seed=0)
    e_idx, e_coef = omp.omp_exact(targets, atoms, 16)
    f_idx, f_coef = omp.omp_fast(targets, atoms, 16, candidates=256)
    exact_err = omp.relative_error(targets, omp.reconstruct(atoms, e_idx, e_coef)).mean()
    fast_err = omp.relative_error(targets, omp.reconstruct(atoms, f_idx, f_coef)).mean()
    assert fast_err > exact_err * 1.2


def test_refresh_at_every_step_selects_what_exact_selects():
    atoms, targets = _embedding_like(2000, 64, 32, seed=5)
    atoms, targets = atoms.double(), targets.double()
    e_idx, e_coef = omp.omp_exact(targets, atoms, 12)
    f_idx, f_coef = omp.omp_fast(targets, atoms, 12, candidates=40, refresh=list(range(1, 12)))
    assert torch.equal(f_idx, e_idx)
    torch.testing.assert_close(f_coef, e_coef)


def test_more_atoms_never_hurt_and_k_equal_dim_is_exact():
    gen = torch.Generator().manual_seed(1)
    atoms = torch.randn(100, 16, generator=gen, dtype=torch.float64)
    targets = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    errors = []
    for k in (1, 4, 8, 16):
        idx, coef = omp.omp_exact(targets, atoms, k)
        errors.append(omp.relative_error(targets, omp.reconstruct(atoms, idx, coef)))
    for a, b in itertools.pairwise(errors):
        assert (b <= a + 1e-12).all()
    assert errors[-1].max() < 1e-8


def test_reconstruct_applies_coefficients_in_another_space():
    base = torch.arange(12.0).reshape(4, 3)
    idx = torch.tensor([[0, 2], [3, 1]])
    coef = torch.tensor([[1.0, 0.5], [2.0, -1.0]])
    out = omp.reconstruct(base, idx, coef)
    torch.testing.assert_close(out[0], base[0] + 0.5 * base[2])
    torch.testing.assert_close(out[1], 2 * base[3] - base[1])


def test_k_larger_than_candidates_is_refused():
    with pytest.raises(ValueError):
        omp.batch_omp_gram(torch.zeros(2, 3), lambda p: torch.zeros(2, 3), 4)


def test_refresh_schedule_is_geometric_and_inside_k():
    assert omp.refresh_schedule(64, 0) == []
    steps = omp.refresh_schedule(64, 10)
    assert steps[0] == 1 and steps[-1] < 64 and steps == sorted(set(steps))
    assert len(steps) >= 8


def test_refreshes_never_hurt_much_and_usually_help():
    atoms, targets = _embedding_like(3000, 128, 48, seed=4)
    errs = []
    for refresh in ([], omp.refresh_schedule(24, 4), omp.refresh_schedule(24, 12)):
        idx, coef = omp.omp_fast(targets, atoms, 24, candidates=96, refresh=refresh)
        errs.append(float(omp.relative_error(targets, omp.reconstruct(atoms, idx, coef)).mean()))
    assert errs[2] < errs[1] < errs[0], errs
