"""Per-token activation scales for the int8 MatMulIntegers (``--activations per-token``).

onnxruntime's dynamic int8 quantizes a MatMul's input X with one scale and zero point for the
whole tensor (DynamicQuantizeLinear), so one outlier token or channel coarsens every row. Here
each row r of X (a token: the last axis is the MatMul's K) gets its own scale, in standard ops:

    s_r = max_k |X_rk| / 127,   X_q = uint8(round(X_r / s_r) + 128),   zero point 128,

and the output is rescaled row by row: Y = float(X_q·W_q)·s_w·s_r. onnxruntime's quantizer writes
Y = float(X_q·W_q)·(s_x·s_w), and onnxruntime fuses that pattern into MatMulIntegerToFloat, which
takes s_x as a scalar: fed a column of row scales it silently computes something else (MiniLM:
cosine 0.60). So the scale Mul keeps only s_w and a Mul by s_r follows the product, a pattern
that does not fuse. MatMulInteger stays the uint8 × int8 kernel with a scalar zero point; the
weights are untouched. Values stay in [1, 255], the range DynamicQuantizeLinear's own output spans.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .index import default_opset

__all__ = ["per_token_activations", "candidates"]


def candidates(model: onnx.ModelProto, keep: set[str] | frozenset = frozenset()) -> list[str]:
    """The quantized outputs of the DynamicQuantizeLinears :func:`per_token_activations` would rewrite."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    before = {n.output[0] for n in probe.graph.node if n.op_type == "DynamicQuantizeLinear"}
    per_token_activations(probe, keep)
    return sorted(before - {n.output[0] for n in probe.graph.node if n.op_type == "DynamicQuantizeLinear"})


def per_token_activations(model: onnx.ModelProto, keep: set[str] | frozenset = frozenset(),
                          only: set[str] | None = None) -> int:
    """Rewrite in place every main-graph DynamicQuantizeLinear that only MatMulIntegers (values)
    and Mul nodes (scale) read, and whose quantized output is not in ``keep`` (the input model's
    own; ``only``: and is in it), as per-row quantization; returns how many were rewritten."""
    g = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    todo = [n for n in g.node if n.op_type == "DynamicQuantizeLinear" and n.domain in ("", "ai.onnx")
            and len(n.output) == 3 and n.output[0] not in keep and n.output[1] not in outputs
            and all(r.op_type == "MatMulInteger" for r in readers.get(n.output[0], []))
            and all(r.op_type == "Mul" and r.output[0] not in outputs
                    and all(c.op_type == "Mul" for c in readers.get(r.output[0], []))
                    for r in readers.get(n.output[1], []))]
    todo = [n for n in todo if only is None or n.output[0] in only]
    if not todo:
        return 0
    axes_input = default_opset(model) >= 18  # ReduceMax takes axes as an input from 18
    shared = "hmf.pt"
    have = {t.name for t in g.initializer}
    g.initializer.extend(t for t in [numpy_helper.from_array(np.array(127.0, np.float32), f"{shared}.q"),
                          numpy_helper.from_array(np.array(128.0, np.float32), f"{shared}.z"),
                          numpy_helper.from_array(np.array(128, np.uint8), f"{shared}.zero"),
                          numpy_helper.from_array(np.array(1e-30, np.float32), f"{shared}.tiny"),
                          numpy_helper.from_array(np.array(1.0, np.float32), f"{shared}.one")]
                         + ([numpy_helper.from_array(np.array([-1], np.int64), f"{shared}.axes")] if axes_input else [])
                         if t.name not in have)
    reshaped = set()  # the scale is now [..., 1]
    taken = {o for m in g.node for o in m.output} | {m.name for m in g.node} | have
    k = 0
    for n in todo:
        while f"{shared}{k}.abs" in taken:  # short names: a name is stored three times per node
            k += 1
        p, k = f"{shared}{k}", k + 1
        x, (xq, xs, xz) = n.input[0], n.output
        reduce = (helper.make_node("ReduceMax", [p + ".abs", f"{shared}.axes"], [p + ".max"], name=p + ".max", keepdims=1)
                  if axes_input else
                  helper.make_node("ReduceMax", [p + ".abs"], [p + ".max"], name=p + ".max", axes=[-1], keepdims=1))
        nodes = [helper.make_node("Abs", [x], [p + ".abs"], name=p + ".abs"), reduce,
                 helper.make_node("Max", [p + ".max", f"{shared}.tiny"], [p + ".maxp"], name=p + ".maxp"),
                 helper.make_node("Div", [p + ".maxp", f"{shared}.q"], [xs], name=p + ".scale"),
                 helper.make_node("Div", [x, xs], [p + ".div"], name=p + ".div"),
                 helper.make_node("Round", [p + ".div"], [p + ".round"], name=p + ".round"),
                 helper.make_node("Add", [p + ".round", f"{shared}.z"], [p + ".shift"], name=p + ".shift"),
                 helper.make_node("Cast", [p + ".shift"], [xq], name=p + ".cast", to=onnx.TensorProto.UINT8)]
        reshaped.add(xs)
        after = []  # (node, the Mul that follows it)
        for r in readers.get(xs, []):  # s_x·s_w → s_w·1; each float(X_q·W_q)·s_w then ·s_r
            r.input[:] = [f"{shared}.one" if i == xs else i for i in r.input]
            for c in readers.get(r.output[0], []):
                out = c.output[0]
                c.output[0] = f"{p}.w{len(after)}"
                after.append((c, helper.make_node("Mul", [c.output[0], xs], [out], name=f"{p}.r{len(after)}")))
        for r in readers.get(xz, []):  # the zero point: the constant 128
            r.input[:] = [f"{shared}.zero" if i == xz else i for i in r.input]
        at = list(g.node).index(n)
        g.node.remove(n)
        for j, new in enumerate(nodes):
            g.node.insert(at + j, new)
        for c, mul in after:
            g.node.insert(list(g.node).index(c) + 1, mul)
    stale = [v for v in g.value_info if v.name in reshaped]
    for v in stale:
        g.value_info.remove(v)
    return len(todo)
