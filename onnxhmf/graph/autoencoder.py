"""ONNX subgraphs for autoencoder-compressed weights, standard ops only.

Embedding table E (V×d) with codes C (V×k) and a decoder (``factorize/autoencoder.py``):

    linear:     Gather(C, ids) → MatMul(D) → Add(b)                       ê = C[ids]·D + b
    nonlinear:  Gather(C, ids) → MatMul(D₁) → Add(b₁) → Act → MatMul(D₂) → Add(b₂)

Tied LM head (the table also read, through Transpose, by a MatMul/Gemm):

    linear:     logits = h·Êᵀ = h·(C·D + 1·bᵀ)ᵀ = (h·Dᵀ)·Cᵀ + (h·b)·1ᵀ
                (MatMul, MatMul, MatMul with b reshaped to d×1, broadcasting Add; the
                Transposes and the Reshape read only constants)
    nonlinear:  the full table is decoded by a constant subgraph Ê = act(C·D₁ + b₁)·D₂ + b₂
                that replaces the stored table for every reader (Gather and head alike).
                onnxruntime folds it once when the session is created: the file holds only
                codes and decoder, memory holds Ê as before, per-call compute is unchanged.

Storage mode: each weight W_l (rows of a stacked group) is rebuilt by a constant subgraph
from its codes C_l, its row norms n_l and the group's shared decoder:

    T = Tanh(LeakyRelu(LeakyRelu(C_l·D₁ + b₁)·D₂ + b₂)·D₃ + b₃),   W_l = T · (n_l / ‖T‖_row)

and every node that read W_l reads the rebuilt tensor instead (the original nodes are kept).
onnxruntime folds these subgraphs at session creation; onnx.reference computes them each run.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..factorize.autoencoder import LEAKY_SLOPE, MLP, EmbeddingAE, StorageAE
from .edit import GraphEditor
from .hybrid import Factors, _gemm_tail, drop_old_weight
from .index import FLOAT_TYPES, GraphIndex, default_opset
from .sites import WeightGroup

__all__ = ["rewrite_embedding_ae", "rebuild_weights", "emit_mlp"]

_ONNX_ACT = {"relu": ("Relu", {}), "leakyrelu": ("LeakyRelu", {"alpha": LEAKY_SLOPE}), "tanh": ("Tanh", {})}


def emit_mlp(editor: GraphEditor, x: str, layers: list[tuple[str, str, str]], out: str, tag: str) -> list:
    """Nodes for y = act_L(…act_1(x·W₁ + b₁)…) given (W, b, act) initializer names; y named ``out``."""
    nodes, cur = [], x
    for i, (W, b, act) in enumerate(layers):
        last = i == len(layers) - 1
        mm, add = editor.fresh(f"{out}.ae_mm{i}"), (out if last and act == "linear" else editor.fresh(f"{out}.ae_add{i}"))
        nodes.append(editor.node("MatMul", [cur, W], [mm], f"{tag}/ae/MatMul_{i}"))
        nodes.append(editor.node("Add", [mm, b], [add], f"{tag}/ae/Add_{i}"))
        cur = add
        if act != "linear":
            op, attrs = _ONNX_ACT[act]
            a = out if last else editor.fresh(f"{out}.ae_act{i}")
            nodes.append(editor.node(op, [cur], [a], f"{tag}/ae/{op}_{i}", **attrs))
            cur = a
    return nodes


def _store_mlp(f: Factors, mlp: MLP, prefix: str) -> list[tuple[str, str, str]]:
    names = []
    for i, act in enumerate(mlp.acts):
        names.append((f.add(mlp.params[2 * i], f"{prefix}_W{i}"), f.add(mlp.params[2 * i + 1], f"{prefix}_b{i}"), act))
    return names


def _redirect(editor: GraphEditor, index: GraphIndex, old: str, new: str, skip: set[int] = frozenset()) -> None:
    """Every main-graph node that reads ``old`` reads ``new`` instead; the old tensor is dropped."""
    for node in index.consumers.get(old, []):
        if id(node) in skip:
            continue
        base = editor.replacement(node)
        copy = onnx.NodeProto()
        copy.CopyFrom(base)
        for i, name in enumerate(copy.input):
            if name == old:
                copy.input[i] = new
        editor.replace(node, [copy])
    editor.remove_tensor(old)


def rewrite_embedding_ae(editor: GraphEditor, index: GraphIndex, group: WeightGroup, ae: EmbeddingAE) -> int:
    """Replace the table's uses by the AE's codes and decoder; returns the elements stored."""
    f = Factors(editor, group)
    V, d = group.shape
    codes = f.add(ae.codes, "ae_codes")
    layers = _store_mlp(f, ae.decoder, "ae_dec")
    head = [u for u in group.uses if u.kind != "gather"]
    if ae.config.decoder == "nonlinear" and head:
        # Decode the whole table once (a constant subgraph) and point every reader at it.
        table = editor.fresh(f"{group.name}.ae_decoded")
        for node in emit_mlp(editor, codes, layers, table, f"{group.name}/decode"):
            editor.prepend(node)
        _redirect(editor, index, group.name, table)
        return f.stored
    ed = editor
    for use in group.uses:
        node = use.node
        y = node.output[0]
        tag = node.name or y
        if use.kind == "gather":
            g = ed.fresh(f"{y}.ae_code")
            nodes = [ed.node("Gather", [codes, node.input[1]], [g], f"{tag}/ae/Gather", axis=0)]
            nodes += emit_mlp(ed, g, layers, y, tag)
        else:  # linear decoder, tied head reading Eᵀ: (h·Dᵀ)·Cᵀ + h·b
            (D, b, _), = layers
            if not use.transposed:
                raise ValueError("an embedding table read untransposed by a MatMul is not supported with the AE")
            b_col = f._t.get("b_col")
            if b_col is None:
                b_col = f._t["b_col"] = ed.fresh(f"{b}.col")
                ed.prepend(ed.node("Reshape", [b, f.const_i64([d, 1])], [b_col], f"{b}/Reshape"))
            z = y if use.kind == "matmul" else ed.fresh(f"{y}.ae_xw")
            hd, low, hb = ed.fresh(f"{y}.ae_hd"), ed.fresh(f"{y}.ae_low"), ed.fresh(f"{y}.ae_hb")
            x = node.input[0]
            nodes = [
                ed.node("MatMul", [x, f.T(D)], [hd], f"{tag}/ae/MatMul_D"),
                ed.node("MatMul", [hd, f.T(codes)], [low], f"{tag}/ae/MatMul_C"),
                ed.node("MatMul", [x, b_col], [hb], f"{tag}/ae/MatMul_b"),
                ed.node("Add", [low, hb], [z], f"{tag}/ae/Add"),
            ]
            if use.kind == "gemm":
                _gemm_tail(f, node, z, y, nodes)
        ed.replace(node, nodes)
    drop_old_weight(editor, group)
    return f.stored


def rebuild_weights(editor: GraphEditor, index: GraphIndex, names: list[str], row_counts: list[int],
                    ae: StorageAE, group_tag: str) -> list[int]:
    """Storage mode: replace each initializer in ``names`` (stacked row-wise, ``row_counts`` rows
    each, in this order) by a constant subgraph decoding it from its codes and norms with the
    shared decoder. Returns the elements stored per weight (the decoder counted on the first)."""
    model = editor.model
    ref0 = index.const(names[0])
    dtype = FLOAT_TYPES[ref0.data_type]
    stored, start = [], 0
    dec_names = None
    opset = default_opset(model)
    for name, n in zip(names, row_counts):
        size_before = 0
        if dec_names is None:
            dec_names = []
            for i, act in enumerate(ae.decoder.acts):
                W = editor.add_initializer(np.asarray(ae.decoder.params[2 * i], dtype), f"{group_tag}.ae_dec_W{i}")
                b = editor.add_initializer(np.asarray(ae.decoder.params[2 * i + 1], dtype), f"{group_tag}.ae_dec_b{i}")
                dec_names.append((W, b, act))
            size_before = ae.decoder.n_params
        codes = editor.add_initializer(np.asarray(ae.codes[start:start + n], dtype), f"{name}.ae_codes")
        norms = editor.add_initializer(np.asarray(ae.norms[start:start + n], dtype).reshape(n, 1), f"{name}.ae_norms")
        start += n
        t, nt, scale, out = (editor.fresh(f"{name}.ae_{s}") for s in ("tanh", "rownorm", "scale", "decoded"))
        nodes = emit_mlp(editor, codes, dec_names, t, f"{name}/decode")
        if opset >= 18:
            axes = editor.add_initializer(np.array([1], np.int64), f"{name}.ae_axes")
            size_before += 1
            nodes.append(editor.node("ReduceL2", [t, axes], [nt], f"{name}/decode/ReduceL2", keepdims=1))
        else:
            nodes.append(editor.node("ReduceL2", [t], [nt], f"{name}/decode/ReduceL2", axes=[1], keepdims=1))
        nodes += [
            editor.node("Div", [norms, nt], [scale], f"{name}/decode/Div"),
            editor.node("Mul", [t, scale], [out], f"{name}/decode/Mul"),
        ]
        for node in nodes:
            editor.prepend(node)
        _redirect(editor, index, name, out)
        stored.append(size_before + n * ae.codes.shape[1] + n)  # codes n·x + norms n (+ decoder, axes)
    return stored
