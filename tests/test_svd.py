"""LMF math on plain matrices: Eckart–Young error, √σ split, rank planning."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxhmf.factorize.svd import breakeven_rank, lmf, lmf_params, rank_for_keep, round_rank, truncated_svd

from graphs import matrix


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), r=st.integers(1, 40), seed=st.integers(0, 1000))
def test_error_equals_discarded_singular_values(m, n, r, seed):
    W = np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)
    f = lmf(W, r)
    s = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    k = min(r, m, n)
    assert f.rank == k
    actual = np.sum((W.astype(np.float64) - f.A @ f.B) ** 2)
    assert f.residual_sq == pytest.approx(np.sum(s[k:] ** 2), rel=1e-6, abs=1e-9)
    assert actual == pytest.approx(f.residual_sq, rel=1e-6, abs=1e-8)


def test_full_rank_is_exact_and_factors_are_balanced():
    W = matrix(30, 20, seed=3)
    f = lmf(W, 20)
    assert np.max(np.abs(f.A @ f.B - W)) < 1e-5
    # √σ on each side: column norms of A equal row norms of B (both √σ_i).
    np.testing.assert_allclose(np.linalg.norm(f.A, axis=0), np.linalg.norm(f.B, axis=1), rtol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(f.A, axis=0) ** 2, f.sigma[:20], rtol=1e-8)


def test_randomized_svd_matches_exact_on_large_matrix():
    W = matrix(2000, 1600, seed=1, decay=0.99)
    U, s, Vt, exact = truncated_svd(W, 64)
    assert not exact
    s_true = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    # A flat spectrum (σ_i = 3·0.99^i) is the hard case for a randomized range finder.
    np.testing.assert_allclose(s[:64], s_true[:64], rtol=2e-2)
    f = lmf(W, 64)
    optimal = np.sum(s_true[64:] ** 2)
    assert optimal <= f.residual_sq <= 1.01 * optimal  # within 1% of Eckart–Young
    assert np.sum((W - f.A @ f.B) ** 2) == pytest.approx(f.residual_sq, rel=1e-6)  # reported = actual


@settings(max_examples=100, deadline=None)
@given(m=st.integers(1, 5000), n=st.integers(1, 5000), keep=st.floats(0.01, 1.0), mult=st.sampled_from([1, 4, 8, 16]))
def test_rank_for_keep_respects_budget(m, n, keep, mult):
    r = rank_for_keep(m, n, keep, mult)
    assert r % mult == 0
    assert lmf_params(m, n, r) <= keep * m * n + 1e-6
    # and it is the largest such rank
    assert lmf_params(m, n, r + mult) > keep * m * n - 1e-6


def test_breakeven_and_rounding():
    assert breakeven_rank(128, 128) == 63  # 64·256 = 128·128 is not a saving
    assert lmf_params(128, 128, 63) < 128 * 128 <= lmf_params(128, 128, 64)
    assert breakeven_rank(1, 1000) == 0
    assert round_rank(37, 8) == 32 and round_rank(5, 8) == 8 and round_rank(5, 1) == 5


def test_bad_arguments():
    with pytest.raises(ValueError):
        lmf(np.zeros((3, 3, 3)), 1)
    with pytest.raises(ValueError):
        lmf(np.zeros((3, 3)), 0)
    with pytest.raises(ValueError):
        rank_for_keep(10, 10, 1.5)
