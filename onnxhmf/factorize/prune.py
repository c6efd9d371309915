"""Magnitude pruning: the sparse baseline for a parameter budget.

Keeping the p entries of W with the largest |w_ij| (zeroing the rest) is the best p-sparse
approximation in the Frobenius norm:

    ‖W − W_p‖_F² = Σ of the m·n − p smallest w_ij².

The result is a dense matrix with zeros (what ONNX runtimes execute today); ``sparse_bytes``
gives what a CSR copy would take. Ties in |w| are broken by flat (row-major) index, lower first,
so the result is deterministic.

Pure numpy: nothing here knows about ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Pruned", "magnitude_prune"]


@dataclass(frozen=True)
class Pruned:
    """W with all but the largest-magnitude entries set to zero."""

    W: np.ndarray  # dense, same shape and dtype as the input, zeros where pruned
    nnz: int  # non-zeros of W (= entries kept, unless some kept entries were already 0)
    residual_sq: float  # ‖W_in − W‖_F² = Σ of the pruned w²
    total_sq: float  # ‖W_in‖_F²

    @property
    def density(self) -> float:
        return self.nnz / self.W.size if self.W.size else 0.0

    @property
    def relative_error(self) -> float:
        """‖W_in − W‖_F / ‖W_in‖_F."""
        return float(np.sqrt(self.residual_sq / self.total_sq)) if self.total_sq > 0 else 0.0

    def sparse_bytes(self, value_bytes: int = 4, index_bytes: int = 4) -> int:
        """Bytes of a CSR copy: nnz·(value_bytes + index_bytes) column indices and values, plus
        (m + 1)·index_bytes row pointers."""
        return self.nnz * (value_bytes + index_bytes) + (self.W.shape[0] + 1) * index_bytes


def magnitude_prune(W: np.ndarray, keep_params: int) -> Pruned:
    """Keep the ``keep_params`` largest |w| of W (all of them if keep_params ≥ W.size)."""
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {W.shape}")
    if keep_params < 0:
        raise ValueError(f"keep_params must be ≥ 0, got {keep_params}")
    flat = W.ravel()
    if flat.dtype.kind == "f" and not np.all(np.isfinite(flat)):
        raise ValueError("W has non-finite entries")
    size = flat.size
    keep = int(min(keep_params, size))
    mag = np.abs(flat)
    mask = np.zeros(size, dtype=bool)
    if keep == size:
        mask[:] = True
    elif keep > 0:
        t = np.partition(mag, size - keep)[size - keep]  # the keep-th largest |w|
        mask = mag > t
        ties = np.flatnonzero(mag == t)[: keep - int(mask.sum())]  # lowest indices first
        mask[ties] = True
    out = np.where(mask, flat, np.zeros((), dtype=flat.dtype)).reshape(W.shape)
    sq = np.square(flat, dtype=np.float64)
    total_sq = float(np.sum(sq))
    residual_sq = float(np.sum(sq[~mask]))
    return Pruned(W=out, nnz=int(np.count_nonzero(out)), residual_sq=residual_sq, total_sq=total_sq)
