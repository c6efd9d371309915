"""Activation statistics with onnxruntime: the inputs of target nodes become extra outputs.

For every activation tensor X that feeds a compressible MatMul/Gemm, the session returns X
with each batch, and we accumulate C = XᵀX (in×in, float64) over the rows of X that are real
tokens: positions where the attention mask is 0 are dropped when X's leading axes match the
mask. Each batch's X is dropped as soon as it is added, so memory is Σ in² per distinct
activation, whatever the number of tokens. Gather index tensors give token counts instead.

With ``reference`` (sequential calibration), the same batch also runs through the reference
model and we accumulate the cross term X_cᵀX_o between the two models' activations.

Activations computed inside If/Loop/Scan bodies are threaded out to model outputs first
(graph/expose.py); those that cannot be get no statistics and a reason (``uncaptured``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort

from .calibration import Calibration
from .progress import no_progress

__all__ = ["ActivationStats", "capture_stats", "session_with_outputs", "session", "masked_rows"]


@dataclass
class ActivationStats:
    grams: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> XᵀX (float64)
    cross: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> X_cᵀX_o (sequential)
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # index tensor -> bincount
    rows: dict[str, int] = field(default_factory=dict)  # tensor -> rows (tokens) accumulated
    uncaptured: dict[str, str] = field(default_factory=dict)  # tensor -> why it has no statistics

    def merge(self, other: "ActivationStats") -> None:
        for attr in ("grams", "cross", "counts", "rows", "uncaptured"):
            getattr(self, attr).update(getattr(other, attr))


def _value_types(model: onnx.ModelProto, names: set[str]) -> dict[str, int]:
    """Element types of the named tensors, from shape inference (falls back to float)."""
    found = {vi.name: vi.type.tensor_type.elem_type for vi in list(model.graph.value_info) + list(model.graph.input)
             + list(model.graph.output) if vi.name in names and vi.type.tensor_type.elem_type}
    if len(found) < len(names):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            for vi in inferred.graph.value_info:
                if vi.name in names and vi.type.tensor_type.elem_type:
                    found.setdefault(vi.name, vi.type.tensor_type.elem_type)
        except Exception:
            pass
    return found


def session_with_outputs(model: onnx.ModelProto, names: list[str], threads: int | None = None) -> ort.InferenceSession:
    """An ORT session for ``model`` that also returns the tensors ``names``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    want = [n for n in names if n not in have]
    types = _value_types(m, set(want))
    for n in want:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None))
    return session(m, threads)


def session(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    """A quiet onnxruntime CPU session for ``model`` (``threads``: intra-op threads, None = ORT's)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # a failed run is raised, once; ORT's own ERROR line would repeat it on stderr
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def masked_rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """x as (rows, features), without padded positions when x's leading axes are the mask's."""
    if mask is not None and x.ndim >= 2 and x.shape[:-1] == mask.shape:
        return x[mask.astype(bool)]
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


BODY_ONLY = ("is computed inside an If/Loop/Scan body and could not be returned as a model output: not "
             "captured, the weight is fitted unwhitened")


def _sessions(model, reference, acts, indices, calib):
    """(session, reference session or None, {name: model output name}, the same for the
    reference, {name: why not captured}).

    Values inside If/Loop/Scan bodies are threaded out to model outputs (graph/expose.py); if
    that fails for a model (a session that will not load or run), those values are skipped."""
    from .graph.expose import expose_values

    names = acts + list(indices)
    hidden = _body_only(model, names)
    outs: dict[str, str] = {}
    ref_outs: dict[str, str] = {}
    missing: dict[str, str] = {}
    if hidden:
        exposed, outs, missing = expose_values(model, list(hidden))
        missing = {n: f"is computed inside an If/Loop/Scan body and {why}: not captured, the weight is fitted "
                      "unwhitened" for n, why in missing.items()}
        ref_exposed, ref_outs, _ = expose_values(reference, list(outs)) if reference is not None else (None, {}, {})
        try:
            keep = [n for n in names if n not in missing]
            ref_keep = [ref_outs.get(n, n) for n in acts if n not in missing]
            sess = session_with_outputs(exposed, [outs.get(n, n) for n in keep])
            ref = session_with_outputs(ref_exposed, ref_keep) if ref_exposed is not None and ref_keep else None
            if calib.batches:
                sess.run([outs.get(n, n) for n in keep], calib.batches[0])
                if ref is not None:
                    ref.run(ref_keep, calib.batches[0])
            return sess, ref, outs, ref_outs, missing
        except Exception as e:  # fall back: the main graph's values only
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            missing = {n: f"{BODY_ONLY} (threading it out of its body failed: {why})" for n in hidden}
            outs, ref_outs = {}, {}
    keep = [n for n in names if n not in missing]
    sess = session_with_outputs(model, keep)
    keep_acts = [a for a in acts if a not in missing]
    ref = session_with_outputs(reference, keep_acts) if reference is not None and keep_acts else None
    return sess, ref, outs, ref_outs, missing


def _body_only(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """{name: reason} for the names that are not values of the main graph (they live in a body)."""
    g = model.graph
    main = {t.name for t in g.initializer} | {i.name for i in g.input} | {o for n in g.node for o in n.output}
    return {n: BODY_ONLY for n in names if n not in main}


def capture_stats(
    model: onnx.ModelProto,
    calib: Calibration,
    activations: Iterable[str],
    indices: dict[str, int] | None = None,
    *,
    reference: onnx.ModelProto | None = None,
    progress: Callable = no_progress,
) -> ActivationStats:
    """Grams XᵀX of ``activations`` and counts of ``indices`` (tensor -> table rows) over ``calib``.

    With ``reference``: also X_cᵀX_o, X_c from ``model`` and X_o from ``reference`` (same names).
    """
    acts = list(dict.fromkeys(activations))
    indices = dict(indices or {})
    sess, ref, outs, ref_outs, missing = _sessions(model, reference, acts, indices, calib)
    acts = [a for a in acts if a not in missing]
    indices = {k: v for k, v in indices.items() if k not in missing}
    stats = ActivationStats(uncaptured=missing)
    out_names = [outs.get(n, n) for n in acts + list(indices)]
    for feeds in progress(calib.batches, "capturing activations"):
        mask = feeds.get(calib.mask) if calib.mask else None
        try:
            values = sess.run(out_names, feeds)
            ref_values = ref.run([ref_outs.get(n, n) for n in acts], feeds) if ref is not None else None
        except Exception as e:  # data the model rejects: one line, not onnxruntime's traceback
            import re

            from .errors import OnnxHmfError

            msg = re.sub(r"\s+", " ", str(e)).strip()[:300]
            raise OnnxHmfError(f"calibration data {calib.source!r}: onnxruntime failed on it: {msg}") from None
        for i, name in enumerate(acts):
            if values[i].size == 0:  # a body value from the branch not taken: no rows
                continue
            X = masked_rows(values[i], mask)
            g = (X.T @ X).astype(np.float64)  # one batch in float32, the sum in float64
            stats.grams[name] = stats.grams[name] + g if name in stats.grams else g
            stats.rows[name] = stats.rows.get(name, 0) + X.shape[0]
            if ref_values is not None:
                Xo = masked_rows(ref_values[i], mask)
                c = (X.T @ Xo).astype(np.float64)
                stats.cross[name] = stats.cross[name] + c if name in stats.cross else c
        for j, (name, size) in enumerate(indices.items()):
            ids = values[len(acts) + j]
            if ids.size == 0:
                continue
            ids = ids[mask.astype(bool)] if mask is not None and ids.shape == mask.shape else ids.ravel()
            ids = ids.astype(np.int64)
            ids = ids[(ids >= 0) & (ids < size)]
            c = np.bincount(ids, minlength=size)
            stats.counts[name] = stats.counts[name] + c if name in stats.counts else c
    _check_finite(stats, calib.source)
    return stats


def _check_finite(stats: ActivationStats, source: str) -> None:
    """Non-finite activations would reach the whitening's eigen/SVD routines: one clear error."""
    from .errors import OnnxHmfError

    for kind, table in (("activation", stats.grams), ("activation (sequential cross term)", stats.cross)):
        bad = sorted(n for n, g in table.items() if not np.isfinite(g).all())
        if bad:
            raise OnnxHmfError(f"calibration on {source!r}: the {kind} {bad[0]!r}"
                               f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} has NaN or Inf values "
                               "(a non-finite weight upstream, or an overflow); calibrated factorization needs finite "
                               "activations: fix the model, or run without --calib")
