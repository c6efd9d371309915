"""Recognise weights that a model already stores quantized, and say so.

onnxhmf factorizes float weights. A model that comes quantized (onnxruntime's
``quantize_dynamic``, ``quantize_static`` in QDQ or QOperator form, its MatMulNBits int4
quantizer, or hand-made ``GatherBlockQuantized``) keeps integer codes plus scales: factorizing
those would first dequantize them to float, which grows the file and changes the numerics the
model was quantized (and possibly calibrated) for. So each such weight is reported as skipped
with what it is (dtype, op, scheme), and :func:`quantized_summary` gives one note for the model.
The float weights next to them (a Gemm the quantizer left alone, an embedding table) are
compressed as usual.

Recognised readers of a constant integer weight (8 bits or fewer):

    MatMulInteger B, DynamicQuantizeMatMul B, QLinearMatMul b, QGemm B        int8/uint8
    DynamicQuantizeLSTM W and R                                                 int8
    MatMulNBits B (packed, logical K×N from its attributes)                     2–8 bit blocks
    GatherBlockQuantized data, Gather of an int8/uint8 table                    codes
    ConvInteger w, QLinearConv w                                                int8/uint8
    DequantizeLinear → MatMul / Gemm / Gather (QDQ, also through a Transpose)  int8/uint8/int4/...
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .index import ConstRef, GraphIndex
from .groups import Use, WeightGroup

__all__ = ["QuantizedWeight", "find_quantized_weights", "quantized_reason", "quantized_summary", "all_quantized_message",
           "QUANT_TYPES"]

QUANT_TYPES = {
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
    *(getattr(onnx.TensorProto, n) for n in ("INT2", "UINT2") if hasattr(onnx.TensorProto, n)),
}

ONLY_FLOAT = "left untouched, onnxhmf compresses float weights only"

# (op_type, domain) -> {input slot: (what, scheme)}
_READERS = {
    ("MatMulInteger", ""): {1: ("MatMulInteger weight", "dynamic quantization")},
    ("DynamicQuantizeMatMul", "com.microsoft"): {1: ("DynamicQuantizeMatMul weight", "dynamic quantization")},
    ("QLinearMatMul", ""): {3: ("QLinearMatMul weight", "static quantization, QOperator")},
    ("QGemm", "com.microsoft"): {3: ("QGemm weight", "static quantization, QOperator")},
    ("DynamicQuantizeLSTM", "com.microsoft"): {1: ("DynamicQuantizeLSTM W", "dynamic quantization"),
                                               2: ("DynamicQuantizeLSTM R", "dynamic quantization")},
    ("MatMulNBits", "com.microsoft"): {1: ("MatMulNBits weight", "block-quantized")},
    ("GatherBlockQuantized", "com.microsoft"): {0: ("GatherBlockQuantized table", "block-quantized")},
    ("ConvInteger", ""): {1: ("ConvInteger weight", "dynamic quantization")},
    ("QLinearConv", ""): {3: ("QLinearConv weight", "static quantization, QOperator")},
}


@dataclass
class QuantizedWeight(WeightGroup):
    """A weight stored quantized; ``shape`` is its logical 2-D shape (K×N for MatMulNBits)."""

    logical: tuple[int, int] = (0, 0)
    what: str = ""  # e.g. "MatMulInteger weight"
    scheme: str = ""  # e.g. "dynamic quantization"
    bits: int = 8

    @property
    def shape(self) -> tuple[int, int]:
        return self.logical


def _dtype(t: int) -> str:
    return onnx.TensorProto.DataType.Name(t).lower()


def _bits(t: int) -> int:
    name = onnx.TensorProto.DataType.Name(t)
    return int("".join(c for c in name if c.isdigit()) or 8)


def _logical(dims: tuple[int, ...]) -> tuple[int, int]:
    if len(dims) == 2:
        return int(dims[0]), int(dims[1])
    if len(dims) < 2:
        return 1, int(np.prod(dims)) if dims else 1
    return int(np.prod(dims[:-1])), int(dims[-1])


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _reason(q: "QuantizedWeight") -> str:
    codes = f"{q.bits}-bit codes in " if q.bits != _bits(q.ref.data_type) else ""
    return f"already quantized ({codes}{_dtype(q.ref.data_type)} {q.what}, {q.scheme}): {ONLY_FLOAT}"


def quantized_reason(index: GraphIndex, ref: ConstRef) -> str | None:
    """Why an integer (8 bits or fewer) weight read directly by a MatMul/Gemm/Gather is left
    alone (quantize_dynamic's and QOperator's quantized embeddings: Gather of uint8 codes), or
    None when ``ref`` is not of a quantized dtype."""
    if ref.data_type not in QUANT_TYPES:
        return None
    ops = sorted({n.op_type for n in index.readers(ref.name, index.scopes[ref.scope])})
    what = "table read by Gather" if ops == ["Gather"] else f"weight read by {'/'.join(ops) or 'nothing'}"
    return f"already quantized ({_dtype(ref.data_type)} {what}, its scale applied downstream): {ONLY_FLOAT}"


def all_quantized_message(sites) -> str | None:
    """The error line's text when every site was skipped as already quantized (SiteReports)."""
    kinds = [s.reason.split(": ")[0] for s in sites if s.reason.startswith("already quantized")]
    if not kinds or len(kinds) != len(sites):
        return None
    counts: dict[str, int] = {}
    for k in kinds:
        k = k[len("already quantized ("):-1] if k.endswith(")") else k
        counts[k] = counts.get(k, 0) + 1
    return (f"every weight is already quantized ({'; '.join(f'{n}x {k}' for k, n in sorted(counts.items()))}); "
            "onnxhmf compresses float weights only")


def _make(index: GraphIndex, ref: ConstRef, node, scope, what: str, scheme: str, kind: str) -> QuantizedWeight:
    logical = _logical(ref.dims)
    bits = _bits(ref.data_type)
    if node.op_type == "MatMulNBits":
        logical = (int(_attr(node, "K", logical[0])), int(_attr(node, "N", logical[1])))
        bits = int(_attr(node, "bits", 4))
        scheme = f"{scheme}, block {_attr(node, 'block_size', '?')}"
    q = QuantizedWeight(ref, [Use(node, kind, False, scope=scope.path)], logical=logical, what=what, scheme=scheme,
                        bits=bits)
    q.skip_reason = _reason(q)
    return q


def _dq_consumers(index: GraphIndex, dq: onnx.NodeProto, scope) -> list[tuple[onnx.NodeProto, str]]:
    """(node, kind) of the MatMul/Gemm/Gather that read a DequantizeLinear's output, directly or
    through a Transpose."""
    out = []
    for c in index.readers(dq.output[0], scope):
        if c.op_type == "Transpose":
            out += [(cc, cc.op_type.lower()) for cc in index.readers(c.output[0], index.node_scope(c))
                    if cc.op_type in ("MatMul", "Gemm")]
        elif c.op_type in ("MatMul", "Gemm", "Gather"):
            out.append((c, c.op_type.lower()))
    return out


def find_quantized_weights(index: GraphIndex, seen: set) -> list[QuantizedWeight]:
    """Every constant integer weight read by a quantized op or through DequantizeLinear, in
    every graph; ``seen``: (scope, name) keys already reported elsewhere."""
    found: dict[tuple[str, str], QuantizedWeight] = {}
    for scope, node in index.nodes():
        slots = _READERS.get((node.op_type, "" if node.domain == "ai.onnx" else node.domain), {})
        for slot, (what, scheme) in slots.items():
            if len(node.input) <= slot or not node.input[slot]:
                continue
            ref = index.const(node.input[slot], scope)
            if ref is None or ref.data_type not in QUANT_TYPES:
                continue
            key = (ref.scope, ref.name)
            if key in seen:
                continue
            if key in found:
                found[key].uses.append(Use(node, node.op_type.lower(), False, scope=scope.path))
            else:
                found[key] = _make(index, ref, node, scope, what, scheme, node.op_type.lower())
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx", "com.microsoft"):
            ref = index.const(node.input[0], scope)
            if ref is None or ref.data_type not in QUANT_TYPES or (ref.scope, ref.name) in seen:
                continue
            readers = _dq_consumers(index, node, scope)
            if not readers or (ref.scope, ref.name) in found:
                continue
            ops = "/".join(sorted({k.capitalize() if k != "matmul" else "MatMul" for _, k in readers}))
            axis = _attr(node, "axis", 1)
            block = _attr(node, "block_size", 0)
            how = f"block {block}" if block else ("per-tensor" if len(node.input) < 2 or not _per_channel(index, node, scope)
                                                  else f"per-channel, axis {axis}")
            q = _make(index, ref, readers[0][0], scope, f"weight, DequantizeLinear → {ops}", f"QDQ, {how}",
                      readers[0][1])
            q.uses += [Use(n, k, False, scope=index.node_scope(n).path) for n, k in readers[1:]]
            found[(ref.scope, ref.name)] = q
    return list(found.values())


def _per_channel(index: GraphIndex, dq: onnx.NodeProto, scope) -> bool:
    s = index.const(dq.input[1], scope)
    return s is not None and int(np.prod(s.dims)) > 1


def quantized_summary(groups: list[WeightGroup], rewritten: set[str]) -> str | None:
    """One note: how many weights (and parameters) come quantized, by op and scheme, and what
    was compressed instead."""
    q = [g for g in groups if isinstance(g, QuantizedWeight) or (g.skip_reason or "").startswith("already quantized")]
    if not q:
        return None
    kinds: dict[str, int] = {}
    for g in q:
        label = f"{g.what} ({g.scheme})" if isinstance(g, QuantizedWeight) else "integer Gather table"
        kinds[label] = kinds.get(label, 0) + 1
    params = sum(g.params for g in q)
    floats = [g for g in groups if g not in q and g.ref.data_type in (1, 10, 11)]
    done = [g for g in floats if g.name in rewritten]
    tail = (f"compressed {len(done)} of the {len(floats)} float weight(s) as usual" if floats
            else "the model has no float MatMul/Gemm/Gather weight left to compress")
    return (f"already quantized: {len(q)} weight(s), {params:,} params (" +
            ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) +
            f") left as they are (onnxhmf factorizes float weights; dequantizing them to factorize would grow "
            f"the file and change the numerics they were quantized for); {tail}")
