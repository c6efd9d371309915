"""Read-only indexes over a ModelProto's graphs: producers, consumers, constants.

The main graph and every If/Loop/Scan body (nested too) is a *scope*, named by a path ("" for
the main graph, ``"<node>.<attribute>"`` joined by "/" for bodies). A body reads a name of an
outer scope by writing it: the name resolves to the innermost enclosing scope that defines it
(an initializer, a graph input or a node output). The flat attributes (``initializers``,
``producer``, ``consumers``, ...) are the main graph's; the scope-aware methods take a scope.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["GraphIndex", "ConstRef", "Scope", "iter_scopes", "subgraph_names", "default_opset", "readers_of"]

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


def readers_of(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """{tensor name: the nodes of ``g`` (this graph only, not its bodies) that read it}."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return readers


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


def iter_scopes(graph: onnx.GraphProto, path: str = "", parent: str | None = None,
                owner: onnx.NodeProto | None = None, _seen: set | None = None):
    """(path, graph, parent path, owner node) for ``graph`` and every body in it, parents first.

    A body's path is its owner's name (or op_type_index) and the attribute, e.g. ``"vad.then_branch"``,
    below its parent's path; GRAPHS attributes add ``[j]``.
    """
    seen = set() if _seen is None else _seen
    seen.add(path)
    yield path, graph, parent, owner
    for i, node in enumerate(graph.node):
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                subs = [(a.g, "")]
            elif a.type == onnx.AttributeProto.GRAPHS:
                subs = [(g, f"[{j}]") for j, g in enumerate(a.graphs)]
            else:
                continue
            for sub, suffix in subs:
                tag = f"{node.name or f'{node.op_type}_{i}'}.{a.name}{suffix}"
                sub_path = f"{path}/{tag}" if path else tag
                if sub_path in seen:  # two owners with one name
                    sub_path = f"{sub_path}#{i}"
                yield from iter_scopes(sub, sub_path, path, node, seen)


@dataclass(eq=False)
class Scope:
    """One graph of the model: the main graph (path "") or an If/Loop/Scan body."""

    path: str
    graph: onnx.GraphProto
    parent: "Scope | None" = None
    owner: onnx.NodeProto | None = None  # the If/Loop/Scan node whose attribute this body is
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    inputs: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))

    def __post_init__(self):
        g = self.graph
        self.initializers.update((t.name, t) for t in g.initializer)
        self.inputs.update(i.name for i in g.input)
        self.outputs.update(o.name for o in g.output)
        for node in g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)

    def defines(self, name: str) -> bool:
        return name in self.initializers or name in self.inputs or name in self.producer

    def chain(self):
        """This scope and its enclosing scopes, innermost first."""
        s = self
        while s is not None:
            yield s
            s = s.parent


@dataclass(frozen=True)
class ConstRef:
    """A constant tensor: an initializer or the output of a Constant node, in the graph ``scope``."""

    name: str  # tensor name (initializer name or Constant output)
    kind: str  # "initializer" | "constant"
    dims: tuple[int, ...]
    data_type: int
    scope: str = ""  # path of the graph that holds it ("" = the main graph)


class GraphIndex:
    """Producers, consumers and constants of ``model.graph`` and of every body in it.

    The flat attributes are the main graph's (as before control flow was supported); the
    methods take an optional ``scope`` (a :class:`Scope`; None = the main graph).
    """

    def __init__(self, model: onnx.ModelProto, store=None):
        g = model.graph
        self.model = model
        self.store = store  # onnxhmf.external.TensorStore: resolves external data lazily
        self.graph = g
        self.scopes: dict[str, Scope] = {}
        self.scope_of: dict[int, Scope] = {}  # id(node) -> the scope that holds it
        for path, graph, parent, owner in iter_scopes(g):
            s = Scope(path, graph, self.scopes.get(parent) if parent is not None else None, owner)
            self.scopes[path] = s
            for node in graph.node:
                self.scope_of[id(node)] = s
        main = self.main = self.scopes[""]
        self.initializers: dict[str, onnx.TensorProto] = main.initializers
        self.graph_inputs = main.inputs
        self.graph_outputs = main.outputs
        self.producer: dict[str, onnx.NodeProto] = main.producer
        self.consumers: dict[str, list[onnx.NodeProto]] = main.consumers
        self.in_subgraphs = subgraph_names(g)

    @property
    def has_subgraphs(self) -> bool:
        return len(self.scopes) > 1

    def nodes(self):
        """(scope, node) for every node of every graph, the main graph's first, in graph order."""
        for s in self.scopes.values():
            for node in s.graph.node:
                yield s, node

    def node_scope(self, node: onnx.NodeProto) -> Scope:
        return self.scope_of.get(id(node), self.main)

    def defining_scope(self, name: str, scope: Scope | None = None) -> Scope | None:
        """The innermost scope, from ``scope`` outwards, that defines ``name`` (None: nowhere)."""
        for s in (scope or self.main).chain():
            if s.defines(name):
                return s
        return None

    def const(self, name: str, scope: Scope | None = None) -> ConstRef | None:
        """The constant behind ``name`` as seen from ``scope``, or None if it is computed or
        overridable at run time (a graph input, or a body's input)."""
        s = self.defining_scope(name, scope)
        if s is None or name in s.inputs:  # an initializer that is also an input can be fed a new value
            return None
        t = s.initializers.get(name)
        if t is not None:
            return ConstRef(name, "initializer", tuple(t.dims), t.data_type, s.path)
        node = s.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    return ConstRef(name, "constant", tuple(a.t.dims), a.t.data_type, s.path)
        return None

    def tensor(self, ref: ConstRef) -> onnx.TensorProto:
        s = self.scopes[ref.scope]
        if ref.kind == "initializer":
            return s.initializers[ref.name]
        node = s.producer[ref.name]
        return next(a.t for a in node.attribute if a.name == "value")

    def array(self, ref: ConstRef) -> np.ndarray:
        """The constant's value; for external data a read-only memmap of just this tensor.

        Without a store, external data must already be loaded into the proto.
        """
        t = self.tensor(ref)
        if self.store is not None:
            return self.store.array(t)
        return numpy_helper.to_array(t)

    def transpose_of_const(self, name: str, scope: Scope | None = None) -> ConstRef | None:
        """If ``name`` is Transpose(C) of a 2-D constant C with perm [1, 0], return C."""
        s = self.defining_scope(name, scope)
        node = s.producer.get(name) if s is not None else None
        if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            return None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        src = self.const(node.input[0], s)
        if src is None or len(src.dims) != 2 or perm not in (None, [1, 0]):
            return None
        return src

    def is_constant(self, name: str, scope: Scope | None = None) -> bool:
        return self.const(name, scope) is not None or self.transpose_of_const(name, scope) is not None

    def is_used_outside_main(self, name: str) -> bool:
        return name in self.in_subgraphs or name in self.graph_outputs

    def seeing(self, name: str, home: Scope):
        """Scopes (``home`` and bodies below it) in which ``name`` resolves to ``home``'s value."""
        for s in self.scopes.values():
            if any(x is home for x in s.chain()) and self.defining_scope(name, s) is home:
                yield s

    def readers(self, name: str, home: Scope) -> list[onnx.NodeProto]:
        """Every node, in ``home`` or any body below it, that reads ``home``'s tensor ``name``."""
        return [n for s in self.seeing(name, home) for n in s.consumers.get(name, [])]

    def output_of(self, name: str, home: Scope) -> str | None:
        """Which graph returns ``home``'s tensor ``name`` as an output ("main graph", a body path), or None."""
        for s in self.seeing(name, home):
            if name in s.outputs:
                return "main graph" if not s.path else f"body {s.path!r}"
        return None

def count_params(model: onnx.ModelProto) -> int:
    """Elements in all initializers and Constant tensors of the main graph and of every
    If/Loop/Scan body in it."""
    n = 0
    for _, graph, _, _ in iter_scopes(model.graph):
        n += sum(int(np.prod(t.dims)) for t in graph.initializer)
        for node in graph.node:
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


_GATHER_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}


def gather_rows(index: "GraphIndex", name: str, depth: int = 0) -> int | None:
    """Smallest row count of a constant table that ``name`` indexes through Gather."""
    if depth > 6:
        return None
    best = None
    for node in index.consumers.get(name, []):
        rows = None
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
            ref = index.const(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if ref is not None and ref.dims and -len(ref.dims) <= axis < len(ref.dims):
                rows = ref.dims[axis]  # ids index the gathered axis, not always the rows
        elif node.op_type in _GATHER_PASS_THROUGH and node.input[0] == name:
            rows = gather_rows(index, node.output[0], depth + 1)
        if rows is not None:
            best = rows if best is None else min(best, rows)
    return best
