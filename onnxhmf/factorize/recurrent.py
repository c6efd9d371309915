"""Low-rank and hybrid factorization of recurrent weights (ONNX LSTM/GRU/RNN).

An ONNX recurrent op holds W ``[dirs, G·H, I]`` (G gate blocks of H rows: LSTM i,o,f,c; GRU
z,r,h; RNN one) and computes, for every time step and direction d, X_t·W_dᵀ. Both directions
read the same X, so one input basis V (r×I) serves both:

    W_d ≈ U_d·V,   X·W_dᵀ ≈ (X·Vᵀ)·U_dᵀ,

which is one LMF of the stacked matrix M = [W_0ᵀ | W_1ᵀ] (I × dirs·G·H, MatMul layout in×out):
M ≈ A·B with V = Aᵀ, U_d = (B's d-th block)ᵀ. Whitened by the Gram C = XᵀX of the op's input
(see whiten.py), the truncation minimises Σ_d ‖X·(W_d − U_d·V)ᵀ‖², the error of both
directions' gate pre-activations; params r·(I + dirs·G·H) against dirs·G·H·I.

HMF inside the op (``input_hmf``): the op multiplies its whole input by its W, so a hybrid must
be expressed through the input: k input features S stay exact, the rest get rank r,
Z = [X_S | X_R·Aᵀ] and W_new,d = [D_d | U_d] (G·H × (k + r)), i.e. dense *rows* of M (hmf.py's
rows mode, Frobenius norm: whitening mixes input features, so it does not map back to dense
inputs). Dense *gate rows* (output columns of M) need the gates computed outside the fused
kernel: ``gate_hmf`` is for the Scan lowering (graph/recurrent_scan.py), where the projections
X·Wᵀ and h·Rᵀ are explicit MatMuls. Its candidates keep k output columns dense inside one gate
block (each gate in turn), or anywhere (hmf.py's own choice), for k on a grid, each fitted
exactly (hmf_fixed on the whitened matrix), and the lowest error wins; ``gate_errors`` gives each
gate block's share of a rank-r fit's error (how sensitive the gates are).

Pure numpy/scipy: nothing here knows about ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .hmf import HybridFactors, hmf, hmf_fixed
from .svd import LowRankFactors, lmf
from .whiten import DEFAULT_DAMP, Whitener, weighted_lmf, whitener

__all__ = [
    "GATES",
    "GATE_NAMES",
    "SharedInputBasis",
    "stack_inputs",
    "shared_input_lmf",
    "input_hmf",
    "GateHMF",
    "gate_hmf",
    "gate_errors",
]

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
GATE_NAMES = {"LSTM": ("i", "o", "f", "c"), "GRU": ("z", "r", "h"), "RNN": ("h",)}


def stack_inputs(W: np.ndarray) -> np.ndarray:
    """M = [W_0ᵀ | W_1ᵀ | …] (I × dirs·G·H) from W ``[dirs, G·H, I]``: X·M = [X·W_0ᵀ | X·W_1ᵀ]."""
    W = np.asarray(W)
    if W.ndim != 3:
        raise ValueError(f"expected W of shape [dirs, gates*hidden, input], got {W.shape}")
    d, gh, i = W.shape
    return np.ascontiguousarray(W.transpose(2, 0, 1).reshape(i, d * gh))


@dataclass(frozen=True)
class SharedInputBasis:
    """W_d ≈ U[d]·V for every direction d; ``factors`` is the LMF of the stacked M (errors in
    its norm: whitened when a Gram was given)."""

    V: np.ndarray  # (r, I)
    U: np.ndarray  # (dirs, G·H, r)
    factors: LowRankFactors

    @property
    def rank(self) -> int:
        return self.V.shape[0]

    @property
    def params(self) -> int:
        return self.V.size + self.U.size

    @property
    def relative_error(self) -> float:
        return self.factors.relative_error

    def reconstruct(self) -> np.ndarray:
        """Ŵ ``[dirs, G·H, I]``."""
        return np.einsum("dgr,ri->dgi", self.U, self.V)


def shared_input_lmf(W: np.ndarray, rank: int, gram: np.ndarray | Whitener | None = None, *,
                     damp: float = DEFAULT_DAMP, seed: int = 0) -> SharedInputBasis:
    """One input basis V for all directions of W ``[dirs, G·H, I]`` (see the module docstring);
    with ``gram`` = XᵀX the fit minimises the gate pre-activation error Σ_d ‖X(W_d − Ŵ_d)ᵀ‖²."""
    W = np.asarray(W)
    d, gh, _ = W.shape
    M = stack_inputs(W).astype(np.float64)
    f = lmf(M, rank, seed=seed) if gram is None else weighted_lmf(M, rank, gram, damp=damp, seed=seed)
    U = np.ascontiguousarray(f.B.T.reshape(d, gh, f.rank))
    return SharedInputBasis(V=np.ascontiguousarray(f.A.T), U=U, factors=f)


def input_hmf(W: np.ndarray, budget: int, *, seed: int = 0) -> HybridFactors:
    """HMF of the stacked M (I × dirs·G·H) with dense *rows* (input features) within ``budget``
    parameters: the hybrid that the fused op can run (module docstring). Frobenius norm."""
    return hmf(stack_inputs(W).astype(np.float64), budget, axis="rows", seed=seed)


def _block_of(n: int, blocks: int) -> np.ndarray:
    size = n // blocks
    return np.arange(n) // size


def gate_errors(Wt: np.ndarray, rank: int, blocks: int, gram: np.ndarray | Whitener | None = None, *,
                damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Share of a rank-``rank`` fit's (whitened) error that falls in each of the ``blocks``
    equal column blocks of Wt (in × blocks·H): the gates' sensitivity to truncation."""
    w = None if gram is None else (gram if isinstance(gram, Whitener) else whitener(gram, damp))
    M = np.asarray(Wt, dtype=np.float64)
    M = M if w is None else w.apply(M)
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    D = M - (U[:, :rank] * s[:rank]) @ Vt[:rank]
    per = np.bincount(_block_of(M.shape[1], blocks), weights=np.sum(D**2, axis=0), minlength=blocks)
    return per / max(per.sum(), 1e-300)


@dataclass(frozen=True)
class GateHMF:
    """The chosen hybrid (dense output columns of Wt, errors in the whitened norm when a Gram
    was given) and every candidate tried: (label, k, rank, residual²)."""

    factors: HybridFactors
    label: str
    tried: list


def _candidates(M: np.ndarray, budget: int, blocks: int):
    """(label, dense columns) candidates: top-residual columns inside one block, for k on a grid."""
    m, n = M.shape
    r0 = max(1, min(budget // (m + n), m, n))
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    Q = U[:, :r0]
    res = np.sum(M**2, axis=0) - np.sum((Q.T @ M) ** 2, axis=0)
    block = _block_of(n, blocks)
    size = n // blocks
    k_max = min(size, max(0, budget // m - 1))
    ks = sorted({k for k in (size // 16, size // 8, size // 4, size // 2, size) if 0 < k <= k_max})
    for g in range(blocks):
        cols = np.flatnonzero(block == g)
        order = cols[np.argsort(-res[cols], kind="stable")]
        for k in ks:
            yield f"gate {g}", np.sort(order[:k])


def gate_hmf(Wt: np.ndarray, budget: int, blocks: int, gram: np.ndarray | Whitener | None = None, *,
             damp: float = DEFAULT_DAMP, seed: int = 0) -> GateHMF | None:
    """HMF of Wt (in × blocks·H, MatMul layout) with dense output columns (gate rows of W),
    within ``budget`` parameters, minimising the whitened error when ``gram`` (of the input)
    is given. Candidates: dense columns inside one gate block (each block, k on a grid), and
    hmf.py's unconstrained choice; each is fitted exactly at the largest rank the budget leaves.
    None when not even rank 1 fits."""
    w = None if gram is None else (gram if isinstance(gram, Whitener) else whitener(gram, damp))
    Wt = np.asarray(Wt)
    M = Wt.astype(np.float64) if w is None else w.apply(Wt.astype(np.float64))
    m, n = M.shape
    if budget // (m + n) < 1:
        return None
    best, label, tried = None, "", []
    free = hmf(M, budget, axis="columns", seed=seed)
    for lab, hf in [("any gate", free)] + [(lab, hmf_fixed(M, S, min((budget - m * S.size) // (m + n - S.size), m), axis=1))
                                           for lab, S in _candidates(M, budget, blocks)]:
        if hf.rank < 1 and hf.k < n:
            continue
        tried.append((lab if hf.k else "lmf", hf.k, hf.rank, hf.residual_sq))
        if best is None or hf.residual_sq < best.residual_sq:
            best, label = hf, (lab if hf.k else "lmf")
    if w is not None:
        best = replace(best, D=np.ascontiguousarray(Wt[:, best.dense_idx]), A=w.undo(best.A))
    return GateHMF(best, label, tried)
