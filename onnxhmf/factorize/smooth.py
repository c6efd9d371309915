"""SmoothQuant scales for MatMulInteger's per-tensor activation quantization, pure numpy.

onnxruntime's dynamic int8 path computes Y = X·W as DQ(X)·DQ(W): X is quantized at run time to
uint8 over its whole range, [min(X, 0), max(X, 0)] in 255 steps (DynamicQuantizeLinear), and W
to int8 per output column. A few input channels j with large |X_j| (BERT's outliers) set that
range, so every other channel loses its precision. SmoothQuant moves the difficulty into W:

    s_j = max|X_j|^α / max_n |W_jn|^(1−α),     X·W = (X·diag(1/s))·(diag(s)·W),

exact in float. X/s has flat channel ranges; diag(s)·W has larger rows where X had outliers,
which per-column weight scales absorb well. α = 0 leaves X (up to the weight's row scale), α = 1
flattens X completely. Sites whose MatMuls share one X (Q, K, V) share one s, with the weight
maximum taken over all their columns.

``search_alpha`` picks α from a grid per site by the simulated output error
Σ_batches ‖X·W − dq_u8(X/s)·dq_pc(diag(s)·W)‖² over calibration activations (each batch's X
quantized over its own range, as at run time), α = 0 (no smoothing, s = 1) always included.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quant import per_channel_int8

__all__ = ["smooth_scales", "dynamic_uint8", "int8_output_error", "search_alpha", "SmoothChoice", "ALPHA_GRID"]

ALPHA_GRID = (0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def smooth_scales(act_max: np.ndarray, w_max: np.ndarray, alpha: float, lo: float = 1e-5,
                  floor: bool = True) -> np.ndarray:
    """s_j = act_max_j^α / w_max_j^(1−α), normalised so that the geometric mean of s is 1 (the
    overall level moves into neither side); channels with a zero maximum keep s_j = 1. ``floor``:
    s_j = max(s_j, 1), so only channels above the typical level are shrunk: a channel that was
    quiet in calibration is never amplified (it may not be quiet on other text)."""
    a = np.asarray(act_max, np.float64)
    w = np.asarray(w_max, np.float64)
    ok = (a > lo) & (w > lo)
    s = np.ones_like(a)
    if alpha == 0.0 or not ok.any():
        return s.astype(np.float32)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    s[ok] /= np.exp(np.mean(np.log(s[ok])))
    return (np.maximum(s, 1.0) if floor else s).astype(np.float32)


def dynamic_uint8(X: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear then DequantizeLinear of X (one scale and zero point for the tensor)."""
    X = np.asarray(X, np.float32)
    lo, hi = min(float(X.min()), 0.0), max(float(X.max()), 0.0)
    if hi == lo:
        return np.zeros_like(X)
    scale = np.float32((hi - lo) / 255.0)
    zp = np.clip(np.round(-lo / scale), 0, 255)
    return ((np.clip(np.round(X / scale) + zp, 0, 255) - zp) * scale).astype(np.float32)


def int8_output_error(batches: list[np.ndarray], Ws: list[np.ndarray], s: np.ndarray,
                      refs: list[list[np.ndarray]] | None = None) -> float:
    """Σ over batches and weights of ‖X·W − dq_u8(X/s)·dq_pc(diag(s)·W)‖² (X: rows × K)."""
    Wq = [per_channel_int8(W * s[:, None]) for W in Ws]
    err = 0.0
    for b, X in enumerate(batches):
        Xq = dynamic_uint8(X / s)
        for i, W in enumerate(Ws):
            Y = refs[b][i] if refs is not None else X @ W
            err += float(np.sum((Y - Xq @ Wq[i]) ** 2))
    return err


@dataclass
class SmoothChoice:
    alpha: float
    scale: np.ndarray  # s (K,): X → X/s, W → diag(s)·W
    error: float  # simulated int8 output error at alpha
    baseline: float  # the same at alpha = 0 (s = 1)


def search_alpha(batches: list[np.ndarray], Ws: list[np.ndarray], grid=ALPHA_GRID, fit_max: np.ndarray | None = None,
                 act_max: np.ndarray | None = None, floor: bool = True) -> SmoothChoice:
    """The α of ``grid`` (0 always tried) with the least simulated int8 output error, on
    ``batches`` (X's rows per calibration batch), of the MatMuls X·W_i that share X.

    ``fit_max``: max|X_j| over other batches than those scored (held out, so that α is not
    chosen for channel maxima the scored batches themselves set: on new text other channels
    spike); default: over ``batches``. ``act_max``: the maxima the returned s is built from
    (default ``fit_max``; pass the maxima over all calibration batches)."""
    fit_max = np.max([np.abs(X).max(axis=0) for X in batches], axis=0) if fit_max is None else fit_max
    act_max = fit_max if act_max is None else act_max
    w_max = np.max([np.abs(W).max(axis=1) for W in Ws], axis=0)
    refs = [[X @ W for W in Ws] for X in batches]
    best = None
    base = None
    for a in sorted(set(grid) | {0.0}):
        e = int8_output_error(batches, Ws, smooth_scales(fit_max, w_max, a, floor=floor), refs)
        if a == 0.0:
            base = e
        if best is None or e < best[0]:
            best = (e, a)
    return SmoothChoice(best[1], smooth_scales(act_max, w_max, best[1], floor=floor), best[0], base)
