"""Low-rank matrix factorization (LMF) by truncated SVD.

For W (m×n) with SVD W = U·diag(σ)·Vᵀ, the best rank-r approximation in the Frobenius and
spectral norms (Eckart–Young) is W_r = U_r·diag(σ_r)·V_rᵀ, and

    ‖W − W_r‖_F² = Σ_{i>r} σ_i².

We store it as W_r = A·B with A = U_r·diag(√σ_r) (m×r) and B = diag(√σ_r)·V_rᵀ (r×n): the
singular values are split evenly so both factors have the same scale, which keeps fp16/int8
storage of the factors well conditioned.

Pure numpy/scipy: nothing here knows about ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = [
    "LowRankFactors",
    "truncated_svd",
    "lmf",
    "lmf_params",
    "breakeven_rank",
    "rank_for_keep",
    "round_rank",
]

# Below this many columns (min side) a full LAPACK SVD is cheap and exact.
_FULL_SVD_MAX_SIDE = 1536
# Very tall (or wide) matrices, such as embedding tables: SVD through the small Gram matrix.
_GRAM_MIN_ASPECT = 8
_GRAM_MIN_SIZE = 1 << 22
_GRAM_CHUNK_ROWS = 8192


def _gram_svd(W: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """SVD of a tall W (m ≫ n) from the n×n Gram matrix G = WᵀW = V·diag(σ²)·Vᵀ.

    G is accumulated in float64 over row chunks, so memory stays O(n² + m·r) instead of the
    O(m·n) float64 copy and workspace of a direct SVD. U_r = W·V_r·diag(1/σ_r). σ_i is
    accurate to about ε·σ_1²/σ_i, ample for truncation of float32 weights; directions with
    σ_i ≤ 1e-7·σ_1 are not used (their U columns would be noise) and count as discarded.
    """
    if W.shape[0] < W.shape[1]:
        U, s, Vt, exact = _gram_svd(W.T, rank)
        return Vt.T, s, U.T, exact
    m, n = W.shape
    G = np.zeros((n, n))
    for i in range(0, m, _GRAM_CHUNK_ROWS):
        c = W[i : i + _GRAM_CHUNK_ROWS].astype(np.float64)
        G += c.T @ c
    evals, V = np.linalg.eigh(G)
    order = np.argsort(evals)[::-1]
    s = np.sqrt(np.clip(evals[order], 0.0, None))
    V = V[:, order]
    usable = int(np.sum(s > 1e-7 * s[0])) if s.size and s[0] > 0 else 0
    r = min(rank, usable)
    U = np.empty((m, r))
    for i in range(0, m, _GRAM_CHUNK_ROWS):
        U[i : i + _GRAM_CHUNK_ROWS] = W[i : i + _GRAM_CHUNK_ROWS].astype(np.float64) @ V[:, :r]
    U /= s[:r]
    return U, s, V[:, :r].T, True


@dataclass(frozen=True)
class LowRankFactors:
    """W ≈ A @ B.  ``sigma`` holds all singular values that were computed (descending)."""

    A: np.ndarray  # (m, r)
    B: np.ndarray  # (r, n)
    sigma: np.ndarray  # singular values, at least the first r
    residual_sq: float  # ‖W − A·B‖_F² (exact when the full spectrum was computed)
    total_sq: float  # ‖W‖_F²

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def params(self) -> int:
        return self.A.size + self.B.size

    @property
    def relative_error(self) -> float:
        """‖W − A·B‖_F / ‖W‖_F."""
        return float(np.sqrt(self.residual_sq / self.total_sq)) if self.total_sq > 0 else 0.0


def lmf_params(m: int, n: int, r: int) -> int:
    """Parameters of a rank-r factorization of an m×n matrix: r·(m+n)."""
    return r * (m + n)


def breakeven_rank(m: int, n: int) -> int:
    """Largest r with r·(m+n) < m·n, i.e. the largest rank that still saves parameters."""
    return max(0, (m * n - 1) // (m + n))


def round_rank(r: int, multiple: int) -> int:
    """Round r down to a multiple of ``multiple`` (but never below ``multiple`` when r ≥ 1)."""
    if multiple <= 1 or r <= 0:
        return r
    return max(multiple, (r // multiple) * multiple)


def rank_for_keep(m: int, n: int, keep: float, multiple: int = 1) -> int:
    """Rank whose factors hold at most ``keep`` of the m·n parameters: ⌊keep·m·n/(m+n)⌋.

    Rounded down to ``multiple``. Returns 0 when even rank ``multiple`` would not fit.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    r = int(np.floor(keep * m * n / (m + n) + 1e-9))
    if multiple > 1:
        r = (r // multiple) * multiple
    return max(r, 0)


def truncated_svd(
    W: np.ndarray, rank: int, *, seed: int = 0, oversample: int = 16, power_iters: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Top-``rank`` singular triplets of W: (U_r, σ, V_rᵀ, exact).

    Small matrices, or ranks that are a large part of the smaller side, use a full LAPACK SVD
    (gesdd) and return every singular value (``exact=True``). Otherwise a randomized range
    finder (Halko–Martinsson–Tropp) with ``power_iters`` subspace iterations and QR
    re-orthonormalisation computes only the leading ``rank + oversample`` directions.
    """
    W = np.asarray(W)
    m, n = W.shape
    k = min(m, n)
    rank = int(min(rank, k))
    if max(m, n) >= _GRAM_MIN_ASPECT * k and m * n >= _GRAM_MIN_SIZE and k <= _FULL_SVD_MAX_SIDE:
        return _gram_svd(W, rank)
    if k <= _FULL_SVD_MAX_SIDE or rank + oversample >= k // 3:
        W64 = W.astype(np.float64, copy=False)
        try:
            U, s, Vt = scipy.linalg.svd(W64, full_matrices=False, lapack_driver="gesdd", check_finite=False)
        except np.linalg.LinAlgError:  # gesdd can fail to converge on nasty inputs
            U, s, Vt = scipy.linalg.svd(W64, full_matrices=False, lapack_driver="gesvd", check_finite=False)
        return U[:, :rank], s, Vt[:rank], True

    rng = np.random.default_rng(seed)
    W64 = W.astype(np.float64, copy=False)
    transpose = m < n  # work on the tall orientation
    M = W64.T if transpose else W64
    p = min(rank + oversample, k)
    Q = np.linalg.qr(M @ rng.standard_normal((M.shape[1], p)))[0]
    for _ in range(power_iters):
        Q = np.linalg.qr(M.T @ Q)[0]
        Q = np.linalg.qr(M @ Q)[0]
    Ub, s, Vt = scipy.linalg.svd(Q.T @ M, full_matrices=False, check_finite=False)
    U = Q @ Ub
    if transpose:
        U, Vt = Vt.T, U.T
    return U[:, :rank], s, Vt[:rank], False


def lmf(W: np.ndarray, rank: int, *, seed: int = 0) -> LowRankFactors:
    """Best rank-``rank`` factorization W ≈ A·B with √σ on each factor (float64 factors)."""
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {W.shape}")
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    U, s, Vt, exact = truncated_svd(W, rank, seed=seed)
    r = U.shape[1]
    root = np.sqrt(s[:r])
    A = np.multiply(U, root, out=U)  # in place: U is ours, and tall
    B = root[:, None] * Vt
    if exact:  # the full spectrum is known: ‖W‖² = Σσ², no float64 copy of W needed
        total_sq = float(np.sum(s**2))
        residual_sq = float(np.sum(s[r:] ** 2))
    else:
        # ‖W − U_r U_rᵀ W‖² = ‖W‖² − Σ_{i≤r} σ_i² for the computed (orthonormal) U_r.
        total_sq = sum(float(np.sum(np.square(c, dtype=np.float64))) for c in np.array_split(W, max(1, W.shape[0] // 4096)))
        residual_sq = max(total_sq - float(np.sum(s[:r] ** 2)), 0.0)
    return LowRankFactors(A=A, B=B, sigma=s, residual_sq=residual_sq, total_sq=total_sq)
