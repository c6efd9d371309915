"""An integer-only plan: per weight one run-time integer treatment (passes/intquant.py) or dense,
under a file budget, from measured losses (used by benchmarks/bench_runtime.py).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..capture import session
from ..errors import OnnxHmfError
from ..factorize.allocate import Option, allocate
from ..graph import qdq
from ..passes.calibrated import output_loss
from ..passes.intquant import IntTreatment, _as_weight, apply_treatments, weight_grams
from .mixed import _fake_quant_inputs

__all__ = ["integer_plan"]


def _proxy(W: np.ndarray, Wq: np.ndarray, G, site: str) -> float:
    """Output error tr(ΔᵀGΔ) of a MatMul weight (G None or a table: ‖Δ‖²)."""
    D = W - Wq
    return float(np.einsum("kn,kl,ln->", D, G, D)) if G is not None and site == "matmul" else float(np.sum(D * D))


def integer_plan(model: onnx.ModelProto, calib, target_bytes: int, menu: list[IntTreatment],
                 grams: dict[str, np.ndarray] | None = None, batches: int = 4, progress=lambda it: it,
                 fitted: dict | None = None):
    """Per weight, one treatment of ``menu`` (or dense, if it fits) minimising the summed measured
    loss under a file budget: each (weight, treatment) is probed end to end (Σ outputs 1 − mean
    cosine over ``batches`` calibration batches, only that weight changed; int8pc's MatMul input
    goes through DynamicQuantizeLinear → DequantizeLinear, which is what MatMulInteger computes),
    then the multiple-choice knapsack of factorize/allocate.py. To keep it to one probe per weight,
    only the first applicable non-int8pc treatment is measured; the others' losses are that loss
    scaled by their output-error proxy tr(ΔᵀCΔ) (‖Δ‖² for tables), except product-quantized
    tables (pq), always probed (their error is not a scaled rounding error). ``fitted``: {(weight,
    treatment): fit} shared between calls (e.g. several targets). Returns (model, plan, info)."""
    sites = {t.name: qdq.site_kind(model, t.name) for t in model.graph.initializer}
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if sites[t.name]}
    grams = weight_grams(model, list(arrays), calib) if grams is None else grams
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for w, W in arrays.items():
        probe.graph.input.append(onnx.helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, list(W.shape)))
    flags = _fake_quant_inputs(probe, [w for w in arrays if sites[w] == "matmul"])
    sess = session(probe)
    names = [o.name for o in model.graph.output]
    data = calib.batches[:batches]
    off = {f: np.array(False) for f in flags.values()}
    refs = [sess.run(names, {**b, **off}) for b in data]

    def loss(w, Wq, fq):
        extra = {**off, w: Wq, **({flags[w]: np.array(True)} if fq and w in flags else {})}
        return float(np.mean([output_loss(r, sess.run(names, {**b, **extra}), b.get(calib.mask) if calib.mask else None)
                              for b, r in zip(data, refs)]))

    options = {}
    fitted = {} if fitted is None else fitted
    for w in progress(list(arrays)):
        W = arrays[w].astype(np.float64)
        G = grams.get(w)
        opts, measured = [Option(4 * W.size, 0.0, None)], None
        for t in menu:
            if sites[w] not in t.sites() or (sites[w] != "matmul" and t.block and W.shape[1] % t.block):
                continue
            f = fitted[(w, t)] = fitted[(w, t)] if (w, t) in fitted else t.fit(W, G, sites[w])
            Wq = _as_weight(f, sites[w])
            err = _proxy(W, Wq, G, sites[w])
            if t.kind in ("int8pc", "pq") or measured is None or measured[1] <= 0:
                lost = loss(w, Wq, t.kind == "int8pc")
                if t.kind not in ("int8pc", "pq"):
                    measured = (lost, err)
            else:  # the others scaled by the output-error proxy: one probe per weight
                lost = measured[0] * err / measured[1]
            opts.append(Option(t.nbytes(W.shape, sites[w]), lost, t))
        options[w] = opts
    fixed = model.ByteSize() - sum(o[0].cost for o in options.values())
    budget = int(target_bytes) - fixed
    for _ in range(4):  # the byte estimates miss names and nodes: spend the overshoot less
        try:
            picked = dict(zip(options, allocate(list(options.values()), max(budget, 0))))
        except ValueError:
            raise OnnxHmfError(f"integer plan: nothing in the menu fits {int(target_bytes):,} B") from None
        plan = {w: o.tag for w, o in picked.items() if o.tag is not None}
        out, notes = apply_treatments(model, plan, grams=grams, fitted=fitted)
        over = out.ByteSize() - int(target_bytes)
        if over <= 0:
            break
        budget -= over + 1000
    info = {"predicted_loss": sum(o.error for o in picked.values()), "notes": notes,
            "counts": {k: sum(1 for t in plan.values() if t.name == k) for k in {t.name for t in plan.values()}},
            "dense": sum(1 for o in picked.values() if o.tag is None)}
    return out, plan, info
