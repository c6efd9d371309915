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
gathers its input features instead, on axis 0 of the transposed input (the output shape from
Shape's start/end attributes at opset ≥ 15, else from shape constants):

    y = X·Fᵀ = (X[..., p] + X[..., q]·Cᵀ)·W_pᵀ      p = order[:r], q = order[r:]
    yᵀ = W_p·(X_pᵀ + C·X_qᵀ)

so one stored pair serves a tied table's Gather and its head: the permutation is of the
table's d feature columns, never of its V rows (no V-sized index map).
"""
from __future__ import annotations

import numpy as np

from ..factorize.pivot import pivoted_params, pivoted_rank_for_budget
from ..factorize.svd import rank_for_keep, round_rank
from .edit import GraphEditor
from .hybrid import Factors, _gemm_tail, drop_old_weight
from .index import default_opset
from .sites import Use, WeightGroup

__all__ = ["rewrite_pivoted", "rewrite_shared_pivoted", "PivotCosts"]


def _drop_last(ed, f, shape: str, out: str, name: str):
    """``out`` = ``shape``[:-1]: Slice with inputs from opset 10, with attributes before."""
    if default_opset(ed.model) >= 10:
        return ed.node("Slice", [shape, f.const_i64([0]), f.const_i64([-1])], [out], name)
    return ed.node("Slice", [shape], [out], name, starts=[0], ends=[-1], axes=[0])

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
        """z = x·Fᵀ = (x[..., p] + x[..., q]·Cᵀ)·W_pᵀ (k = 0), in the transposed layout:
        zᵀ = W_p·(X_pᵀ + C·X_qᵀ), the input features gathered on axis 0 of Xᵀ."""
        ed, f = self.ed, self.f
        m, n = self.pf.shape
        fr = lambda s: self._fresh(z, s)  # noqa: E731
        x2, xt, xp, yt, y2, shape = (fr(s) for s in ("x2d", "xt", "xp", "yt", "y2d", "out_shape"))
        if self.flatten:
            nodes.append(ed.node("Flatten", [x], [x2], f"{tag}/piv/Flatten", axis=-1))
        else:
            nodes.append(ed.node("Reshape", [x, f.const_i64([-1, n])], [x2], f"{tag}/piv/Reshape_in"))
        nodes += [
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
            ed.node("MatMul", [self.Wp, xp], [yt], f"{tag}/piv/MatMul_F"),
            ed.node("Transpose", [yt], [y2], f"{tag}/piv/Transpose_out", perm=[1, 0]),
        ]
        lead, width = fr("lead"), fr("width")
        if default_opset(ed.model) >= 15:  # Shape's start/end attributes: [lead..., m] without constants
            nodes += [ed.node("Shape", [x], [lead], f"{tag}/piv/Shape_lead", end=-1),
                      ed.node("Shape", [self.Wp], [width], f"{tag}/piv/Shape_width", end=1)]
        else:
            full = fr("shape")
            nodes += [ed.node("Shape", [x], [full], f"{tag}/piv/Shape"), _drop_last(ed, f, full, lead, f"{tag}/piv/Slice")]
            width = f.const_i64([m])
        nodes += [
            ed.node("Concat", [lead, width], [shape], f"{tag}/piv/Concat_shape", axis=0),
            ed.node("Reshape", [y2, shape], [z], f"{tag}/piv/Reshape_out"),
        ]

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


def rewrite_shared_pivoted(editor: GraphEditor, groups: list[WeightGroup], pf, widths: list[int]) -> list[int]:
    """Weights that read the same activation X (Q, K, V) with [W_1 | W_2 | …] ≈ A·[B_1 | B_2 | …],
    stored pivoted over the stacked outputs (one W_p, one C):

        Y = Concat(X·W_p, (X·W_p)·C)        (all outputs, in pivot order; emitted once)
        Y_i = Y[..., inv_i]                 (one transposed-layout Gather per weight)

    Emitted in place of the first use in graph order. Returns each group's stored elements
    (W_p and C counted with the first, each index map with its own group)."""
    first = groups[0]
    f = Factors(editor, first)
    ed = editor
    Wp = f.add(pf.F, "shared_piv_F")
    C = f.add(pf.C, "shared_piv_C") if pf.C.shape[1] else None
    x = first.uses[0].node.input[0]
    fr = lambda s: ed.fresh(f"{x}.shared_piv_{s}")  # noqa: E731
    yp, cat, c2, ct = fr("yp"), fr("cat"), fr("cat2d"), fr("catT")
    tag0 = first.uses[0].node.name or first.uses[0].node.output[0]
    head = [ed.node("MatMul", [x, Wp], [yp], f"{tag0}/shared_piv/MatMul_F")]
    if C is not None:
        yq = fr("yq")
        head += [ed.node("MatMul", [yp, C], [yq], f"{tag0}/shared_piv/MatMul_C"),
                 ed.node("Concat", [yp, yq], [cat], f"{tag0}/shared_piv/Concat", axis=-1)]
    else:
        cat = yp
    new_opset = default_opset(ed.model) >= 15
    head += [ed.node("Flatten", [cat], [c2], f"{tag0}/shared_piv/Flatten", axis=-1),
             ed.node("Transpose", [c2], [ct], f"{tag0}/shared_piv/Transpose_in", perm=[1, 0])]
    lead = fr("lead")
    if new_opset:
        head.append(ed.node("Shape", [cat], [lead], f"{tag0}/shared_piv/Shape_lead", end=-1))
    else:
        full = fr("shape")
        head += [ed.node("Shape", [cat], [full], f"{tag0}/shared_piv/Shape"),
                 _drop_last(ed, f, full, lead, f"{tag0}/shared_piv/Slice")]
    stored = [f.stored] + [0] * (len(groups) - 1)
    inv = pf.inverse
    start = 0
    for i, (g, w) in enumerate(zip(groups, widths)):
        fi = f if i == 0 else Factors(editor, g)
        before = fi.stored
        idx = fi.add(inv[start : start + w].astype(np.int32), "shared_piv_inv", np.int32)
        start += w
        node = g.uses[0].node
        y = node.output[0]
        tag = node.name or y
        width = fi.const_i64([w]) if not new_opset else ed.fresh(f"{y}.piv_width")
        g_t, y2, shape = ed.fresh(f"{y}.piv_gt"), ed.fresh(f"{y}.piv_y2d"), ed.fresh(f"{y}.piv_shape")
        nodes = list(head) if i == 0 else []
        if new_opset:
            nodes.append(ed.node("Shape", [idx], [width], f"{tag}/shared_piv/Shape_width"))
        nodes += [
            ed.node("Gather", [ct, idx], [g_t], f"{tag}/shared_piv/Gather_perm", axis=0),
            ed.node("Transpose", [g_t], [y2], f"{tag}/shared_piv/Transpose_out", perm=[1, 0]),
            ed.node("Concat", [lead, width], [shape], f"{tag}/shared_piv/Concat_shape", axis=0),
            ed.node("Reshape", [y2, shape], [y], f"{tag}/shared_piv/Reshape_out"),
        ]
        editor.replace(node, nodes)
        drop_old_weight(editor, g)
        stored[i] += fi.stored - before
    return stored


class PivotCosts:
    """What pivoted storage costs for each weight group of one model, before any rewrite:
    r(m+n−r) plus the int32 index maps, n for the output permutation of uses reading F unless
    it folds into their consumers (fold.py, predicted on the graph as the executor does it) and
    n for the input gathers of uses reading Fᵀ (a tied head), plus shape constants at old opsets.
    ``pivot`` False: A·B everywhere (r(m+n))."""

    def __init__(self, index, groups, *, fold: bool = True, pivot: bool = True):
        self.index, self.fold = index, fold
        self.by_node = {id(u.node): g for g in groups for u in g.uses}
        self.opset = default_opset(index.model)
        # IR 3 stores new tensors as Constant nodes, which hold only floats before opset 9: no int32 maps
        self.pivot = pivot and not (index.model.ir_version < 4 and self.opset < 9)

    def folds(self, group: WeightGroup) -> bool:
        """Every use reading F is a MatMul whose output permutation folds into consumers we may permute."""
        from .fold import plan_fold
        from .rewrite import factor_orientation

        if not self.fold:
            return False
        transposed = factor_orientation(group)
        n = group.shape[0] if transposed else group.shape[1]
        uses = [u for u in group.uses if u.transposed == transposed]
        for u in uses:
            plan = plan_fold(self.index, u.node.output[0], n) if u.kind == "matmul" else None
            if plan is None:
                return False
            for g in (self.by_node.get(id(t)) for t in plan.terminals):
                if not (g is not None and g.skip_reason is None and len(g.uses) == 1 and g.uses[0].kind == "matmul"
                        and not g.uses[0].transposed and g.ref.kind == "initializer" and g.name != group.name):
                    return False
        return bool(uses)

    def map_cost(self, group: WeightGroup) -> int:
        from .rewrite import factor_orientation

        transposed = factor_orientation(group)
        n = group.shape[0] if transposed else group.shape[1]
        sees = {u.transposed == transposed for u in group.uses}
        cost = 0
        if False in sees:  # input gathers; shape constants below opset 15 (Slice) and 11 (Reshape)
            cost += n + (3 if self.opset < 15 else 0) + (2 if self.opset < 11 else 0)
        if True in sees and not self.folds(group):
            cost += n + (2 if self.opset < 11 else 0)
        return cost

    def stores_pivoted(self, group: WeightGroup, r: int) -> bool:
        """Pivoted is smaller than A·B at rank r: r² > its index maps."""
        return self.pivot and r * r > self.map_cost(group)

    def cost(self, group: WeightGroup, r: int) -> int:
        m, n = group.shape
        return pivoted_params(m, n, r) + self.map_cost(group) if self.stores_pivoted(group, r) else r * (m + n)

    def rank(self, group: WeightGroup, keep: float, multiple: int = 1) -> int:
        """The larger of the pivoted rank (maps included) and A·B's rank for ``keep``."""
        m, n = group.shape
        r_ab = rank_for_keep(m, n, keep, multiple)
        if not self.pivot:
            return r_ab
        r = pivoted_rank_for_budget(m, n, int(np.floor(keep * m * n + 1e-6)) - self.map_cost(group))
        r = round_rank(r, multiple) if r >= multiple else 0
        return max(r, r_ab)
