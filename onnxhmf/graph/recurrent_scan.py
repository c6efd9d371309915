"""Lower an ONNX LSTM/GRU/RNN (layout 0, no sequence_lens) to ``Scan`` with explicit MatMuls.

The fused op hides R (h_{t−1}·R_dᵀ inside its kernel), so R cannot be factorized there. The
lowering computes the input projection P = X·Mᵀ + b once for the whole sequence outside the
loop (M = the stacked W of both directions, one MatMul), and one Scan per direction whose body
is the cell with h·R_dᵀ as a MatMul, so each projection can be dense, low rank or hybrid:

    LSTM (gates i,o,f,c):  g = p_t + h·Rᵀ;  c' = σ(f)⊙c + σ(i)⊙tanh(c̃);  h' = σ(o)⊙tanh(c')
    GRU  (gates z,r,h):    z = σ(p_z + h·R_zᵀ), r = σ(p_r + h·R_rᵀ),
                           n = tanh(p_h + r⊙(h·R_hᵀ + Rb_h))   (linear_before_reset = 1)
                           n = tanh(p_h + (r⊙h)·R_hᵀ)          (linear_before_reset = 0)
                           h' = n + z⊙(h − n)
    RNN:                   h' = tanh(p_t + h·Rᵀ)

b holds W's and R's biases (except GRU's Rb_h with linear_before_reset = 1, which stays in the
body). The reverse direction runs a forward Scan on P reversed in time (Slice with step −1) and
reverses its Y back, so Y is in time order, as the op's (onnx.reference's Scan has no reverse
scan directions). Y = Concat of Unsqueeze(Y_d, 1), Y_h/Y_c =
Concat of Unsqueeze(final state, 0). Default activations only, no clip, no peepholes, no
input_forget; opset ≥ 13 (Unsqueeze with an axes input).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .edit import GraphEditor
from .index import FLOAT_TYPES, GraphIndex
from .recurrent import RecurrentSite, attr

__all__ = ["Projection", "lowering_blocker", "lower_to_scan", "r_parts"]


@dataclass
class Projection:
    """y = x·T for T (in × out), stored as ``dense`` (T), ``lowrank`` (A·B) or ``hybrid``
    (hmf.HybridFactors with axis 1: dense output columns of T)."""

    kind: str
    T: np.ndarray | None = None
    A: np.ndarray | None = None
    B: np.ndarray | None = None
    hf: object = None

    @property
    def params(self) -> int:
        if self.kind == "dense":
            return self.T.size
        if self.kind == "lowrank":
            return self.A.size + self.B.size
        return self.hf.params + self.hf.shape[1]  # + the int64 output permutation


def lowering_blocker(site: RecurrentSite, opset: int) -> str | None:
    """Why ``site`` cannot be lowered to Scan, or None."""
    node = site.node
    if site.skip_reason or site.r_reason:
        return site.skip_reason or site.r_reason
    if opset < 13:
        return f"lowering needs opset ≥ 13 (the model has {opset})"
    if site.layout != 0:
        return "lowering supports layout 0 only"
    if len(node.input) > 4 and node.input[4]:
        return "lowering does not support sequence_lens"
    if site.op == "LSTM" and len(node.input) > 7 and node.input[7]:
        return "lowering does not support LSTM peepholes (P)"
    for a in ("activations", "activation_alpha", "activation_beta", "clip"):
        if attr(node, a, None) is not None:
            return f"lowering supports default activations only (attribute {a!r} is set)"
    if attr(node, "input_forget", 0):
        return "lowering does not support input_forget"
    if len(node.input) > 3 and node.input[3] and site.B is None:
        return "B is not a constant"
    return None


def r_parts(site: RecurrentSite, R_d: np.ndarray) -> list[np.ndarray]:
    """The matrices (in × out, MatMul layout) the body multiplies h by for one direction:
    [R_dᵀ], or [R_zrᵀ, R_hᵀ] for a GRU with linear_before_reset = 0."""
    H = site.hidden
    if site.op == "GRU" and not attr(site.node, "linear_before_reset", 0):
        return [np.ascontiguousarray(R_d[: 2 * H].T), np.ascontiguousarray(R_d[2 * H:].T)]
    return [np.ascontiguousarray(R_d.T)]


class _Emit:
    """Nodes and constants for the main graph (``body`` False) or a Scan body."""

    def __init__(self, editor: GraphEditor, dtype, body: bool):
        self.editor, self.dtype, self.body = editor, dtype, body
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, a: np.ndarray, base: str, cast: bool = True) -> str:
        a = a.astype(self.dtype) if cast else a
        if a.ndim == 0:  # a Constant node: initializer helpers make 0-d arrays 1-d
            return self.op("Constant", [], base, value=numpy_helper.from_array(a))
        if not self.body:
            return self.editor.add_initializer(a, base)
        name = self.editor.fresh(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def op(self, op: str, inputs: list[str], base: str, out: str | None = None, n_out: int = 1, **attrs):
        outs = [out] if out else [self.editor.fresh(f"{base}.{i}" if n_out > 1 else base) for i in range(n_out)]
        self.nodes.append(self.editor.node(op, inputs, outs, base, **attrs))
        return outs[0] if n_out == 1 else outs

    def slice(self, x: str, lo: int, hi: int, base: str) -> str:
        i64 = lambda v, b: self.const(np.array([v], np.int64), b, cast=False)  # noqa: E731
        return self.op("Slice", [x, i64(lo, f"{base}.lo"), i64(hi, f"{base}.hi"), i64(-1, f"{base}.axis")], base)

    def flip(self, x: str, base: str) -> str:
        """x reversed along axis 0 (time): Slice with step −1."""
        i64 = lambda v, b: self.const(np.array([v], np.int64), b, cast=False)  # noqa: E731
        return self.op("Slice", [x, i64(-1, f"{base}.lo"), i64(-(2**63) + 1, f"{base}.hi"), i64(0, f"{base}.axis"),
                                 i64(-1, f"{base}.step")], base)

    def project(self, x: str, p: Projection, base: str) -> str:
        if p.kind == "dense":
            return self.op("MatMul", [x, self.const(p.T, f"{base}.T")], base)
        if p.kind == "lowrank":
            t = self.op("MatMul", [x, self.const(p.A, f"{base}.A")], f"{base}.xA")
            return self.op("MatMul", [t, self.const(p.B, f"{base}.B")], base)
        hf = p.hf
        yd = self.op("MatMul", [x, self.const(hf.D, f"{base}.D")], f"{base}.dense")
        t = self.op("MatMul", [x, self.const(hf.A, f"{base}.A")], f"{base}.xA")
        yr = self.op("MatMul", [t, self.const(hf.B, f"{base}.B")], f"{base}.rest")
        cat = self.op("Concat", [yd, yr], f"{base}.cat", axis=-1)
        pos = np.argsort(np.concatenate([hf.dense_idx, hf.rest_idx])).astype(np.int64)
        return self.op("Gather", [cat, self.const(pos, f"{base}.perm", cast=False)], base, axis=-1)


def _body(editor: GraphEditor, site: RecurrentSite, dtype, rproj: list[Projection], rb_h: np.ndarray | None):
    """The Scan body of one direction: (h, [c], p_t) -> (h', [c'], y_t)."""
    H, op, tag = site.hidden, site.op, f"{site.node.name or site.op}"
    em = _Emit(editor, dtype, body=True)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    names = ["h", "c", "p"] if op == "LSTM" else ["h", "p"]
    ins = {n: editor.fresh(f"{tag}.body.{n}") for n in names}
    h, p = ins["h"], ins["p"]
    sig = lambda x, b: em.op("Sigmoid", [x], b)  # noqa: E731
    if op == "LSTM":
        g = em.op("Add", [p, em.project(h, rproj[0], f"{tag}.hR")], f"{tag}.gates")
        i, o, f, cc = (em.slice(g, k * H, (k + 1) * H, f"{tag}.{n}") for k, n in enumerate("iofc"))
        c_new = em.op("Add", [em.op("Mul", [sig(f, f"{tag}.sf"), ins["c"]], f"{tag}.fc"),
                              em.op("Mul", [sig(i, f"{tag}.si"), em.op("Tanh", [cc], f"{tag}.tc")], f"{tag}.ic")], f"{tag}.c_new")
        h_new = em.op("Mul", [sig(o, f"{tag}.so"), em.op("Tanh", [c_new], f"{tag}.tcn")], f"{tag}.h_new")
        outs = [h_new, c_new]
    elif op == "GRU":
        pz, pr, ph = (em.slice(p, k * H, (k + 1) * H, f"{tag}.p{n}") for k, n in enumerate("zrh"))
        hr = em.project(h, rproj[0], f"{tag}.hR")
        z = sig(em.op("Add", [pz, em.slice(hr, 0, H, f"{tag}.hz")], f"{tag}.az"), f"{tag}.z")
        r = sig(em.op("Add", [pr, em.slice(hr, H, 2 * H, f"{tag}.hr")], f"{tag}.ar"), f"{tag}.r")
        if len(rproj) == 1:  # linear_before_reset = 1
            hh = em.slice(hr, 2 * H, 3 * H, f"{tag}.hh")
            if rb_h is not None:
                hh = em.op("Add", [hh, em.const(rb_h, f"{tag}.Rbh")], f"{tag}.hhb")
            pre = em.op("Add", [ph, em.op("Mul", [r, hh], f"{tag}.rhh")], f"{tag}.ah")
        else:
            pre = em.op("Add", [ph, em.project(em.op("Mul", [r, h], f"{tag}.rh"), rproj[1], f"{tag}.rhR")], f"{tag}.ah")
        n = em.op("Tanh", [pre], f"{tag}.n")
        h_new = em.op("Add", [n, em.op("Mul", [z, em.op("Sub", [h, n], f"{tag}.hmn")], f"{tag}.zd")], f"{tag}.h_new")
        outs = [h_new]
    else:
        h_new = em.op("Tanh", [em.op("Add", [p, em.project(h, rproj[0], f"{tag}.hR")], f"{tag}.a")], f"{tag}.h_new")
        outs = [h_new]
    y = em.op("Identity", [h_new], f"{tag}.y")
    vi = lambda n, w: helper.make_tensor_value_info(n, elem, [None, w])  # noqa: E731
    G = site.gates
    graph = helper.make_graph(
        em.nodes, editor.fresh(f"{tag}_scan_body"),
        [vi(ins[n], G * H if n == "p" else H) for n in names],
        [vi(o, H) for o in outs + [y]], em.inits)
    return graph


def _state(em: _Emit, site: RecurrentSite, slot: int, d: int, zeros: str) -> str:
    node = site.node
    if len(node.input) > slot and node.input[slot]:
        idx = em.const(np.array(d, np.int64), f"{site.name}.dir{d}", cast=False)
        return em.op("Gather", [node.input[slot], idx], f"{node.name}.state{slot}_{d}", axis=0)
    return zeros


def lower_to_scan(editor: GraphEditor, index: GraphIndex, site: RecurrentSite, wproj: Projection,
                  rprojs: list[list[Projection]]) -> None:
    """Replace ``site``'s node by P = X·W-projection + b and one Scan per direction (module
    docstring); ``wproj`` maps I → dirs·G·H, ``rprojs[d]`` are direction d's R parts (r_parts)."""
    node, dirs, H, G = site.node, site.dirs, site.hidden, site.gates
    dtype = FLOAT_TYPES[site.W.data_type]
    em = _Emit(editor, dtype, body=False)
    tag = node.name or site.op
    P = em.project(node.input[0], wproj, f"{tag}.XW")
    lbr = site.op == "GRU" and attr(node, "linear_before_reset", 0)
    rbh = [None] * dirs
    if site.B is not None:
        Bv = index.array(site.B).astype(np.float64)
        Wb, Rb = Bv[:, : G * H], Bv[:, G * H:].copy()
        if lbr:
            rbh = [Rb[d, 2 * H:].copy() for d in range(dirs)]
            Rb[:, 2 * H:] = 0.0
        P = em.op("Add", [P, em.const((Wb + Rb).reshape(-1), f"{tag}.bias")], f"{tag}.XWb")
    shape = em.op("Shape", [node.input[0]], f"{tag}.xshape")
    batch = em.op("Slice", [shape, em.const(np.array([1], np.int64), f"{tag}.one", cast=False),
                            em.const(np.array([2], np.int64), f"{tag}.two", cast=False)], f"{tag}.batch")
    zshape = em.op("Concat", [batch, em.const(np.array([H], np.int64), f"{tag}.H", cast=False)], f"{tag}.zshape", axis=0)
    zeros = em.op("ConstantOfShape", [zshape], f"{tag}.zeros",
                  value=numpy_helper.from_array(np.zeros(1, dtype)))
    finals: list[list[str]] = []
    ys = []
    for d in range(dirs):
        Pd = P if dirs == 1 else em.slice(P, d * G * H, (d + 1) * G * H, f"{tag}.P{d}")
        states = [_state(em, site, 5, d, zeros)] + ([_state(em, site, 6, d, zeros)] if site.op == "LSTM" else [])
        body = _body(editor, site, dtype, rprojs[d], rbh[d])
        if d:
            Pd = em.flip(Pd, f"{tag}.P{d}_rev")
        outs = em.op("Scan", states + [Pd], f"{tag}.scan{d}", n_out=len(states) + 1, body=body, num_scan_inputs=1)
        finals.append(outs[:-1])
        ys.append(em.flip(outs[-1], f"{tag}.Y{d}_rev") if d else outs[-1])
    want = list(node.output) + [""] * (3 - len(node.output))

    def stack(parts: list[str], axis: int, out: str, base: str) -> None:
        ax = em.const(np.array([axis], np.int64), f"{base}.axis", cast=False)
        us = [em.op("Unsqueeze", [p_, ax], f"{base}.u{i}") for i, p_ in enumerate(parts)]
        if len(us) == 1:
            em.op("Identity", us, base, out=out)
        else:
            em.op("Concat", us, base, out=out, axis=axis)

    if want[0]:
        stack(ys, 1, want[0], f"{tag}.Y")
    if want[1]:
        stack([f[0] for f in finals], 0, want[1], f"{tag}.Y_h")
    if site.op == "LSTM" and want[2]:
        stack([f[1] for f in finals], 0, want[2], f"{tag}.Y_c")
    editor.replace(node, em.nodes)
    for ref in (site.W, site.R, site.B):
        if ref is not None:
            editor.remove_tensor(ref.name)
