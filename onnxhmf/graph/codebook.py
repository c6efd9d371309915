"""A product-quantized Gather table (factorize/codebook.py) in standard ONNX ops.

Each ``Gather(E, ids)`` (axis 0) becomes

    c  = Gather(codes, ids)                    [..., S]  uint8
    ix = Cast(c, int64) + offsets               offsets[s] = s·k
    v  = Gather(codebook, ix)                  [..., S, d]  (codebook: the S codebooks stacked, S·k × d)
    (Cast(v, float) when the codebook is float16)
    E[ids] = Reshape(v, [0, …, 0, D])

An int8 codebook is rebuilt first, from constants only, which onnxruntime folds at load:
codebook = Reshape(Cast(q, float) · a, [S·k, d]) (q S×k×d int8, a S×1×1 float32).

so the loaded model holds the uint8 codes and the small codebooks, and only the gathered rows
become float (nothing is constant-folded: every Gather reads the run-time ids). Opset ≥ 11, the
input's opset is kept.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import OnnxHmfError
from ..factorize.codebook import ProductQuantized
from .qdq import _consumers, _index_rank, _rebuild, _take, site_kind

__all__ = ["codebook_table"]


def codebook_table(model: onnx.ModelProto, name: str, pq: ProductQuantized) -> int:
    """Store the Gather table ``name`` (V×D, site_kind 'table') as ``pq``'s codes and codebooks;
    returns the number of Gathers rewritten."""
    kind = site_kind(model, name)
    arr = next((t for t in model.graph.initializer if t.name == name), None)
    if kind != "table" or arr is None or tuple(arr.dims) != pq.shape:
        raise OnnxHmfError(f"{name}: not a product-quantized table site ({kind}, {pq.shape} codes for "
                           f"{None if arr is None else tuple(arr.dims)})")
    gathers = [u for u in _consumers(model.graph, name) if u.op_type == "Gather"]
    ranks = {g.input[1]: _index_rank(model, g.input[1]) for g in gathers}
    if None in ranks.values():
        raise OnnxHmfError(f"{name}: the rank of a Gather's indices is unknown")
    _take(model, name)
    S, k, d = pq.codebooks.shape
    D = S * d
    base = f"{name}.pq{d}"
    init = model.graph.initializer
    half = pq.itemsize == 2
    mk = helper.make_node
    init.append(numpy_helper.from_array(pq.codes.astype(np.uint8), f"{base}.codes"))
    if pq.itemsize == 1:
        q, a = pq.int8_books()
        book = f"{base}.codebook"
        init.extend([numpy_helper.from_array(q, book + "8"), numpy_helper.from_array(a, book + ".scale"),
                     numpy_helper.from_array(np.array([S * k, d], np.int64), book + ".shape")])
        pre = [mk("Cast", [book + "8"], [book + "8f"], name=book + "8f", to=TensorProto.FLOAT),
               mk("Mul", [book + "8f", book + ".scale"], [book + "3"], name=book + "3"),
               mk("Reshape", [book + "3", book + ".shape"], [book], name=book)]
        for i, n in enumerate(pre):
            model.graph.node.insert(i, n)
    else:
        init.append(numpy_helper.from_array(pq.codebooks.reshape(S * k, d).astype(np.float16 if half else np.float32),
                                            f"{base}.codebook"))
    init.append(numpy_helper.from_array(np.arange(S, dtype=np.int64) * k, f"{base}.offsets"))
    for r in sorted(set(ranks.values())):
        init.append(numpy_helper.from_array(np.array([0] * r + [D], np.int64), f"{base}.shape{r}"))
    count = iter(range(1 << 30))

    def fn(u):
        if u.op_type != "Gather" or u.input[0] != name:
            return None
        ids, out, p = u.input[1], u.output[0], f"{u.output[0]}.pq{next(count)}"
        v = p + ".v"
        ns = [mk("Gather", [f"{base}.codes", ids], [p + ".c"], name=p + ".c", axis=0),
              mk("Cast", [p + ".c"], [p + ".ci"], name=p + ".ci", to=TensorProto.INT64),
              mk("Add", [p + ".ci", f"{base}.offsets"], [p + ".ix"], name=p + ".ix"),
              mk("Gather", [f"{base}.codebook", p + ".ix"], [v], name=v, axis=0)]
        if half:
            ns.append(mk("Cast", [v], [p + ".vf"], name=p + ".vf", to=TensorProto.FLOAT))
            v = p + ".vf"
        return ns + [mk("Reshape", [v, f"{base}.shape{ranks[ids]}"], [out], name=p + ".r")]
    return _rebuild(model, fn)
