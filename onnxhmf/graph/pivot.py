"""Rewrite every use of a weight group with pivoted low-rank factors (factorize/pivot.py).

F (m×n, the stored T or Tᵀ) is stored as F₁ = [D, W_p] (m×(k+r)) and C (r×(n−k−r)) with
F[:, order] = [F₁, F₁[:, k:]·C]. A use that reads F (MatMul, Gemm, or a Gather of F's rows):

    y₁ = X·F₁  (Gather: F₁[ids]),   y₂ = y₁[..., k:]·C,   y = Concat(y₁, y₂)[..., inv]

The trailing permutation is left out when it is folded into the consumers (fold.py; the
caller permutes their constants); otherwise it is one Gather on axis 0 of the transposed
output (onnxruntime's Gather on the last axis is 5–6× slower, see hybrid.py). Gemm keeps α, β
and C through hybrid._gemm_tail. A use that reads Fᵀ (a tied LM head; k = 0) gathers its
input features instead, in the transposed layout:

    y = X·Fᵀ = (X[..., p] + X[..., q]·Cᵀ)·W_pᵀ      p = order[:r], q = order[r:]
    yᵀ = W_p·(X_pᵀ + C·X_qᵀ)

so one stored pair serves a tied table's Gather and its head: the permutation is of the
table's d feature columns, never of its V rows (no V-sized index map).
"""
from __future__ import annotations

import numpy as np

from .edit import GraphEditor
from .hybrid import Factors, _gemm_tail, drop_old_weight
from .sites import Use, WeightGroup

__all__ = ["rewrite_pivoted"]


class _Emit:
    def __init__(self, f: Factors, pf, F1: str, C: str | None, inv: str | None, idx_p: str | None, idx_q: str | None):
        self.f, self.pf, self.F1, self.C, self.inv, self.idx_p, self.idx_q = f, pf, F1, C, inv, idx_p, idx_q
        self.ed = f.editor

    def _fresh(self, z: str, s: str) -> str:
        return self.ed.fresh(f"{z}.piv_{s}")

    def forward(self, y1: str, z: str, tag: str, permute: bool, nodes: list) -> None:
        """z = Concat(y1, y1[..., k:]·C)[..., inv] (without [inv] when not ``permute``)."""
        ed, pf = self.ed, self.pf
        if self.C is None:  # no rest: the pivots are all the columns
            cat = y1
        else:
            src = y1
            if pf.k:
                src = self._fresh(z, "low")
                nodes.append(ed.node("Slice", [y1, self.f.const_i64([pf.k]), self.f.const_i64([pf.F.shape[1]]),
                                               self.f.const_i64([-1])], [src], f"{tag}/piv/Slice"))
            y2 = self._fresh(z, "rest")
            nodes.append(ed.node("MatMul", [src, self.C], [y2], f"{tag}/piv/MatMul_C"))
            cat = z if not permute else self._fresh(z, "cat")
            nodes.append(ed.node("Concat", [y1, y2], [cat], f"{tag}/piv/Concat", axis=-1))
        if not permute:
            if cat != z:
                nodes.append(ed.node("Identity", [cat], [z], f"{tag}/piv/Identity"))
            return
        self._permute_last(cat, z, tag, nodes)

    def _permute_last(self, x: str, z: str, tag: str, nodes: list) -> None:
        """z = x[..., inv] as Transpose → Gather(axis 0) → Transpose on the 2-D view."""
        ed, f, n = self.ed, self.f, self.pf.order.size
        shape, x2, xt, g, y2 = (self._fresh(z, s) for s in ("shape", "x2d", "xt", "gt", "y2d"))
        nodes += [
            ed.node("Shape", [x], [shape], f"{tag}/piv/Shape"),
            ed.node("Reshape", [x, f.const_i64([-1, n])], [x2], f"{tag}/piv/Reshape_in"),
            ed.node("Transpose", [x2], [xt], f"{tag}/piv/Transpose_in", perm=[1, 0]),
            ed.node("Gather", [xt, self.inv], [g], f"{tag}/piv/Gather_perm", axis=0),
            ed.node("Transpose", [g], [y2], f"{tag}/piv/Transpose_out", perm=[1, 0]),
            ed.node("Reshape", [y2, shape], [z], f"{tag}/piv/Reshape_out"),
        ]

    def backward(self, x: str, z: str, tag: str, nodes: list) -> None:
        """z = x·Fᵀ = (x[..., p] + x[..., q]·Cᵀ)·W_pᵀ, in the transposed layout (k = 0)."""
        ed, f = self.ed, self.f
        m, n = self.pf.shape
        fr = lambda s: self._fresh(z, s)  # noqa: E731
        shape, lead, out_shape, x2, xt, xp, u, y1t, y2 = (fr(s) for s in
                                                          ("shape", "lead", "out_shape", "x2d", "xt", "xp", "u", "yt", "y2d"))
        nodes += [
            ed.node("Shape", [x], [shape], f"{tag}/piv/Shape"),
            ed.node("Slice", [shape, f.const_i64([0]), f.const_i64([-1])], [lead], f"{tag}/piv/Slice"),
            ed.node("Concat", [lead, f.const_i64([m])], [out_shape], f"{tag}/piv/Concat_shape", axis=0),
            ed.node("Reshape", [x, f.const_i64([-1, n])], [x2], f"{tag}/piv/Reshape_in"),
            ed.node("Transpose", [x2], [xt], f"{tag}/piv/Transpose_in", perm=[1, 0]),
            ed.node("Gather", [xt, self.idx_p], [xp], f"{tag}/piv/Gather_pivots", axis=0),
        ]
        if self.C is not None:
            xq, cx, s = fr("xq"), fr("cxq"), fr("sum")
            nodes += [
                ed.node("Gather", [xt, self.idx_q], [xq], f"{tag}/piv/Gather_rest", axis=0),
                ed.node("MatMul", [self.C, xq], [cx], f"{tag}/piv/MatMul_C"),
                ed.node("Add", [xp, cx], [s], f"{tag}/piv/Add"),
            ]
            xp = s
        nodes += [
            ed.node("MatMul", [self.F1, xp], [y1t], f"{tag}/piv/MatMul_F"),
            ed.node("Transpose", [y1t], [y2], f"{tag}/piv/Transpose_out", perm=[1, 0]),
            ed.node("Reshape", [y2, out_shape], [z], f"{tag}/piv/Reshape_out"),
        ]

    def use(self, use: Use, sees_f: bool, permute: bool) -> list:
        node, nodes, ed = use.node, [], self.ed
        y = node.output[0]
        tag = node.name or y
        z = y if use.kind != "gemm" else ed.fresh(f"{y}.piv_xw")
        if not sees_f:
            self.backward(node.input[0], z, tag, nodes)
        else:
            y1 = self._fresh(y, "y1")
            if use.kind == "gather":
                nodes.append(ed.node("Gather", [self.F1, node.input[1]], [y1], f"{tag}/piv/Gather", axis=0))
            else:
                nodes.append(ed.node("MatMul", [node.input[0], self.F1], [y1], f"{tag}/piv/MatMul_F"))
            self.forward(y1, z, tag, permute, nodes)
        if use.kind == "gemm":
            _gemm_tail(self.f, node, z, y, nodes)
        return nodes


def rewrite_pivoted(editor: GraphEditor, group: WeightGroup, pf, transposed: bool, folded: set[int] = frozenset()) -> int:
    """Replace every use of ``group`` by the pivoted factors ``pf`` of F (= Tᵀ if ``transposed``).

    ``folded``: ids of use nodes (MatMuls reading F) whose output permutation the caller folds
    into their consumers. Returns the elements stored, index maps included.
    """
    f = Factors(editor, group)
    F1 = f.add(pf.F, "piv_F")
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
    emit = _Emit(f, pf, F1, C, inv, idx_p, idx_q)
    for use in group.uses:
        editor.replace(use.node, emit.use(use, sees[id(use.node)], permute=id(use.node) not in folded))
    drop_old_weight(editor, group)
    return f.stored
