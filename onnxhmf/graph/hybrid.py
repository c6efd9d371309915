"""Rewrites for hybrid (HMF) factors and pruned weights, standard ONNX ops only.

Linear sites, HMF of F (m×n) with k dense columns S and rank-r rest R (axis=1):

    Y = Concat(X·D, (X·A)·B)[..., inv]          inv: column j of F ↦ its slot in [S, R]

The trailing Gather on the last axis is dropped when the permutation can be folded into the
consumers instead (see fold.py): then Y' = Concat(...) is Y with columns in [S, R] order and
the consumers' constants are permuted to match. With k dense rows (axis=0) no output
permutation is needed:  Y = X[..., S]·D + (X[..., R]·A)·B.

A use that reads Fᵀ sees the same structure on the other axis, with D, A, B transposed.

Embedding tables E (V×d) with dense rows S (frequent tokens) and codes for the rest:

    s  = M[ids]                                  M: token ↦ slot (int32, V entries)
    e  = D̃[min(s, k)] + Ã[max(s − k, 0)]·B      D̃ = [D; 0], Ã = [0; A]

and a tied LM head reads the same stored tensors: logits = Concat(h·D̃ᵀ, (h·Bᵀ)·Ãᵀ)[..., inv].
"""
from __future__ import annotations

import numpy as np
import onnx

from .edit import GraphEditor
from .index import FLOAT_TYPES, default_opset
from .sites import Use, WeightGroup

__all__ = ["Factors", "HybridEmit", "drop_old_weight", "rewrite_hybrid", "rewrite_embedding_hybrid", "rewrite_dense"]


class Factors:
    """Initializer names for one group's stored tensors, with lazily made transposes."""

    def __init__(self, editor: GraphEditor, group: WeightGroup):
        self.editor = editor
        self.group = group
        self.dtype = FLOAT_TYPES[group.ref.data_type]
        self._t: dict[str, str] = {}
        self.stored = 0  # elements of every tensor added, index maps and scalars included

    def add(self, array: np.ndarray, suffix: str, dtype=None) -> str:
        array = np.asarray(array, dtype=dtype or self.dtype)
        self.stored += array.size
        return self.editor.add_initializer(array, f"{self.group.ref.name}.{suffix}", scope=self.group.ref.scope)

    def T(self, name: str) -> str:
        if name not in self._t:
            out = self.editor.fresh(f"{name}.T")
            self.editor.prepend(self.editor.node("Transpose", [name], [out], f"{name}/Transpose", perm=[1, 0]),
                                scope=self.group.ref.scope)
            self._t[name] = out
        return self._t[name]

    def scalar(self, value: float, suffix: str) -> str:
        return self.add(np.array(value), suffix)

    def const_i64(self, values: list[int]) -> str:
        """A small int64 shape constant, shared by every use of the group."""
        key = f"i64:{values}"
        if key not in self._t:
            self._t[key] = self.add(np.array(values, np.int64), "hmf_shape", np.int64)
        return self._t[key]


def _gemm_tail(f: Factors, node: onnx.NodeProto, z: str, y: str, nodes: list) -> None:
    """Y = α·Z + β·C for a Gemm use, given Z = X·op(B)."""
    ed = f.editor
    alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
    beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    tag = node.name or y
    cur = z
    if alpha != 1.0:
        cur = y if c is None else ed.fresh(f"{y}.alpha")
        nodes.append(ed.node("Mul", [z, f.scalar(alpha, "alpha")], [cur], f"{tag}/hmf/Mul"))
    if c is not None:
        if beta != 1.0:
            scaled = ed.fresh(f"{y}.betaC")
            nodes.append(ed.node("Mul", [c, f.scalar(beta, "beta")], [scaled], f"{tag}/hmf/beta"))
            c = scaled
        nodes.append(ed.node("Add", [cur, c], [y], f"{tag}/hmf/Add"))
    elif cur == z:
        nodes.append(ed.node("Identity", [z], [y], f"{tag}/hmf/Identity"))


class HybridEmit:
    """Emit X·F for one use, where F has hybrid factors (D, A, B) along ``axis``."""

    def __init__(self, f: Factors, shape: tuple[int, int], axis: int, D: str, A: str, B: str,
                 dense_idx: str | None, rest_idx: str | None, inv: str | None):
        self.f, self.shape, self.axis, self.D, self.A, self.B = f, shape, axis, D, A, B
        self.dense_idx, self.rest_idx, self.inv = dense_idx, rest_idx, inv

    def product(self, x: str, z: str, tag: str, sees_f: bool, permute: bool, nodes: list) -> None:
        """z = x·F (sees_f) or x·Fᵀ, columns in original order if ``permute`` else in [S, R] order."""
        f = self.f
        axis = self.axis if sees_f else 1 - self.axis
        if axis == 1 and not permute:  # folded: plain layout, no permutation at all
            D, A, B = (self.D, self.A, self.B) if sees_f else (f.T(self.D), f.T(self.B), f.T(self.A))
            ed = f.editor
            yd, mid, yr = ed.fresh(f"{z}.hmf_dense"), ed.fresh(f"{z}.hmf_xa"), ed.fresh(f"{z}.hmf_low")
            nodes += [
                ed.node("MatMul", [x, D], [yd], f"{tag}/hmf/MatMul_dense"),
                ed.node("MatMul", [x, A], [mid], f"{tag}/hmf/MatMul_A"),
                ed.node("MatMul", [mid, B], [yr], f"{tag}/hmf/MatMul_B"),
                ed.node("Concat", [yd, yr], [z], f"{tag}/hmf/Concat", axis=-1),
            ]
            return
        # Permutations of the feature axis run as Gathers on axis 0 of the transposed
        # activations (m × N): onnxruntime's Gather on the last axis is ~5x slower than
        # Transpose + Gather(axis 0) + Transpose. The factors' transposes are constants.
        Dt, At, Bt = (f.T(self.D), f.T(self.A), f.T(self.B)) if sees_f else (self.D, self.B, self.A)
        m, n = self.shape if sees_f else self.shape[::-1]
        self._transposed_layout(x, z, tag, axis, m, n, Dt, At, Bt, nodes)

    def _transposed_layout(self, x: str, z: str, tag: str, axis: int, m: int, n: int, Dt: str, At: str, Bt: str, nodes: list) -> None:
        """Yᵀ from Xᵀ = Transpose(Reshape(X, [-1, m])), then Y = Reshape(Transpose(Yᵀ), [..., n])."""
        ed, f = self.f.editor, self.f
        fresh = lambda s: ed.fresh(f"{z}.hmf_{s}")  # noqa: E731
        shape, lead, out_shape, x2, xt = fresh("shape"), fresh("lead"), fresh("out_shape"), fresh("x2d"), fresh("xt")
        yd, mid, yr, yt, y2 = fresh("dense"), fresh("xa"), fresh("low"), fresh("yt"), fresh("y2d")
        nodes += [
            ed.node("Shape", [x], [shape], f"{tag}/hmf/Shape"),
            _slice_lead(ed, f, shape, lead, tag),
            ed.node("Concat", [lead, f.const_i64([n])], [out_shape], f"{tag}/hmf/Concat_shape", axis=0),
            ed.node("Reshape", [x, f.const_i64([-1, m])], [x2], f"{tag}/hmf/Reshape_in"),
            ed.node("Transpose", [x2], [xt], f"{tag}/hmf/Transpose_in", perm=[1, 0]),
        ]
        if axis == 1:
            cat = fresh("cat")
            nodes += [
                ed.node("MatMul", [Dt, xt], [yd], f"{tag}/hmf/MatMul_dense"),
                ed.node("MatMul", [At, xt], [mid], f"{tag}/hmf/MatMul_A"),
                ed.node("MatMul", [Bt, mid], [yr], f"{tag}/hmf/MatMul_B"),
                ed.node("Concat", [yd, yr], [cat], f"{tag}/hmf/Concat", axis=0),
                ed.node("Gather", [cat, self.inv], [yt], f"{tag}/hmf/Gather_perm", axis=0),
            ]
        else:
            xs, xr = fresh("xs"), fresh("xr")
            nodes += [
                ed.node("Gather", [xt, self.dense_idx], [xs], f"{tag}/hmf/Gather_dense", axis=0),
                ed.node("Gather", [xt, self.rest_idx], [xr], f"{tag}/hmf/Gather_rest", axis=0),
                ed.node("MatMul", [Dt, xs], [yd], f"{tag}/hmf/MatMul_dense"),
                ed.node("MatMul", [At, xr], [mid], f"{tag}/hmf/MatMul_A"),
                ed.node("MatMul", [Bt, mid], [yr], f"{tag}/hmf/MatMul_B"),
                ed.node("Add", [yd, yr], [yt], f"{tag}/hmf/Add"),
            ]
        nodes += [
            ed.node("Transpose", [yt], [y2], f"{tag}/hmf/Transpose_out", perm=[1, 0]),
            ed.node("Reshape", [y2, out_shape], [z], f"{tag}/hmf/Reshape_out"),
        ]

    def use(self, use: Use, sees_f: bool, permute: bool) -> list:
        node, nodes = use.node, []
        y = node.output[0]
        tag = node.name or y
        if use.kind == "matmul":
            self.product(node.input[0], y, tag, sees_f, permute, nodes)
        else:  # gemm
            z = self.f.editor.fresh(f"{y}.hmf_xw")
            self.product(node.input[0], z, tag, sees_f, permute, nodes)
            _gemm_tail(self.f, node, z, y, nodes)
        return nodes


def rewrite_hybrid(editor: GraphEditor, group: WeightGroup, hf, transposed: bool, folded: set[int] = frozenset()) -> int:
    """Replace every (MatMul/Gemm) use by HMF factors of F (= Tᵀ if ``transposed``).

    ``folded``: ids of use nodes whose output permutation is folded into their consumers
    (they emit Concat in [S, R] order, no Gather). Returns the elements stored, index maps
    included.
    """
    f = Factors(editor, group)
    D, A, B = f.add(hf.D, "hmf_D"), f.add(hf.A, "hmf_A"), f.add(hf.B, "hmf_B")
    n_axis = len(hf.dense_idx) + len(hf.rest_idx)
    order = np.concatenate([hf.dense_idx, hf.rest_idx])
    def eff_axis(u: Use) -> int:  # a use that reads Fᵀ sees the split on the other axis
        return hf.axis if u.transposed == transposed else 1 - hf.axis

    need_inv = any(eff_axis(u) == 1 and id(u.node) not in folded for u in group.uses)
    need_idx = any(eff_axis(u) == 0 for u in group.uses)
    inv = dense_idx = rest_idx = None
    if need_inv:
        inv_arr = np.empty(n_axis, np.int32)
        inv_arr[order] = np.arange(n_axis, dtype=np.int32)
        inv = f.add(inv_arr, "hmf_inv", np.int32)
    if need_idx:
        dense_idx = f.add(hf.dense_idx.astype(np.int32), "hmf_dense_idx", np.int32)
        rest_idx = f.add(hf.rest_idx.astype(np.int32), "hmf_rest_idx", np.int32)
    m = hf.D.shape[0] if hf.axis == 1 else hf.A.shape[0] + hf.D.shape[0]
    n = hf.D.shape[1] + hf.B.shape[1] if hf.axis == 1 else hf.B.shape[1]
    emit = HybridEmit(f, (m, n), hf.axis, D, A, B, dense_idx, rest_idx, inv)
    for use in group.uses:
        editor.replace(use.node, emit.use(use, use.transposed == transposed, permute=id(use.node) not in folded))
    drop_old_weight(editor, group)
    return f.stored


def rewrite_embedding_hybrid(editor: GraphEditor, group: WeightGroup, hf) -> int:
    """Embedding HMF (dense rows, axis=0, of the stored table) for Gather uses and tied heads."""
    assert hf.axis == 0
    f = Factors(editor, group)
    V, d = group.shape
    k = len(hf.dense_idx)
    r = hf.A.shape[1]
    D_ext = np.vstack([hf.D, np.zeros((1, d))])
    A_ext = np.vstack([np.zeros((1, r)), hf.A])
    D, A, B = f.add(D_ext, "hmf_D"), f.add(A_ext, "hmf_A"), f.add(hf.B, "hmf_B")
    slot = np.empty(V, np.int32)
    slot[hf.dense_idx] = np.arange(k, dtype=np.int32)
    slot[hf.rest_idx] = k + 1 + np.arange(V - k, dtype=np.int32)
    M = f.add(slot, "hmf_slot", np.int32)
    inv = None
    if any(u.kind != "gather" for u in group.uses):
        inv_arr = np.empty(V, np.int32)
        inv_arr[hf.dense_idx] = np.arange(k, dtype=np.int32)
        inv_arr[hf.rest_idx] = (k + 1) + 1 + np.arange(V - k, dtype=np.int32)
        inv = f.add(inv_arr, "hmf_inv", np.int32)
    # Min/Max take int32 from opset 12; below it the slot arithmetic runs in float32 (exact for
    # slots < 2^24) between two Casts, with Clip at opset 7 (whose Min/Max do not broadcast)
    int_minmax = default_opset(editor.model) >= 12
    k_c = f.add(np.array(k, np.int32 if int_minmax else np.float32), "hmf_k", np.int32 if int_minmax else np.float32)
    zero = f.add(np.array(0, np.int32 if int_minmax else np.float32), "hmf_zero", np.int32 if int_minmax else np.float32)
    ed = editor
    for use in group.uses:
        node = use.node
        y = node.output[0]
        tag = node.name or y
        if use.kind == "gather":
            s, sd, sr0, sr = (ed.fresh(f"{y}.hmf_{n}") for n in ("slot", "dslot", "rslot0", "rslot"))
            ed_, code, low = ed.fresh(f"{y}.hmf_dense"), ed.fresh(f"{y}.hmf_code"), ed.fresh(f"{y}.hmf_low")
            nodes = [ed.node("Gather", [M, node.input[1]], [s], f"{tag}/hmf/Gather_slot", axis=0)]
            if not int_minmax:
                sf, sdf, srf = (ed.fresh(f"{y}.hmf_{n}") for n in ("slot_f", "dslot_f", "rslot_f"))
                nodes.append(ed.node("Cast", [s], [sf], f"{tag}/hmf/Cast_slot", to=onnx.TensorProto.FLOAT))
                s, sd_out, sr_out, sd, sr = sf, sd, sr, sdf, srf
            if default_opset(editor.model) >= 8:
                nodes += [
                    ed.node("Min", [s, k_c], [sd], f"{tag}/hmf/Min"),
                    ed.node("Sub", [s, k_c], [sr0], f"{tag}/hmf/Sub"),
                    ed.node("Max", [sr0, zero], [sr], f"{tag}/hmf/Max"),
                ]
            else:  # opset 7's Min/Max do not broadcast: Clip with attributes
                nodes += [
                    ed.node("Clip", [s], [sd], f"{tag}/hmf/Min", max=float(k)),
                    ed.node("Sub", [s, k_c], [sr0], f"{tag}/hmf/Sub"),
                    ed.node("Clip", [sr0], [sr], f"{tag}/hmf/Max", min=0.0),
                ]
            if not int_minmax:
                nodes += [ed.node("Cast", [sd], [sd_out], f"{tag}/hmf/Cast_dense", to=onnx.TensorProto.INT32),
                          ed.node("Cast", [sr], [sr_out], f"{tag}/hmf/Cast_rest", to=onnx.TensorProto.INT32)]
                sd, sr = sd_out, sr_out
            nodes += [
                ed.node("Gather", [D, sd], [ed_], f"{tag}/hmf/Gather_dense", axis=0),
                ed.node("Gather", [A, sr], [code], f"{tag}/hmf/Gather_code", axis=0),
                ed.node("MatMul", [code, B], [low], f"{tag}/hmf/MatMul_B"),
                ed.node("Add", [ed_, low], [y], f"{tag}/hmf/Add"),
            ]
        else:  # the head reads Eᵀ: logits = Concat(h·D̃ᵀ, (h·Bᵀ)·Ãᵀ)[..., inv]
            if not use.transposed:
                raise ValueError("an embedding table read untransposed by a MatMul is not supported with HMF")
            emit = HybridEmit(f, (V, d), 0, D, A, B, None, None, inv)
            nodes = []
            z = y if use.kind == "matmul" else ed.fresh(f"{y}.hmf_xw")
            emit.product(node.input[0], z, tag, sees_f=False, permute=True, nodes=nodes)
            if use.kind == "gemm":
                _gemm_tail(f, node, z, y, nodes)
        editor.replace(node, nodes)
    drop_old_weight(editor, group)
    return f.stored


def _slice_lead(ed: GraphEditor, f: Factors, shape: str, lead: str, tag: str) -> onnx.NodeProto:
    """shape[:-1]: Slice with inputs from opset 10, with attributes below it."""
    if default_opset(ed.model) >= 10:
        return ed.node("Slice", [shape, f.const_i64([0]), f.const_i64([-1])], [lead], f"{tag}/hmf/Slice")
    return ed.node("Slice", [shape], [lead], f"{tag}/hmf/Slice", starts=[0], ends=[-1], axes=[0])


def rewrite_dense(editor: GraphEditor, group: WeightGroup, W: np.ndarray) -> None:
    """Store a new dense value for the group's tensor (e.g. pruned), keeping every use as is."""
    ref = group.ref
    new = editor.make_tensor(np.asarray(W, FLOAT_TYPES[ref.data_type]).reshape(ref.dims), ref.name)
    graph = editor.graph_at(ref.scope)
    if ref.kind == "initializer":
        for t in graph.initializer:
            if t.name == ref.name:
                t.CopyFrom(new)
                return
    node = next(n for n in graph.node if ref.name in n.output)
    for a in node.attribute:
        if a.name == "value":
            a.t.CopyFrom(new)


def drop_old_weight(editor: GraphEditor, group: WeightGroup) -> None:
    """Remove the dense tensor (initializer or Constant) and the Transposes that read it."""
    for use in group.uses:
        if use.via_transpose is not None:
            editor.remove_node(editor.producer_of(use.via_transpose, use.scope))
    ref = group.ref
    if ref.kind == "constant":
        editor.remove_node(editor.producer_of(ref.name, ref.scope))
    else:
        editor.remove_tensor(ref.name, ref.scope)
