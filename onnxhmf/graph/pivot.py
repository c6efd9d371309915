"""Rewrite every use of a weight group with pivoted low-rank factors (factorize/pivot.py).

F (m×n, the stored T or Tᵀ) is stored as D (m×k dense columns, HMF only), W_p (m×r) and C
(r×(n−k−r)) with F[:, order] = [D, W_p, W_p·C]. A use that reads F (MatMul, Gemm, or a Gather
of F's rows):

    y_p = X·W_p  (Gather: W_p[ids]),   y_q = y_p·C,   y = Concat(X·D, y_p, y_q)[..., inv]

The trailing permutation is left out when it is folded into the consumers (fold.py; the
caller permutes their constants); otherwise it is one Gather on axis 0 of the transposed
output (onnxruntime's Gather on the last axis is 5–6× slower, see hybrid.py), reshaped by
Flatten(axis=-1) and the input's own Shape, so no shape constant is stored (a data file with
every tensor external would otherwise hide Reshape's shape from onnx's shape inference).
Gemm keeps α, β and C through hybrid._gemm_tail. A use that reads Fᵀ (a tied LM head; k = 0)
gathers its input features instead (on the last axis: it has only the table's d features):

    y = X·Fᵀ = (X[..., p] + X[..., q]·Cᵀ)·W_pᵀ      p = order[:r], q = order[r:]

so one stored pair serves a tied table's Gather and its head: the permutation is of the
table's d feature columns, never of its V rows (no V-sized index map).
"""
from __future__ import annotations

import numpy as np

from .edit import GraphEditor
from .hybrid import Factors, _gemm_tail, drop_old_weight
from .index import default_opset
from .sites import Use, WeightGroup

__all__ = ["rewrite_pivoted"]


class _Emit:
    def __init__(self, f: Factors, pf, D: str | None, Wp: str, C: str | None, inv: str | None, idx_p: str | None,
                 idx_q: str | None):
        self.f, self.pf, self.D, self.Wp, self.C = f, pf, D, Wp, C
        self.inv, self.idx_p, self.idx_q = inv, idx_p, idx_q
        self.ed = f.editor
        self.flatten = default_opset(f.editor.model) >= 11  # Flatten(axis=-1): no shape constants

    def _fresh(self, z: str, s: str) -> str:
        return self.ed.fresh(f"{z}.piv_{s}")

    def forward(self, yp: str, yd: str | None, z: str, tag: str, permute: bool, nodes: list) -> None:
        """z = Concat(yd, yp, yp·C)[..., inv] (without [inv] when not ``permute``)."""
        ed = self.ed
        parts = [yd] if yd is not None else []
        parts.append(yp)
        if self.C is not None:
            yq = self._fresh(z, "rest")
            nodes.append(ed.node("MatMul", [yp, self.C], [yq], f"{tag}/piv/MatMul_C"))
            parts.append(yq)
        cat = z if not permute else self._fresh(z, "cat")
        if len(parts) > 1:
            nodes.append(ed.node("Concat", parts, [cat], f"{tag}/piv/Concat", axis=-1))
        else:
            nodes.append(ed.node("Identity", parts, [cat], f"{tag}/piv/Identity"))
        if permute:
            self._permute_last(cat, z, tag, nodes)

    def _permute_last(self, x: str, z: str, tag: str, nodes: list) -> None:
        """z = x[..., inv] as Flatten → Transpose → Gather(axis 0) → Transpose → Reshape(Shape(x))."""
        ed, n = self.ed, self.pf.order.size
        shape, x2, xt, g, y2 = (self._fresh(z, s) for s in ("shape", "x2d", "xt", "gt", "y2d"))
        if self.flatten:
            flat = ed.node("Flatten", [x], [x2], f"{tag}/piv/Flatten", axis=-1)
        else:
            flat = ed.node("Reshape", [x, self.f.const_i64([-1, n])], [x2], f"{tag}/piv/Reshape_in")
        nodes += [
            ed.node("Shape", [x], [shape], f"{tag}/piv/Shape"),
            flat,
            ed.node("Transpose", [x2], [xt], f"{tag}/piv/Transpose_in", perm=[1, 0]),
            ed.node("Gather", [xt, self.inv], [g], f"{tag}/piv/Gather_perm", axis=0),
            ed.node("Transpose", [g], [y2], f"{tag}/piv/Transpose_out", perm=[1, 0]),
            ed.node("Reshape", [y2, shape], [z], f"{tag}/piv/Reshape_out"),
        ]

    def backward(self, x: str, z: str, tag: str, nodes: list) -> None:
        """z = x·Fᵀ = (x[..., p] + x[..., q]·Cᵀ)·W_pᵀ (k = 0). The input gathers run on the last
        axis: this is the head of a tied table, whose input has only the table's d features."""
        ed, f = self.ed, self.f
        xp = self._fresh(z, "xp")
        nodes.append(ed.node("Gather", [x, self.idx_p], [xp], f"{tag}/piv/Gather_pivots", axis=-1))
        if self.C is not None:
            xq, cx, s = self._fresh(z, "xq"), self._fresh(z, "cxq"), self._fresh(z, "sum")
            nodes += [
                ed.node("Gather", [x, self.idx_q], [xq], f"{tag}/piv/Gather_rest", axis=-1),
                ed.node("MatMul", [xq, f.T(self.C)], [cx], f"{tag}/piv/MatMul_C"),
                ed.node("Add", [xp, cx], [s], f"{tag}/piv/Add"),
            ]
            xp = s
        nodes.append(ed.node("MatMul", [xp, f.T(self.Wp)], [z], f"{tag}/piv/MatMul_F"))

    def use(self, use: Use, sees_f: bool, permute: bool) -> list:
        node, nodes, ed = use.node, [], self.ed
        y = node.output[0]
        tag = node.name or y
        z = y if use.kind != "gemm" else ed.fresh(f"{y}.piv_xw")
        if not sees_f:
            self.backward(node.input[0], z, tag, nodes)
        else:
            yp, yd = self._fresh(y, "yp"), None
            if use.kind == "gather":
                nodes.append(ed.node("Gather", [self.Wp, node.input[1]], [yp], f"{tag}/piv/Gather", axis=0))
            else:
                nodes.append(ed.node("MatMul", [node.input[0], self.Wp], [yp], f"{tag}/piv/MatMul_F"))
            if self.D is not None:
                yd = self._fresh(y, "yd")
                if use.kind == "gather":
                    nodes.append(ed.node("Gather", [self.D, node.input[1]], [yd], f"{tag}/piv/Gather_dense", axis=0))
                else:
                    nodes.append(ed.node("MatMul", [node.input[0], self.D], [yd], f"{tag}/piv/MatMul_dense"))
            self.forward(yp, yd, z, tag, permute, nodes)
        if use.kind == "gemm":
            _gemm_tail(self.f, node, z, y, nodes)
        return nodes


def rewrite_pivoted(editor: GraphEditor, group: WeightGroup, pf, transposed: bool, folded: set[int] = frozenset()) -> int:
    """Replace every use of ``group`` by the pivoted factors ``pf`` of F (= Tᵀ if ``transposed``).

    ``folded``: ids of use nodes (MatMuls reading F) whose output permutation the caller folds
    into their consumers. Returns the elements stored, index maps included.
    """
    f = Factors(editor, group)
    D = f.add(pf.F[:, : pf.k], "piv_D") if pf.k else None
    Wp = f.add(pf.F[:, pf.k :], "piv_F")
    C = f.add(pf.C, "piv_C") if pf.C.shape[1] else None
    sees = {id(u.node): u.transposed == transposed for u in group.uses}
    inv = idx_p = idx_q = None
    if any(s and id(u.node) not in folded for u, s in ((u, sees[id(u.node)]) for u in group.uses)):
        inv = f.add(pf.inverse.astype(np.int32), "piv_inv", np.int32)
    if not all(sees.values()):
        if pf.k:
            raise ValueError("a use reading Fᵀ needs a pivoted form without dense columns")
        r = pf.rank
        idx_p = f.add(pf.order[:r].astype(np.int32), "piv_idx", np.int32)
        if C is not None:
            idx_q = f.add(pf.order[r:].astype(np.int32), "piv_rest_idx", np.int32)
    emit = _Emit(f, pf, D, Wp, C, inv, idx_p, idx_q)
    for use in group.uses:
        editor.replace(use.node, emit.use(use, sees[id(use.node)], permute=id(use.node) not in folded))
    drop_old_weight(editor, group)
    return f.stored
