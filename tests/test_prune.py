"""Magnitude pruning: exact sparsity, optimality, deterministic ties, CSR accounting."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxhmf.factorize.prune import magnitude_prune


def nonzero_matrix(m, n, seed, dtype=np.float32):
    W = np.random.default_rng(seed).standard_normal((m, n)).astype(dtype)
    W[W == 0] = 1.0
    return W


@settings(max_examples=80, deadline=None)
@given(m=st.integers(1, 30), n=st.integers(1, 30), frac=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_keeps_exactly_and_is_optimal(m, n, frac, seed):
    W = nonzero_matrix(m, n, seed)
    keep = int(round(frac * W.size))
    p = magnitude_prune(W, keep)
    assert p.W.shape == W.shape and p.W.dtype == W.dtype
    assert p.nnz == keep == np.count_nonzero(p.W)
    kept = p.W != 0
    np.testing.assert_array_equal(p.W[kept], W[kept])  # kept values untouched
    assert np.abs(W[kept]).min(initial=np.inf) >= np.abs(W[~kept]).max(initial=0)  # largest kept
    sq = np.sort(np.square(W.astype(np.float64)).ravel())
    optimal = float(np.sum(sq[: W.size - keep]))  # the smallest squares are the ones dropped
    assert p.residual_sq == pytest.approx(optimal, rel=1e-12, abs=1e-300)
    assert float(np.sum((W.astype(np.float64) - p.W) ** 2)) == pytest.approx(p.residual_sq, rel=1e-12, abs=1e-300)
    assert p.total_sq == pytest.approx(float(sq.sum()), rel=1e-12)


def test_ties_are_broken_by_lowest_flat_index():
    W = np.array([[1.0, -2.0, 2.0], [2.0, -1.0, -2.0]], dtype=np.float32)
    p = magnitude_prune(W, 2)
    np.testing.assert_array_equal(p.W, [[0, -2, 2], [0, 0, 0]])
    p = magnitude_prune(W, 3)
    np.testing.assert_array_equal(p.W, [[0, -2, 2], [2, 0, 0]])
    # deterministic across calls
    np.testing.assert_array_equal(magnitude_prune(W, 5).W, magnitude_prune(W, 5).W)


def test_extremes_and_dtypes():
    W = nonzero_matrix(7, 5, seed=1, dtype=np.float16)
    full = magnitude_prune(W, W.size + 10)
    np.testing.assert_array_equal(full.W, W)
    assert full.residual_sq == 0.0 and full.relative_error == 0.0 and full.density == 1.0
    none = magnitude_prune(W, 0)
    assert none.nnz == 0 and not np.any(none.W) and none.relative_error == pytest.approx(1.0)
    assert none.W.dtype == np.float16


def test_existing_zeros_are_not_counted():
    W = np.array([[0.0, 3.0], [0.0, 0.0]], dtype=np.float32)
    p = magnitude_prune(W, 3)
    assert p.nnz == 1 and p.residual_sq == 0.0


def test_sparse_bytes_is_csr():
    W = nonzero_matrix(10, 20, seed=2)
    p = magnitude_prune(W, 37)
    assert p.sparse_bytes() == 37 * (4 + 4) + (10 + 1) * 4
    assert p.sparse_bytes(value_bytes=2, index_bytes=2) == 37 * 4 + 11 * 2


def test_validation():
    W = nonzero_matrix(3, 3, seed=0)
    with pytest.raises(ValueError):
        magnitude_prune(W, -1)
    with pytest.raises(ValueError):
        magnitude_prune(W.ravel(), 2)
    W[1, 1] = np.nan
    with pytest.raises(ValueError):
        magnitude_prune(W, 2)
