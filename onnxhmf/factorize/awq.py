"""Activation-aware scales for blocked int4 weights (the scale half of AWQ), on the activation Gram.

X·W = (X·diag(1/s))·(diag(s)·W) exactly; quantizing diag(s)·W instead of W gives the input
channels with large activations, which dominate the output error, finer rounding steps. With
C = XᵀX (n rows), r_j = √(C_jj/n) the RMS of channel j (n cancels in s), and

    s_j = r_j^α / (Π_j r_j^α)^(1/K)          (geometric mean 1)

α is chosen from a grid to minimise the summed output error of the weights sharing X,

    E(α) = Σ_i tr(Δ_iᵀ C Δ_i),   Δ_i = W_i − diag(1/s)·Q(diag(s)·W_i),

with Q the blocked round-to-nearest quantizer (factorize/quant.py). α = 0 (s = 1) is in the grid,
so the choice never does worse than no scaling on the calibration Gram. After smoothing, the
Gram of the new input X/s is C / (s·sᵀ), which GPTQ then uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quant import quantize_blocked

__all__ = ["AWQ_GRID", "AwqChoice", "awq_scales", "output_error"]

AWQ_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


@dataclass
class AwqChoice:
    alpha: float
    scale: np.ndarray  # s (K,)
    error: float  # E(alpha)
    baseline: float  # E(0)


def output_error(W: np.ndarray, Wq: np.ndarray, G: np.ndarray) -> float:
    """tr(ΔᵀGΔ), Δ = W − Wq: the summed squared output error over the rows whose Gram is G."""
    D = np.asarray(W, np.float64) - Wq
    return float(np.sum((G @ D) * D))


def awq_scales(Ws: list[np.ndarray], G: np.ndarray, bits: int = 4, block: int = 128, grid=AWQ_GRID) -> AwqChoice:
    """The α of ``grid`` (and its s) minimising E(α) for the weights ``Ws`` (each K×N) read by the
    activation whose Gram is ``G`` (module docstring); ``baseline`` is E(0)."""
    G = np.asarray(G, np.float64)
    d = np.diag(G)
    live = d > 0
    logr = np.where(live, 0.5 * np.log(np.where(live, d, 1.0)), 0.0)
    centre = logr[live].mean() if live.any() else 0.0
    best, baseline = None, None
    for a in sorted(set(grid) | {0.0}):
        s = np.exp(np.where(live, a * (logr - centre), 0.0))
        err = sum(output_error(W, quantize_blocked(s[:, None] * W, bits, block).dequantize() / s[:, None], G)
                  for W in Ws)
        baseline = err if a == 0.0 else baseline
        if best is None or err < best.error:
            best = AwqChoice(float(a), s, err, 0.0)
    best.baseline = baseline
    return best
