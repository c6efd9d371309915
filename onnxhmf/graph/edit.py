"""Batched edits of a ModelProto's main graph: new initializers, node replacement, cleanup."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .index import _graph_attrs

__all__ = ["GraphEditor"]


def _all_names(graph: onnx.GraphProto, names: set[str]) -> None:
    names.update(t.name for t in graph.initializer)
    names.update(v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info))
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        if node.name:
            names.add(node.name)
        for sub in _graph_attrs(node):
            _all_names(sub, names)


class GraphEditor:
    """Collects edits, then applies them in one pass with :meth:`commit`.

    Replacement nodes are spliced in at the position of the node they replace, which keeps the
    node list topologically sorted: they read only that node's inputs and new constants.
    """

    def __init__(self, model: onnx.ModelProto, store=None):
        self.model = model
        self.store = store  # onnxhmf.external.TensorStore: big new tensors go to its spill file
        self.graph = model.graph
        self._names: set[str] = set()
        _all_names(self.graph, self._names)
        self._replace: dict[int, list[onnx.NodeProto]] = {}
        self._prepend: list[onnx.NodeProto] = []
        self._remove_nodes: set[int] = set()
        self._remove_tensors: set[str] = set()
        self._new_inits: list[onnx.TensorProto] = []

    def fresh(self, base: str) -> str:
        """A tensor or node name not used anywhere in the model, derived from ``base``."""
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def add_initializer(self, array: np.ndarray, base: str) -> str:
        name = self.fresh(base)
        self._new_inits.append(self.make_tensor(array, name))
        return name

    def make_tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        """A TensorProto for ``array``, spilled to disk as external data when a store says so."""
        if self.store is not None:
            return self.store.tensor(array, name)
        array = np.asarray(array)
        return numpy_helper.from_array(np.ascontiguousarray(array).reshape(array.shape), name)  # (a 0-d array stays 0-d)

    def node(self, op: str, inputs: list[str], outputs: list[str], base: str, **attrs) -> onnx.NodeProto:
        return onnx.helper.make_node(op, inputs, outputs, name=self.fresh(base), **attrs)

    def replace(self, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        self._replace[id(old)] = new

    def replacement(self, old: onnx.NodeProto) -> onnx.NodeProto:
        """The node standing in for ``old`` so far (itself, or its single replacement)."""
        new = self._replace.get(id(old))
        return new[0] if new and len(new) == 1 else old

    def prepend(self, node: onnx.NodeProto) -> None:
        """Add a node that reads only constants at the start of the graph."""
        self._prepend.append(node)

    def remove_node(self, node: onnx.NodeProto) -> None:
        self._remove_nodes.add(id(node))

    def remove_tensor(self, name: str) -> None:
        """Drop an initializer (and any value_info) of this name once nothing reads it."""
        self._remove_tensors.add(name)

    def commit(self) -> None:
        g = self.graph
        if self.model.ir_version < 4 and self._new_inits:
            # IR 3: every initializer must also be a graph input (overridable); new tensors are
            # emitted as Constant nodes instead, so they stay constants
            self._prepend[:0] = [onnx.helper.make_node("Constant", [], [t.name], name=self.fresh(f"{t.name}/Constant"), value=t)
                                 for t in self._new_inits]
            self._new_inits = []
        nodes: list[onnx.NodeProto] = [onnx.NodeProto() for _ in self._prepend]
        for dst, src in zip(nodes, self._prepend):
            dst.CopyFrom(src)
        for node in g.node:
            key = id(node)
            if key in self._remove_nodes:
                continue
            for src in self._replace.get(key, [node]):
                dst = onnx.NodeProto()
                dst.CopyFrom(src)
                nodes.append(dst)
        del g.node[:]
        g.node.extend(nodes)
        g.initializer.extend(self._new_inits)
        still_read: set[str] = set()
        for node in g.node:
            still_read.update(node.input)
        dead = {n for n in self._remove_tensors if n not in still_read}
        if dead:  # delete in place, back to front: no copies of large tensors
            for field in (g.initializer, g.value_info):
                for i in reversed(range(len(field))):
                    if field[i].name in dead:
                        del field[i]
        self._replace.clear()
        self._prepend.clear()
        self._remove_nodes.clear()
        self._remove_tensors.clear()
        self._new_inits = []
