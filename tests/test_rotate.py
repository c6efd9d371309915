"""Rotated int4 (factorize/rotate.py, graph/qdq.rotated_matmul): the math, the fit, the graph."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxhmf.errors import OnnxHmfError
from onnxhmf.factorize import quant as Q
from onnxhmf.factorize import rotate as R
from onnxhmf.passes.intquant import PLANNED, apply_treatments, parse_treatment


def test_rotation_is_orthogonal_and_blockwise():
    for b in (16, 64, 128):
        H = R.rotation(b)
        assert np.allclose(H @ H.T, np.eye(b))
        assert set(np.unique(np.abs(H) * np.sqrt(b)).round(9)) == {1.0}
    assert [R.rotation_block(k) for k in (384, 1536, 96, 48, 40, 100)] == [128, 128, 32, 16, 0, 0]
    assert R.rotation_block(1536, 64) == 64
    with pytest.raises(ValueError):
        R.hadamard(12)


def test_rotate_rows_and_gram_match_the_block_diagonal_matrix():
    rng = np.random.default_rng(0)
    K, N, b = 96, 7, 32
    H = R.rotation(b)
    Rm = np.kron(np.eye(K // b), H)
    W = rng.standard_normal((K, N))
    X = rng.standard_normal((50, K))
    G = X.T @ X
    assert np.allclose(R.rotate_rows(W, H), Rm.T @ W)
    assert np.allclose(R.rotate_rows(R.rotate_rows(W, H), H, inverse=True), W)
    assert np.allclose(R.rotate_gram(G, H), (X @ Rm).T @ (X @ Rm))
    assert np.allclose((X @ Rm) @ R.rotate_rows(W, H), X @ W)  # Y = (X·R)(Rᵀ·W)


def test_rotation_lowers_the_output_error_of_spiky_weights():
    """A weight with a few large entries (what LayerNorm-fed layers have): at the same block and
    bits, GPTQ on Rᵀ·W against Rᵀ·G·R leaves a smaller error in X·W than GPTQ on W."""
    rng = np.random.default_rng(1)
    K, N = 256, 64
    W = rng.standard_normal((K, N))
    spikes = rng.random((K, N)) < 0.01
    W[spikes] *= 25
    X = rng.standard_normal((512, K)) * rng.uniform(0.5, 2, K)
    G = X.T @ X
    plain = parse_treatment("int4b:64:a:gptq").weight(W, G)
    t = parse_treatment("int4b:64:a:gptq:rot128")
    f = t.fit(W, G)
    assert isinstance(f, R.Rotated) and f.block == 128 and f.inner.block == 64
    rotated = t.weight(W, G)
    err = lambda V: np.linalg.norm(X @ (V - W)) / np.linalg.norm(X @ W)  # noqa: E731
    assert err(rotated) < 0.7 * err(plain), (err(rotated), err(plain))
    assert t.nbytes((K, N)) == parse_treatment("int4b:64:a:gptq").nbytes((K, N))


def test_no_power_of_two_block_falls_back_to_the_plain_fit():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((40, 8))
    f = parse_treatment("int4b:32:a:rtn:rot128").fit(W)
    assert isinstance(f, Q.Blocked)


def test_parse_and_sites():
    t = parse_treatment("int4b:128:a:gptq:rot64")
    assert (t.rotate, t.block, t.symmetric, t.name) == (64, 128, False, "int4b128a-gptq-rot64")
    assert t.sites() == ("matmul",)
    for bad in ("int4b:64:a:gptq:rot100", "int4b:64:a:gptq:rot8", "int4b:64:a:gptq:spin"):
        with pytest.raises(OnnxHmfError):
            parse_treatment(bad)
    assert {(PLANNED[k].rotate, PLANNED[k].scale_bits) for k in ("int4b32r", "int4b64r", "int4b128r", "int4b256r")} == {(32, 8)}


def _two_readers(K=256, N=48, seed=3):
    """y = Relu(x)·W1 + Relu(x)·W2 + x·W3: two MatMuls share a produced input, one reads a graph input."""
    rng = np.random.default_rng(seed)
    Ws = [rng.standard_normal((K, N)).astype(np.float32) for _ in range(3)]
    Ws[0][3] *= 30
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("MatMul", ["h", "w1"], ["a"]), helper.make_node("MatMul", ["h", "w2"], ["b"]),
             helper.make_node("MatMul", ["x", "w3"], ["c"]),
             helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", N])],
                          [numpy_helper.from_array(w, f"w{i + 1}") for i, w in enumerate(Ws)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m, Ws


def _run(m, x, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_rotated_graph_computes_the_fitted_weight_and_fuses(tmp_path):
    m, Ws = _two_readers()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 256)).astype(np.float32)
    h = np.maximum(x, 0).reshape(-1, 256).astype(np.float64)
    grams = {"w1": h.T @ h + np.eye(256), "w2": h.T @ h + np.eye(256),
             "w3": x.reshape(-1, 256).T.astype(np.float64) @ x.reshape(-1, 256) + np.eye(256)}
    t = parse_treatment("int4b:64:a:gptq:rot128")
    out, notes = apply_treatments(m, {w: t for w in grams}, grams=grams)
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == 9 and "opset 17 -> 21 (blocked DequantizeLinear)" in notes
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Shape") == 2 and ops.count("DequantizeLinear") == 3  # one rotated input per activation
    W = {w: t.weight(numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == w)), grams[w])
         for w in grams}
    hx = np.maximum(x, 0)
    want = hx @ W["w1"] + hx @ W["w2"] + x @ W["w3"]
    got = _run(out, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert fused.count("MatMulNBits") == 3 and "DequantizeLinear" not in fused and "Cast" not in fused
    ref = hx @ Ws[0] + hx @ Ws[1] + x @ Ws[2]
    plain, _ = apply_treatments(m, {w: parse_treatment("int4b:64:a:gptq") for w in grams}, grams=grams)
    err = lambda y: np.abs(y - ref).mean()  # noqa: E731
    assert err(got) < err(_run(plain, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL))


def test_a_rotated_treatment_skips_tables():
    from graphs import token_mlp_model

    m = token_mlp_model(vocab=64, d=32, h=48)
    table = next(t.name for t in m.graph.initializer if len(t.dims) == 2 and t.dims[0] == 64)
    out, notes = apply_treatments(m, {table: parse_treatment("int4b:32:a:rtn:rot32")})
    assert any("skipped" in n and table in n for n in notes)
    assert any(t.name == table for t in out.graph.initializer)


def test_a_plan_file_with_rotated_int4_replays_and_runs(tmp_path):
    """A saved plan naming int4b32r / int4b128r for the MatMuls: the executor writes rotated
    inputs, 8-bit scales and the DQs, the model passes the checker and stays close to the input."""
    import json

    from graphs import token_batches, token_mlp_model
    from onnxhmf.api import optimize
    from onnxhmf.cli import main

    m = token_mlp_model(vocab=320, d=32, h=64)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    calib = tmp_path / "cal.npz"
    np.savez(calib, **token_batches(320, 64, 12, seed=1))
    p = tmp_path / "p.json"
    assert main(["optimize", str(src), str(tmp_path / "x.onnx"), "--dry-run", "--save-plan", str(p), "-q",
                 "--calib", str(calib)]) == 0
    data = json.loads(p.read_text())
    for d in data["decisions"]:  # K = 32: one block a column (float32 scales); K = 64: two (8-bit scales)
        if d["ops"] == "matmul":
            d.update(treatment="int4b32r" if d["shape"][0] >= 64 else "int4b128r", rank=None, budget=None)
    data["settings"]["quantize"] = None
    p.write_text(json.dumps(data))
    out, report = optimize(str(src), plan_file=p, calib=calib, verify=False)
    onnx.checker.check_model(out, full_check=True)
    names = {t.name for t in out.graph.initializer}
    assert "hmf.rot32s0.sign" in names and any(n.endswith(".scale8") for n in names)
    assert {s.method for s in report.rewritten} >= {"int4b32r", "int4b128r"}
    feeds = token_batches(320, 4, 12, seed=5)
    run = lambda model: ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, feeds)[0].ravel()
    a, b = run(m), run(out)
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.98


def test_the_latency_cap_prices_the_rotation():
    from onnxhmf.factorize.allocate import Option
    from onnxhmf.planners.latency import LatencyCap

    cap = LatencyCap(1.0, 1.0, {"w": (1e-3, 6, 64)}, 1e-3, {(6, 64, 128): {"int4b": 0.6, "r0": 1}})
    p = type("P", (), {"groups": {"w": type("G", (), {"shape": (64, 128)})()}, "rank_multiple": 1, "costs": None})()
    assert cap.resource(p, "w", Option(1, 0.0, ("int4b256", 1.0))) == pytest.approx(0.6e-3)
    assert cap.resource(p, "w", Option(1, 0.0, ("int4b64r", 1.0))) == pytest.approx(1e-3 * (0.6 + 32 / 128))


def test_rotated_options_only_with_rotate_and_the_flag_rules(tmp_path, capsys):
    """planner_options offers int4bNr for MatMuls only when asked (--rotate), never for tables,
    at their blocked price; --rotate without a planner is one error line."""
    from graphs import token_mlp_model
    from onnxhmf.cli import main
    from onnxhmf.passes.intquant import planner_options
    from onnxhmf.plan import treatment_bytes

    m = token_mlp_model(vocab=320, d=32, h=64)
    arrays = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    loss = lambda name, W: float(np.linalg.norm(W - arrays[name]))  # noqa: E731
    keys = {r: {w: [t[0] for _, _, t in planner_options(m, w, arrays[w], {}, loss, lambda b, l, t: (b, l, t),
                                                        rotate=r)] for w in ("E", "W1")} for r in (False, True)}
    rotated = {"int4b32r", "int4b64r", "int4b128r", "int4b256r"}
    assert not rotated & set(keys[False]["W1"]) and not rotated & set(keys[True]["E"])
    # K = 32: blocks 64 and up are one block per column, the same fit as block 32's, so not offered
    assert rotated & set(keys[True]["W1"]) == {"int4b32r"} and "int4b128" not in keys[False]["W1"]
    got = {t[0]: b for b, _, t in planner_options(m, "W1", arrays["W1"], {}, loss, lambda b, l, t: (b, l, t), rotate=True)}
    shape = arrays["W1"].shape
    assert 0 < treatment_bytes("int4b32r", shape) - got["int4b32r"] <= 400 + 300
    # 8-bit scales from two blocks a column on (one block: float32 is smaller)
    assert treatment_bytes("int4b32r", (128, 64)) < treatment_bytes("int4b", (128, 64), table=True)
    assert treatment_bytes("int4b32r", shape) == treatment_bytes("int4b", shape, table=True) + 300
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    assert main(["optimize", str(src), str(tmp_path / "o.onnx"), "--quantize", "int8", "--rotate"]) == 2
    err = capsys.readouterr().err
    assert "--rotate goes with --plan auto" in err and len(err.strip().splitlines()) == 1


def test_a_treatments_damp_reaches_gptq_plain_and_rotated():
    """IntTreatment.damp is the δ of its GPTQ fit (the planner's default quant.GPTQ_DAMP), also
    through the rotation: a smaller δ fits the Gram's own data more closely."""
    from dataclasses import replace

    rng = np.random.default_rng(3)
    X = rng.standard_normal((96, 64)) * np.linspace(0.05, 3.0, 64)  # few rows, uneven energy: δ matters
    W = rng.standard_normal((64, 48))
    G = X.T @ X
    for t in (parse_treatment("int4b:32:a:gptq"), PLANNED["int4b32r"]):
        assert t.damp == Q.GPTQ_DAMP
        loose, tight = t.weight(W, G), replace(t, damp=0.001).weight(W, G)
        assert not np.allclose(loose, tight)
        err = lambda V: float(np.linalg.norm(X @ (W - V)))  # noqa: E731
        assert err(tight) < err(loose)
    plain = parse_treatment("int4b:32:a:gptq")
    direct = Q.gptq(W, G, 4, 32, False, damp=0.001).dequantize()
    np.testing.assert_allclose(replace(plain, damp=0.001).weight(W, G), direct.astype(np.float32), rtol=1e-6)
    assert replace(plain, damp=0.001).name.endswith("-d0.001") and not plain.name.endswith(f"-d{Q.GPTQ_DAMP:g}")
