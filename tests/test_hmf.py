"""HMF math on plain matrices: accounting, Eckart–Young on the low-rank block, the (k, r) search."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxhmf.factorize.hmf as hmf_mod
from onnxhmf.factorize.hmf import HybridFactors, hmf, hmf_fixed, hmf_params
from onnxhmf.factorize.svd import lmf

from graphs import matrix


def rest_block(W: np.ndarray, f: HybridFactors) -> np.ndarray:
    return W[:, f.rest_idx] if f.axis == 1 else W[f.rest_idx, :]


def discarded_sq(Y: np.ndarray, r: int) -> float:
    """Σ_{i>r} σ_i(Y)² from numpy's SVD."""
    if Y.size == 0:
        return 0.0
    s = np.linalg.svd(Y.astype(np.float64), compute_uv=False)
    return float(np.sum(s[r:] ** 2))


def check_structure(W: np.ndarray, f: HybridFactors) -> None:
    m, n = W.shape
    side = n if f.axis == 1 else m
    assert f.shape == (m, n)
    assert f.dense_idx.dtype == np.int64 and f.rest_idx.dtype == np.int64
    assert np.all(np.diff(f.dense_idx) > 0) and np.all(np.diff(f.rest_idx) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([f.dense_idx, f.rest_idx])), np.arange(side))
    k, r = f.k, f.rank
    if f.axis == 1:
        assert f.D.shape == (m, k) and f.A.shape == (m, r) and f.B.shape == (r, n - k)
        np.testing.assert_array_equal(f.D, W[:, f.dense_idx])
    else:
        assert f.D.shape == (k, n) and f.A.shape == (m - k, r) and f.B.shape == (r, n)
        np.testing.assert_array_equal(f.D, W[f.dense_idx, :])
    assert f.D.dtype == W.dtype
    assert f.params == f.D.size + f.A.size + f.B.size == hmf_params(m, n, k, r, f.axis)


def test_hmf_params_formula():
    assert hmf_params(10, 20, 0, 3) == 3 * 30  # k = 0 is LMF
    assert hmf_params(10, 20, 20, 0) == 200  # all columns dense
    assert hmf_params(10, 20, 4, 3, axis=1) == 10 * 4 + 3 * (10 + 16)
    assert hmf_params(10, 20, 4, 3, axis=0) == 4 * 20 + 3 * (6 + 20)
    with pytest.raises(ValueError):
        hmf_params(10, 20, 1, 1, axis=2)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 24), frac=st.floats(0.0, 1.2), axis=st.sampled_from(["auto", "columns", "rows"]),
       seed=st.integers(0, 10_000))
def test_budget_accounting_and_block_error(m, n, frac, axis, seed):
    W = np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)
    W[:, :: max(1, n // 3)] *= 4.0  # uneven columns, so dense columns are worth something
    P = int(frac * m * n)
    f = hmf(W, P, axis=axis)
    check_structure(W, f)
    assert f.params <= P
    if axis != "auto":
        assert f.axis == (1 if axis == "columns" else 0)
    W64 = W.astype(np.float64)
    total = float(np.sum(W64**2))
    assert f.total_sq == pytest.approx(total, rel=1e-9)
    # Reported error = discarded σ² of the low-rank block (Eckart–Young) = actual error.
    tol = 1e-9 * total + 1e-12
    assert f.residual_sq == pytest.approx(discarded_sq(rest_block(W, f), f.rank), rel=1e-6, abs=tol)
    assert float(np.sum((W64 - f.reconstruct()) ** 2)) == pytest.approx(f.residual_sq, rel=1e-6, abs=tol)
    # Never worse than plain LMF with the same budget (k = 0 is always a candidate).
    r0 = min(P // (m + n), m, n)
    lmf_sq = lmf(W, r0).residual_sq if r0 >= 1 else total
    assert f.residual_sq <= lmf_sq * (1 + 1e-9) + tol


@pytest.mark.parametrize("axis", ["auto", "columns", "rows"])
@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (1, 7), (7, 1)])
def test_exact_at_full_budget(shape, axis):
    W = matrix(*shape, seed=4, decay=0.99)
    f = hmf(W, W.size, axis=axis)
    assert f.residual_sq == 0.0 and f.relative_error == 0.0
    assert np.max(np.abs(f.reconstruct() - W)) <= 1e-5
    assert f.params <= W.size
    check_structure(W, f)


@pytest.mark.parametrize("axis", [1, 0])
def test_hmf_fixed_keeps_dense_bit_exact(axis):
    W = matrix(40, 30, seed=2, decay=0.8)
    W = W + np.random.default_rng(0).standard_normal(W.shape).astype(np.float32) * 1e-3
    idx = [17, 3, 25, 9] if axis == 1 else [39, 0, 12]
    f = hmf_fixed(W, idx, 5, axis=axis)
    check_structure(W, f)
    np.testing.assert_array_equal(f.dense_idx, np.sort(idx))
    Wh = f.reconstruct()
    if axis == 1:
        np.testing.assert_array_equal(Wh[:, f.dense_idx], W[:, f.dense_idx].astype(np.float64))
    else:
        np.testing.assert_array_equal(Wh[f.dense_idx, :], W[f.dense_idx, :].astype(np.float64))
    assert f.rank == 5
    assert f.residual_sq == pytest.approx(discarded_sq(rest_block(W, f), 5), rel=1e-8)
    assert float(np.sum((W.astype(np.float64) - Wh) ** 2)) == pytest.approx(f.residual_sq, rel=1e-6)
    # √σ on each factor, as in svd.lmf: column norms of A = row norms of B = √σ_i.
    np.testing.assert_allclose(np.linalg.norm(f.A, axis=0), np.linalg.norm(f.B, axis=1), rtol=1e-8)
    s = np.linalg.svd(rest_block(W, f).astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(f.A, axis=0) ** 2, s[:5], rtol=1e-8)


def test_hmf_fixed_edges_and_validation():
    W = matrix(12, 10, seed=1)
    f = hmf_fixed(W, [], 10)  # no dense columns, full rank: exact LMF
    assert f.k == 0 and np.max(np.abs(f.reconstruct() - W)) < 1e-5
    f = hmf_fixed(W, np.arange(10), 3)  # everything dense
    assert f.rank == 0 and f.residual_sq == 0.0 and f.params == W.size
    f = hmf_fixed(W, [1, 2], 0)  # rank 0: the rest is zero
    assert f.rank == 0 and f.residual_sq == pytest.approx(float(np.sum(np.delete(W, [1, 2], axis=1).astype(np.float64) ** 2)))
    assert hmf_fixed(W, [0], 50).rank == 9  # capped at the rest's smaller side
    with pytest.raises(ValueError):
        hmf_fixed(W, [1, 1], 2)
    with pytest.raises(ValueError):
        hmf_fixed(W, [10], 2)
    with pytest.raises(ValueError):
        hmf_fixed(W, [0], 2, axis=2)
    with pytest.raises(ValueError):
        hmf(W[0], 10)
    with pytest.raises(ValueError):
        hmf(W, -1)


def outlier_columns(m=64, n=128, n_out=8, scale=4.0, seed=0):
    """A decaying-spectrum W plus a few large, unstructured columns (uneven column norms)."""
    rng = np.random.default_rng(seed)
    W = matrix(m, n, seed=seed, decay=0.93).astype(np.float64)
    cols = np.sort(rng.choice(n, n_out, replace=False))
    W[:, cols] += scale * rng.standard_normal((m, n_out)) / np.sqrt(m) * 3.0
    return W.astype(np.float32), cols


def lognormal_columns(m=48, n=96, sd=1.0, seed=0):
    """A decaying-spectrum W with log-normally scaled columns (uneven column norms, like FFN units)."""
    rng = np.random.default_rng(seed)
    return matrix(m, n, seed=seed, decay=0.95) * np.exp(sd * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.7])
def test_beats_fixed_half_split_and_lmf_on_outlier_columns(keep, monkeypatch):
    W, cols = outlier_columns()
    m, n = W.shape
    P = int(keep * m * n)
    f = hmf(W, P)
    half = hmf(W, P, axis="columns", k_candidates=[(P // 2) // m])
    plain = lmf(W, P // (m + n))
    assert f.params <= P and half.params <= P
    assert f.relative_error < 0.9 * half.relative_error
    assert f.relative_error < 0.75 * plain.relative_error
    # The outlier columns are exactly the ones it keeps dense (no more: k is small, not half).
    assert f.axis == 1 and set(cols) <= set(f.dense_idx.tolist()) and f.k < (P // 2) // m
    # Pure residual scoring misses them: outliers hold the top directions, so they fit well.
    monkeypatch.setattr(hmf_mod, "_LEVERAGE_WEIGHT", 0.0)
    assert hmf(W, P).relative_error > 1.15 * f.relative_error


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beats_fixed_half_split_and_lmf_on_lognormal_columns(seed):
    W = lognormal_columns(seed=seed)
    m, n = W.shape
    for keep in (0.3, 0.5, 0.7):
        P = int(keep * m * n)
        f = hmf(W, P)
        half = hmf(W, P, axis="columns", k_candidates=[(P // 2) // m])
        plain = lmf(W, P // (m + n))
        assert f.params <= P
        assert f.relative_error < 0.98 * half.relative_error  # here the best k is above half
        assert f.relative_error < 0.9 * plain.relative_error
        assert f.k != (P // 2) // m


def test_rows_mode_finds_outlier_rows_and_auto_picks_it():
    W, rows = outlier_columns(seed=3)
    W = W.T.copy()  # outliers are now rows
    P = W.size // 2
    f = hmf(W, P)
    cols_only = hmf(W, P, axis="columns")
    assert f.axis == 0 and set(rows) <= set(f.dense_idx.tolist())
    assert f.residual_sq < 0.8 * cols_only.residual_sq
    assert f.residual_sq == pytest.approx(hmf(W, P, axis="rows").residual_sq, rel=1e-12)


def test_low_rank_matrix_needs_no_dense_columns():
    W = matrix(50, 40, seed=5, true_rank=6)
    f = hmf(W, 6 * 90)
    assert f.k == 0 and f.rank == 6
    assert np.max(np.abs(f.reconstruct() - W)) < 1e-5


def test_k_candidates_restrict_the_split():
    W, _ = outlier_columns(seed=1)
    P = W.size // 2
    f = hmf(W, P, axis="columns", k_candidates=[5, 20, 10_000])
    assert f.k in (5, 20)
    with pytest.raises(ValueError):
        hmf(W, P, axis="columns", k_candidates=[10_000])


def test_refine_round_never_hurts():
    better = 0
    for seed in range(4):
        W = lognormal_columns(seed=seed, sd=1.2)
        P = int(0.6 * W.size)
        f0 = hmf(W, P, refine_rounds=0)
        f1 = hmf(W, P, refine_rounds=1)
        assert f1.residual_sq <= f0.residual_sq * (1 + 1e-12)
        assert f1.params <= P and f1.k == f0.k
        better += f1.residual_sq < f0.residual_sq * (1 - 1e-6)
    assert better >= 1  # and it does improve something


def test_zero_budget_and_determinism():
    W = matrix(20, 16, seed=6)
    f = hmf(W, 0)
    assert f.params == 0 and f.rank == 0 and f.k == 0
    assert f.residual_sq == pytest.approx(f.total_sq) and f.relative_error == pytest.approx(1.0)
    assert np.all(f.reconstruct() == 0)
    a, b = hmf(W, 150), hmf(W, 150)
    np.testing.assert_array_equal(a.dense_idx, b.dense_idx)
    np.testing.assert_array_equal(a.A, b.A)


def test_chunked_gram_matches_unchunked(monkeypatch):
    """Tall and wide matrices (embedding tables) take the chunked path: same answer."""
    for shape, axis in (((90, 12), "rows"), ((12, 90), "columns"), ((90, 12), "auto")):
        W = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
        W[:: 9, :] *= 5.0
        P = W.size // 3
        ref = hmf(W, P, axis=axis)
        with monkeypatch.context() as mp:
            mp.setattr(hmf_mod, "_CHUNK", 7)
            got = hmf(W, P, axis=axis)
            fixed = hmf_fixed(W, ref.dense_idx, ref.rank, axis=ref.axis)
        assert (got.axis, got.k, got.rank) == (ref.axis, ref.k, ref.rank)
        np.testing.assert_array_equal(got.dense_idx, ref.dense_idx)
        assert got.residual_sq == pytest.approx(ref.residual_sq, rel=1e-9)
        np.testing.assert_allclose(got.reconstruct(), ref.reconstruct(), atol=1e-9)
        assert fixed.residual_sq == pytest.approx(ref.residual_sq, rel=1e-9)


def test_large_matrix_path(monkeypatch):
    """Above _EXACT_MAX_SIDE: randomized SVD and bound scoring; still within budget, never
    worse than LMF, and the reported error is the actual error."""
    monkeypatch.setattr(hmf_mod, "_EXACT_MAX_SIDE", 8)
    W, cols = outlier_columns(m=48, n=96, seed=2)
    for keep in (0.3, 0.6):
        P = int(keep * W.size)
        f = hmf(W, P)
        check_structure(W, f)
        assert f.params <= P
        actual = float(np.sum((W.astype(np.float64) - f.reconstruct()) ** 2))
        assert actual == pytest.approx(f.residual_sq, rel=1e-6)
        assert f.residual_sq <= lmf(W, P // sum(W.shape)).residual_sq * (1 + 1e-9)
    assert set(cols) <= set(f.dense_idx.tolist())
