"""Fold a column permutation of a MatMul's output into its consumers' constants.

HMF with dense columns computes Y·P (columns in [dense, rest] order). Instead of a Gather
that restores the order, we can keep Y·P when everything downstream commutes with P:

    elementwise ops whose other operands are scalars or last-axis vectors c  (use c·P),
    ending in MatMul(·, W) with constant W                                  (use Pᵀ·W).

The region must not leak: no graph output, no subgraph reader, no other consumer. It lies in
one graph: the main graph or the If/Loop/Scan body that computes the permuted output.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .edit import GraphEditor
from .index import GraphIndex

__all__ = ["FoldPlan", "plan_fold", "apply_vector_permutations"]

UNARY = {
    "Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Softplus",
    "Softsign", "Elu", "LeakyRelu", "Selu", "HardSigmoid", "HardSwish", "Mish", "Identity", "Sin", "Cos",
    "Floor", "Ceil", "Round", "Sign", "Cast",
}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}


@dataclass
class FoldPlan:
    vectors: list[tuple[onnx.NodeProto, int]] = field(default_factory=list)  # (node, input slot) to permute
    terminals: list[onnx.NodeProto] = field(default_factory=list)  # MatMuls whose weight rows to permute


def _leaks(index: GraphIndex, t: str, scope) -> bool:
    """``t`` is an output of its graph or read by a body below it (or, in the main graph, by any body)."""
    if scope is index.main:
        return index.is_used_outside_main(t)
    return t in scope.outputs or any(index.node_scope(r) is not scope for r in index.readers(t, scope))


def plan_fold(index: GraphIndex, y: str, n: int) -> FoldPlan | None:
    """How to absorb a permutation of ``y``'s last axis (length n) downstream, or None.

    The region stays in the graph that computes ``y`` (the main graph or a body)."""
    scope = next((s for s in index.scopes.values() if y in s.producer), index.main)
    region, frontier, nodes, plan = {y}, [y], [], FoldPlan()
    seen_nodes: set[int] = set()
    while frontier:
        t = frontier.pop()
        if _leaks(index, t, scope):
            return None
        for c in scope.consumers.get(t, []):
            if id(c) in seen_nodes:
                continue
            seen_nodes.add(id(c))
            if c.domain not in ("", "ai.onnx"):
                return None
            if c.op_type == "MatMul" and c.input[0] in region and c.input[1] not in region and index.const(c.input[1], scope) is not None:
                if c.input[0] != t:
                    return None
                plan.terminals.append(c)
            elif c.op_type in UNARY or c.op_type in BINARY:
                nodes.append(c)
                for o in c.output:
                    region.add(o)
                    frontier.append(o)
            else:
                return None
    for c in nodes:  # every operand of the region's elementwise ops: in the region or a harmless constant
        if c.op_type == "Pow" and c.input[1] not in region:
            ref = index.const(c.input[1], scope)
            if ref is None or int(np.prod(ref.dims)) != 1:
                return None
            continue
        for slot, name in enumerate(c.input):
            if name in region:
                continue
            ref = index.const(name, scope)
            if ref is None:
                return None
            size = int(np.prod(ref.dims)) if ref.dims else 1
            if size == 1:
                continue
            if ref.kind == "initializer" and ref.dims[-1] == n and size == n:
                plan.vectors.append((c, slot))
            else:
                return None
    return plan if plan.terminals else None


def apply_vector_permutations(editor: GraphEditor, index: GraphIndex, plan: FoldPlan, perm: np.ndarray) -> None:
    """Give each region node a permuted copy of its last-axis constant: c' = c[..., perm]."""
    for node, slot in plan.vectors:
        ref = index.const(node.input[slot], index.node_scope(node))
        arr = index.array(ref)
        name = editor.add_initializer(arr[..., perm], f"{ref.name}.perm", scope=ref.scope)
        new = onnx.NodeProto()
        new.CopyFrom(editor.replacement(node))
        new.input[slot] = name
        editor.replace(node, [new])
        home = index.scopes[ref.scope]
        others = [c for c in index.readers(ref.name, home) if c is not node]
        if not others and index.output_of(ref.name, home) is None:  # a graph output or another reader keeps it
            editor.remove_tensor(ref.name, ref.scope)
