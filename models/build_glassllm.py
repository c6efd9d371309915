"""Build an ONNX model of glassllm's pretrained English model (glassllm 0.1.0, MIT).

The graph is written node by node with ``onnx.helper`` (opset 17, float32) and
mirrors glassllm's NumPy forward pass: RMSNorm, interleaved RoPE, grouped-query
attention, SwiGLU and a tied embedding table used both by ``Gather`` and, through
an explicit ``Transpose`` node, by the LM head.

    python models/build_glassllm.py [--out models/glassllm.onnx] [--no-check]
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import glassllm

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14
HERE = Path(__file__).resolve().parent
SOURCE = ("glassllm 0.1.0 pretrained 'en' model (https://pypi.org/project/glassllm/, "
          "https://github.com/Oseiasdfarias/glassllm), MIT License, Copyright (c) Oséias Dias de Farias")


class GraphBuilder:
    """Collects nodes and initializers and hands out unique, readable tensor names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        """Add a single-output node called ``name``; its output is ``name + '_output_0'``."""
        output = f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output


def rms_norm(g: GraphBuilder, x: str, gamma: str, eps: str, scope: str) -> str:
    """x / sqrt(mean(x * x, -1) + eps) * gamma, exactly as glassllm.nn.RMSNorm."""
    square = g.op("Mul", [x, x], f"{scope}/Mul")
    mean = g.op("ReduceMean", [square], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
    rms = g.op("Sqrt", [g.op("Add", [mean, eps], f"{scope}/Add")], f"{scope}/Sqrt")
    return g.op("Mul", [g.op("Div", [x, rms], f"{scope}/Div"), gamma], f"{scope}/Mul_1")


def rope(g: GraphBuilder, x: str, cos: str, sin: str, swap: str, scope: str) -> str:
    """Rotate adjacent pairs: out = x * cos + swap_pairs(x) * (-sin, +sin) interleaved."""
    swapped = g.op("Gather", [x, swap], f"{scope}/Gather", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], f"{scope}/Mul"),
                        g.op("Mul", [swapped, sin], f"{scope}/Mul_1")], f"{scope}/Add")


def build(model: glassllm.GlassLM) -> onnx.ModelProto:
    """Return the ONNX graph for ``model`` with its weights as float32 initializers."""
    cfg = model.cfg
    d_k = cfg.d_model // cfg.n_heads
    repeats = cfg.n_heads // cfg.n_kv_heads
    params = {name: p.data.astype(np.float32) for name, p in model.named_parameters().items()}
    g = GraphBuilder()

    # Constants shared by all layers.
    embed = g.const("embed.weight", params["E"])
    attn = model.blocks[0].attn
    g.const("rope.cos", np.repeat(attn.cos, 2, axis=1))  # (max_len, d_k): cos per pair
    signed_sin = np.stack([-attn.sin, attn.sin], axis=-1).reshape(cfg.max_len, d_k)
    g.const("rope.sin", signed_sin)  # (max_len, d_k): -sin, +sin per pair
    g.const("rope.swap_pairs", np.arange(d_k, dtype=np.int64).reshape(-1, 2)[:, ::-1].reshape(-1))
    g.const("causal_mask", np.triu(np.ones((cfg.max_len, cfg.max_len), dtype=bool), k=1))
    g.const("eps", np.array(cfg.eps, dtype=np.float32))
    g.const("attn.scale", np.array(math.sqrt(d_k), dtype=np.float32))
    g.const("neg_inf", np.array(-np.inf, dtype=np.float32))
    g.const("zero", np.array([0], dtype=np.int64))
    g.const("one", np.array([1], dtype=np.int64))
    g.const("two", np.array([2], dtype=np.int64))
    g.const("zeros2", np.zeros(2, dtype=np.int64))
    g.const("axes01", np.array([0, 1], dtype=np.int64))
    g.const("heads_shape", np.array([0, 0, cfg.n_heads, d_k], dtype=np.int64))
    g.const("kv_heads_shape", np.array([0, 0, cfg.n_kv_heads, d_k], dtype=np.int64))
    g.const("kv_repeat", np.array([1, 1, repeats, 1, 1], dtype=np.int64))
    g.const("gqa_shape", np.array([0, cfg.n_heads, -1, d_k], dtype=np.int64))
    g.const("merge_shape", np.array([0, 0, cfg.d_model], dtype=np.int64))

    # Sequence length n, then the RoPE rows and causal mask for positions [0, n).
    n = g.op("Slice", [g.op("Shape", ["input_ids"], "/Shape"), "one", "two"], "/seq_len")  # [n]
    cos = g.op("Slice", ["rope.cos", "zero", n, "zero"], "/rope/cos/Slice")
    sin = g.op("Slice", ["rope.sin", "zero", n, "zero"], "/rope/sin/Slice")
    ends = g.op("Concat", [n, n], "/mask/Concat", axis=0)
    mask = g.op("Slice", ["causal_mask", "zeros2", ends, "axes01"], "/mask/Slice")  # True: masked

    x = g.op("Gather", [embed, "input_ids"], "/embed/Gather", axis=0)
    for i in range(cfg.n_layers):
        p, s = f"blocks.{i}", f"/blocks.{i}"
        for key in ("norm1.gamma", "norm2.gamma"):
            g.const(f"{p}.{key}", params[f"{p}.{key}"])
        for key in ("W_Q", "W_K", "W_V", "W_O"):
            g.const(f"{p}.attn.w{key[-1].lower()}", params[f"{p}.attn.{key}"])
        for key in ("W1", "W3", "W2"):
            g.const(f"{p}.ffn.{key.lower()}", params[f"{p}.ffn.{key}"])

        # Attention: (b, n, d) -> heads (b, h, n, d_k), RoPE, GQA, causal softmax.
        h = rms_norm(g, x, f"{p}.norm1.gamma", "eps", f"{s}/norm1")
        heads = {}
        for proj, shape in (("q", "heads_shape"), ("k", "kv_heads_shape"), ("v", "kv_heads_shape")):
            y = g.op("MatMul", [h, f"{p}.attn.w{proj}"], f"{s}/attn/{proj}_proj/MatMul")
            y = g.op("Reshape", [y, shape], f"{s}/attn/{proj}_proj/Reshape")
            heads[proj] = g.op("Transpose", [y], f"{s}/attn/{proj}_proj/Transpose", perm=[0, 2, 1, 3])
        q = rope(g, heads["q"], cos, sin, "rope.swap_pairs", f"{s}/attn/rope_q")
        k = rope(g, heads["k"], cos, sin, "rope.swap_pairs", f"{s}/attn/rope_k")
        kv = []
        for name, t in (("k", k), ("v", heads["v"])):  # repeat_kv: head j uses kv head j // repeats
            t = g.op("Unsqueeze", [t, "two"], f"{s}/attn/repeat_{name}/Unsqueeze")
            t = g.op("Expand", [t, "kv_repeat"], f"{s}/attn/repeat_{name}/Expand")
            kv.append(g.op("Reshape", [t, "gqa_shape"], f"{s}/attn/repeat_{name}/Reshape"))
        k_t = g.op("Transpose", [kv[0]], f"{s}/attn/k_transpose", perm=[0, 1, 3, 2])
        scores = g.op("MatMul", [q, k_t], f"{s}/attn/scores/MatMul")
        scores = g.op("Div", [scores, "attn.scale"], f"{s}/attn/scores/Div")
        scores = g.op("Where", [mask, "neg_inf", scores], f"{s}/attn/mask/Where")
        weights = g.op("Softmax", [scores], f"{s}/attn/Softmax", axis=-1)
        mixed = g.op("MatMul", [weights, kv[1]], f"{s}/attn/mix/MatMul")
        mixed = g.op("Transpose", [mixed], f"{s}/attn/merge/Transpose", perm=[0, 2, 1, 3])
        mixed = g.op("Reshape", [mixed, "merge_shape"], f"{s}/attn/merge/Reshape")
        out = g.op("MatMul", [mixed, f"{p}.attn.wo"], f"{s}/attn/o_proj/MatMul")
        x = g.op("Add", [x, out], f"{s}/attn/residual/Add")

        # SwiGLU: (silu(h @ W1) * (h @ W3)) @ W2.
        h = rms_norm(g, x, f"{p}.norm2.gamma", "eps", f"{s}/norm2")
        gate = g.op("MatMul", [h, f"{p}.ffn.w1"], f"{s}/ffn/gate_proj/MatMul")
        up = g.op("MatMul", [h, f"{p}.ffn.w3"], f"{s}/ffn/up_proj/MatMul")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{s}/ffn/act/Sigmoid")], f"{s}/ffn/act/Mul")
        act = g.op("Mul", [act, up], f"{s}/ffn/act/Mul_1")
        down = g.op("MatMul", [act, f"{p}.ffn.w2"], f"{s}/ffn/down_proj/MatMul")
        x = g.op("Add", [x, down], f"{s}/ffn/residual/Add")

    g.const("norm_f.gamma", params["norm_f.gamma"])
    h = rms_norm(g, x, "norm_f.gamma", "eps", "/norm_f")
    embed_t = g.op("Transpose", [embed], "/lm_head/Transpose", perm=[1, 0])
    g.nodes.append(helper.make_node("MatMul", [h, embed_t], ["logits"], name="/lm_head/MatMul"))

    graph = helper.make_graph(
        g.nodes, "glassllm_en",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", cfg.vocab_size])],
        g.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                   producer_name="onnxhmf-models", producer_version="0.1.0")
    onnx_model.ir_version = IR_VERSION
    onnx_model.doc_string = f"Causal LM converted from {SOURCE}. max_len={cfg.max_len}."
    helper.set_model_props(onnx_model, {"source": SOURCE, "license": "MIT", "max_len": str(cfg.max_len)})
    return onnx_model


def check(onnx_model: onnx.ModelProto, model: glassllm.GlassLM, tol: float = 1e-4, seed: int = 0) -> float:
    """Compare onnxruntime logits with glassllm's NumPy forward; raise if they differ by >= tol."""
    import onnxruntime as ort

    onnx.checker.check_model(onnx_model, full_check=True)
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for length in (1, 17, model.cfg.max_len):
        ids = rng.integers(0, model.cfg.vocab_size, size=(2, length), dtype=np.int64)
        (got,) = session.run(["logits"], {"input_ids": ids})
        with glassllm.no_grad():
            want = model.forward(ids).data
        if got.shape != want.shape or got.dtype != np.float32:
            raise RuntimeError(f"logits shape/dtype {got.shape} {got.dtype}, expected {want.shape} float32")
        diff = float(np.max(np.abs(got - want)))
        print(f"check: batch 2, seq {length:3d}: max |onnx - numpy| = {diff:.3e}")
        worst = max(worst, diff)
    if not worst < tol:
        raise RuntimeError(f"ONNX model does not match glassllm: max abs diff {worst:.3e} >= {tol:g}")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "glassllm.onnx", help="output .onnx path")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="verify against glassllm's NumPy forward (default: on)")
    args = parser.parse_args(argv)

    model, _ = glassllm.load_pretrained("en")
    onnx_model = build(model)
    if args.check:
        check(onnx_model, model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, args.out)
    tokenizer_out = args.out.with_name(args.out.name.removesuffix(".onnx") + ".tokenizer.json")
    with resources.as_file(resources.files("glassllm") / "weights" / "en.tokenizer.json") as src:
        shutil.copyfile(src, tokenizer_out)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes) and {tokenizer_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
