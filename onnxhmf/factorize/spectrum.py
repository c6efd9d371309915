"""Singular values only, and the rank that holds a given share of a matrix's spectral energy.

For W (m×n) with singular values σ_1 ≥ … ≥ σ_k (k = min(m, n)), the energy of the best rank-r
approximation is E(r) = Σ_{i≤r} σ_i² (Eckart–Young), out of ‖W‖_F² = Σ_i σ_i². The rank for a
share q is

    r_q = min { r : Σ_{i≤r} σ_i² ≥ q·Σ_i σ_i² },

so the rank-r_q truncation has relative Frobenius error ‖W − W_r‖_F / ‖W‖_F ≤ √(1 − q).

Pure numpy/scipy: nothing here knows about ONNX.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

__all__ = ["singular_values", "energy_rank", "GRAM_ASPECT", "GRAM_CHUNK_ROWS"]

# Tall (or wide) matrices: σ² from the eigenvalues of the small-side Gram matrix.
GRAM_ASPECT = 4
GRAM_CHUNK_ROWS = 8192


def singular_values(W: np.ndarray) -> np.ndarray:
    """All min(m, n) singular values of W, descending (float64).

    Near-square W: LAPACK singular values only (scipy.linalg.svdvals, no vectors).
    Tall W (long side ≥ GRAM_ASPECT × short side): σ_i = √λ_i(G) with G = WᵀW (short side
    squared, accumulated in float64 over row chunks, so memory is O(n²)); σ_i is accurate to
    about ε·σ_1²/σ_i, which only blurs directions far below any rank one would keep.
    """
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {W.shape}")
    if W.size == 0:
        return np.zeros(0)
    if W.shape[0] < W.shape[1]:
        W = W.T
    m, n = W.shape
    if m >= GRAM_ASPECT * n:
        G = np.zeros((n, n))
        for i in range(0, m, GRAM_CHUNK_ROWS):
            c = W[i : i + GRAM_CHUNK_ROWS].astype(np.float64)
            G += c.T @ c
        lam = scipy.linalg.eigvalsh(G, check_finite=False)
        return np.sqrt(np.clip(lam[::-1], 0.0, None))
    try:
        return scipy.linalg.svdvals(W.astype(np.float64, copy=False), check_finite=False)
    except np.linalg.LinAlgError:  # gesdd can fail to converge on nasty inputs
        return scipy.linalg.svd(W.astype(np.float64), compute_uv=False, lapack_driver="gesvd", check_finite=False)


def energy_rank(sigma: np.ndarray, share: float) -> int:
    """Smallest r with Σ_{i≤r} σ_i² ≥ share·Σ_i σ_i² (0 for an all-zero spectrum)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    e = np.cumsum(np.square(np.sort(np.asarray(sigma, np.float64))[::-1]))
    if e.size == 0 or e[-1] <= 0:
        return 0
    # a relative slack of 1e-12 keeps share=1 from failing on rounding in the cumulative sum
    return int(min(np.searchsorted(e, share * e[-1] * (1 - 1e-12)) + 1, e.size))
