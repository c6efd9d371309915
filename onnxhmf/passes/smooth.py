"""SmoothQuant before onnxruntime's dynamic int8 (MatMulInteger): find the sites, capture their
activations on calibration batches, pick α per site on the simulated int8 output error
(factorize/smooth.py), rewrite with the 1/s folded (graph/smooth.py), and check in float that
the rewritten model computes the same outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..capture import session, session_with_outputs
from ..errors import OnnxHmfError
from ..factorize.smooth import ALPHA_GRID, search_alpha
from ..graph.smooth import apply_smoothing, smooth_sites

__all__ = ["smooth_for_int8", "smooth_for_int4", "smoothed_grams", "SmoothResult", "FLOAT_TOL"]

FLOAT_TOL = 1e-4  # max |Δ output| / max |output| allowed between the smoothed and original float models


@dataclass
class SmoothResult:
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # weight -> s (its rows were multiplied by s)
    notes: list[str] = field(default_factory=list)
    float_error: float = 0.0  # measured relative output difference in float


def _activations(model: onnx.ModelProto, acts: list[str], calib, keep: int):
    """({act: [X as rows × K] for the last ``keep`` calibration batches}, {act: max|X_j| over the
    other batches}, {act: max|X_j| over all}). Whole batches: the run-time range includes padding."""
    sess = session_with_outputs(model, acts)
    kept: dict[str, list[np.ndarray]] = {a: [] for a in acts}
    fit: dict[str, np.ndarray] = {}
    n = len(calib.batches)
    keep = min(keep, max(n // 2, 1))
    for i, feeds in enumerate(calib.batches):
        for a, v in zip(acts, sess.run(acts, feeds)):
            X = v.reshape(-1, v.shape[-1]).astype(np.float32)
            if i >= n - keep:
                kept[a].append(X)
            elif n > 1:
                m = np.abs(X).max(axis=0)
                fit[a] = np.maximum(fit[a], m) if a in fit else m
    every = {a: np.maximum(fit[a], np.max([np.abs(X).max(axis=0) for X in kept[a]], axis=0)) if a in fit
             else np.max([np.abs(X).max(axis=0) for X in kept[a]], axis=0) for a in acts}
    return kept, fit, every


def float_difference(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """max over outputs of max|A − B| / max|A| on one batch (float)."""
    names = [o.name for o in a.graph.output]
    ra, rb = session(a).run(names, feeds), session(b).run(names, feeds)
    return max(float(np.max(np.abs(x - y))) / max(float(np.max(np.abs(x))), 1e-30) for x, y in zip(ra, rb))


def smooth_for_int8(model: onnx.ModelProto, calib, weights=None, grid=ALPHA_GRID, nodes: str = "cheap",
                    batches: int = 4, tol: float = FLOAT_TOL) -> tuple[onnx.ModelProto, SmoothResult]:
    """(smoothed copy of ``model``, what was done). ``weights``: the MatMul weights that will be
    int8 (None: all plain ones); ``nodes``: which sites with no free fold get a Mul(X, 1/s) node
    ("cheap": where the MatMuls' outputs are at least as wide as X; "all"; "none"; graph/smooth.py).
    α is chosen per site on the last ``batches`` calibration batches with the channel maxima of
    the others (held out); the scales use the maxima over all. A site keeps α = 0 (unchanged)
    where smoothing does not lower its simulated int8 error."""
    res = SmoothResult()
    if calib is None or not calib.batches:
        res.notes.append("smooth: no calibration data, nothing smoothed")
        return model, res
    sites = smooth_sites(model, weights, nodes)
    if not sites:
        return model, res
    X, fit, every = _activations(model, [s.act for s in sites], calib, batches)
    arrays = {t.name: t for t in model.graph.initializer}
    scales = {}
    for site in sites:
        Ws = [numpy_helper.to_array(arrays[w]).astype(np.float32) for w in site.weights]
        ch = search_alpha(X[site.act], Ws, grid, fit.get(site.act), every[site.act])
        short = site.weights[0] + (f" (+{len(site.weights) - 1})" if len(site.weights) > 1 else "")
        if ch.alpha > 0:
            scales[site.act] = ch.scale
            res.scales.update({w: ch.scale for w in site.weights})
            res.notes.append(f"smooth {short}: alpha {ch.alpha:g}, 1/s folded by {site.fold}, simulated int8 "
                             f"error x{ch.error / max(ch.baseline, 1e-30):.2f}")
        else:
            res.notes.append(f"smooth {short}: kept (no alpha lowers the simulated int8 error)")
    if not scales:
        return model, res
    out = apply_smoothing(model, sites, scales)
    res.float_error = float_difference(model, out, calib.batches[0])
    if not res.float_error <= tol:
        raise OnnxHmfError(f"internal error: smoothing changed the float model's outputs by {res.float_error:.2e} "
                           f"(relative; allowed {tol:.0e})")
    return out, res


def smooth_for_int4(model: onnx.ModelProto, grams: dict[str, np.ndarray], weights=None, block: int = 128,
                    nodes: str = "all", check=None, tol: float = FLOAT_TOL) -> tuple[onnx.ModelProto, SmoothResult]:
    """AWQ-style scales before blocked int4 (factorize/awq.py): per site, the α whose simulated
    int4 block-``block`` output error on the Gram is lowest (α = 0: left alone), folded as
    smooth_for_int8 does. ``grams``: {weight: Gram of its input} (intquant.weight_grams);
    ``check``: a calibration batch on which the smoothed float model must match the input.
    res.scales gives each smoothed weight's s (its new Gram is G / s·sᵀ)."""
    from ..factorize.awq import awq_scales

    res = SmoothResult()
    sites = [s for s in smooth_sites(model, weights, nodes) if all(w in grams for w in s.weights)]
    arrays = {t.name: t for t in model.graph.initializer}
    scales = {}
    for site in sites:
        Ws = [numpy_helper.to_array(arrays[w]).astype(np.float64) for w in site.weights]
        ch = awq_scales(Ws, grams[site.weights[0]], 4, block)
        short = site.weights[0] + (f" (+{len(site.weights) - 1})" if len(site.weights) > 1 else "")
        if ch.alpha > 0:
            scales[site.act] = ch.scale.astype(np.float32)
            res.scales.update({w: ch.scale for w in site.weights})
            res.notes.append(f"awq {short}: alpha {ch.alpha:g}, 1/s folded by {site.fold}, simulated int4 "
                             f"error x{ch.error / max(ch.baseline, 1e-30):.2f}")
    if not scales:
        return model, res
    out = apply_smoothing(model, sites, scales)
    if check is not None:
        res.float_error = float_difference(model, out, check)
        if not res.float_error <= tol:
            raise OnnxHmfError(f"internal error: smoothing changed the float model's outputs by {res.float_error:.2e} "
                               f"(relative; allowed {tol:.0e})")
    return out, res


def smoothed_grams(grams: dict[str, np.ndarray], scales: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Grams of the smoothed weights' inputs X/s: G / s·sᵀ (the others unchanged)."""
    return {w: G / np.outer(scales[w], scales[w]) if w in scales else G for w, G in grams.items()}
