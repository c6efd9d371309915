"""Pivoted low-rank storage (PIFA, "Pivoting Factorization", ICML 2025): a rank-r matrix stored
as r of its own columns and the coefficients of the others, r·(m+n−r) numbers instead of r·(m+n).

For a low-rank result W_r = A·B (A m×r, B r×n, MatMul layout in×out: y = X·W_r, so the output
features are W_r's columns), every column of W_r is a combination of r linearly independent ones.
QR with column pivoting of B (Businger–Golub) picks them:

    B[:, π] = Q·[R₁₁ R₁₂],   p = π[:r] (pivots),  q = π[r:] (the rest),
    W_p = W_r[:, p] = A·B[:, p]          (m×r, the pivot columns, stored)
    C   = R₁₁⁻¹·R₁₂                       (r×(n−r), stored),  so  B[:, q] = B[:, p]·C
    W_r[:, q] = A·B[:, q] = W_p·C         (exact: the same product as A·B)

and the layer is  y_p = X·W_p,  y_q = y_p·C,  y = [y_p, y_q] in the order (p, q), put back by the
permutation ``order`` = [p, q] (folded into consumers or undone by one gather).

Cost: m·r + r·(n−r) = r(m+n−r) < m·n for every r < min(m, n) (it equals m·n at r = min(m, n)),
so every rank saves and, at a keep κ, the rank is the smaller root of r² − (m+n)·r + κ·m·n = 0:
for a square n×n weight at κ = 0.75, r = n/2 (A·B: 0.375·n).

Conditioning: pivoting keeps |R₁₁| well conditioned (its diagonal decreases, |R₁₁[i,i]| ≥
|R[i, j]| for j > i), so C's entries stay moderate (|C| ≤ 2^r in theory, O(1)–O(10) in
practice); directions with |R₁₁[i,i]| ≤ ``tol``·|R₁₁[0,0]| are numerically absent from W_r and
dropped (the rank falls; ``residual_sq`` counts what they held).

The same applies to a hybrid's low-rank block (HMF + pivots): W[:, R] ≈ A·B over the rest
columns R is pivoted within R, and the dense columns D join the pivots in the first product:
y_1 = X·[D, W_p], y_q = y_1[..., k:]·C, cost m·k + r(m + n − k − r).

Pure numpy/scipy: nothing here knows about ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = [
    "PivotedFactors",
    "pivot_factors",
    "pivot_hybrid",
    "pivoted_params",
    "pivoted_breakeven_rank",
    "pivoted_rank_for_keep",
    "pivoted_rank_for_budget",
]

# |R₁₁[i,i]| below this share of |R₁₁[0,0]|: the direction is numerically absent from A·B.
PIVOT_TOL = 1e-7


@dataclass(frozen=True)
class PivotedFactors:
    """Ŵ (m×n) with Ŵ[:, order] = [F, F[:, k:]·C]:  F = [D, W_p] (m×(k+r)), C (r×(n−k−r)).

    k = 0 is pivoted LMF (F = W_p); k > 0 is HMF with a pivoted low-rank remainder (D the
    dense columns ``order[:k]``). ``order`` = [dense, pivots, rest] as column indices of Ŵ.
    """

    F: np.ndarray  # (m, k + r): dense columns, then pivot columns
    C: np.ndarray  # (r, n − k − r)
    order: np.ndarray  # (n,) int64 permutation
    k: int  # dense columns in front of the pivots
    residual_sq: float  # ‖W − Ŵ‖² in the source's norm (as the factorization that produced it)
    total_sq: float

    @property
    def rank(self) -> int:
        return self.F.shape[1] - self.k

    @property
    def shape(self) -> tuple[int, int]:
        return self.F.shape[0], self.order.size

    @property
    def params(self) -> int:
        return self.F.size + self.C.size

    @property
    def relative_error(self) -> float:
        return float(np.sqrt(self.residual_sq / self.total_sq)) if self.total_sq > 0 else 0.0

    @property
    def inverse(self) -> np.ndarray:
        """inv with Ŵ = [F, F[:, k:]·C][:, inv] (column j of Ŵ sits at slot inv[j])."""
        inv = np.empty(self.order.size, np.int64)
        inv[self.order] = np.arange(self.order.size)
        return inv

    def permuted(self) -> np.ndarray:
        """[F, F[:, k:]·C] (m×n, float64): Ŵ with columns in ``order``."""
        F = np.asarray(self.F, np.float64)
        return np.concatenate([F, F[:, self.k :] @ np.asarray(self.C, np.float64)], axis=1)

    def reconstruct(self) -> np.ndarray:
        """Ŵ (m×n, float64) in the original column order."""
        return self.permuted()[:, self.inverse]


def pivoted_params(m: int, n: int, r: int, k: int = 0) -> int:
    """Stored numbers of a rank-r pivoted form of an m×n matrix (k dense columns): m·k + r(m+n−k−r)."""
    return m * k + r * (m + n - k - r)


def pivoted_breakeven_rank(m: int, n: int) -> int:
    """Largest rank that still saves parameters: min(m, n) − 1 (the cost is m·n at r = min(m, n))."""
    return max(0, min(m, n) - 1)


def pivoted_rank_for_budget(m: int, n: int, budget: int, k: int = 0) -> int:
    """Largest r ≤ min(m, n − k) with m·k + r(m+n−k−r) ≤ ``budget`` (0 if none)."""
    P = int(budget) - m * k
    s = m + n - k
    cap = max(0, min(m, n - k))
    if P <= 0 or cap == 0:
        return 0
    disc = s * s - 4 * P
    r = cap if disc < 0 else int(np.floor((s - np.sqrt(disc)) / 2))
    r = max(0, min(r, cap))
    while r < cap and (r + 1) * (s - r - 1) <= P:  # exact integer check around the float root
        r += 1
    while r > 0 and r * (s - r) > P:
        r -= 1
    return r


def pivoted_rank_for_keep(m: int, n: int, keep: float, multiple: int = 1) -> int:
    """Rank whose pivoted form holds at most ``keep`` of the m·n parameters, rounded down to
    ``multiple`` (0 when even rank ``multiple`` does not fit); keep 1 gives min(m, n)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    r = pivoted_rank_for_budget(m, n, int(np.floor(keep * m * n + 1e-6)))
    if multiple > 1:
        r = (r // multiple) * multiple
    return max(r, 0)


def _pivots(B: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pivot columns p, the rest q, C) with B[:, q] = B[:, p]·C, from QR with column pivoting."""
    B = np.asarray(B, np.float64)
    r, n = B.shape
    if r == 0:
        return np.zeros(0, np.int64), np.arange(n, dtype=np.int64), np.zeros((0, n))
    _, R, piv = scipy.linalg.qr(B, mode="economic", pivoting=True, check_finite=False)
    d = np.abs(np.diag(R))
    keep = int(np.sum(d > tol * d[0])) if d.size and d[0] > 0 else 0
    p, q = piv[:keep].astype(np.int64), piv[keep:].astype(np.int64)
    if keep == 0:
        return p, q, np.zeros((0, q.size))
    C = scipy.linalg.solve_triangular(R[:keep, :keep], R[:keep, keep:], check_finite=False)
    return p, q, C


def pivot_factors(A: np.ndarray, B: np.ndarray, residual_sq: float = 0.0, total_sq: float | None = None,
                  *, tol: float = PIVOT_TOL) -> PivotedFactors:
    """The pivoted form of W_r = A·B (A m×r, B r×n): W_p = A·B[:, p], C = R₁₁⁻¹R₁₂ (see the module
    docstring). ``residual_sq``/``total_sq`` describe the factorization's error (carried over);
    directions dropped as numerically absent add their share of ‖A·B‖² to it."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    p, q, C = _pivots(B, tol)
    Wp = A @ B[:, p]
    if p.size < B.shape[0]:  # numerically rank-deficient: what the dropped directions held
        residual_sq = float(residual_sq) + float(np.sum((A @ B[:, q] - Wp @ C) ** 2))
    total = float(np.sum((A @ B) ** 2)) if total_sq is None else float(total_sq)
    return PivotedFactors(F=Wp, C=C, order=np.concatenate([p, q]), k=0, residual_sq=float(residual_sq),
                          total_sq=total)


def pivot_hybrid(D: np.ndarray, dense_idx: np.ndarray, rest_idx: np.ndarray, A: np.ndarray, B: np.ndarray,
                 residual_sq: float, total_sq: float, *, tol: float = PIVOT_TOL) -> PivotedFactors:
    """HMF with a pivoted remainder: W[:, dense_idx] = D exactly, W[:, rest_idx] ≈ A·B pivoted
    within the rest. F = [D, W_p], order = [dense_idx, rest_idx[p], rest_idx[q]]."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    p, q, C = _pivots(B, tol)
    Wp = A @ B[:, p]
    if p.size < B.shape[0]:
        residual_sq = float(residual_sq) + float(np.sum((A @ B[:, q] - Wp @ C) ** 2))
    F = np.concatenate([np.asarray(D, np.float64), Wp], axis=1)
    order = np.concatenate([np.asarray(dense_idx, np.int64), np.asarray(rest_idx, np.int64)[p],
                            np.asarray(rest_idx, np.int64)[q]])
    return PivotedFactors(F=F, C=C, order=order, k=int(len(dense_idx)), residual_sq=float(residual_sq),
                          total_sq=float(total_sq))
