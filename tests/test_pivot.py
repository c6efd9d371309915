"""Pivoted low-rank storage (factorize/pivot.py): exact for the rank-r product, r(m+n−r) numbers."""
import numpy as np
import pytest

import graphs
from onnxhmf.factorize.hmf import hmf
from onnxhmf.factorize.pivot import (
    pivot_factors,
    pivot_hybrid,
    pivoted_breakeven_rank,
    pivoted_params,
    pivoted_rank_for_budget,
    pivoted_rank_for_keep,
)
from onnxhmf.factorize.svd import lmf, rank_for_keep
from onnxhmf.factorize.whiten import weighted_lmf, whitened_hmf


@pytest.mark.parametrize("m,n,r", [(48, 40, 7), (40, 48, 12), (64, 64, 63), (300, 20, 5)])
def test_pivoted_form_reproduces_the_rank_r_product(m, n, r):
    W = graphs.matrix(m, n, seed=m + n)
    f = lmf(W, r)
    p = pivot_factors(f.A, f.B, f.residual_sq, f.total_sq)
    np.testing.assert_allclose(p.reconstruct(), f.A @ f.B, atol=1e-10 * np.abs(W).max())
    assert p.params == pivoted_params(m, n, r) == r * (m + n - r) < f.params
    assert p.F.shape == (m, r) and p.C.shape == (r, n - r)
    assert sorted(p.order.tolist()) == list(range(n))
    # the pivot columns are columns of the product itself
    np.testing.assert_allclose(p.F, (f.A @ f.B)[:, p.order[:r]], atol=1e-10)
    assert p.relative_error == pytest.approx(f.relative_error)


def test_pivots_are_well_conditioned_and_survive_float32():
    W = graphs.matrix(128, 96, seed=3, decay=0.97)
    f = lmf(W, 60)
    p = pivot_factors(f.A, f.B)
    assert np.abs(p.C).max() < 50  # pivoting keeps the coefficients moderate
    F32, C32 = p.F.astype(np.float32), p.C.astype(np.float32)
    W32 = np.concatenate([F32, F32 @ C32], axis=1)[:, p.inverse]
    Wr = f.A @ f.B
    assert np.linalg.norm(W32 - Wr) / np.linalg.norm(Wr) < 1e-5


def test_rank_deficient_factors_drop_absent_directions():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((40, 4)) @ rng.standard_normal((4, 30))  # float64, rank exactly 4
    f = lmf(W, 8)  # 4 of the 8 directions hold (numerically) nothing
    p = pivot_factors(f.A, f.B, f.residual_sq, f.total_sq)
    assert p.rank == 4
    np.testing.assert_allclose(p.reconstruct(), W, atol=1e-9)
    assert np.abs(p.C).max() < 1e3


def test_costs_and_ranks_in_the_pivoted_currency():
    assert pivoted_breakeven_rank(384, 1536) == 383
    for m, n in [(384, 384), (384, 1536), (30522, 384), (7, 3)]:
        assert pivoted_params(m, n, min(m, n)) == m * n  # break-even exactly at full rank
        assert pivoted_params(m, n, min(m, n) - 1) < m * n
        assert pivoted_rank_for_keep(m, n, 1.0) == min(m, n)
        for keep in (0.9, 0.75, 0.5, 0.25, 0.05):
            r = pivoted_rank_for_keep(m, n, keep)
            budget = int(np.floor(keep * m * n + 1e-9))
            assert pivoted_params(m, n, r) <= budget < pivoted_params(m, n, r + 1) or r == min(m, n)
            assert r >= rank_for_keep(m, n, keep)  # never less rank than A·B at the same keep
            # the keep of a rank maps back to that rank (the allocation passes keeps around)
            assert r == 0 or pivoted_rank_for_keep(m, n, pivoted_params(m, n, r) / (m * n)) == r
    assert pivoted_rank_for_keep(384, 384, 0.75) == 192  # square at 0.75: n/2 (A·B: 0.375·n = 144)
    assert rank_for_keep(384, 384, 0.75) == 144
    assert pivoted_rank_for_keep(64, 64, 0.75, multiple=8) == 32
    assert pivoted_rank_for_budget(10, 10, 5) == 0
    assert pivoted_rank_for_budget(10, 10, 100, k=3) == 7
    assert pivoted_params(10, 10, 7, k=3) == 30 + 7 * 10


def test_whitened_factors_pivot_exactly():
    rng = np.random.default_rng(0)
    W = graphs.matrix(32, 24, seed=5)
    X = rng.standard_normal((200, 32)) * np.linspace(0.1, 3, 32)
    f = weighted_lmf(W, 10, X.T @ X)
    p = pivot_factors(f.A, f.B, f.residual_sq, f.total_sq)
    np.testing.assert_allclose(p.reconstruct(), f.A @ f.B, atol=1e-9)


def test_hmf_with_pivots_spends_the_budget_on_rank():
    W = graphs.matrix(64, 48, seed=2, decay=0.95)
    budget = int(0.6 * W.size)
    plain = hmf(W, budget, axis="columns")
    piv = hmf(W, budget, axis="columns", pivoted=True)
    pf = pivot_hybrid(piv.D, piv.dense_idx, piv.rest_idx, piv.A, piv.B, piv.residual_sq, piv.total_sq)
    assert pf.params == pivoted_params(64, 48, piv.rank, piv.k) <= budget
    assert piv.rank > plain.rank and piv.residual_sq < plain.residual_sq
    np.testing.assert_allclose(pf.reconstruct(), piv.reconstruct(), atol=1e-9)
    np.testing.assert_array_equal(pf.F[:, : pf.k], W[:, piv.dense_idx])  # dense columns bit-exact
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 64))
    wh = whitened_hmf(W, budget, X.T @ X, pivoted=True)
    assert pivoted_params(64, 48, wh.rank, wh.k) <= budget
