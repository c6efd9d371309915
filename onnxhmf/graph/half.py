"""Biases and normalization parameters stored as float16 on disk (``--float16-biases``).

After a plan has stored the weights in a few bits, the float32 vectors around them are a
visible share of the file: on MiniLM at a tenth of its size, its biases and LayerNorm γ, β are
126 KB of 9 MB. ``float16_biases`` stores each float32 1-D initializer of the main graph (not
in external data, not a graph output) whose every reader is an Add, a Sub, a Gemm's C or a
LayerNormalization's scale or bias as float16, rebuilt by Cast(to float) in front of the graph:
b′ = float32(float16(b)), relative error ≤ 2⁻¹¹ (below float16's normal range, absolute error
≤ 2⁻²⁵). onnxruntime folds the Cast at load, so the loaded model is float32 as before (disk
only), and the readers are unchanged. A vector that float16 cannot hold (|b| > 65504, or not
finite) stays float32. Applied twice, nothing more changes (the float16 vector's reader is the
Cast).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["float16_biases", "float16_saving"]

_READERS = {"Add": None, "Sub": None, "Gemm": {2}, "LayerNormalization": {1, 2}}  # op: input slots (None: any)


def _eligible(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    g = model.graph
    readers: dict[str, list] = {}
    for n in g.node:
        for i, x in enumerate(n.input):
            readers.setdefault(x, []).append((n.op_type, i))
    outputs = {o.name for o in g.output}
    out = []
    for t in g.initializer:
        if t.data_type != TensorProto.FLOAT or len(t.dims) != 1 or t.name in outputs \
                or t.data_location == TensorProto.EXTERNAL or not readers.get(t.name):
            continue
        if not all(op in _READERS and (_READERS[op] is None or i in _READERS[op]) for op, i in readers[t.name]):
            continue
        a = numpy_helper.to_array(t)
        if a.size and np.all(np.isfinite(a)) and np.abs(a).max() <= 65504:
            out.append(t)
    return out


def float16_saving(model: onnx.ModelProto) -> int:
    """Bytes float16_biases would save on ``model`` (about half its eligible vectors; the model
    is not changed)."""
    return sum(2 * int(np.prod(t.dims)) for t in _eligible(model))


def float16_biases(model: onnx.ModelProto) -> int:
    """Store the eligible vectors (see the module) as float16 with a Cast in front of the graph,
    in place; returns how many."""
    todo = _eligible(model)
    if not todo:
        return 0
    names = {t.name for t in model.graph.initializer}
    casts = []
    for t in todo:
        name, half = t.name, f"{t.name}.f16"
        while half in names:
            half += "_"
        names.add(half)
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), half))
        casts.append(helper.make_node("Cast", [half], [name], to=TensorProto.FLOAT))
    for i, n in enumerate(casts):
        model.graph.node.insert(i, n)
    return len(todo)
