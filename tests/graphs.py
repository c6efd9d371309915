"""Small synthetic ONNX graphs, one per site variant the optimizer must handle."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR = 8
F = TensorProto.FLOAT


def matrix(m: int, n: int, seed: int = 0, decay: float = 0.9, true_rank: int | None = None) -> np.ndarray:
    """A float32 m×n matrix with geometrically decaying singular values (like real weights).

    With ``true_rank`` only that many singular values are non-zero, so a rank-``true_rank``
    factorization is exact and still saves parameters.
    """
    rng = np.random.default_rng(seed)
    k = min(m, n)
    U = np.linalg.qr(rng.standard_normal((m, k)))[0]
    V = np.linalg.qr(rng.standard_normal((n, k)))[0]
    s = decay ** np.arange(k) * 3.0
    if true_rank is not None:
        s[true_rank:] = 0.0
    return ((U * s) @ V.T).astype(np.float32)


def model(nodes, inputs, outputs, inits=(), opset=OPSET, ir=IR) -> onnx.ModelProto:
    g = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir, producer_name="tests")
    m.metadata_props.add(key="author", value="tests")
    onnx.checker.check_model(m, full_check=True)
    return m


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def const_node(name: str, arr: np.ndarray):
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(arr, name))


def matmul_model(m=48, n=40, ndim=3, source="initializer", seed=0, dtype=np.float32, true_rank=None) -> onnx.ModelProto:
    """Y = X·W with W (m×n) from an initializer, a Constant, or Transpose of either (stored n×m)."""
    W = matrix(m, n, seed, true_rank=true_rank).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    xshape = ["batch", "seq", m] if ndim == 3 else ["batch", m]
    nodes, inits = [], []
    stored = W.T.copy() if source.startswith("transpose") else W
    if source in ("initializer", "transpose_initializer"):
        inits.append(numpy_helper.from_array(stored, "W"))
    else:
        nodes.append(const_node("W", stored))
    w_in = "W"
    if source.startswith("transpose"):
        nodes.append(helper.make_node("Transpose", ["W"], ["W_t"], name="tr", perm=[1, 0]))
        w_in = "W_t"
    nodes.append(helper.make_node("MatMul", ["X", w_in], ["Y"], name="mm"))
    return model(nodes, [vi("X", xshape, elem)], [vi("Y", xshape[:-1] + [n], elem)], inits)


def gemm_model(m=48, n=40, trans_b=0, alpha=1.0, beta=1.0, c="none", via_transpose=False, seed=0, true_rank=None) -> onnx.ModelProto:
    """Y = α·X·op(B) + β·C with B constant; C absent, a vector (n) or a matrix (1×n)."""
    W = matrix(m, n, seed, true_rank=true_rank)
    B = W.T.copy() if trans_b else W
    if via_transpose:
        B = B.T.copy()
    inits = [numpy_helper.from_array(B, "B")]
    inputs = ["X", "B_t" if via_transpose else "B"]
    if c != "none":
        C = np.random.default_rng(seed + 1).standard_normal((n,) if c == "vector" else (1, n)).astype(np.float32)
        inits.append(numpy_helper.from_array(C, "C"))
        inputs.append("C")
    nodes = []
    if via_transpose:
        nodes.append(helper.make_node("Transpose", ["B"], ["B_t"], name="tr", perm=[1, 0]))
    nodes.append(helper.make_node("Gemm", inputs, ["Y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta))
    return model(nodes, [vi("X", ["batch", m])], [vi("Y", ["batch", n])], inits)


def gather_model(vocab=200, d=32, seed=0, true_rank=None) -> onnx.ModelProto:
    E = matrix(vocab, d, seed, true_rank=true_rank)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["Y"], name="embed", axis=0)]
    return model(nodes, [vi("ids", ["batch", "seq"], TensorProto.INT64)], [vi("Y", ["batch", "seq", d])],
                 [numpy_helper.from_array(E, "E")])


def tied_model(vocab=200, d=32, seed=0, true_rank=None) -> onnx.ModelProto:
    """Gather(E, ids) → Mul(·, s) → MatMul(·, Transpose(E)): a tied embedding and LM head."""
    E = matrix(vocab, d, seed, true_rank=true_rank)
    s = np.full((d,), 0.5, np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h0"], name="embed", axis=0),
        helper.make_node("Mul", ["h0", "s"], ["h"], name="scale"),
        helper.make_node("Transpose", ["E"], ["E_t"], name="head_t", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "E_t"], ["logits"], name="head"),
    ]
    return model(nodes, [vi("ids", ["batch", "seq"], TensorProto.INT64)], [vi("logits", ["batch", "seq", vocab])],
                 [numpy_helper.from_array(E, "E"), numpy_helper.from_array(s, "s")])


def shared_with_add_model(m=32, seed=0) -> onnx.ModelProto:
    """W feeds a MatMul and an Add: it cannot be removed, so it must be skipped."""
    W = matrix(m, m, seed)
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["Y0"], name="mm"),
        helper.make_node("Add", ["Y0", "W"], ["Y"], name="add"),
    ]
    return model(nodes, [vi("X", [m, m])], [vi("Y", [m, m])], [numpy_helper.from_array(W, "W")])


def if_model(m=32, seed=0) -> onnx.ModelProto:
    """An If whose branches read the outer initializer W, next to a main-graph MatMul on W2."""
    W = matrix(m, m, seed)
    W2 = matrix(m, m, seed + 1)
    then_g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["t"], name="then_mm")], "then", [], [vi("t", [None, m])])
    else_g = helper.make_graph([helper.make_node("Identity", ["X"], ["e"], name="else_id")], "else", [], [vi("e", [None, m])])
    nodes = [
        helper.make_node("If", ["cond"], ["Y0"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("MatMul", ["Y0", "W2"], ["Y"], name="mm2"),
    ]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(W2, "W2")]
    return model(nodes, [vi("X", ["batch", m]), vi("cond", [], TensorProto.BOOL)], [vi("Y", ["batch", m])], inits)


def int_weight_model(m=32) -> onnx.ModelProto:
    W = np.arange(m * m, dtype=np.int64).reshape(m, m) % 7
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")]
    return model(nodes, [vi("X", ["batch", m], TensorProto.INT64)], [vi("Y", ["batch", m], TensorProto.INT64)],
                 [numpy_helper.from_array(W, "W")])


def weight_is_input_model(m=32) -> onnx.ModelProto:
    """An initializer that is also a graph input can be overridden at run time: not a constant."""
    W = matrix(m, m)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")]
    return model(nodes, [vi("X", ["batch", m]), vi("W", [m, m])], [vi("Y", ["batch", m])], [numpy_helper.from_array(W, "W")])


def mlp_model(d=32, h=96, seed=0, true_rank=None) -> onnx.ModelProto:
    """X → MatMul(W1) → Add(b1) → erf-GELU → MatMul(W2) → Add(b2): a BERT feed-forward block."""
    rng = np.random.default_rng(seed + 7)
    W1, W2 = matrix(d, h, seed, true_rank=true_rank), matrix(h, d, seed + 1, true_rank=true_rank)
    b1 = rng.standard_normal(h).astype(np.float32)
    b2 = rng.standard_normal(d).astype(np.float32)
    c = lambda v, n: numpy_helper.from_array(np.array(v, np.float32), n)  # noqa: E731
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h0"], name="ffn_in"),
        helper.make_node("Add", ["b1", "h0"], ["h1"], name="bias1"),
        helper.make_node("Div", ["h1", "sqrt2"], ["g0"], name="gelu_div"),
        helper.make_node("Erf", ["g0"], ["g1"], name="gelu_erf"),
        helper.make_node("Add", ["g1", "one"], ["g2"], name="gelu_add"),
        helper.make_node("Mul", ["h1", "g2"], ["g3"], name="gelu_mul"),
        helper.make_node("Mul", ["g3", "half"], ["g4"], name="gelu_half"),
        helper.make_node("MatMul", ["g4", "W2"], ["y0"], name="ffn_out"),
        helper.make_node("Add", ["y0", "b2"], ["Y"], name="bias2"),
    ]
    inits = [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(b2, "b2"), c(np.sqrt(2.0), "sqrt2"), c(1.0, "one"), c(0.5, "half")]
    return model(nodes, [vi("X", ["batch", "seq", d])], [vi("Y", ["batch", "seq", d])], inits)


def column_hybrid_mlp(monkeypatch):
    """mlp_model(32, 96) whose W1 is rank 8 except every 5th column: exact as HMF (20 dense
    columns + rank 8), not as LMF. Patches passes/factorize's hmf to those exact factors for W1
    (the others as usual); returns (model, dense column indices)."""
    import onnxhmf.passes.factorize as fz
    from onnxhmf.factorize.hmf import hmf_fixed

    model = mlp_model(32, 96, true_rank=8)
    dense = np.arange(0, 96, 5)
    W1 = next(t for t in model.graph.initializer if t.name == "W1")
    arr = numpy_helper.to_array(W1).copy()
    arr[:, dense] = np.random.default_rng(5).standard_normal((32, len(dense)))
    W1.CopyFrom(numpy_helper.from_array(arr, "W1"))
    orig = fz.hmf
    monkeypatch.setattr(fz, "hmf", lambda W, budget, **kw: (
        hmf_fixed(W, dense, 8, axis=1) if W.shape == (32, 96) else orig(W, budget, **kw)))
    return model, dense


def token_mlp_model(vocab=300, d=32, h=64, seed=0) -> onnx.ModelProto:
    """ids, attention_mask → Gather(E)·mask → MatMul(W1) → Relu → MatMul(W2) → Y: a tiny text
    model with anisotropic activations (E's columns span four decades), so data-aware
    factorization differs from plain SVD."""
    rng = np.random.default_rng(seed)
    E = (rng.standard_normal((vocab, d)) * np.logspace(0, -2, d)).astype(np.float32)
    W1 = matrix(d, h, seed + 1, decay=0.97)
    W2 = matrix(h, d, seed + 2, decay=0.97)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["e"], name="embed"),
        helper.make_node("Cast", ["attention_mask"], ["mf"], name="mask_cast", to=F),
        helper.make_node("Unsqueeze", ["mf", "axis_last"], ["m3"], name="mask_unsq"),
        helper.make_node("Mul", ["e", "m3"], ["x"], name="mask_mul"),
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="up"),
        helper.make_node("Relu", ["h0"], ["h1"], name="act"),
        helper.make_node("MatMul", ["h1", "W2"], ["Y"], name="down"),
    ]
    inits = [numpy_helper.from_array(E, "E"), numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2"),
             numpy_helper.from_array(np.array([-1], np.int64), "axis_last")]
    I64 = onnx.TensorProto.INT64
    return model(nodes, [vi("input_ids", ["batch", "seq"], I64), vi("attention_mask", ["batch", "seq"], I64)],
                 [vi("Y", ["batch", "seq", d])], inits)


def token_batches(vocab=300, n=64, seq=12, seed=0, zipf=True) -> dict[str, np.ndarray]:
    """Calibration feeds for token_mlp_model: Zipf-like ids, ragged lengths, padding masked."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1) if zipf else np.ones(vocab)
    ids = rng.choice(vocab, size=(n, seq), p=p / p.sum()).astype(np.int64)
    lengths = rng.integers(3, seq + 1, n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def qkv_model(d=32, n=32, seed=0, shared_rows: int | None = 8) -> onnx.ModelProto:
    """Three MatMuls reading one activation X (like Q, K, V). With ``shared_rows`` their
    weights share a row space of that dimension (W_i = U·C_i + small noise)."""
    rng = np.random.default_rng(seed)
    if shared_rows:
        U = rng.standard_normal((d, shared_rows))
        Ws = [(U @ rng.standard_normal((shared_rows, n)) + 0.01 * rng.standard_normal((d, n))).astype(np.float32)
              for _ in range(3)]
    else:
        Ws = [matrix(d, n, seed + i) for i in range(3)]
    nodes = [helper.make_node("MatMul", ["X", f"W{i}"], [f"Y{i}"], name=f"proj{i}") for i in range(3)]
    inits = [numpy_helper.from_array(W, f"W{i}") for i, W in enumerate(Ws)]
    return model(nodes, [vi("X", ["batch", "seq", d])], [vi(f"Y{i}", ["batch", "seq", n]) for i in range(3)], inits)
