"""Rewrite every use of a weight group with low-rank factors, using standard ONNX ops only.

The factors approximate F = A·B, where F is the stored tensor T or its transpose Tᵀ. Each use
is rewritten with the identity it needs:

    MatMul(X, F)              →  MatMul(MatMul(X, A), B)
    MatMul(X, Fᵀ)             →  MatMul(MatMul(X, Bᵀ), Aᵀ)        (Transpose nodes on the factors)
    Gemm(X, F, C; α, β)       →  Gemm(MatMul(X, A), B, C; α, β)
    Gemm(X, Fᵀ, C; α, β)      →  Gemm(Gemm(X, B; transB=1), A, C; α, β, transB=1)
    Gather(F, ids)            →  MatMul(Gather(A, ids), B)

so the factors are stored once however many nodes read the weight (a tied embedding and LM
head share them). Transposes of constants are folded by onnxruntime when the session loads.
"""
from __future__ import annotations

import numpy as np
import onnx

from .edit import GraphEditor
from .hybrid import Factors, drop_old_weight
from .sites import Use, WeightGroup

__all__ = ["factor_orientation", "rewrite_lowrank", "rewrite_shared_basis", "shareable"]


def factor_orientation(group: WeightGroup) -> bool:
    """Whether to factorize Tᵀ rather than T: only when every use reads Tᵀ (no Gather)."""
    return all(u.transposed for u in group.uses) and not any(u.kind == "gather" for u in group.uses)


def _gemm_attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        if a.name in ("alpha", "beta"):
            out[a.name] = a.f
    return out


def rewrite_lowrank(editor: GraphEditor, group: WeightGroup, A: np.ndarray, B: np.ndarray, transposed: bool) -> None:
    """Replace every use of ``group`` by the factors of F ≈ A·B (F = Tᵀ if ``transposed``)."""
    f = Factors(editor, group)
    a, b = f.add(A, "lmf_A"), f.add(B, "lmf_B")
    for use in group.uses:
        editor.replace(use.node, _rewrite_use(editor, use, a, b, use.transposed == transposed, f.T))
    drop_old_weight(editor, group)


def _rewrite_use(editor: GraphEditor, use: Use, a: str, b: str, sees_f: bool, transposed_factor) -> list:
    node = use.node
    y = node.output[0]
    tag = node.name or y
    mid = editor.fresh(f"{y}.lmf")
    mk = editor.node
    if use.kind == "gather":
        assert sees_f, "Gather uses are always factorized in the stored orientation"
        attrs = {"axis": 0}
        return [
            mk("Gather", [a, node.input[1]], [mid], f"{tag}/lmf/Gather", **attrs),
            mk("MatMul", [mid, b], [y], f"{tag}/lmf/MatMul"),
        ]
    x = node.input[0]
    if use.kind == "matmul":
        if sees_f:
            first, second = a, b
        else:
            first, second = transposed_factor(b), transposed_factor(a)
        return [
            mk("MatMul", [x, first], [mid], f"{tag}/lmf/MatMul_0"),
            mk("MatMul", [mid, second], [y], f"{tag}/lmf/MatMul_1"),
        ]
    # Gemm: keep α, β and C on the second Gemm so the semantics are exactly the original's.
    c = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    ab = _gemm_attrs(node)
    if sees_f:
        return [
            mk("MatMul", [x, a], [mid], f"{tag}/lmf/MatMul"),
            mk("Gemm", [mid, b, *c], [y], f"{tag}/lmf/Gemm", **ab),
        ]
    return [
        mk("Gemm", [x, b], [mid], f"{tag}/lmf/Gemm_0", transB=1),
        mk("Gemm", [mid, a, *c], [y], f"{tag}/lmf/Gemm_1", transB=1, **ab),
    ]


def shareable(group: WeightGroup) -> str | None:
    """The activation a group reads if it can join a shared basis (one plain, untransposed
    MatMul use of an initializer), else None."""
    if len(group.uses) != 1 or group.skip_reason is not None:
        return None
    u = group.uses[0]
    if u.kind != "matmul" or u.transposed or u.via_transpose is not None:
        return None
    if u.scope:  # inside a body: the shared X·A would have to live in that one body
        return None
    return u.node.input[0]


def rewrite_shared_basis(editor: GraphEditor, groups: list[WeightGroup], A: np.ndarray, Bs: list[np.ndarray]) -> int:
    """Weights that read the same activation X (e.g. Q, K, V) with W_i ≈ A·B_i:

        MatMul(X, W_i)  →  MatMul(MatMul(X, A), B_i)    (one X·A for all of them)

    The shared product is emitted in place of the first use in graph order, so it precedes
    the others. Returns the stored elements (A once, every B_i)."""
    first = groups[0]
    fa = Factors(editor, first)
    a = fa.add(A, "shared_A")
    x = first.uses[0].node.input[0]
    mid = editor.fresh(f"{x}.shared_basis")
    stored = fa.stored
    for i, (g, B) in enumerate(zip(groups, Bs)):
        f = Factors(editor, g)
        b = f.add(B, "shared_B")
        stored += f.stored
        node = g.uses[0].node
        tag = node.name or node.output[0]
        new = [editor.node("MatMul", [mid, b], [node.output[0]], f"{tag}/shared/MatMul_1")]
        if i == 0:
            new.insert(0, editor.node("MatMul", [x, a], [mid], f"{tag}/shared/MatMul_0"))
        editor.replace(node, new)
        drop_old_weight(editor, g)
    return stored
