"""Read-only indexes over a ModelProto's main graph: producers, consumers, constants."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["GraphIndex", "ConstRef", "subgraph_names", "default_opset"]

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
}


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version (1 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _graph_attrs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def subgraph_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node inside a subgraph (If/Loop/Scan bodies), recursively.

    Such names may refer to tensors of the outer graph, so those tensors must be left alone.
    """
    names: set[str] = set()
    for node in graph.node:
        for sub in _graph_attrs(node):
            for inner in sub.node:
                names.update(i for i in inner.input if i)
            names.update(o.name for o in sub.output)
            names |= subgraph_names(sub)
    return names


@dataclass(frozen=True)
class ConstRef:
    """A constant tensor in the main graph: an initializer or the output of a Constant node."""

    name: str  # tensor name (initializer name or Constant output)
    kind: str  # "initializer" | "constant"
    dims: tuple[int, ...]
    data_type: int


class GraphIndex:
    """Producers, consumers and constants of ``model.graph`` (the main graph only)."""

    def __init__(self, model: onnx.ModelProto, store=None):
        g = model.graph
        self.model = model
        self.store = store  # onnxhmf.external.TensorStore: resolves external data lazily
        self.graph = g
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.graph_inputs = {i.name for i in g.input}
        self.graph_outputs = {o.name for o in g.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)
        self.in_subgraphs = subgraph_names(g)

    def const(self, name: str) -> ConstRef | None:
        """The constant behind ``name``, or None if it is computed or overridable at run time."""
        if name in self.graph_inputs:  # an initializer that is also an input can be fed a new value
            return None
        t = self.initializers.get(name)
        if t is not None:
            return ConstRef(name, "initializer", tuple(t.dims), t.data_type)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    return ConstRef(name, "constant", tuple(a.t.dims), a.t.data_type)
        return None

    def tensor(self, ref: ConstRef) -> onnx.TensorProto:
        if ref.kind == "initializer":
            return self.initializers[ref.name]
        node = self.producer[ref.name]
        return next(a.t for a in node.attribute if a.name == "value")

    def array(self, ref: ConstRef) -> np.ndarray:
        """The constant's value; for external data a read-only memmap of just this tensor.

        Without a store, external data must already be loaded into the proto.
        """
        t = self.tensor(ref)
        if self.store is not None:
            return self.store.array(t)
        return numpy_helper.to_array(t)

    def transpose_of_const(self, name: str) -> ConstRef | None:
        """If ``name`` is Transpose(C) of a 2-D constant C with perm [1, 0], return C."""
        node = self.producer.get(name)
        if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            return None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        src = self.const(node.input[0])
        if src is None or len(src.dims) != 2 or perm not in (None, [1, 0]):
            return None
        return src

    def is_constant(self, name: str) -> bool:
        return self.const(name) is not None or self.transpose_of_const(name) is not None

    def is_used_outside_main(self, name: str) -> bool:
        return name in self.in_subgraphs or name in self.graph_outputs


def count_params(model: onnx.ModelProto) -> int:
    """Elements in all initializers and Constant tensors of the main graph."""
    n = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            n += sum(int(np.prod(a.t.dims)) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return n


def vocab_sizes(model: onnx.ModelProto) -> set[int]:
    """Row counts of the constant 2-D tables Gather reads (≥ 100 rows): the vocabularies that
    logits-like outputs end in."""
    index = GraphIndex(model)
    sizes = set()
    for node in model.graph.node:
        if node.op_type == "Gather":
            ref = index.const(node.input[0])
            if ref is not None and len(ref.dims) == 2 and ref.dims[0] >= 100:
                sizes.add(ref.dims[0])
    return sizes
