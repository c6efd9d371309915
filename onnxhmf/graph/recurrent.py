"""Recurrent sites (ONNX LSTM/GRU/RNN with a constant W) and the rewrite of W in the op form.

The op computes X_t·W_dᵀ for every step; with W_d ≈ U_d·V (factorize/recurrent.py) the
product X·Vᵀ is computed once for the whole sequence by a MatMul in front of the op, and the
op gets W = U ``[dirs, G·H, r]``: it infers input_size from W's shape, so nothing else changes
(B, R, sequence_lens, initial states, every attribute, layout 0 or 1: the MatMul acts on the
last axis, which is the feature axis in both layouts). The fused kernel is kept.

The hybrid form (dense input features S, rank r for the rest; an HMF with dense rows of the
stacked M = [W_0ᵀ | …]) feeds the op Z = Concat(Gather(X, S, axis=-1), MatMul(Gather(X, R,
axis=-1), A)) and W_d = [D_dᵀ | B_dᵀ].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..factorize.recurrent import GATES
from .edit import GraphEditor
from .index import FLOAT_TYPES, ConstRef, GraphIndex

__all__ = ["RecurrentSite", "find_recurrent_sites", "rewrite_input_lowrank", "rewrite_input_hybrid", "attr"]

OPS = tuple(GATES)


def attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass
class RecurrentSite:
    """One LSTM/GRU/RNN node. ``W``/``R``/``B``: its constant weights (None if absent or computed)."""

    node: onnx.NodeProto
    W: ConstRef
    R: ConstRef | None
    B: ConstRef | None
    skip_reason: str | None = None
    r_reason: str | None = None  # why R cannot be rewritten (lowering), or None

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def name(self) -> str:
        return self.W.name

    @property
    def gates(self) -> int:
        return GATES[self.op]

    @property
    def dirs(self) -> int:
        return self.W.dims[0]

    @property
    def hidden(self) -> int:
        return self.W.dims[1] // self.gates

    @property
    def input_size(self) -> int:
        return self.W.dims[2]

    @property
    def layout(self) -> int:
        return int(attr(self.node, "layout", 0))

    @property
    def shape(self) -> tuple[int, int]:
        """W as the matrix the pass factorizes: (dirs·G·H, I)."""
        return self.dirs * self.W.dims[1], self.input_size

    @property
    def params(self) -> int:
        return int(np.prod(self.W.dims))

    @property
    def node_names(self) -> list[str]:
        return [self.node.name]


def _only_reader(index: GraphIndex, ref: ConstRef, node: onnx.NodeProto, what: str) -> str | None:
    if ref.data_type not in FLOAT_TYPES:
        return f"{what} dtype {onnx.TensorProto.DataType.Name(ref.data_type)} is not fp32/fp16/fp64"
    if index.is_used_outside_main(ref.name):
        return f"{what} is a graph output or read inside an If/Loop/Scan subgraph"
    others = [c for c in index.consumers.get(ref.name, []) if c is not node]
    if others or list(node.input).count(ref.name) > 1:
        return f"{what} is also read by {others[0].op_type if others else node.op_type} node " \
               f"{(others[0] if others else node).name!r}"
    return None


def find_recurrent_sites(index: GraphIndex) -> list[RecurrentSite]:
    """Every default-domain LSTM/GRU/RNN node whose W is a constant, with why it cannot be
    rewritten (``skip_reason``), in graph order."""
    sites = []
    for node in index.graph.node:
        if node.op_type not in OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
            continue
        W = index.const(node.input[1])
        if W is None or len(W.dims) != 3:
            continue
        R = index.const(node.input[2])
        B = index.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        site = RecurrentSite(node, W, R, B)
        site.skip_reason = _only_reader(index, W, node, "W")
        if site.skip_reason is None and (W.dims[1] % GATES[node.op_type] or 0 in W.dims):
            site.skip_reason = f"W shape {list(W.dims)} does not hold {GATES[node.op_type]} gate blocks"
        site.r_reason = "R is not a constant" if R is None else _only_reader(index, R, node, "R")
        sites.append(site)
    return sites


def _dtype(site: RecurrentSite) -> np.dtype:
    return np.dtype(FLOAT_TYPES[site.W.data_type])


def _new_op(editor: GraphEditor, site: RecurrentSite, z: str, w: str) -> onnx.NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(site.node)
    new.input[0], new.input[1] = z, w
    return new


def rewrite_input_lowrank(editor: GraphEditor, site: RecurrentSite, V: np.ndarray, U: np.ndarray) -> int:
    """Z = MatMul(X, Vᵀ) in front of the op, W ← U ``[dirs, G·H, r]``. Returns stored params."""
    dt = _dtype(site)
    vt = editor.add_initializer(np.ascontiguousarray(V.T).astype(dt), f"{site.name}.Vt")
    w = editor.add_initializer(U.astype(dt), f"{site.name}.U")
    z = editor.fresh(f"{site.node.output[0] or site.name}.XVt")
    mm = editor.node("MatMul", [site.node.input[0], vt], [z], f"{site.node.name or site.op}_input_basis")
    editor.replace(site.node, [mm, _new_op(editor, site, z, w)])
    editor.remove_tensor(site.name)
    return V.size + U.size


def rewrite_input_hybrid(editor: GraphEditor, site: RecurrentSite, hf) -> int:
    """Dense input features: hf is an HMF (axis 0, rows = input features) of the stacked
    M = [W_0ᵀ | …] (I × dirs·G·H). The op reads Z = [X_S | X_R·A] and W_d = [D_dᵀ | B_dᵀ].
    Returns stored params (index maps included)."""
    dt = _dtype(site)
    d, gh = site.dirs, site.W.dims[1]
    x, tag = site.node.input[0], site.node.name or site.op
    s = editor.add_initializer(hf.dense_idx.astype(np.int64), f"{site.name}.dense_inputs")
    rest = editor.add_initializer(hf.rest_idx.astype(np.int64), f"{site.name}.rest_inputs")
    a = editor.add_initializer(hf.A.astype(dt), f"{site.name}.A")
    xs, xr, xa, z = (editor.fresh(f"{site.name}.{t}") for t in ("X_dense", "X_rest", "X_restA", "Z"))
    Wn = np.concatenate([hf.D.T.reshape(d, gh, hf.k), hf.B.T.reshape(d, gh, hf.rank)], axis=2)
    w = editor.add_initializer(Wn.astype(dt), f"{site.name}.W_hybrid")
    nodes = [editor.node("Gather", [x, s], [xs], f"{tag}_dense_inputs", axis=-1),
             editor.node("Gather", [x, rest], [xr], f"{tag}_rest_inputs", axis=-1),
             editor.node("MatMul", [xr, a], [xa], f"{tag}_input_basis"),
             editor.node("Concat", [xs, xa], [z], f"{tag}_inputs", axis=-1),
             _new_op(editor, site, z, w)]
    editor.replace(site.node, nodes)
    editor.remove_tensor(site.name)
    return hf.A.size + Wn.size + hf.dense_idx.size + hf.rest_idx.size
