"""Blocked integer weights in the graph (onnxhmf/graph/qdq.py) and the treatments (passes/intquant.py)."""
import collections
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import gather_model, matmul_model, model, tied_model, token_batches, token_mlp_model, vi
from onnxhmf.calibration import Calibration
from onnxhmf.errors import OnnxHmfError
from onnxhmf.factorize import quant as Q
from onnxhmf.graph import qdq
from onnxhmf.passes.intquant import IntTreatment, apply_treatments, parse_treatment


def _run(m, feeds, optimized=None, level=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if level is not None:
        so.graph_optimization_level = level
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _fused_ops(m, feeds):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "opt.onnx")
        _run(m, feeds, optimized=p)
        return collections.Counter(n.op_type for n in onnx.load(p).graph.node)


EXACT = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no MatMulNBits (it quantizes activations)


def _upgraded(m):
    qdq.upgrade_opset(m)
    return m


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
def test_blocked_matmul_exact_and_fused(bits, sym):
    m = _upgraded(matmul_model(64, 40, ndim=3))
    W = numpy_helper.to_array(m.graph.initializer[0])
    bq = Q.quantize_blocked(W, bits, 32, sym)
    assert qdq.site_kind(m, "W") == "matmul"
    assert qdq.blocked_matmul(m, "W", bq) == 1
    onnx.checker.check_model(m, full_check=True)
    X = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(m, {"X": X}, level=EXACT), X @ bq.dequantize(), rtol=1e-4, atol=1e-4)
    assert not any(t.data_type == TensorProto.FLOAT and tuple(t.dims) == (64, 40) for t in m.graph.initializer)
    assert _fused_ops(m, {"X": X})["MatMulNBits"] == 1
    assert m.ByteSize() < bq.nbytes() + 600


def test_blocked_matmul_needs_opset21():
    m = matmul_model(64, 40)
    with pytest.raises(OnnxHmfError, match="opset 21"):
        qdq.blocked_matmul(m, "W", Q.quantize_blocked(np.zeros((64, 40)), 4, 32))


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
def test_blocked_table_gathers_integer_rows(bits, sym):
    m = gather_model(200, 64)
    E = numpy_helper.to_array(m.graph.initializer[0])
    bq = Q.quantize_blocked(E.T, bits, 32, sym)
    info = qdq.blocked_table(m, "E", bq)
    assert info == {"gathers": 1, "head": False, "shared": False, "nodes": 1}
    onnx.checker.check_model(m, full_check=True)
    ids = np.random.default_rng(0).integers(0, 200, (3, 7))
    np.testing.assert_allclose(_run(m, {"ids": ids}), bq.dequantize().T[ids], rtol=1e-6, atol=1e-7)
    # nothing float of table size is stored (the rows stay integer until gathered)
    big = [t for t in m.graph.initializer if np.prod(t.dims) >= 200 * 64 // 2]
    assert all(t.data_type in (TensorProto.INT8, TensorProto.UINT8) for t in big)
    assert m.ByteSize() < bq.nbytes() + 1200


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_head(bits):
    m = _upgraded(tied_model(256, 64))
    E = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "E"))
    assert qdq.site_kind(m, "E") == "tied"
    bq = Q.quantize_blocked(E.T, bits, 32)
    info = qdq.blocked_table(m, "E", bq)
    assert info["shared"] == (bits == 8) and info["head"]
    onnx.checker.check_model(m, full_check=True)
    ids = np.random.default_rng(0).integers(0, 256, (2, 5))
    Eq = bq.dequantize().T
    ref = (Eq[ids] * 0.5) @ Eq.T
    np.testing.assert_allclose(_run(m, {"ids": ids}, level=EXACT), ref, rtol=1e-4, atol=1e-4)
    ints = [t for t in m.graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4)
            and np.prod(t.dims) >= 256 * 64 // 4]
    assert len(ints) == (1 if bits == 8 else 2)  # int8: one stored tensor read by both


def _dynamic_int8_head(H, Eq):
    """What DynamicQuantizeLinear → MatMulInteger computes for H·Eqᵀ: H as onnxruntime's
    DynamicQuantizeLinear rounds it (uint8, one scale and zero point), then multiplied exactly."""
    g = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["H"], ["q", "s", "z"])], "dql",
                          [vi("H", list(H.shape))], [helper.make_tensor_value_info(n, t, None) for n, t in
                                                     (("q", TensorProto.UINT8), ("s", TensorProto.FLOAT),
                                                      ("z", TensorProto.UINT8))])
    q, s, z = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
                                   .SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"H": H})
    return ((q.astype(np.float64) - z) * s) @ Eq.T.astype(np.float64)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), pytest.param(8, True, marks=pytest.mark.exact_int8), (8, False)])
def test_tied_rows_shared_with_an_integer_head(bits, sym):
    """One scale per row (block = D): the Gather and the head read the same stored rows, the
    head runs as DynamicQuantizeLinear → MatMulInteger, and the opset stays 17."""
    m = tied_model(256, 64)
    E = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "E"))
    bq = Q.quantize_blocked(E.T, bits, 64, sym)
    info = qdq.blocked_table(m, "E", bq)
    assert info["shared"] and info["head"] and info["gathers"] == 1
    assert qdq.default_opset(m) == 17 and all(n.domain == "" for n in m.graph.node)
    onnx.checker.check_model(m, full_check=True)
    ids = np.random.default_rng(0).integers(0, 256, (2, 5))
    Eq = bq.dequantize().T
    got = _run(m, {"ids": ids})
    np.testing.assert_allclose(got, _dynamic_int8_head(Eq[ids] * 0.5, Eq), rtol=1e-4, atol=1e-5)
    assert _fused_ops(m, {"ids": ids})["MatMul"] == 0  # the head is integer at run time
    ints = [t for t in m.graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8)
            and np.prod(t.dims) >= 256 * 64 // 4]
    assert len(ints) == 1 and m.ByteSize() < bq.nbytes() + 2500


@pytest.mark.exact_int8
def test_quantize_int8_shares_a_tied_table(tmp_path):
    """--quantize int8 on a tied table: int8 rows once (onnxruntime's quantizer would dequantize
    the table every run for a float head), per-row scales more accurate than its per-tensor uint8,
    and the value infos the quantizer adds are not written."""
    from onnxhmf.quantize import int8_weight, quantize_int8

    m = tied_model(256, 64)
    E = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "E"))
    E = E * np.geomspace(0.2, 5, 256, dtype=np.float32)[:, None]  # rows of different norms, as real tables have
    next(t for t in m.graph.initializer if t.name == "E").CopyFrom(numpy_helper.from_array(E, "E"))
    q, done = quantize_int8(m)
    assert done == ["E"] and not q.graph.value_info
    assert [n.op_type for n in q.graph.node].count("MatMulInteger") == 1
    ids = np.random.default_rng(1).integers(0, 256, (2, 5))
    ref = _run(m, {"ids": ids})
    rows = int8_weight(E, tied=True)
    np.testing.assert_allclose(_run(q, {"ids": ids}), _dynamic_int8_head(rows[ids] * 0.5, rows), rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(rows - E) < 0.5 * np.linalg.norm(int8_weight(E, table=True) - E)
    assert np.abs(_run(q, {"ids": ids}) - ref).max() < 0.05 * np.abs(ref).max()


def _reduce_model(extra=None):
    inits = [numpy_helper.from_array(np.ones(2, np.float32), "sc")] if extra is not None else []
    nodes = [helper.make_node("ReduceMean", ["X"], ["m"], name="rm", axes=[-1], keepdims=1),
             helper.make_node("Sub", ["X", "m"], ["Y"], name="sub")]
    if extra is not None:
        nodes.append(extra)
    outs = [vi("Y", ["b", 8])] + ([vi("Z", ["b", 8])] if extra is not None else [])
    return model(nodes, [vi("X", ["b", 8])], outs, inits)


def test_upgrade_opset_adapts_reduce_axes():
    m = _reduce_model()
    X = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    before = _run(m, {"X": X})
    notes = qdq.upgrade_opset(m)
    assert qdq.default_opset(m) == 21 and any("axes" in n for n in notes)
    onnx.checker.check_model(m, full_check=True)
    np.testing.assert_array_equal(_run(m, {"X": X}), before)


def test_upgrade_opset_refuses_changed_ops():
    m = _reduce_model(helper.make_node("Resize", ["X", "", "sc"], ["Z"], name="rs"))
    with pytest.raises(OnnxHmfError, match="Resize changes at opset"):
        qdq.upgrade_opset(m)
    assert qdq.default_opset(m) == 17  # refused: nothing changed


def _opset12_model(extra=None):
    """Opset 12: Unsqueeze's axes an attribute, BatchNormalization (inference), Mul → MatMul."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "W")]
    inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), n) for n in ("g", "v")]
    inits += [numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), n) for n in ("b", "mu")]
    nodes = [helper.make_node("Unsqueeze", ["X"], ["X4"], axes=[2, 3], name="un"),
             helper.make_node("BatchNormalization", ["X4", "g", "b", "mu", "v"], ["N4"], name="bn"),
             helper.make_node("Squeeze", ["N4"], ["N"], axes=[2, 3], name="sq"),
             helper.make_node("Mul", ["N", "N"], ["M"], name="mul"),
             helper.make_node("MatMul", ["M", "W"], ["Y"], name="mm")] + ([extra] if extra else [])
    g = helper.make_graph(nodes, "g", [vi("X", ["b", 8])], [vi("Y", ["b", 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)])
    m.ir_version = 7
    m.metadata_props.add(key="k", value="v")
    return m


def test_upgrade_opset_from_12_goes_through_onnx_converter():
    """Below 13, onnx's version converter takes the model to 13 (axes attributes become inputs);
    then the same checks; the IR version and metadata are kept, the outputs too. A model the
    checks refuse is left as it was."""
    from onnxhmf.passes.intquant import can_upgrade

    m = _opset12_model()
    X = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    before = _run(m, {"X": X})
    assert can_upgrade(m) and qdq.default_opset(m) == 12  # the planner's probe (weights left out) agrees
    notes = qdq.upgrade_opset(m)
    assert qdq.default_opset(m) == 21 and notes[0] == "opset 12 -> 13 by onnx.version_converter"
    assert m.ir_version == 7 and [(p.key, p.value) for p in m.metadata_props] == [("k", "v")]
    onnx.checker.check_model(m, full_check=True)
    np.testing.assert_allclose(_run(m, {"X": X}), before, rtol=1e-6, atol=1e-6)
    bad = _opset12_model(helper.make_node("Resize", ["X4", "roi", "sc"], ["Z"], name="rs"))
    bad.graph.initializer.extend([numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
                                  numpy_helper.from_array(np.ones(4, np.float32), "sc")])
    with pytest.raises(OnnxHmfError, match="Resize changes at opset"):
        qdq.upgrade_opset(bad)
    assert not can_upgrade(bad)
    assert qdq.default_opset(bad) == 12 and bad.graph.node[0].attribute[0].name == "axes"


def test_lowrank_and_residual_fuse():
    # 3-D activations: on 2-D ones onnxruntime first fuses the residual's MatMul + Add into a Gemm
    m = _upgraded(matmul_model(64, 64, ndim=3))
    W = numpy_helper.to_array(m.graph.initializer[0]).astype(np.float64)
    X = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    a = onnx.ModelProto()
    a.CopyFrom(m)
    A, B = Q.lowrank_blocked(W, None, 32, 8, 32)
    qdq.lowrank_matmul(a, "W", A, B)
    np.testing.assert_allclose(_run(a, {"X": X}, level=EXACT), X @ A.dequantize() @ B.dequantize(), rtol=1e-4, atol=1e-4)
    assert _fused_ops(a, {"X": X})["MatMulNBits"] == 2
    lr = Q.lowrank_residual(W, None, 32, 4, 32)
    qdq.residual_matmul(m, "W", lr)
    np.testing.assert_allclose(_run(m, {"X": X}, level=EXACT), X @ lr.dequantize(), rtol=1e-4, atol=1e-4)
    assert _fused_ops(m, {"X": X})["MatMulNBits"] == 3


def test_treatments_weight_matches_model_and_gptq_helps():
    m = token_mlp_model(vocab=300, d=32, h=64)
    cal = Calibration([token_batches(300, 64, 12, seed=s) for s in range(2)], mask="attention_mask")
    feeds = token_batches(300, 16, 12, seed=9)
    ref = _run(m, feeds)
    W = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    errs = {}
    for meth in ("rtn", "gptq"):
        t = IntTreatment("int4b", 4, 32, True, meth)
        out, notes = apply_treatments(m, {"W1": t, "W2": t, "E": t}, calib=cal)
        assert "opset 17 -> 21 (blocked DequantizeLinear)" in notes
        assert all(n.domain == "" for n in out.graph.node)
        got = _run(out, feeds, level=EXACT)
        errs[meth] = float(np.mean((got - ref) ** 2))
        if meth == "rtn":  # the probe's numpy weight is what the graph computes
            assert abs(out.ByteSize() - sum(t.nbytes(W[w].shape, "table" if w == "E" else "matmul")
                                            for w in ("W1", "W2", "E")) - 200) < 1500
    assert errs["gptq"] < errs["rtn"]


def test_int8pc_gptq_is_matmulinteger():
    m = token_mlp_model(vocab=300, d=32, h=64)
    cal = Calibration([token_batches(300, 64, 12, seed=s) for s in range(2)], mask="attention_mask")
    out, _ = apply_treatments(m, {"W1": parse_treatment("int8pc:gptq"), "W2": parse_treatment("int8pc")}, calib=cal)
    ops = collections.Counter(n.op_type for n in out.graph.node)
    assert ops["MatMulInteger"] == 2 and qdq.default_opset(out) == 17
    W1 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "W1"))
    q = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "W1_quantized"))
    s = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "W1_scale"))
    np.testing.assert_allclose(s, np.abs(W1).max(axis=0) / 127, rtol=1e-5)  # GPTQ kept onnxruntime's scales
    plain = np.clip(np.round(W1 / s), -127, 127)
    assert np.any(q != plain)  # ... and refitted the integers


def test_parse_treatment():
    assert parse_treatment("int4b:64:a:clip") == IntTreatment("int4b", 4, 64, False, "clip")
    assert parse_treatment("lqer:4:32:r32:gptq") == IntTreatment("lqer", 4, 32, True, "gptq", 32)
    with pytest.raises(OnnxHmfError):
        parse_treatment("int3b")


def test_planner_offers_blocked_treatments_and_writes_them_integer(tmp_path):
    from onnxhmf.api import optimize

    m = token_mlp_model(vocab=320, d=32, h=64)
    p = tmp_path / "calib.npz"
    np.savez(p, **token_batches(320, 128, 12, seed=1))
    # a budget int8w cannot meet everywhere: blocked int4 is the only integer-at-run-time way there
    out, rep = optimize(m, calib=p, plan={"target_size": int(0.2 * m.ByteSize())}, verify=False)
    kinds = {r["weight"]: r["treatment"] for r in rep.plan["sites"]}
    blocked = [w for w, k in kinds.items() if k.startswith("int4b") or k.startswith("int8b")]
    assert blocked, kinds
    assert qdq.default_opset(out) == 21 and any("opset 17 -> 21" in n for n in rep.notes)
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert any(a.name == "block_size" and a.i > 0 for n in dq for a in n.attribute) or "E" in blocked
    assert not any(t.name in blocked and t.data_type == TensorProto.FLOAT for t in out.graph.initializer)
    disk = [r for r in rep.plan["sites"] if r["treatment"].split()[0] in ("int8w", "int4w", "lmf-int8w")]
    assert all(r.get("run_time") == "disk only" for r in disk)


def test_plain_tables_and_int8pc_keep_the_opset():
    m = token_mlp_model(vocab=320, d=32, h=64)
    cal = Calibration([token_batches(320, 64, 12, seed=1)], mask="attention_mask")
    out, notes = apply_treatments(m, {"E": IntTreatment("int4b", 4, 32, True, "clip"), "W1": parse_treatment("int8pc")},
                                  calib=cal)
    assert qdq.default_opset(out) == 17 and not any("opset" in n for n in notes)
    feeds = token_batches(320, 8, 12, seed=5)
    assert np.mean((_run(out, feeds) - _run(m, feeds)) ** 2) < 5e-2 * np.mean(_run(m, feeds) ** 2)


@pytest.mark.slow
def test_glassllm_int4_gptq_is_fused_small_and_faithful(glassllm_path):
    m = onnx.load(glassllm_path)
    ids = np.random.default_rng(0).integers(0, 1024, (8, 128)).astype(np.int64)
    cal = Calibration([{"input_ids": ids[i:i + 4]} for i in (0, 4)])
    weights = [t.name for t in m.graph.initializer if qdq.site_kind(m, t.name)]
    out, notes = apply_treatments(m, {w: IntTreatment("int4b", 4, 32, True, "gptq") for w in weights}, calib=cal)
    assert "opset 17 -> 21 (blocked DequantizeLinear)" in notes
    onnx.checker.check_model(out)
    feeds = {"input_ids": np.random.default_rng(1).integers(0, 1024, (2, 64)).astype(np.int64)}
    ops = _fused_ops(out, feeds)
    assert ops["MatMulNBits"] == 29 and ops.get("DequantizeLinear", 0) == 0  # 28 MatMuls + the tied head
    assert out.ByteSize() < 0.21 * m.ByteSize()
    a, b = _run(m, feeds).ravel(), _run(out, feeds).ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99


def test_integer_plan_meets_the_budget_with_integer_treatments():
    from onnxhmf.planners.integer import integer_plan

    m = token_mlp_model(vocab=320, d=32, h=64)
    cal = Calibration([token_batches(320, 64, 12, seed=s) for s in range(2)], mask="attention_mask")
    menu = [IntTreatment("int4b", 4, 32, True, "gptq"), IntTreatment("int8b", 8, 32, True, "clip")]
    target = int(0.3 * m.ByteSize())
    out, plan, info = integer_plan(m, cal, target, menu, batches=1)
    assert out.ByteSize() <= target and set(plan) == {"E", "W1", "W2"}
    loose, plan2, _ = integer_plan(m, cal, int(0.6 * m.ByteSize()), menu, batches=1)
    assert any(t.bits == 8 for t in plan2.values()) or len(plan2) < 3  # more bytes buy int8 or dense
    with pytest.raises(OnnxHmfError, match="fits"):
        integer_plan(m, cal, 1000, menu, batches=1)


def _if_model(main_reader=False, shadow=False):
    """W (64x40) read from the outer scope by a MatMul in each branch of an If (an optimum
    merged decoder's layout), and optionally by one in the main graph too."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((64, 40)).astype(np.float32)

    def branch(tag):
        nodes = [helper.make_node("MatMul", ["X", "W"], [f"{tag}_y"], name=f"{tag}_mm")]
        inits = [numpy_helper.from_array(W, "W")] if shadow and tag == "else" else []
        return helper.make_graph(nodes, tag, [], [vi(f"{tag}_y", [2, 40])], inits)
    nodes = [helper.make_node("If", ["c"], ["Y"], then_branch=branch("then"), else_branch=branch("else"), name="if")]
    outs = [vi("Y", [2, 40])]
    if main_reader:
        nodes.append(helper.make_node("MatMul", ["X", "W"], ["Z"], name="main_mm"))
        outs.append(vi("Z", [2, 40]))
    g = helper.make_graph(nodes, "g", [vi("X", [2, 64]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          outs, [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m, W


def _body_ops(path):
    return [[n.op_type for n in a.g.node] for n in onnx.load(path).graph.node for a in n.attribute
            if a.type == onnx.AttributeProto.GRAPH]


@pytest.mark.parametrize("scale_bits", [32, 8])
@pytest.mark.parametrize("main_reader", [False, True])
def test_blocked_matmul_in_if_branches_copies_the_integers_and_fuses(main_reader, scale_bits, tmp_path):
    """onnxruntime 1.32 fails to create a session when a branch's DQ reads an outer-scope integer
    initializer ("TransposeDQWeightsForMatMulNBits Missing required weight"): each branch holds
    its own copy, and each fuses into MatMulNBits, with 8-bit scales too (their Cast·Mul is
    folded inside the branch)."""
    m, W = _if_model(main_reader)
    assert qdq.site_kind(m, "W") == "body" and qdq.body_copies(m, "W") == 2 + main_reader
    bq = Q.with_scales(W, Q.quantize_blocked(W, 4, 32, True), scale_bits)
    assert qdq.blocked_matmul(m, "W", bq) == 2 + main_reader
    onnx.checker.check_model(m, full_check=True)
    assert not any(t.name == "W" for t in m.graph.initializer)
    X = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    for c in (True, False):
        np.testing.assert_allclose(_run(m, {"X": X, "c": np.array(c)}, level=EXACT), X @ bq.dequantize(), rtol=1e-4, atol=1e-4)
    p = str(tmp_path / "opt.onnx")
    _run(m, {"X": X, "c": np.array(True)}, optimized=p)
    assert _body_ops(p) == [["MatMulNBits"], ["MatMulNBits"]]
    t = IntTreatment("int4b", 4, 32, True, "rtn")
    assert t.nbytes((64, 40), "body", 2 + main_reader) == (2 + main_reader) * t.nbytes((64, 40))


def test_a_shadowed_or_otherwise_read_body_weight_is_no_site():
    m, _ = _if_model(shadow=True)
    assert qdq.site_kind(m, "W") is None


def test_cli_table_bits_4(tmp_path, capsys):
    """--quantize int8 --table-bits 4: the table becomes int4 rows (clip-searched, block 32) that
    onnxruntime gathers exactly; nothing float of the table's size is stored, the opset stays;
    --dry-run predicts the file within 3%; --table-bits without --quantize is one error line."""
    from onnxhmf.cli import main

    m = gather_model(400, 64)
    src, out = tmp_path / "g.onnx", tmp_path / "o.onnx"
    onnx.save(m, src)
    args = ["optimize", str(src), str(out), "--quantize", "int8", "--table-bits", "4"]
    assert main(args + ["--min-cosine", "0", "--min-top1", "0", "-q"]) == 0
    q = onnx.load(out)
    assert qdq.default_opset(q) == qdq.default_opset(m)
    assert not [t for t in q.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 400 * 64 // 8]
    assert [tuple(t.dims) for t in q.graph.initializer if t.data_type == TensorProto.UINT8 and t.dims] == [(400, 2, 16)]
    E = numpy_helper.to_array(m.graph.initializer[0]).astype(np.float64)
    ids = np.random.default_rng(2).integers(0, 400, (3, 5))
    want = Q.clip_search(E.T, None, 4, 32, True).dequantize().T[ids]
    np.testing.assert_allclose(_run(q, {"ids": ids}), want, rtol=1e-6, atol=1e-7)
    capsys.readouterr()
    assert main(args + ["--dry-run"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("file:")][-1]
    predicted = int(line.split("~")[1].split()[0].replace(",", ""))
    assert abs(predicted - out.stat().st_size) < 0.03 * out.stat().st_size, (predicted, out.stat().st_size)
    assert main(["optimize", str(src), str(tmp_path / "x.onnx"), "--table-bits", "4"]) == 2
    err = capsys.readouterr().err
    assert "--table-bits goes with --quantize" in err and len(err.strip().splitlines()) == 1


def test_int4_unpacking_is_valid_below_opset_14():
    """int4 rows of a table and weight-only int4 unpack with BitShift only (Sub on uint8 is
    opset 14): on an opset-12 model both pass the full checker and onnxruntime gives the
    dequantized values exactly."""
    from onnxhmf.quantize import weight_only

    m = gather_model(200, 64)
    for o in m.opset_import:
        o.version = 12
    E = numpy_helper.to_array(m.graph.initializer[0])
    bq = Q.quantize_blocked(E.T, 4, 32, True)
    qdq.blocked_table(m, "E", bq)
    onnx.checker.check_model(m, full_check=True)
    ids = np.random.default_rng(0).integers(0, 200, (3, 7))
    np.testing.assert_allclose(_run(m, {"ids": ids}), bq.dequantize().T[ids], rtol=1e-6, atol=1e-7)

    w = matmul_model(64, 40, ndim=3)
    for o in w.opset_import:
        o.version = 12
    W = numpy_helper.to_array(w.graph.initializer[0])
    assert weight_only(w, ["W"], 4) == ["W"]
    onnx.checker.check_model(w, full_check=True)
    X = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)
    got = _run(w, {"X": X}, level=EXACT)
    assert np.abs(got - X @ W).max() < 0.2 * np.abs(X @ W).max()  # int4 per column: close, not equal
    assert not any(n.op_type == "Sub" and "lo" in n.name for n in w.graph.node)
