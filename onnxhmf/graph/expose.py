"""Make values computed inside If/Loop/Scan bodies observable as model outputs (calibration).

A body's value v cannot be a model output directly. It is threaded out through its owner, one
level at a time, up to the main graph:

    If    v becomes an extra output of the branch that computes it; the other branch returns an
          empty tensor of the same element type and rank (no rows: it adds nothing to a Gram
          matrix), and the If node gets the extra output.
    Loop  v becomes an extra scan output of the body: the Loop returns v of every iteration
          stacked on a new leading axis (every row of every iteration, for XᵀX).
    Scan  the same, as an extra scan output (axis 0).

Values of bodies owned by any other op, or of a name several sibling bodies define, are not
exposed and get a reason instead.
"""
from __future__ import annotations

import onnx
from onnx import helper

from .index import GraphIndex, Scope

__all__ = ["expose_values"]


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types of every value the shape inference can type, in every graph."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    out: dict[str, onnx.TypeProto] = {}

    def walk(g: onnx.GraphProto) -> None:
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                out.setdefault(vi.name, vi.type)
        for node in g.node:
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(sub)

    walk(inferred.graph)
    return out


def _value_info(name: str, t: onnx.TypeProto | None) -> onnx.ValueInfoProto:
    elem = t.tensor_type.elem_type if t is not None else onnx.TensorProto.FLOAT
    return helper.make_tensor_value_info(name, elem, None)


def _rank(t: onnx.TypeProto | None) -> int:
    if t is not None and t.tensor_type.HasField("shape"):
        return len(t.tensor_type.shape.dim)
    return 2


def _empty(name: str, t: onnx.TypeProto | None) -> onnx.NodeProto:
    elem = t.tensor_type.elem_type if t is not None else onnx.TensorProto.FLOAT
    value = helper.make_tensor(f"{name}_value", elem, [0] * _rank(t), [])
    return helper.make_node("Constant", [], [name], name=f"{name}_node", value=value)


def _thread_out(index: GraphIndex, scope: Scope, value: str, types: dict, fresh) -> str | None:
    """Make ``value`` (of body ``scope``) an output of ``scope``'s owner; the owner's new output
    name in the parent scope, or None when the owner is not an If/Loop/Scan."""
    owner, t = scope.owner, types.get(value)
    if owner is None or owner.domain not in ("", "ai.onnx") or owner.op_type not in ("If", "Loop", "Scan"):
        return None
    copy = fresh(f"{value}.onnxhmf_out")  # (a body input passed straight through trips ORT's Scan)
    scope.graph.node.append(helper.make_node("Identity", [value], [copy], name=f"{copy}_node"))
    scope.graph.output.append(_value_info(copy, t))
    if owner.op_type == "If":
        for a in owner.attribute:
            if a.type == onnx.AttributeProto.GRAPH and a.g is not scope.graph:
                dummy = fresh(f"{value}.empty")
                a.g.node.append(_empty(dummy, t))
                a.g.output.append(_value_info(dummy, t))
    elif owner.op_type == "Scan":
        for a in owner.attribute:
            if a.name in ("scan_output_axes", "scan_output_directions"):
                a.ints.append(0)
    out = fresh(f"{value}.onnxhmf_capture")
    owner.output.append(out)
    return out


def expose_values(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, dict[str, str], dict[str, str]]:
    """(a copy of ``model`` whose outputs include the named body values, {name: its model output
    name}, {name: why it could not be exposed}). Main-graph names are left to the caller."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    index = GraphIndex(m)
    types = _types(m)
    taken = {vi.name for vi in m.graph.output} | {n for _, node in index.nodes() for n in list(node.output) + list(node.input)}
    taken |= {name for s in index.scopes.values() for name in s.initializers} | {i for s in index.scopes.values() for i in s.inputs}

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    exposed, failed = {}, {}
    for name in dict.fromkeys(names):
        homes = [s for s in index.scopes.values() if s.path and s.defines(name)]
        if len(homes) != 1:
            failed[name] = "defined in several sibling bodies" if homes else "not a value of any body"
            continue
        scope, cur = homes[0], name
        while scope is not None and scope.path:
            cur = _thread_out(index, scope, cur, types, fresh)
            if cur is None:
                break
            types.setdefault(cur, types.get(name))
            scope = scope.parent
        if cur is None:
            failed[name] = f"inside a body of a {homes[0].owner.op_type} node, which cannot return it"
            continue
        m.graph.output.append(_value_info(cur, None if name not in types else types[name]))
        exposed[name] = cur
    return m, exposed, failed


def lift_initializers(model: onnx.ModelProto, refs) -> list[str]:
    """Move body initializers (ConstRefs with a scope) into the main graph, in place: a body
    reads a main-graph initializer of that name as before (outer scope), and a main-graph
    initializer can be made an overridable input, which a body's own cannot. Only names that no
    other graph defines are moved; returns them."""
    index = GraphIndex(model)
    moved = []
    for ref in refs:
        if not ref.scope or ref.kind != "initializer":
            continue
        if sum(s.defines(ref.name) for s in index.scopes.values()) != 1:
            continue
        g = index.scopes[ref.scope].graph
        i = next(i for i, t in enumerate(g.initializer) if t.name == ref.name)
        model.graph.initializer.append(g.initializer[i])
        del g.initializer[i]
        moved.append(ref.name)
    return moved
