"""--kernels onnxruntime: blocked DQ → MatMul written as com.microsoft.MatMulNBits (onnxhmf/graph/nbits.py)."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from graphs import matmul_model
from onnxhmf.factorize import quant as Q
from onnxhmf.graph import nbits, qdq
from test_qdq import _if_model


def _run(m, feeds, level=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _copy(m):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def _ops(m):
    return collections.Counter(n.op_type for n in m.graph.node)


def _levels(m):
    return sorted(next(a.i for a in n.attribute if a.name == "accuracy_level")
                  for n in m.graph.node if n.op_type == "MatMulNBits")


@pytest.mark.parametrize("K", [64, 72])  # 72: K padded to whole blocks in the kernel's layout
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
def test_matmulnbits_computes_what_the_standard_form_does(bits, sym, K):
    """The same integers: at accuracy level 0 the kernel gives X·dequantize(W_q) (float compute);
    at the session's level 4 it gives exactly what onnxruntime computes from the standard form."""
    std = matmul_model(K, 40, ndim=3)
    qdq.upgrade_opset(std)
    W = numpy_helper.to_array(std.graph.initializer[0])
    bq = Q.quantize_blocked(W, bits, 32, sym)
    qdq.blocked_matmul(std, "W", bq)
    X = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)
    for level in (0, 4):
        m = _copy(std)
        assert nbits.to_matmulnbits(m, level) == 1
        onnx.checker.check_model(m, full_check=True)
        assert _ops(m) == {"MatMulNBits": 1} and _levels(m) == [level]
        assert qdq.default_opset(m) == qdq.default_opset(std) and m.ir_version == std.ir_version
        assert not any(t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8)
                       for t in m.graph.initializer)  # the DQ's integers are gone, not kept beside the kernel's
        got = _run(m, {"X": X})[0]
        if level == 0:
            np.testing.assert_allclose(got, X @ bq.dequantize(), rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_array_equal(got, _run(std, {"X": X}, level=4)[0])


def test_auto_levels_shared_weights_and_pairs():
    """Default levels by bits (0 for 4-bit, 4 for 8-bit); two MatMuls reading one weight share one
    packed copy; a low-rank pair becomes two kernels."""
    m = matmul_model(64, 64, ndim=3)
    qdq.upgrade_opset(m)
    rng = np.random.default_rng(0)
    A = Q.quantize_blocked(rng.standard_normal((64, 32)), 4, 32)
    B = Q.quantize_blocked(rng.standard_normal((32, 64)), 8, 32)
    qdq.lowrank_matmul(m, "W", A, B)
    X = rng.standard_normal((2, 5, 64)).astype(np.float32)
    assert nbits.to_matmulnbits(m) == 2
    assert _levels(m) == [0, 4] and _ops(m)["MatMulNBits"] == 2
    want = X @ A.dequantize() @ B.dequantize()  # B's kernel quantizes its activations to int8 (level 4)
    np.testing.assert_allclose(_run(m, {"X": X})[0], want, atol=2e-2 * np.abs(want).max())

    shared = matmul_model(64, 40, ndim=3)
    qdq.upgrade_opset(shared)
    g = shared.graph
    g.node.append(helper.make_node("MatMul", ["X", "W"], ["Y2"], name="mm2"))
    g.output.append(helper.make_tensor_value_info("Y2", onnx.TensorProto.FLOAT, ["batch", "seq", 40]))
    bq = Q.quantize_blocked(numpy_helper.to_array(g.initializer[0]), 4, 32)
    assert qdq.blocked_matmul(shared, "W", bq) == 2
    assert nbits.to_matmulnbits(shared) == 2
    assert len(shared.graph.initializer) == 2  # one packed B and its scales, read by both kernels
    y1, y2 = _run(shared, {"X": X})
    np.testing.assert_array_equal(y1, y2)


def test_what_onnxruntime_would_not_fuse_stays():
    """A DQ read by two nodes, a per-tensor DQ and a DQ whose scale is computed stay standard."""
    m = matmul_model(64, 40, ndim=3)
    qdq.upgrade_opset(m)
    bq = Q.quantize_blocked(numpy_helper.to_array(m.graph.initializer[0]), 4, 32)
    qdq.blocked_matmul(m, "W", bq)
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
    m.graph.node.append(helper.make_node("Identity", [dq.output[0]], ["Wf"], name="id"))
    m.graph.output.append(helper.make_tensor_value_info("Wf", onnx.TensorProto.FLOAT, [64, 40]))
    assert nbits.to_matmulnbits(m) == 0
    assert not any(o.domain == nbits.CONTRIB_DOMAIN for o in m.opset_import)


@pytest.mark.parametrize("main_reader", [False, True])
def test_if_branches_each_get_their_kernel(main_reader):
    m, W = _if_model(main_reader)
    bq = Q.quantize_blocked(W, 4, 32, True)
    qdq.blocked_matmul(m, "W", bq)
    assert nbits.to_matmulnbits(m, 0) == 2 + main_reader
    onnx.checker.check_model(m, full_check=True)
    X = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    for c in (True, False):
        np.testing.assert_allclose(_run(m, {"X": X, "c": np.array(c)})[0], X @ bq.dequantize(), rtol=1e-4, atol=1e-4)


def test_cli_kernels_onnxruntime(tmp_path, capsys):
    """The planner's blocked MatMuls come out as MatMulNBits, verified, with names, opset and IR
    kept and a note; --accuracy-level without --kernels onnxruntime is one error line."""
    from onnxhmf.cli import main

    from graphs import token_batches, token_mlp_model

    m = token_mlp_model(vocab=320, d=32, h=64)
    src, calib = tmp_path / "m.onnx", tmp_path / "cal.npz"
    onnx.save(m, src)
    np.savez(calib, **token_batches(320, 128, 12, seed=1))
    out = tmp_path / "o.onnx"
    args = ["optimize", str(src), str(out), "--calib", str(calib), "--plan", "auto", "--target-ratio", "0.2",
            "--kernels", "onnxruntime", "--accuracy-level", "0", "--min-cosine", "0", "--min-top1", "0"]
    assert main(args) == 0
    text = capsys.readouterr().out
    q = onnx.load(out)
    assert _ops(q)["MatMulNBits"] >= 1 and _ops(q)["DequantizeLinear"] == 0, _ops(q)
    assert set(_levels(q)) == {0}
    assert [i.name for i in q.graph.input] == [i.name for i in m.graph.input]
    assert [o.name for o in q.graph.output] == [o.name for o in m.graph.output]
    assert q.ir_version == m.ir_version
    assert "MatMulNBits" in text and "onnxruntime only" in text
    assert main(["optimize", str(src), str(tmp_path / "x.onnx"), "--accuracy-level", "0"]) == 2
    err = capsys.readouterr().err
    assert "--accuracy-level goes with --kernels onnxruntime" in err and len(err.strip().splitlines()) == 1


def test_plan_file_with_kernels_onnxruntime(tmp_path):
    """A saved plan replayed with --kernels onnxruntime gives the kernels too (an output form)."""
    from onnxhmf.api import optimize

    from graphs import token_batches, token_mlp_model

    m = token_mlp_model(vocab=320, d=32, h=64)
    calib = tmp_path / "cal.npz"
    np.savez(calib, **token_batches(320, 128, 12, seed=1))
    std, rep = optimize(m, calib=calib, plan={"target_size": int(0.2 * m.ByteSize())}, verify=False)
    assert _ops(std)["DequantizeLinear"] >= 1
    plan = tmp_path / "plan.json"
    plan.write_text(__import__("json").dumps(rep.planned))
    ort_form, rep2 = optimize(m, calib=calib, plan_file=plan, kernels="onnxruntime", verify=False)
    assert _ops(ort_form)["MatMulNBits"] >= 1 and any("MatMulNBits" in n for n in rep2.notes)


@pytest.mark.parametrize("bits,block,sym", [(4, 256, True), (8, 128, True), (4, 32, False)])
def test_padded_price_is_what_the_kernel_stores(bits, block, sym):
    """IntTreatment.nbytes(padded=True), the planner's price under --kernels onnxruntime, is the
    bytes of the kernel's initializers, K rounded up to whole blocks (384 → 512 at block 256)."""
    from onnxhmf.passes.intquant import IntTreatment

    m = matmul_model(384, 48, ndim=3)
    qdq.upgrade_opset(m)
    W = numpy_helper.to_array(m.graph.initializer[0])
    bq = Q.with_scales(W, Q.quantize_blocked(W, bits, block, sym), 8)  # the kernel stores them as float32 again
    qdq.blocked_matmul(m, "W", bq)
    nbits.to_matmulnbits(m)
    stored = sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer)
    t = IntTreatment("int4b" if bits == 4 else "int8b", bits, block, sym, scale_bits=8)
    assert t.nbytes((384, 48), padded=True) == stored
    assert t.nbytes((384, 48)) <= stored


def test_dry_run_prices_the_kernels_padding(tmp_path):
    """--dry-run under --kernels onnxruntime predicts the padded file (K rounded up to whole
    blocks): within 3% of what is written, and above the standard form's price."""
    from onnxhmf.api import optimize
    from onnxhmf.plan import treatment_bytes

    from graphs import token_batches, token_mlp_model

    m = token_mlp_model(vocab=320, d=48, h=80)  # K = 48 and 80: every block of 32 or more pads
    calib = tmp_path / "cal.npz"
    np.savez(calib, **token_batches(320, 128, 12, seed=1))
    kw = dict(calib=calib, plan={"target_size": int(0.2 * m.ByteSize())}, kernels="onnxruntime", verify=False)
    _, plan = optimize(m, dry_run=True, **kw)
    out, rep = optimize(m, **kw)
    blocked = [d for d in plan.decisions if d.treatment in ("int4b", "int8b", "int4b128", "int4b256")
               and qdq.site_kind(m, d.weight) == "matmul"]
    assert blocked and _ops(out)["MatMulNBits"] >= 1
    assert any(d.predicted_bytes > treatment_bytes(d.treatment, d.shape) for d in blocked)
    assert abs(plan.predicted_bytes - out.ByteSize()) < 0.03 * out.ByteSize(), (plan.predicted_bytes, out.ByteSize())


def test_signed_integers_with_a_zero_point_and_fed_weights():
    """A DQ from elsewhere with signed int8 values and int8 zero points (onnxruntime's QDQ writes
    them) computes the same as a kernel; a weight that is also a graph input stays standard."""
    rng = np.random.default_rng(5)
    K, N, block = 64, 24, 32
    q = rng.integers(-100, 100, (K, N)).astype(np.int8)
    z = rng.integers(-5, 5, (K // block, N)).astype(np.int8)
    s = rng.uniform(0.01, 0.02, (K // block, N)).astype(np.float32)
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s"), numpy_helper.from_array(z, "z")]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=0, block_size=block, name="dq"),
             helper.make_node("MatMul", ["X", "w"], ["Y"], name="mm")]
    from graphs import vi

    g = helper.make_graph(nodes, "g", [vi("X", [2, K])], [vi("Y", [2, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    X = rng.standard_normal((2, K)).astype(np.float32)
    W = (q.astype(np.float32) - np.repeat(z, block, 0)) * np.repeat(s, block, 0)
    fed = _copy(m)
    fed.graph.input.append(helper.make_tensor_value_info("q", onnx.TensorProto.INT8, [K, N]))
    assert nbits.to_matmulnbits(fed) == 0
    assert nbits.to_matmulnbits(m, 0) == 1
    np.testing.assert_allclose(_run(m, {"X": X})[0], X @ W, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale_bits", [16, 8])
def test_compact_scales_fold_fuse_and_convert(scale_bits, tmp_path):
    """Scales stored as float16 or 8-bit codes: the standard form computes X·dequantize(W_q);
    onnxruntime folds the scale nodes and fuses the DQ into MatMulNBits; to_matmulnbits reads
    through them and leaves none of them behind; the file is smaller than with float32 scales."""
    std = matmul_model(256, 40, ndim=3)
    qdq.upgrade_opset(std)
    W = numpy_helper.to_array(std.graph.initializer[0])
    X = np.random.default_rng(2).standard_normal((2, 3, 256)).astype(np.float32)
    full = _copy(std)
    qdq.blocked_matmul(full, "W", Q.quantize_blocked(W, 4, 32, False))
    bq = Q.with_scales(W, Q.quantize_blocked(W, 4, 32, False), scale_bits)
    qdq.blocked_matmul(std, "W", bq)
    onnx.checker.check_model(std, full_check=True)
    saved = (2 * 320 if scale_bits == 16 else 3 * 320 - 4 * 40) - 200  # 8 blocks × 40 columns; 200: the scale nodes
    assert full.ByteSize() - std.ByteSize() >= saved
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(std.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"X": X})[0]
    np.testing.assert_allclose(got, X @ bq.dequantize(), rtol=1e-4, atol=1e-4)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(std.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["MatMulNBits"]
    m = _copy(std)
    assert nbits.to_matmulnbits(m, 0) == 1
    onnx.checker.check_model(m, full_check=True)
    assert _ops(m) == {"MatMulNBits": 1} and len(m.graph.initializer) == 3  # packed values, scales, zero points
    np.testing.assert_allclose(_run(m, {"X": X})[0], X @ bq.dequantize(), rtol=1e-4, atol=1e-4)
