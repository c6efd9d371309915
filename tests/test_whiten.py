"""Whitened (data-aware) factorization: optimal output error, against independent solutions."""
import numpy as np
import pytest
import scipy.optimize

from onnxhmf.factorize.allocate import Option, allocate
from onnxhmf.factorize.svd import lmf
from onnxhmf.factorize.whiten import (
    reconstruct_rank,
    sequential_target,
    shared_basis_lmf,
    weighted_lmf,
    whitened_hmf,
    whitened_spectrum,
    whitener,
)


def _data(seed, tokens=200, m=12, n=9):
    rng = np.random.default_rng(seed)
    # correlated, anisotropic activations: a few directions dominate, as in real layers
    X = rng.standard_normal((tokens, m)) @ (rng.standard_normal((m, m)) * np.logspace(0, -2, m))
    W = rng.standard_normal((m, n))
    return X, W


def out_err(X, W, Wp):
    return float(np.linalg.norm(X @ (W - Wp)) ** 2)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("r", [1, 3, 6])
def test_whitened_lmf_is_optimal_by_qr_route(seed, r):
    """min ‖X(W − W′)‖ over rank-r W′: X = Q·R, so it is R⁻¹·trunc_r(R·W). Same value, and
    the truncation cost is exactly the discarded σ²."""
    X, W = _data(seed)
    f = weighted_lmf(W, r, X.T @ X, damp=0.0)
    R = np.linalg.qr(X, mode="r")
    U, s, Vt = np.linalg.svd(R @ W, full_matrices=False)
    Wq = np.linalg.solve(R, (U[:, :r] * s[:r]) @ Vt[:r])
    assert out_err(X, W, f.A @ f.B) == pytest.approx(out_err(X, W, Wq), rel=1e-7)
    assert f.residual_sq == pytest.approx(out_err(X, W, f.A @ f.B), rel=1e-7)
    assert f.residual_sq == pytest.approx(float(np.sum(s[r:] ** 2)), rel=1e-7)
    # and it beats plain SVD on the output error (which is optimal only for ‖W − W′‖)
    p = lmf(W, r)
    assert out_err(X, W, f.A @ f.B) <= out_err(X, W, p.A @ p.B) * (1 + 1e-9)


def test_whitened_lmf_beats_local_search():
    """No rank-2 (A, B) found by BFGS from many starts has a lower output error."""
    X, W = _data(7, tokens=60, m=5, n=4)
    r = 2
    best = out_err(X, W, (lambda f: f.A @ f.B)(weighted_lmf(W, r, X.T @ X, damp=0.0)))
    rng = np.random.default_rng(0)

    def loss(v):
        A, B = v[: 5 * r].reshape(5, r), v[5 * r :].reshape(r, 4)
        return out_err(X, W, A @ B)

    found = min(scipy.optimize.minimize(loss, rng.standard_normal(5 * r + r * 4), method="BFGS").fun for _ in range(20))
    assert found >= best * (1 - 1e-6)
    assert found <= best * 1.01  # the search is good enough to have found the optimum


def test_rank_deficient_gram_is_handled():
    """Calibration data spanning only 3 of 8 input directions: the damped whitener is finite and
    the output error on that data is as small as the rank allows."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((50, 3)) @ rng.standard_normal((3, 8))
    W = rng.standard_normal((8, 6))
    f = weighted_lmf(W, 3, X.T @ X)
    assert np.all(np.isfinite(f.A)) and np.all(np.isfinite(f.B))
    # X·W has rank 3, so a rank-3 W′ can reproduce it almost exactly
    assert out_err(X, W, f.A @ f.B) < 1e-3 * float(np.linalg.norm(X @ W) ** 2)


def test_row_weights_and_two_sided_weights():
    rng = np.random.default_rng(2)
    E = rng.standard_normal((30, 6))
    w = rng.integers(0, 20, 30).astype(float)
    f = weighted_lmf(E, 2, w, damp=0.0 + 1e-12)
    # equals the plain truncation of diag(√w)·E, un-weighted
    sw = np.sqrt(w + 1e-12 * w.mean())
    U, s, Vt = np.linalg.svd(sw[:, None] * E, full_matrices=False)
    np.testing.assert_allclose(sw[:, None] * (f.A @ f.B), (U[:, :2] * s[:2]) @ Vt[:2], atol=1e-8)
    # two-sided: ‖D^½ (E − E′) S‖ with a column Gram too
    H = rng.standard_normal((40, 6))
    g = weighted_lmf(E, 2, w, H.T @ H, damp=1e-12)
    Lw, Rw = whitener(w, 1e-12), whitener(H.T @ H, 1e-12)
    M = Lw.apply(E) @ Rw.St.T
    s2 = np.linalg.svd(M, compute_uv=False)
    assert g.residual_sq == pytest.approx(float(np.sum(s2[2:] ** 2)), rel=1e-6)
    resid = Lw.apply(E - g.A @ g.B) @ Rw.St.T
    assert float(np.sum(resid**2)) == pytest.approx(g.residual_sq, rel=1e-6)


def test_spectrum_reconstruction_matches_factors():
    X, W = _data(3)
    spec = whitened_spectrum(W, X.T @ X)
    for r in (1, 4):
        f = weighted_lmf(W, r, X.T @ X)
        np.testing.assert_allclose(reconstruct_rank(spec, r), f.A @ f.B, atol=1e-8)


def test_whitened_hmf_keeps_columns_and_beats_whitened_lmf():
    X, W = _data(4, m=16, n=16)
    W[:, 3] *= 8  # an outlier output unit
    budget = int(0.5 * W.size)
    hf = whitened_hmf(W, budget, X.T @ X, damp=0.0)
    assert hf.params <= budget
    np.testing.assert_array_equal(hf.reconstruct()[:, hf.dense_idx], W[:, hf.dense_idx])
    assert hf.residual_sq == pytest.approx(out_err(X, W, hf.reconstruct()), rel=1e-6)
    lf = weighted_lmf(W, budget // 32, X.T @ X, damp=0.0)
    assert hf.residual_sq <= lf.residual_sq * (1 + 1e-9)


def test_sequential_target_corrects_the_prefix_error():
    """If the compressed prefix distorts X, W* applied to X_c reproduces X_o·W better than W."""
    rng = np.random.default_rng(5)
    Xo = rng.standard_normal((300, 10))
    Xc = Xo @ (np.eye(10) + 0.2 * rng.standard_normal((10, 10)))  # the prefix's error
    W = rng.standard_normal((10, 7))
    Ws = sequential_target(W, Xc.T @ Xc, Xc.T @ Xo, damp=0.0)
    lsq = np.linalg.lstsq(Xc, Xo @ W, rcond=None)[0]
    np.testing.assert_allclose(Ws, lsq, atol=1e-8)
    assert np.linalg.norm(Xc @ Ws - Xo @ W) < 0.5 * np.linalg.norm(Xc @ W - Xo @ W)


def test_shared_basis_exact_at_full_rank_and_joint_objective():
    X, _ = _data(6, m=8)
    rng = np.random.default_rng(6)
    Ws = [rng.standard_normal((8, n)) for n in (8, 8, 4)]
    A, Bs, _ = shared_basis_lmf(Ws, 8, X.T @ X)
    for W, B in zip(Ws, Bs):
        np.testing.assert_allclose(A @ B, W, atol=1e-9)
    A, Bs, f = shared_basis_lmf(Ws, 3, X.T @ X, damp=0.0)
    assert sum(out_err(X, W, A @ B) for W, B in zip(Ws, Bs)) == pytest.approx(f.residual_sq, rel=1e-7)


def test_allocation_respects_budget_and_beats_uniform():
    rng = np.random.default_rng(8)
    sites = []
    for i in range(6):
        params = [0, 100, 200, 300, 400]
        scale = 10.0 ** rng.uniform(-2, 1)  # sites differ a lot in sensitivity
        errs = [scale * e for e in (1.0, 0.3, 0.1, 0.02, 0.0)]
        sites.append([Option(p, e, j) for j, (p, e) in enumerate(zip(params, errs))])
    for budget in (600, 1000, 1700):
        choice = allocate(sites, budget)
        assert sum(o.cost for o in choice) <= budget
        uniform = [s[budget // 6 // 100] for s in sites]
        assert sum(o.cost for o in uniform) <= budget
        assert sum(o.error for o in choice) <= sum(o.error for o in uniform) + 1e-12
        # exhaustive check on this small problem
        import itertools

        best = min(sum(o.error for o in c) for c in itertools.product(*sites) if sum(o.cost for o in c) <= budget)
        assert sum(o.error for o in choice) == pytest.approx(best, rel=1e-9)
