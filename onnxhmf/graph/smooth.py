"""SmoothQuant in the graph: X·W = (X·diag(1/s))·(diag(s)·W), with the 1/s folded where it is free.

A site is an activation X (last axis K) and the MatMuls X·W_i whose constant weights W_i are
smoothed together (Q, K and V share their input, so they share s). W_i's rows become s_j·W_i[j, :].
The 1/s goes, in order of preference:

* ``mul``: X = Mul(a, c) with c a constant (K,) vector and X read only by the site (an RMSNorm's
  ·weight): c becomes c/s. Free and exact. A scalar c (BERT's GELU ends with ·0.5) is not
  folded: the vector would break onnxruntime's Gelu fusion, which costs more than a Mul node
  (MiniLM: 0.51 against 0.45 of the original's latency, bench_smooth.py).
* ``norm``: X = LayerNormalization(x, γ, β) (last axis), X read only by the site (and Shape):
  γ, β become γ/s, β/s. Free and exact. In a post-LN transformer (BERT) the LayerNorm's output
  is also the residual, so this does not apply there.
* ``gate``: X = Mul(a, Y) with Y = Z·W_u read only there (a gated FFN's up projection, SwiGLU):
  X is linear per channel in W_u's columns, which become W_u[:, j]/s_j. Free and exact.
* ``value``: X is attention's context, X = merge_heads(P·split_heads(A·W_v + b_v)), which is
  linear per channel in V: W_v's columns and b_v become W_v[:, j]/s_j, b_v/s. Free and exact.
* ``node`` (only when allowed): a Mul(X, 1/s) node is inserted before the site's MatMuls. One
  elementwise op per site; the only option after a post-LN LayerNorm. Only where the MatMuls'
  outputs together are at least as wide as X (Σ N_i ≥ K): the Mul reads and writes X once, which
  beside int8 MatMuls of K·ΣN_i multiply-adds per row is not free. MiniLM, per-channel int8,
  latency over onnxruntime's per-channel model (250 paired rounds, 1 thread, 8×128 tokens):
  no Mul nodes 0.990, the twelve 384-wide ones (Q, K, V and FFN1 inputs) 1.009, and the six
  1536-wide ones after GELU too (Σ N = 384) 1.037.

:func:`smooth_sites` finds the sites, :func:`apply_smoothing` rewrites a copy of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .index import subgraph_names
from .qdq import _consumers, _perm, site_kind

__all__ = ["SmoothSite", "smooth_sites", "apply_smoothing"]


@dataclass
class SmoothSite:
    act: str  # the activation X the MatMuls share
    weights: list[str]  # their constant B initializers (K×N each)
    fold: str  # mul | norm | gate | value | node
    target: tuple = ()  # nodes by their first output. mul: (Mul, constant input); norm: (LayerNorm,);
    # gate: (W_u,); value: (W_v, b_v, Add)


def _producer(g: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in g.node if name in n.output), None)


def _const(g: onnx.GraphProto, name: str) -> np.ndarray | None:
    t = next((t for t in g.initializer if t.name == name), None)
    if t is not None:
        return numpy_helper.to_array(t)
    p = _producer(g, name)
    if p is not None and p.op_type == "Constant":
        a = next((a for a in p.attribute if a.name == "value"), None)
        return numpy_helper.to_array(a.t) if a is not None else None
    return None


def _only(g: onnx.GraphProto, name: str, allowed) -> bool:
    """Every reader of ``name`` is in ``allowed`` (nodes by their first output) or a Shape; it is
    no graph output."""
    outs = {o.name for o in g.output}
    return name not in outs and all(u.output[0] in allowed or u.op_type == "Shape" for u in _consumers(g, name))


def _single(g: onnx.GraphProto, name: str) -> bool:
    return len(_consumers(g, name)) == 1 and name not in {o.name for o in g.output}


def _node(g: onnx.GraphProto, output: str) -> onnx.NodeProto:
    return next(n for n in g.node if n.output and n.output[0] == output)


def _mul_fold(g, x: str, K: int, readers) -> tuple | None:
    p = _producer(g, x)
    if p is None or p.op_type != "Mul" or not _only(g, x, readers):
        return None
    for i in (1, 0):
        c = _const(g, p.input[i])
        if c is not None and c.dtype == np.float32 and c.ndim >= 1 and c.shape[-1] == K and c.size == K and \
                _const(g, p.input[1 - i]) is None:
            return "mul", (p.output[0], p.input[i])
    return None


def _norm_fold(g, x: str, K: int, readers) -> tuple | None:
    p = _producer(g, x)
    if p is None or p.op_type != "LayerNormalization" or len(p.input) < 3 or len(p.output) > 1:
        return None
    axis = next((a.i for a in p.attribute if a.name == "axis"), -1)
    gamma, beta = _const(g, p.input[1]), _const(g, p.input[2])
    if axis != -1 or gamma is None or beta is None or gamma.size != K or beta.size != K:
        return None
    return ("norm", (p.output[0],)) if _only(g, x, readers) else None


def _gate_fold(g, x: str, K: int, readers) -> tuple | None:
    p = _producer(g, x)
    if p is None or p.op_type != "Mul" or not _only(g, x, readers):
        return None
    for y in p.input:
        m = _producer(g, y)
        if m is not None and m.op_type == "MatMul" and _single(g, y) and site_kind_ok(g, m.input[1]) and \
                list(p.input).count(y) == 1:
            t = next(t for t in g.initializer if t.name == m.input[1])
            if t.dims[1] == K:
                return "gate", (m.input[1],)
    return None


def _value_fold(g, x: str, K: int, readers) -> tuple | None:
    """x = Reshape(Transpose(MatMul(P, Transpose(Reshape(Add(MatMul(A, W_v), b_v)))))), perms (0,2,1,3)."""
    chain = []
    name = x
    for op in ("Reshape", "Transpose", "MatMul", "Transpose", "Reshape", "Add", "MatMul"):
        p = _producer(g, name)
        if p is None or p.op_type != op:
            return None
        if op == "Transpose" and _perm(p) != [0, 2, 1, 3]:
            return None
        chain.append(p)
        if op == "MatMul" and len(chain) == 3:
            name = p.input[1]
        elif op == "Add":
            other = [i for i in p.input if _const(g, i) is not None]
            if len(other) != 1:
                return None
            bias = other[0]
            name = next(i for i in p.input if i != bias)
        else:
            name = p.input[0]
        if len(chain) > 1 and not _single(g, chain[-1].output[0]):
            return None
    if not _only(g, x, readers):
        return None
    wv = chain[-1].input[1]
    b = _const(g, bias)
    if site_kind_ok(g, wv) is False or b is None or b.size != K:
        return None
    return "value", (wv, bias, chain[-2].output[0])


def site_kind_ok(g: onnx.GraphProto, w: str) -> bool:
    t = next((t for t in g.initializer if t.name == w), None)
    return t is not None and len(t.dims) == 2 and len(_consumers(g, w)) == 1


NODES = ("cheap", "all", "none")


def smooth_sites(model: onnx.ModelProto, weights=None, nodes: str = "cheap") -> list[SmoothSite]:
    """The sites of the MatMul weights ``weights`` (None: every plain MatMul weight): grouped by
    their shared input, each with its fold. ``nodes``: which sites with no free fold get a Mul
    node: "cheap" (where Σ N_i ≥ K), "all", or "none"."""
    if nodes not in NODES:
        raise ValueError(f"nodes must be one of {NODES}, got {nodes!r}")
    g = model.graph
    groups: dict[str, list[onnx.NodeProto]] = {}  # X -> its MatMuls
    for n in g.node:
        if n.op_type != "MatMul" or (weights is not None and n.input[1] not in weights):
            continue
        if site_kind(model, n.input[1]) != "matmul" or len(_consumers(g, n.input[1])) != 1:
            continue
        groups.setdefault(n.input[0], []).append(n)
    out = []
    for x, group in groups.items():
        K = next(t.dims[0] for t in g.initializer if t.name == group[0].input[1])
        readers = {n.output[0] for n in group}
        found = _mul_fold(g, x, K, readers) or _norm_fold(g, x, K, readers) or _gate_fold(g, x, K, readers) or \
            _value_fold(g, x, K, readers)
        wide = sum(next(t.dims[1] for t in g.initializer if t.name == n.input[1]) for n in group) >= K
        if found is None and (nodes == "all" or (nodes == "cheap" and wide)):
            found = ("node", ())
        if found is not None:
            out.append(SmoothSite(x, [n.input[1] for n in group], found[0], found[1]))
    return out


def _fresh(g: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def apply_smoothing(model: onnx.ModelProto, sites: list[SmoothSite], scales: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with each site of ``scales`` ({act: s (K,)}) smoothed and its 1/s folded."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    arrays: dict[str, np.ndarray] = {}

    def arr(name):
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name]).astype(np.float32)
        return arrays[name]

    replaced: set[str] = set()
    for k, site in enumerate(sites):
        s = scales.get(site.act)
        if s is None:
            continue
        s = np.asarray(s, np.float32)
        tag = f"smooth{k}"  # short names: they are stored in the file, several times each
        for w in site.weights:
            arrays[w] = arr(w) * s[:, None]
        if site.fold == "mul":
            node, c = _node(g, site.target[0]), site.target[1]
            replaced.add(c)
            new = _fresh(g, f"{tag}.c")
            g.initializer.append(numpy_helper.from_array(
                (np.broadcast_to(_const(g, c).reshape(-1), s.shape) / s).astype(np.float32), new))
            node.input[list(node.input).index(c)] = new
        elif site.fold == "norm":
            node = _node(g, site.target[0])
            replaced.update(node.input[1:3])
            for i, part in ((1, "gamma"), (2, "beta")):
                new = _fresh(g, f"{tag}.{part}")
                g.initializer.append(numpy_helper.from_array((_const(g, node.input[i]).reshape(-1) / s).astype(np.float32), new))
                node.input[i] = new
        elif site.fold == "gate":
            arrays[site.target[0]] = arr(site.target[0]) / s[None, :]
        elif site.fold == "value":
            wv, bias, add = site.target
            arrays[wv] = arr(wv) / s[None, :]
            new = _fresh(g, f"{tag}.bias")
            g.initializer.append(numpy_helper.from_array(
                (_const(g, bias).reshape(-1) / s).astype(np.float32).reshape(_const(g, bias).shape), new))
            node = _node(g, add)
            replaced.add(bias)
            node.input[list(node.input).index(bias)] = new
        else:
            inv, xs = _fresh(g, f"{tag}.inv"), _fresh(g, f"{tag}.x")
            g.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
            at = min(i for i, n in enumerate(g.node) if n.op_type == "MatMul" and n.input[1] in site.weights)
            g.node.insert(at, onnx.helper.make_node("Mul", [site.act, inv], [xs], name=_fresh(g, f"{tag}.mul")))
            for n in g.node:
                if n.op_type == "MatMul" and n.input[1] in site.weights:
                    n.input[0] = xs
    for name, a in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(a.astype(np.float32), name))
    _drop_unused(g, replaced)
    return out


def _drop_unused(g: onnx.GraphProto, names: set[str]) -> None:
    """Remove the replaced constants (initializers or Constant nodes) that nothing reads any more."""
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output} | {i.name for i in g.input} | \
        subgraph_names(g)
    gone = names - used
    for t in [t for t in g.initializer if t.name in gone]:
        g.initializer.remove(t)
    for n in [n for n in g.node if n.op_type == "Constant" and n.output[0] in gone]:
        g.node.remove(n)
