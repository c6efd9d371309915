"""Data-aware (whitened) factorization: minimise the error of the layer's *output*, not of W.

For a site Y = X·W (W in×out) with calibration activations X (tokens×in), the output error of
an approximation W′ is

    ‖X·(W − W′)‖_F² = tr(Δᵀ·C·Δ),   C = XᵀX (in×in, accumulated in float64 over the data).

Write C + δ·I = S·Sᵀ with S = Q·Λ^{1/2} from C's eigendecomposition C = Q·Λ·Qᵀ (δ is a small
damping, ``damp``·mean(λ): it makes rank-deficient C invertible and keeps a little weight on
directions the calibration data never excites). Then tr(Δᵀ·C·Δ) + δ‖Δ‖² = ‖Sᵀ·Δ‖², so the best
rank-r W′ is the truncated SVD of the *whitened* matrix M = Sᵀ·W (Eckart–Young), un-whitened:

    M = U·Σ·Vᵀ,   W′ = S^{-T}·U_r·Σ_r·V_rᵀ,   A = S^{-T}·U_r·Σ_r^{1/2},   B = Σ_r^{1/2}·V_rᵀ,

and truncating σ_i costs exactly σ_i² of output error: ‖Sᵀ(W − W′)‖² = Σ_{i>r} σ_i². This is
SVD-LLM's truncation-aware whitening (they use a Cholesky factor; any S with S·Sᵀ = C gives the
same W′). Weights on the other side (Y = X·Wᵀ for a tied LM head reads the table transposed)
and row weights (an embedding table read by Gather: C = diag(token counts)) work the same way:
the objective ‖L·Δ·R‖² is minimised by truncating L·W·R.

Whitened HMF keeps whole *output columns* dense: Sᵀ acts on rows, so keeping W[:, j] exact is
keeping M[:, j] exact, and the hybrid split of M (see hmf.py) maps back column for column.

Sequential calibration (each site sees the already-compressed prefix): with X_c the compressed
model's activations and X_o the original's, min_{W′} ‖X_c·W′ − X_o·W‖² = ‖X_c·(W′ − W*)‖² + const
with the least-squares target W* = (X_cᵀX_c)^{-1}·X_cᵀX_o·W, so the site is a whitened
factorization of W* under C = X_cᵀX_c.

Shared bases: sites that read the same activation (Q, K, V) stack their weights side by side,
W = [W_1 | W_2 | …], and share the first factor A: Σ_i ‖X(W_i − A·B_i)‖² = ‖X(W − A·B)‖².

Pure numpy/scipy: nothing here knows about ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .hmf import HybridFactors, hmf
from .svd import LowRankFactors, lmf

__all__ = [
    "DEFAULT_DAMP",
    "Whitener",
    "whitener",
    "weighted_lmf",
    "whitened_spectrum",
    "whitened_hmf",
    "sequential_target",
    "shared_basis_lmf",
    "token_weights",
]

DEFAULT_DAMP = 0.01


@dataclass(frozen=True)
class Whitener:
    """A factor S of the damped Gram matrix, C + δI = S·Sᵀ, kept as Sᵀ and S^{-T} (or, for a
    diagonal C given as a vector of weights, as their square roots)."""

    St: np.ndarray  # Sᵀ (n×n), or √w (n,) for a diagonal
    St_inv: np.ndarray  # S^{-T} (n×n), or 1/√w (n,)

    @property
    def diagonal(self) -> bool:
        return self.St.ndim == 1

    def apply(self, W: np.ndarray) -> np.ndarray:
        """Sᵀ·W (whiten W's rows)."""
        return self.St[:, None] * W if self.diagonal else self.St @ W

    def undo(self, A: np.ndarray) -> np.ndarray:
        """S^{-T}·A."""
        return self.St_inv[:, None] * A if self.diagonal else self.St_inv @ A


MAX_DAMP = 1e6  # δ past a million times the mean energy only flattens the whitening to the identity


def check_damp(damp: float) -> float:
    """A damping fraction in [0, MAX_DAMP] (finite: δ = damp·mean(λ) must not overflow)."""
    if not isinstance(damp, (int, float)) or not 0 <= damp <= MAX_DAMP:
        raise ValueError(f"--damp (whitening damping) must be a number from 0 to {MAX_DAMP:g} (a fraction of the mean "
                         "activation energy), "
                         f"got {damp!r}")
    return float(damp)


def whitener(gram: np.ndarray, damp: float = DEFAULT_DAMP) -> Whitener:
    """Whitener for a Gram matrix C (n×n, symmetric PSD) or a vector of row weights (n,).

    δ = damp·mean(eigenvalues) (= damp·mean(weights)); an all-zero C gives the identity.
    """
    C = np.asarray(gram, dtype=np.float64)
    if C.ndim == 1:
        w = np.clip(C, 0.0, None)
        mean = float(w.mean()) if w.size else 0.0
        w = w + (damp * mean if mean > 0 else 1.0)
        root = np.sqrt(w)
        return Whitener(root, 1.0 / root)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"a Gram matrix must be square, got shape {C.shape}")
    lam, Q = np.linalg.eigh((C + C.T) / 2)
    lam = np.clip(lam, 0.0, None)
    mean = float(lam.mean()) if lam.size else 0.0
    lam = lam + (damp * mean if mean > 0 else 1.0)
    root = np.sqrt(lam)
    return Whitener(root[:, None] * Q.T, Q / root)


def _wrap(W, rows: Whitener | None, cols: Whitener | None) -> np.ndarray:
    M = np.asarray(W, dtype=np.float64)
    if rows is not None:
        M = rows.apply(M)
    if cols is not None:  # M·S_c, with S_c = (S_cᵀ)ᵀ
        M = (cols.St[None, :] * M) if cols.diagonal else M @ cols.St.T
    return M


def weighted_lmf(
    W: np.ndarray,
    rank: int,
    rows: np.ndarray | Whitener | None = None,
    cols: np.ndarray | Whitener | None = None,
    *,
    damp: float = DEFAULT_DAMP,
    seed: int = 0,
) -> LowRankFactors:
    """Best rank-``rank`` W′ = A·B for ‖L·(W − W′)·R‖_F with L = Sᵀ of the ``rows`` Gram (the
    input side of Y = X·W) and R = S of the ``cols`` Gram (Y = X·Wᵀ); each a Gram matrix, a
    vector of row/column weights, a Whitener, or None (identity).

    ``residual_sq``/``total_sq`` are in the weighted norm: residual_sq = Σ_{i>r} σ_i(L·W·R)²
    is the (damped) output error, so ``relative_error`` is ‖X·Δ‖/‖X·W‖ for a Gram of X.
    """
    Lw = rows if isinstance(rows, Whitener) or rows is None else whitener(rows, damp)
    Rw = cols if isinstance(cols, Whitener) or cols is None else whitener(cols, damp)
    f = lmf(_wrap(W, Lw, Rw), rank, seed=seed)
    A = f.A if Lw is None else Lw.undo(f.A)
    B = f.B
    if Rw is not None:  # B·S_c^{-1} = (S_c^{-T}·Bᵀ)ᵀ
        B = Rw.undo(B.T).T
    return replace(f, A=A, B=np.ascontiguousarray(B))


def whitened_spectrum(W: np.ndarray, rows=None, cols=None, *, damp: float = DEFAULT_DAMP):
    """(U, σ, Vᵀ, L^{-1}-apply, R^{-1}-apply) of the weighted matrix, for trying many ranks:
    W′_r = L^{-1}·U_r·Σ_r·V_rᵀ·R^{-1}, with error Σ_{i>r} σ_i². Full SVD (small matrices)."""
    Lw = rows if isinstance(rows, Whitener) or rows is None else whitener(rows, damp)
    Rw = cols if isinstance(cols, Whitener) or cols is None else whitener(cols, damp)
    M = _wrap(W, Lw, Rw)
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    return U, s, Vt, Lw, Rw


def reconstruct_rank(spec, r: int) -> np.ndarray:
    """W′_r from a :func:`whitened_spectrum` result."""
    U, s, Vt, Lw, Rw = spec
    A = U[:, :r] * s[:r]
    B = Vt[:r]
    if Lw is not None:
        A = Lw.undo(A)
    if Rw is not None:
        B = Rw.undo(B.T).T
    return A @ B


def whitened_hmf(W: np.ndarray, budget: int, gram: np.ndarray | Whitener, *, damp: float = DEFAULT_DAMP,
                 seed: int = 0, pivoted: bool = False) -> HybridFactors:
    """HMF minimising ‖X·(W − Ŵ)‖ within ``budget`` parameters: dense output columns of W plus
    a low-rank rest, found by :func:`hmf` on the whitened M = Sᵀ·W (columns only) and mapped back:
    D = W[:, S] exactly, A = S^{-T}·A_M. Errors are in the whitened (output) norm."""
    w = gram if isinstance(gram, Whitener) else whitener(gram, damp)
    W = np.asarray(W)
    hf = hmf(w.apply(W.astype(np.float64)), budget, axis="columns", seed=seed, pivoted=pivoted)
    return replace(hf, D=np.ascontiguousarray(W[:, hf.dense_idx]), A=w.undo(hf.A))


def token_weights(counts: np.ndarray, mix: float = 0.5) -> np.ndarray:
    """Row weights for an embedding table from calibration token counts: the empirical token
    distribution mixed with the uniform one, w = (1 − mix)·c/Σc + mix/V, so tokens the
    calibration text never used still count (held-out text uses them)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    p = c / total if total > 0 else np.zeros_like(c)
    return (1.0 - mix) * p + mix / max(c.size, 1)


def sequential_target(W: np.ndarray, gram_c: np.ndarray, cross: np.ndarray, *, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """The weight that, applied to the compressed prefix's activations X_c, best reproduces the
    original output X_o·W (least squares, ridge-regularised toward W itself):

        W* = W + (C_c + δI)^{-1}·(X_cᵀX_o − C_c)·W,   C_c = X_cᵀX_c,

    which is C_c^{-1}·X_cᵀX_o·W for δ = 0 and exactly W when the prefix is unchanged (X_c = X_o).
    ``gram_c`` = X_cᵀX_c, ``cross`` = X_cᵀX_o."""
    C = np.asarray(gram_c, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    mean = float(np.trace(C)) / max(C.shape[0], 1)
    Cd = C + (damp * mean if mean > 0 else 1.0) * np.eye(C.shape[0])
    return W + np.linalg.solve(Cd, (np.asarray(cross, dtype=np.float64) - C) @ W)


def shared_basis_lmf(Ws: list[np.ndarray], rank: int, gram=None, *, damp: float = DEFAULT_DAMP,
                     seed: int = 0) -> tuple[np.ndarray, list[np.ndarray], LowRankFactors]:
    """One first factor for several weights that read the same activation: W_i ≈ A·B_i.

    Minimises Σ_i ‖X·(W_i − A·B_i)‖² (or the plain Frobenius error without ``gram``) by a
    whitened LMF of the side-by-side W = [W_1 | W_2 | …]. Returns (A, [B_i], the joint factors).
    """
    widths = [w.shape[1] for w in Ws]
    if len({w.shape[0] for w in Ws}) != 1:
        raise ValueError("shared-basis weights must have the same number of rows (input features)")
    f = weighted_lmf(np.concatenate([np.asarray(w, dtype=np.float64) for w in Ws], axis=1), rank, gram, damp=damp, seed=seed)
    cuts = np.cumsum(widths)[:-1]
    return f.A, [np.ascontiguousarray(b) for b in np.split(f.B, cuts, axis=1)], f
