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


def _unit_centred(atoms, targets):
    mu = atoms.mean(0)
    a = atoms - mu
    return a / a.norm(dim=1, keepdim=True), targets - mu


def test_ann_candidates_recover_exact_omp_selection():
    """Stated recall: searching faiss IVF candidates at every step (the exact-search version
    of this selects exactly what exact OMP selects, see above), at least 80% of the atoms
    exact OMP selects are selected, and the error is within 2% of exact's."""
    pytest.importorskip("faiss")
    from tokensurgeon.ann import AnchorIndex

    atoms, targets = _embedding_like(4000, 128, 48, seed=11)
    unit, t = _unit_centred(atoms, targets)
    k = 12
    e_idx, e_coef = omp.omp_exact(t, unit, k)
    index = AnchorIndex(unit, "faiss", nprobe=48)
    assert index.backend == "faiss"
    f_idx, f_coef = omp.omp_fast(t, unit, k, candidates=24, refresh=list(range(1, k)),
                                 search=index.search)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(e_idx, f_idx)) / e_idx.numel()
    assert recall >= 0.8, recall
    e_err = omp.relative_error(t, omp.reconstruct(unit, e_idx, e_coef)).mean()
    f_err = omp.relative_error(t, omp.reconstruct(unit, f_idx, f_coef)).mean()
    assert f_err <= e_err * 1.02, (float(f_err), float(e_err))


def test_ann_search_finds_the_exact_top_candidates():
    """|correlation| search: faiss IVF (48 lists probed) returns >= 90% of the exact top-32,
    never an excluded atom, and no atom twice."""
    pytest.importorskip("faiss")
    from tokensurgeon.ann import AnchorIndex, exact_top_abs

    atoms, targets = _embedding_like(3000, 64, 32, seed=12)
    unit, t = _unit_centred(atoms, targets)
    index = AnchorIndex(unit, "faiss", nprobe=48)
    exclude = exact_top_abs(t, unit, 3)
    got = index.search(t, 32, exclude)
    want = exact_top_abs(t, unit, 32, exclude)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, want)) / want.numel()
    assert recall >= 0.9, recall
    for row, ex in zip(got.tolist(), exclude.tolist()):
        assert len(set(row)) == len(row) and not set(row) & set(ex)


def test_missing_faiss_falls_back_to_exact_and_says_so_once(monkeypatch, capsys):
    import sys

    from tokensurgeon import ann

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    monkeypatch.setattr(ann, "_WARNED", False)
    atoms, targets = _embedding_like(500, 8, 16, seed=2)
    first = ann.AnchorIndex(atoms, "faiss")
    second = ann.AnchorIndex(atoms, "faiss")
    assert first.backend == second.backend == "exact"
    assert capsys.readouterr().err.count("faiss is not installed") == 1
    torch.testing.assert_close(first.search(targets, 10).sort(1).values,
                               ann.exact_top_abs(targets, atoms, 10).sort(1).values)


def test_softmax_coefficients_are_convex_and_rows_stay_in_the_hull():
    from tokensurgeon.methods import TransplantProblem
    from tokensurgeon.methods.omp import OmpOptions, omp_rows

    gen = torch.Generator().manual_seed(5)
    donor_anchors = torch.randn(300, 16, generator=gen)
    base_anchors = torch.randn(300, 12, generator=gen) * 3 + 1
    targets = torch.randn(40, 16, generator=gen) * 5
    opts = OmpOptions(k=6, candidates=32, coefficients="softmax", shrink=1.0, output_shrink=0.5,
                      search="exact")
    result = omp_rows(TransplantProblem(targets, donor_anchors, base_anchors, base_anchors,
                                        [None] * 40, {}, options=opts))
    assert (result.coef >= 0).all()
    torch.testing.assert_close(result.coef.sum(1), torch.ones(40))
    # Convex combination of real rows: every coordinate inside the anchors' range...
    lo, hi = base_anchors.min(0).values, base_anchors.max(0).values
    assert (result.rows >= lo - 1e-5).all() and (result.rows <= hi + 1e-5).all()
    # ...so every logit is bounded by the largest real logit (the leak bound).
    h = torch.randn(64, 12, generator=gen)
    assert ((h @ result.rows.T).max(1).values <= (h @ base_anchors.T).max(1).values + 1e-4).all()
    # Output rows are the same rows pulled halfway to the anchor mean.
    mu = base_anchors.mean(0)
    torch.testing.assert_close(result.output_rows, mu + 0.5 * (result.rows - mu))


def test_centred_lstsq_rows_are_mean_plus_combination_of_centred_anchors():
    from tokensurgeon.methods import TransplantProblem
    from tokensurgeon.methods.omp import OmpOptions, omp_rows

    gen = torch.Generator().manual_seed(6)
    donor_anchors = torch.randn(200, 10, generator=gen) + 4
    base_anchors = torch.randn(200, 7, generator=gen) - 2
    targets = torch.randn(8, 10, generator=gen) + 4
    opts = OmpOptions(k=5, candidates=0, shrink=0.7)
    r = omp_rows(TransplantProblem(targets, donor_anchors, base_anchors, base_anchors,
                                   [None] * 8, {}, options=opts))
    mu = base_anchors.mean(0)
    raw = omp.reconstruct(base_anchors, r.anchors, r.coef) + r.mean_coef[:, None] * mu
    torch.testing.assert_close(r.rows, mu + 0.7 * (raw - mu))
    torch.testing.assert_close(r.mean_coef, 1 - r.coef.sum(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_method_on_cuda_matches_cpu():
    from tokensurgeon.methods import TransplantProblem
    from tokensurgeon.methods.omp import OmpOptions, omp_rows

    atoms, targets = _embedding_like(3000, 64, 32, seed=9)
    base = torch.randn(3000, 24, generator=torch.Generator().manual_seed(1))
    rows = {}
    for device in ("cpu", "cuda"):
        problem = TransplantProblem(targets, atoms, base, base, [None] * 64, {},
                                    options=OmpOptions(search="exact"), device=device)
        rows[device] = omp_rows(problem).rows
    torch.testing.assert_close(rows["cuda"], rows["cpu"], rtol=1e-3, atol=1e-3)
