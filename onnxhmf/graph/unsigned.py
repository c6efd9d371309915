"""Lossless int8 → uint8 weights for MatMulInteger (``--int8-weights``).

MatMulInteger computes Y = (A − z_A)·(B − z_B) in int32. Shifting the weight and its zero point
by the same 128,

    B' = B + 128 (uint8),   z_B' = z_B + 128   (absent z_B: the constant 128),

leaves every B − z_B, hence Y, unchanged: the same integers, the same bytes. What changes is the
kernel onnxruntime picks. Its x86 u8×s8 kernels on CPUs without VNNI (AVX2, AVX-512BW) add each
adjacent pair of uint8·int8 products in a saturating int16 (vpmaddubsw), so full-range operands
overflow (``runtime.matmulinteger_saturates``); its u8×u8 kernel widens to int16 first and is
exact. Measured on an AMD EPYC (AVX2), onnxruntime 1.32, 2026-12-03, glassllm at 8×128 tokens, one thread:
onnxruntime's per-channel dynamic int8 goes from KL 0.00521 to 0.00320 with every weight
shifted, at 0.90 of the float latency instead of 0.83 (u8×u8 is the slower kernel). Per-tensor
activations and weights seldom reach the int16 limit; per-token activations (graph/pertoken.py)
and per-channel weights span the whole range and do, so those are the sites to shift. The
pattern still fuses (MatMulIntegerToFloat, DynamicQuantizeMatMul take uint8 weights).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .index import readers_of, subgraph_names
from .qdq import _graphs

__all__ = ["unsigned_weights", "signed_weights", "SHIFT_ZERO"]

SHIFT_ZERO = "hmf.u8.z128"  # the scalar uint8 zero point 128 of a shifted weight that had none


def _int8(t: onnx.TensorProto | None) -> bool:
    return (t is not None and t.data_type == onnx.TensorProto.INT8
            and t.data_location != onnx.TensorProto.EXTERNAL)


def unsigned_weights(model: onnx.ModelProto, only: set[str] | None = None) -> int:
    """Shift in place the int8 initializer weights of ``model``'s MatMulIntegers (every graph,
    control-flow bodies included) to uint8, as the module docstring gives; ``only``: just the
    MatMulIntegers whose quantized input (A) is named in it. A weight is left alone where
    another kind of node, a body, or a graph output reads it, where two of its readers differ in
    zero point, or where that zero point is not an int8 initializer of the same graph. Returns
    how many weights were shifted."""
    done = 0
    for g in _graphs(model.graph):
        inits = {t.name: t for t in g.initializer}
        readers = readers_of(g)
        inner = subgraph_names(g) | {o.name for o in g.output}
        todo = [n for n in g.node if n.op_type == "MatMulInteger" and n.domain in ("", "ai.onnx") and len(n.input) >= 2
                and _int8(inits.get(n.input[1])) and (only is None or n.input[0] in only)]
        old: set[str] = set()  # zero points shared with other weights, replaced by a shifted copy
        for b in dict.fromkeys(n.input[1] for n in todo):
            users = readers.get(b, [])
            zps = {u.input[3] if len(u.input) > 3 else "" for u in users}
            if b in inner or any(u.op_type != "MatMulInteger" or u.input[1] != b or b in u.input[:1] or
                                 (only is not None and u.input[0] not in only) for u in users) or len(zps) != 1:
                continue
            zp = zps.pop()
            if zp and (not _int8(inits.get(zp)) or zp in inner or
                       any(r.op_type != "MatMulInteger" or list(r.input).index(zp) != 3 for r in readers.get(zp, []))):
                continue
            W = numpy_helper.to_array(inits[b]).astype(np.int16) + 128
            inits[b].CopyFrom(numpy_helper.from_array(W.astype(np.uint8), b))
            if zp:
                z = numpy_helper.to_array(inits[zp]).astype(np.int16) + 128
                if {id(r) for r in readers.get(zp, [])} <= {id(u) for u in users}:  # read by these weights' nodes only
                    inits[zp].CopyFrom(numpy_helper.from_array(z.astype(np.uint8), zp))
                    new = zp
                else:
                    new = f"{zp}.u8"
                    old.add(zp)
                    if new not in inits:
                        inits[new] = numpy_helper.from_array(z.astype(np.uint8), new)
                        g.initializer.append(inits[new])
            else:
                new = SHIFT_ZERO
                if new not in inits:
                    inits[new] = numpy_helper.from_array(np.array(128, np.uint8), new)
                    g.initializer.append(inits[new])
            for u in users:
                while len(u.input) < 4:
                    u.input.append("")
                u.input[3] = new
                readers.setdefault(new, []).append(u)
            if zp:
                readers[zp] = [r for r in readers.get(zp, []) if all(r is not u for u in users)]
            stale = [v for v in g.value_info if v.name in (b, zp)]
            for v in stale:
                g.value_info.remove(v)
            done += 1
        read = {i for n in g.node for i in n.input} | inner
        for t in [t for t in g.initializer if t.name in old and t.name not in read]:
            g.initializer.remove(t)
    return done


_PASS = {"Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Concat", "BitShift", "Slice", "Gather"}


def signed_weights(model: onnx.ModelProto) -> int:
    """How many MatMulIntegers (every graph) may take an int8 weight: B traced back through
    layout ops (Reshape, Transpose, Concat, BitShift, ...) to an initializer or a Cast; one
    whose type cannot be told counts as int8. The kernel that saturates is these ones'."""
    n = 0
    for g in _graphs(model.graph):
        inits = {t.name: t.data_type for t in g.initializer}
        made = {o: node for node in g.node for o in node.output}
        infos = {v.name: v.type.tensor_type.elem_type for v in g.value_info}
        for node in g.node:
            if node.op_type != "MatMulInteger" or len(node.input) < 2:
                continue
            name, kind, seen = node.input[1], None, 0
            while kind is None and seen < 32:
                seen += 1
                if name in inits:
                    kind = inits[name]
                elif name in infos and infos[name]:
                    kind = infos[name]
                elif name in made and made[name].op_type == "Cast":
                    kind = next((a.i for a in made[name].attribute if a.name == "to"), None)
                elif name in made and made[name].op_type in _PASS and made[name].input:
                    name = made[name].input[0]
                else:
                    break
            n += kind != onnx.TensorProto.UINT8
    return n
