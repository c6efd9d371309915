"""Batched edits of a ModelProto's graphs: new initializers, node replacement, cleanup.

The main graph and every If/Loop/Scan body are edited alike: a replaced node's replacement goes
where it was, in the node's own graph; new initializers and prepended nodes go to the graph
named by ``scope`` (a path as in index.iter_scopes; "" = the main graph), which the caller
picks so that every reader sees them (the graph that held the weight). Fresh names are unique
across all graphs.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .index import _graph_attrs, iter_scopes, subgraph_names

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
        self._scan()

    def _scan(self) -> None:
        """Map every graph (by scope path) and node (by id) of the model; edits for bodies."""
        self._graphs: dict[str, onnx.GraphProto] = {}
        self._parents: dict[str, str | None] = {}
        self._node_scope: dict[int, str] = {}
        for path, graph, parent, _ in iter_scopes(self.graph):
            self._graphs[path], self._parents[path] = graph, parent
            for node in graph.node:
                self._node_scope[id(node)] = path
        self._body_prepend: dict[str, list[onnx.NodeProto]] = {}
        self._body_inits: dict[str, list[onnx.TensorProto]] = {}
        self._body_remove: set[tuple[str, str]] = set()

    def graph_at(self, scope: str) -> onnx.GraphProto:
        """The graph of a scope path ("" = the main graph)."""
        return self._graphs[scope]

    def scope_of(self, node: onnx.NodeProto) -> str:
        return self._node_scope.get(id(node), "")

    def producer_of(self, name: str, scope: str = "") -> onnx.NodeProto:
        """The node that makes ``name`` as seen from ``scope`` (that graph, then the enclosing ones)."""
        s: str | None = scope
        while s is not None:
            node = next((n for n in self._graphs[s].node if name in n.output), None)
            if node is not None:
                return node
            s = self._parents[s]
        raise KeyError(name)

    def fresh(self, base: str) -> str:
        """A tensor or node name not used anywhere in the model, derived from ``base``."""
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def add_initializer(self, array: np.ndarray, base: str, scope: str = "") -> str:
        """A new initializer in the graph ``scope`` (default: the main graph); its name."""
        name = self.fresh(base)
        t = self.make_tensor(array, name)
        if scope:
            self._body_inits.setdefault(scope, []).append(t)
        else:
            self._new_inits.append(t)
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

    def prepend(self, node: onnx.NodeProto, scope: str = "") -> None:
        """Add a node that reads only constants at the start of the graph ``scope``."""
        if scope:
            self._body_prepend.setdefault(scope, []).append(node)
        else:
            self._prepend.append(node)

    def remove_node(self, node: onnx.NodeProto) -> None:
        self._remove_nodes.add(id(node))

    def remove_tensor(self, name: str, scope: str = "") -> None:
        """Drop an initializer (and any value_info) of this name from the graph ``scope`` once
        nothing reads it (there or in a body below)."""
        if scope:
            self._body_remove.add((scope, name))
        else:
            self._remove_tensors.add(name)

    def commit(self) -> None:
        if len(self._graphs) > 1:
            self._commit_bodies()
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
        if len(self._graphs) > 1:  # outer-scope reads inside bodies, and graph outputs
            still_read |= subgraph_names(g) | {o.name for o in g.output}
        _drop_dead(g, {n for n in self._remove_tensors if n not in still_read})
        self._replace.clear()
        self._prepend.clear()
        self._remove_nodes.clear()
        self._remove_tensors.clear()
        self._new_inits = []
        self._scan()

    def _commit_bodies(self) -> None:
        """Apply the edits of every body, innermost first (an outer node is copied with its
        already-edited bodies)."""
        for path in reversed(list(self._graphs)):
            if not path:
                continue
            g = self._graphs[path]
            mine = [n for n in g.node if id(n) in self._replace or id(n) in self._remove_nodes]
            pre, inits = self._body_prepend.get(path, []), self._body_inits.get(path, [])
            dead = {n for s, n in self._body_remove if s == path}
            if not (mine or pre or inits or dead):  # (edited bodies below were edited in place)
                continue
            nodes = []
            for src in pre:
                nodes.append(onnx.NodeProto())
                nodes[-1].CopyFrom(src)
            for node in g.node:
                if id(node) in self._remove_nodes:
                    continue
                for src in self._replace.get(id(node), [node]):
                    nodes.append(onnx.NodeProto())
                    nodes[-1].CopyFrom(src)
            del g.node[:]
            g.node.extend(nodes)
            g.initializer.extend(inits)
            if dead:
                read = {i for n in g.node for i in n.input} | subgraph_names(g) | {o.name for o in g.output}
                _drop_dead(g, dead - read)


def _drop_dead(g: onnx.GraphProto, dead: set[str]) -> None:
    """Delete initializers and value_info of these names in place, back to front (no copies)."""
    if dead:
        for field in (g.initializer, g.value_info):
            for i in reversed(range(len(field))):
                if field[i].name in dead:
                    del field[i]
