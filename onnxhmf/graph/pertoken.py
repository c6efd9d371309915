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

from .index import default_opset, readers_of

__all__ = ["per_token_activations", "candidates", "dynamic_quantizers", "row_scale", "SHARED"]

SHARED = "hmf.pt"  # prefix of the constants (and, numbered, of the nodes) this module writes


def dynamic_quantizers(model: onnx.ModelProto) -> set[str]:
    """The quantized outputs of ``model``'s DynamicQuantizeLinears (an input's own, to keep)."""
    return {n.output[0] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear" and n.output}


def _eligible(g: onnx.GraphProto, readers, keep) -> list[onnx.NodeProto]:
    """Main-graph DynamicQuantizeLinears that only MatMulIntegers (values) and Mul nodes (scale,
    themselves read by Muls only) read, whose quantized output is not in ``keep``."""
    outputs = {o.name for o in g.output}
    return [n for n in g.node if n.op_type == "DynamicQuantizeLinear" and n.domain in ("", "ai.onnx")
            and len(n.output) == 3 and n.output[0] not in keep and n.output[1] not in outputs
            and all(r.op_type == "MatMulInteger" for r in readers.get(n.output[0], []))
            and all(r.op_type == "Mul" and r.output[0] not in outputs
                    and all(c.op_type == "Mul" for c in readers.get(r.output[0], []))
                    for r in readers.get(n.output[1], []))]


def candidates(model: onnx.ModelProto, keep: set[str] | frozenset = frozenset()) -> list[str]:
    """The quantized outputs of the DynamicQuantizeLinears :func:`per_token_activations` would rewrite."""
    g = model.graph
    return sorted(n.output[0] for n in _eligible(g, readers_of(g), keep))


def _constants(model: onnx.ModelProto) -> bool:
    """Add the shared constants (once); returns whether ReduceMax takes axes as an input (opset ≥ 18)."""
    g = model.graph
    axes_input = default_opset(model) >= 18
    have = {t.name for t in g.initializer}
    values = {"q": np.array(127.0, np.float32), "z": np.array(128.0, np.float32), "zero": np.array(128, np.uint8),
              "tiny": np.array(1e-30, np.float32), "one": np.array(1.0, np.float32),
              **({"axes": np.array([-1], np.int64)} if axes_input else {})}
    g.initializer.extend(numpy_helper.from_array(v, f"{SHARED}.{k}") for k, v in values.items() if f"{SHARED}.{k}" not in have)
    return axes_input


def row_scale(model: onnx.ModelProto, x: str, scale: str, p: str) -> list[onnx.NodeProto]:
    """Nodes giving ``scale`` = max(max_k |x_rk|, tiny) / 127 per row of ``x`` (last axis kept as
    1), named after ``p``; adds the shared constants to ``model``. The planners' probe
    (planners/mixed._fake_quant_inputs) emulates the rewrite with the same nodes."""
    axes_input = _constants(model)
    mk = helper.make_node
    reduce = (mk("ReduceMax", [p + ".abs", f"{SHARED}.axes"], [p + ".max"], name=p + ".max", keepdims=1) if axes_input
              else mk("ReduceMax", [p + ".abs"], [p + ".max"], name=p + ".max", axes=[-1], keepdims=1))
    return [mk("Abs", [x], [p + ".abs"], name=p + ".abs"), reduce,
            mk("Max", [p + ".max", f"{SHARED}.tiny"], [p + ".maxp"], name=p + ".maxp"),
            mk("Div", [p + ".maxp", f"{SHARED}.q"], [scale], name=p + ".scale")]


def per_token_activations(model: onnx.ModelProto, keep: set[str] | frozenset = frozenset(),
                          only: set[str] | None = None, unsigned: bool = False) -> int:
    """Rewrite in place every DynamicQuantizeLinear :func:`candidates` lists (``only``: those of
    them in it) as per-row quantization; returns how many were rewritten. ``unsigned``: the
    weights of the MatMulIntegers they feed shifted to uint8 (graph/unsigned.py), since full-range
    rows are what the int8 kernels of x86 CPUs without VNNI saturate on."""
    g = model.graph
    readers = readers_of(g)
    todo = [n for n in _eligible(g, readers, keep) if only is None or n.output[0] in only]
    if not todo:
        return 0
    reshaped = set()  # the scale is now [..., 1]
    taken = {o for m in g.node for o in m.output} | {m.name for m in g.node}
    k = 0
    mk = helper.make_node
    for n in todo:
        while f"{SHARED}{k}.abs" in taken:  # short names: a name is stored three times per node
            k += 1
        p, k = f"{SHARED}{k}", k + 1
        x, (xq, xs, xz) = n.input[0], n.output
        nodes = row_scale(model, x, xs, p) + [
            mk("Div", [x, xs], [p + ".div"], name=p + ".div"),
            mk("Round", [p + ".div"], [p + ".round"], name=p + ".round"),
            mk("Add", [p + ".round", f"{SHARED}.z"], [p + ".shift"], name=p + ".shift"),
            mk("Cast", [p + ".shift"], [xq], name=p + ".cast", to=onnx.TensorProto.UINT8)]
        reshaped.add(xs)
        after = []  # (node, the Mul that follows it)
        for r in readers.get(xs, []):  # s_x·s_w → s_w·1; each float(X_q·W_q)·s_w then ·s_r
            r.input[:] = [f"{SHARED}.one" if i == xs else i for i in r.input]
            for c in readers.get(r.output[0], []):
                out = c.output[0]
                c.output[0] = f"{p}.w{len(after)}"
                after.append((c, mk("Mul", [c.output[0], xs], [out], name=f"{p}.r{len(after)}")))
        for r in readers.get(xz, []):  # the zero point: the constant 128
            r.input[:] = [f"{SHARED}.zero" if i == xz else i for i in r.input]
        at = list(g.node).index(n)
        g.node.remove(n)
        for j, new in enumerate(nodes):
            g.node.insert(at + j, new)
        for c, mul in after:
            g.node.insert(list(g.node).index(c) + 1, mul)
    stale = [v for v in g.value_info if v.name in reshaped]
    for v in stale:
        g.value_info.remove(v)
    if unsigned:
        from .unsigned import unsigned_weights

        unsigned_weights(model, {n.output[0] for n in todo})
    return len(todo)
