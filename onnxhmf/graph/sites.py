"""Find compressible sites: constant 2-D weights of MatMul/Gemm and Gather embedding tables.

A *use* is one node that reads a weight; a *weight group* is one stored constant tensor with
all its uses. A tied embedding (Gather(E, ids) and MatMul(h, Transpose(E))) is one group with
two uses, so it is factorized once and stored once.

A group is rewritable only if every reader of the tensor (and of any Transpose of it) is a
recognised use: anything else (an Add, a graph output, a node inside an If/Loop/Scan body)
would still need the dense tensor, so the group is reported as skipped with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from .index import FLOAT_TYPES, ConstRef, GraphIndex

__all__ = ["Use", "WeightGroup", "find_weight_groups"]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass
class Use:
    """One node reading the weight T (stored m×n).

    kind: "matmul" (Y = X·W), "gemm" (Y = α·X·W + β·C) or "gather" (Y = T[ids]).
    transposed: the node multiplies by Tᵀ instead of T (via a Transpose node, Gemm's transB,
    or both, which cancel).
    """

    node: onnx.NodeProto
    kind: str
    transposed: bool
    via_transpose: str | None = None  # name of the Transpose output the node reads, if any


@dataclass
class WeightGroup:
    ref: ConstRef
    uses: list[Use] = field(default_factory=list)
    skip_reason: str | None = None

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def shape(self) -> tuple[int, int]:
        return self.ref.dims  # type: ignore[return-value]

    @property
    def params(self) -> int:
        m, n = self.shape
        return m * n

    @property
    def ops(self) -> str:
        return "+".join(sorted({u.kind for u in self.uses})) or "-"

    @property
    def node_names(self) -> list[str]:
        return [u.node.name for u in self.uses]


def _use_of(index: GraphIndex, node: onnx.NodeProto, tensor: str) -> tuple[Use | None, str | None]:
    """Classify how ``node`` reads ``tensor`` (a weight or a Transpose of one)."""
    via = tensor if index.transpose_of_const(tensor) is not None else None
    if node.domain not in ("", "ai.onnx"):
        return None, f"read by custom-domain node {node.name!r} ({node.domain}::{node.op_type})"
    op = node.op_type
    if op == "MatMul" and len(node.input) == 2 and node.input[1] == tensor:
        if index.is_constant(node.input[0]):
            return None, f"MatMul {node.name!r} has two constant inputs"
        return Use(node, "matmul", transposed=via is not None, via_transpose=via), None
    if op == "Gemm" and len(node.input) >= 2 and node.input[1] == tensor and node.input[0] != tensor:
        if _attr(node, "transA", 0):
            return None, f"Gemm {node.name!r} has transA=1"
        trans = bool(_attr(node, "transB", 0)) != (via is not None)
        return Use(node, "gemm", transposed=trans, via_transpose=via), None
    if op == "Gather" and node.input[0] == tensor and via is None:
        if _attr(node, "axis", 0) != 0:
            return None, f"Gather {node.name!r} on axis {_attr(node, 'axis', 0)}"
        return Use(node, "gather", transposed=False), None
    return None, f"read by {op} node {node.name!r} as input {list(node.input).index(tensor)}"


def find_weight_groups(index: GraphIndex) -> list[WeightGroup]:
    """All constant 2-D tensors read by at least one MatMul/Gemm/Gather, in graph order."""
    groups: dict[str, WeightGroup] = {}

    def candidate(tensor: str) -> ConstRef | None:
        ref = index.const(tensor)
        if ref is None:
            ref = index.transpose_of_const(tensor)
        return ref if ref is not None and len(ref.dims) == 2 else None

    for node in index.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Gather") or node.domain not in ("", "ai.onnx"):
            continue
        slot = 0 if node.op_type == "Gather" else 1
        if len(node.input) <= slot or not node.input[slot]:
            continue
        ref = candidate(node.input[slot])
        if ref is not None and ref.name not in groups:
            groups[ref.name] = WeightGroup(ref)

    for group in groups.values():
        group.skip_reason = _collect_uses(index, group)
    wrapped = _wrapped_weights(index, groups)
    return list(groups.values()) + wrapped + _overridable_weights(index, {**groups, **{g.name: g for g in wrapped}})


INPUT_WEIGHT = ("initializer is also a graph input (IR 3 or keep_initializers_as_inputs=True), so a caller may feed "
                "another value: not a constant; re-export without keep_initializers_as_inputs (IR >= 4) to compress it")


def _overridable_weights(index: GraphIndex, seen: dict) -> list[WeightGroup]:
    """2-D initializers that are also graph inputs and feed a MatMul/Gemm/Gather: reported as
    skipped with the reason (they are not constants), instead of silently not being sites."""
    out: dict[str, WeightGroup] = {}
    for node in index.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Gather") or node.domain not in ("", "ai.onnx"):
            continue
        slot = 0 if node.op_type == "Gather" else 1
        if len(node.input) <= slot:
            continue
        name = node.input[slot]
        prod = index.producer.get(name)
        if prod is not None and prod.op_type == "Transpose":
            name = prod.input[0]
        t = index.initializers.get(name)
        if t is None or name not in index.graph_inputs or len(t.dims) != 2 or name in seen or name in out:
            continue
        ref = ConstRef(name, "initializer", tuple(t.dims), t.data_type)
        out[name] = WeightGroup(ref, [Use(node, node.op_type.lower(), False)], skip_reason=INPUT_WEIGHT)
    return list(out.values())


def _non_finite(index: GraphIndex, ref: ConstRef) -> int:
    """How many entries of the weight are NaN or ±Inf (read in row blocks: no full-size mask)."""
    import numpy as np

    W = index.array(ref)
    if not np.issubdtype(W.dtype, np.floating):
        return 0
    W = W.reshape(W.shape[0], -1) if W.ndim else W.reshape(1, 1)
    step = max(1, (1 << 22) // max(1, W.shape[1]))
    return int(sum(int(W[i:i + step].size - np.count_nonzero(np.isfinite(W[i:i + step]))) for i in range(0, W.shape[0], step)))


_WRAPPERS = {
    "DequantizeLinear": "quantized weight behind DequantizeLinear: left untouched",
    "Cast": "weight behind a Cast (e.g. bf16 or int8 storage): left untouched",
}


def _wrapped_weights(index: GraphIndex, seen: dict) -> list[WeightGroup]:
    """Constant weights that reach a MatMul/Gemm/Gather only through DequantizeLinear or Cast.

    They are not rewritten (factorizing would dequantize or widen them), but reported as
    skipped with the reason, so the user sees why they were left alone.
    """
    out: dict[str, WeightGroup] = {}
    for node in index.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Gather") or node.domain not in ("", "ai.onnx"):
            continue
        slot = 0 if node.op_type == "Gather" else 1
        if len(node.input) <= slot or not node.input[slot]:
            continue
        prod = index.producer.get(node.input[slot])
        if prod is None or prod.op_type not in _WRAPPERS or prod.domain not in ("", "ai.onnx"):
            continue
        ref = index.const(prod.input[0])
        if ref is None or len(ref.dims) != 2 or ref.name in seen or ref.name in out:
            continue
        out[ref.name] = WeightGroup(ref, [Use(node, node.op_type.lower(), False)],
                                    skip_reason=_WRAPPERS[prod.op_type])
    return list(out.values())


def _collect_uses(index: GraphIndex, group: WeightGroup) -> str | None:
    """Fill ``group.uses``; return why the group cannot be rewritten, or None."""
    ref = group.ref
    if ref.data_type not in FLOAT_TYPES:
        return f"dtype {onnx.TensorProto.DataType.Name(ref.data_type)} is not fp32/fp16/fp64"
    if 0 in ref.dims:
        return "empty tensor"
    bad = _non_finite(index, ref)
    if bad:
        return (f"{bad} of its {group.params} values are NaN or Inf: left untouched (a factorization, pruning or "
                "quantization would spread or hide them)")
    readers: list[tuple[onnx.NodeProto, str]] = []
    for consumer in index.consumers.get(ref.name, []):
        if consumer.op_type == "Transpose" and index.transpose_of_const(consumer.output[0]) is not None:
            t_out = consumer.output[0]
            if index.is_used_outside_main(t_out):
                return f"Transpose output {t_out!r} is a graph output or read inside a subgraph"
            readers.extend((c, t_out) for c in index.consumers.get(t_out, []))
        else:
            readers.append((consumer, ref.name))
    if index.is_used_outside_main(ref.name):
        return "tensor is a graph output or read inside an If/Loop/Scan subgraph"
    for node, tensor in readers:
        use, why = _use_of(index, node, tensor)
        if use is None:
            return why
        group.uses.append(use)
    if not group.uses:
        return "no MatMul/Gemm/Gather reads it"
    return None
