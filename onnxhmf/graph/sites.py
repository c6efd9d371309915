"""Find compressible sites: constant 2-D weights of MatMul/Gemm and Gather embedding tables.

A *use* is one node that reads a weight; a *weight group* is one stored constant tensor with
all its uses. A tied embedding (Gather(E, ids) and MatMul(h, Transpose(E))) is one group with
two uses, so it is factorized once and stored once.

A group is rewritable only if every reader of the tensor (and of any Transpose of it) is a
recognised use: anything else (an Add, a graph output) would still need the dense tensor, so
the group is reported as skipped with the reason.

Readers are found in every graph that sees the tensor: a main-graph initializer read by a
MatMul inside an If/Loop/Scan body (an outer-scope read) has that MatMul as a use, and the
initializers and Constants of the bodies themselves are weights too (``ref.scope`` says which
graph holds them). A weight read both inside and outside a body is one group.
"""
from __future__ import annotations

import onnx

from .groups import Use, WeightGroup  # (defined there, re-exported here)
from .index import FLOAT_TYPES, ConstRef, GraphIndex
from .quantized import find_quantized_weights, quantized_reason

__all__ = ["Use", "WeightGroup", "find_weight_groups"]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _use_of(index: GraphIndex, node: onnx.NodeProto, tensor: str) -> tuple[Use | None, str | None]:
    """Classify how ``node`` reads ``tensor`` (a weight or a Transpose of one)."""
    scope = index.node_scope(node)
    via = tensor if index.transpose_of_const(tensor, scope) is not None else None
    if node.domain not in ("", "ai.onnx"):
        return None, f"read by custom-domain node {node.name!r} ({node.domain}::{node.op_type})"
    op = node.op_type
    if op == "MatMul" and len(node.input) == 2 and node.input[1] == tensor:
        if index.is_constant(node.input[0], scope):
            return None, f"MatMul {node.name!r} has two constant inputs"
        return Use(node, "matmul", transposed=via is not None, via_transpose=via, scope=scope.path), None
    if op == "Gemm" and len(node.input) >= 2 and node.input[1] == tensor and node.input[0] != tensor:
        if _attr(node, "transA", 0):
            return None, f"Gemm {node.name!r} has transA=1"
        trans = bool(_attr(node, "transB", 0)) != (via is not None)
        return Use(node, "gemm", transposed=trans, via_transpose=via, scope=scope.path), None
    if op == "Gather" and node.input[0] == tensor and via is None:
        if _attr(node, "axis", 0) != 0:
            return None, f"Gather {node.name!r} on axis {_attr(node, 'axis', 0)}"
        return Use(node, "gather", transposed=False, scope=scope.path), None
    return None, f"read by {op} node {node.name!r} as input {list(node.input).index(tensor)}"


def _slot_nodes(index: GraphIndex):
    """(scope, node, weight slot) of every default-domain MatMul/Gemm/Gather, all graphs."""
    for scope, node in index.nodes():
        if node.op_type not in ("MatMul", "Gemm", "Gather") or node.domain not in ("", "ai.onnx"):
            continue
        slot = 0 if node.op_type == "Gather" else 1
        if len(node.input) > slot and node.input[slot]:
            yield scope, node, slot


def find_weight_groups(index: GraphIndex) -> list[WeightGroup]:
    """All constant 2-D tensors read by at least one MatMul/Gemm/Gather, in graph order (the
    main graph first, then each If/Loop/Scan body), with the already-quantized weights."""
    groups: dict[tuple[str, str], WeightGroup] = {}

    def candidate(tensor: str, scope) -> ConstRef | None:
        ref = index.const(tensor, scope)
        if ref is None:
            ref = index.transpose_of_const(tensor, scope)
        return ref if ref is not None and len(ref.dims) == 2 else None

    for scope, node, slot in _slot_nodes(index):
        ref = candidate(node.input[slot], scope)
        if ref is not None and (ref.scope, ref.name) not in groups:
            groups[(ref.scope, ref.name)] = WeightGroup(ref)

    for group in groups.values():
        group.skip_reason = _collect_uses(index, group)
    quantized = find_quantized_weights(index, set(groups))
    seen = set(groups) | {(g.ref.scope, g.ref.name) for g in quantized}
    out = list(groups.values()) + quantized + _wrapped_weights(index, seen)
    out += _overridable_weights(index, seen | {(g.ref.scope, g.ref.name) for g in out})
    _label_duplicates(out)
    return out


def _label_duplicates(groups: list[WeightGroup]) -> None:
    """Sibling bodies may each hold a tensor of one name: qualify those names by scope."""
    count: dict[str, int] = {}
    for g in groups:
        count[g.ref.name] = count.get(g.ref.name, 0) + 1
    for g in groups:
        if count[g.ref.name] > 1 and g.ref.scope:
            g.label = f"{g.ref.scope}::{g.ref.name}"


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
        if t is None or name not in index.graph_inputs or len(t.dims) != 2 or ("", name) in seen or name in out:
            continue
        ref = ConstRef(name, "initializer", tuple(t.dims), t.data_type)
        out[name] = WeightGroup(ref, [Use(node, node.op_type.lower(), False)], skip_reason=INPUT_WEIGHT)
    return list(out.values())


def _non_finite(index: GraphIndex, ref: ConstRef) -> int:
    """How many entries of the weight are NaN or ±Inf (read in row blocks: no full-size mask)."""
    import numpy as np
    from onnx.external_data_helper import uses_external_data

    if index.store is None and uses_external_data(index.tensor(ref)):
        return 0  # not readable from this index (no store): the pass that rewrites it reads it with one
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


def _wrapped_weights(index: GraphIndex, seen: set) -> list[WeightGroup]:
    """Constant weights that reach a MatMul/Gemm/Gather only through DequantizeLinear or Cast.

    They are not rewritten (factorizing would dequantize or widen them), but reported as
    skipped with the reason, so the user sees why they were left alone.
    """
    out: dict[tuple[str, str], WeightGroup] = {}
    for scope, node, slot in _slot_nodes(index):
        s = index.defining_scope(node.input[slot], scope)
        prod = s.producer.get(node.input[slot]) if s is not None else None
        if prod is None or prod.op_type not in _WRAPPERS or prod.domain not in ("", "ai.onnx"):
            continue
        ref = index.const(prod.input[0], s)
        if ref is None or len(ref.dims) != 2 or (ref.scope, ref.name) in seen or (ref.scope, ref.name) in out:
            continue
        out[(ref.scope, ref.name)] = WeightGroup(ref, [Use(node, node.op_type.lower(), False, scope=scope.path)],
                                                 skip_reason=_WRAPPERS[prod.op_type])
    return list(out.values())


def _collect_uses(index: GraphIndex, group: WeightGroup) -> str | None:
    """Fill ``group.uses`` (readers in every graph that sees the tensor); return why the group
    cannot be rewritten, or None."""
    ref = group.ref
    if ref.data_type not in FLOAT_TYPES:
        why = quantized_reason(index, ref)
        if why:  # its readers, for the report
            group.uses = [Use(n, n.op_type.lower(), False, scope=index.node_scope(n).path)
                          for n in index.readers(ref.name, index.scopes[ref.scope])]
        return why or f"dtype {onnx.TensorProto.DataType.Name(ref.data_type)} is not fp32/fp16/fp64"
    if 0 in ref.dims:
        return "empty tensor"
    bad = _non_finite(index, ref)
    if bad:
        return (f"{bad} of its {group.params} values are NaN or Inf: left untouched (a factorization, pruning or "
                "quantization would spread or hide them)")
    home = index.scopes[ref.scope]
    readers: list[tuple[onnx.NodeProto, str]] = []
    for consumer in index.readers(ref.name, home):
        cs = index.node_scope(consumer)
        if consumer.op_type == "Transpose" and index.transpose_of_const(consumer.output[0], cs) is not None:
            t_out = consumer.output[0]
            if index.output_of(t_out, cs) is not None:
                return f"Transpose output {t_out!r} is an output of the {index.output_of(t_out, cs)}"
            readers.extend((c, t_out) for c in index.readers(t_out, cs))
        else:
            readers.append((consumer, ref.name))
    where = index.output_of(ref.name, home)
    if where is not None:
        return "tensor is a graph output" + ("" if where == "main graph" else f" (of the {where})")
    for node, tensor in readers:
        use, why = _use_of(index, node, tensor)
        if use is None:
            return why
        group.uses.append(use)
    if not group.uses:
        return "no MatMul/Gemm/Gather reads it"
    return None
