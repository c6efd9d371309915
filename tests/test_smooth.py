"""SmoothQuant (factorize/smooth.py, graph/smooth.py, passes/smooth.py) on matrices and a synthetic block."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxhmf.calibration import Calibration
from onnxhmf.factorize import smooth as S
from onnxhmf.graph.smooth import apply_smoothing, smooth_sites
from onnxhmf.passes.intquant import IntTreatment, apply_treatments, parse_treatment
from onnxhmf.passes.smooth import smooth_for_int8

D, H, F = 32, 4, 64
OUTLIERS = [3, 17]


def _block(seed=0, scalar_half=False) -> onnx.ModelProto:
    """x → LN1 → Q,K,V (+ residual) → attention → W_o → + → LN2 (only FFN1) → GELU-like ·c (c a (F,)
    vector, or the scalar 0.5) → W_2 → SwiGLU (gate ⊙ up) → W_d: sites with every fold kind (node,
    value, norm, mul, gate)."""
    rng = np.random.default_rng(seed)
    w = lambda *s: numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), f"w{len(inits)}")  # noqa: E731
    inits = []
    names = {}
    for key, shape in (("wq", (D, D)), ("wk", (D, D)), ("wv", (D, D)), ("wo", (D, D)), ("w1", (D, F)), ("w2", (F, D)),
                       ("wg", (D, F)), ("wu", (D, F)), ("wd", (F, D))):
        t = w(*shape)
        t.name = key
        inits.append(t)
        names[key] = t
    vec = lambda n, v: inits.append(numpy_helper.from_array(np.asarray(v, np.float32), n))  # noqa: E731
    vec("g1", 1 + 0.1 * rng.standard_normal(D)), vec("b1", 0.1 * rng.standard_normal(D))
    vec("g2", 1 + 0.1 * rng.standard_normal(D)), vec("b2", 0.1 * rng.standard_normal(D))
    vec("bv", 0.1 * rng.standard_normal(D))
    vec("half", 0.5 if scalar_half else 0.5 + 0.1 * rng.standard_normal(F))
    inits.append(numpy_helper.from_array(np.array([0, 0, H, D // H], np.int64), "split"))
    inits.append(numpy_helper.from_array(np.array([0, 0, D], np.int64), "merge"))
    n = helper.make_node
    nodes = [n("LayerNormalization", ["x", "g1", "b1"], ["h"], axis=-1),
             n("MatMul", ["h", "wq"], ["q"]), n("MatMul", ["h", "wk"], ["k"]), n("MatMul", ["h", "wv"], ["v0"]),
             n("Add", ["v0", "bv"], ["v1"]), n("Reshape", ["v1", "split"], ["v2"]),
             n("Transpose", ["v2"], ["v3"], perm=[0, 2, 1, 3]),
             n("Reshape", ["q", "split"], ["q2"]), n("Transpose", ["q2"], ["q3"], perm=[0, 2, 1, 3]),
             n("Reshape", ["k", "split"], ["k2"]), n("Transpose", ["k2"], ["k3"], perm=[0, 2, 3, 1]),
             n("MatMul", ["q3", "k3"], ["sc"]), n("Softmax", ["sc"], ["p"], axis=-1),
             n("MatMul", ["p", "v3"], ["c0"]), n("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
             n("Reshape", ["c1", "merge"], ["ctx"]), n("MatMul", ["ctx", "wo"], ["o"]), n("Add", ["o", "h"], ["r1"]),
             n("LayerNormalization", ["r1", "g2", "b2"], ["h2"], axis=-1),
             n("MatMul", ["h2", "w1"], ["f1"]), n("Sigmoid", ["f1"], ["sg"]), n("Mul", ["f1", "sg"], ["f2"]),
             n("Mul", ["f2", "half"], ["f3"]), n("MatMul", ["f3", "w2"], ["f4"]), n("Add", ["f4", "r1"], ["r2"]),
             n("MatMul", ["r2", "wg"], ["gg"]), n("Sigmoid", ["gg"], ["gs"]), n("Mul", ["gg", "gs"], ["ga"]),
             n("MatMul", ["r2", "wu"], ["up"]), n("Mul", ["ga", "up"], ["gu"]), n("MatMul", ["gu", "wd"], ["y0"]),
             n("Add", ["y0", "r2"], ["y"])]
    g = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", D])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def _feeds(n=6, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((4, 10, D)).astype(np.float32)
        x[..., OUTLIERS] *= 30  # outlier channels before the first LayerNorm...
        out.append({"x": x})
    return out


def _run(m, feeds):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return [s.run(["y"], f)[0] for f in feeds]


def _outlier_block():
    """The block with LN gains that make channels 3 and 17 outliers in every LayerNorm output."""
    m = _block()
    for t in m.graph.initializer:
        if t.name in ("g1", "g2"):
            a = numpy_helper.to_array(t).copy()
            a[OUTLIERS] *= 25
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    return m


def test_sites_find_every_fold():
    m = _block()
    folds = {tuple(s.weights): s.fold for s in smooth_sites(m)}
    assert folds == {("wq", "wk", "wv"): "node", ("wo",): "value", ("w1",): "norm", ("w2",): "mul",
                     ("wg", "wu"): "node", ("wd",): "gate"}
    assert {s.fold for s in smooth_sites(m, nodes="none")} == {"value", "norm", "mul", "gate"}
    # "cheap": a Mul node only where the MatMuls' outputs are at least as wide as X
    wide = {tuple(s.weights): s.fold for s in smooth_sites(_block(scalar_half=True))}
    assert ("w2",) not in wide and wide[("wq", "wk", "wv")] == "node"
    assert {tuple(s.weights): s.fold for s in smooth_sites(_block(scalar_half=True), nodes="all")}[("w2",)] == "node"
    with pytest.raises(ValueError):
        smooth_sites(m, nodes="some")
    assert [s.weights for s in smooth_sites(m, weights={"wo"})] == [["wo"]]
    # a scalar constant stays (a vector would break onnxruntime's Gelu fusion): a Mul node instead
    assert {tuple(s.weights): s.fold for s in smooth_sites(_block(scalar_half=True), nodes="all")}[("w2",)] == "node"


@pytest.mark.parametrize("nodes", ["none", "all"])
def test_folds_are_exact_in_float_and_keep_the_graph_valid(nodes):
    m = _block()
    sites = smooth_sites(m, nodes=nodes)
    rng = np.random.default_rng(5)
    scales = {s.act: np.exp(rng.standard_normal(len(numpy_helper.to_array(
        next(t for t in m.graph.initializer if t.name == s.weights[0])))) ).astype(np.float32) for s in sites}
    out = apply_smoothing(m, sites, scales)
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    assert out.graph.output[0].type == m.graph.output[0].type
    assert len(out.graph.node) == len(m.graph.node) + (2 if nodes == "all" else 0)  # one Mul per node site
    w = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert not np.allclose(w["w2"], numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w2")))
    feeds = _feeds(2)
    for a, b in zip(_run(m, feeds), _run(out, feeds)):
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))
    assert m.graph.node[22].input[1] == "half"  # the input is not modified


def test_dynamic_uint8_matches_onnxruntime():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 33)) * 3 + 1).astype(np.float32)
    g = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
                           helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "dq",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7, 33])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 33])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(S.dynamic_uint8(x), y, atol=1e-6)


def test_smoothing_lowers_int8_error_on_outlier_channels():
    rng = np.random.default_rng(2)
    K, N = 64, 48
    gain = np.ones(K)
    gain[[5, 40]] = 40.0
    batches = [(rng.standard_normal((200, K)) * gain).astype(np.float32) for _ in range(4)]
    W = (rng.standard_normal((K, N)) / 8).astype(np.float32)
    one = np.ones(K, np.float32)
    base = S.int8_output_error(batches, [W], one)
    ch = S.search_alpha(batches, [W])
    assert ch.alpha > 0 and ch.baseline == pytest.approx(base)
    assert ch.error < 0.5 * base
    assert S.int8_output_error(batches, [W], ch.scale) == pytest.approx(ch.error)
    assert np.all(ch.scale >= 1) and ch.scale[5] > 3 and ch.scale[40] > 3  # only outliers shrink
    s = S.smooth_scales(np.abs(batches[0]).max(0), np.abs(W).max(1), 0.5, floor=False)
    assert np.exp(np.mean(np.log(s))) == pytest.approx(1.0, rel=1e-4)


def test_smooth_for_int8_lowers_the_quantized_models_error():
    m = _outlier_block()
    cal = Calibration(_feeds(6), None, "synthetic")
    held = _feeds(3, seed=9)
    ref = _run(m, held)
    err = {}
    for sq in (False, True):
        q, notes = apply_treatments(m, {w: IntTreatment("int8pc", smooth=sq) for w in
                                        ("wq", "wk", "wv", "wo", "w1", "w2", "wg", "wu", "wd")}, calib=cal)
        onnx.checker.check_model(q)
        assert {n.op_type for n in q.graph.node} >= {"MatMulInteger", "DynamicQuantizeLinear"}
        err[sq] = sum(float(np.sum((a - b) ** 2)) for a, b in zip(ref, _run(q, held)))
        assert any(x.startswith("smooth ") for x in notes) == sq
    assert err[True] < 0.7 * err[False]
    smoothed, res = smooth_for_int8(m, cal)
    assert res.float_error <= 1e-5 and set(res.scales) <= {"wq", "wk", "wv", "wo", "w1", "w2", "wg", "wu", "wd"}
    assert "wq" in res.scales  # the outlier LayerNorm output is smoothed


def test_smooth_without_calibration_says_so():
    q, notes = apply_treatments(_block(), {"wo": IntTreatment("int8pc", smooth=True)})
    assert any("not smoothed (needs calibration data)" in n for n in notes)


def test_parse_smooth_treatment():
    assert parse_treatment("int8pc:gptq:smooth") == IntTreatment("int8pc", 8, 0, True, "gptq", smooth=True)
    assert parse_treatment("int8pc:smooth").name == "int8pc-rtn-smooth"
    assert parse_treatment("int8pc").smooth is False
    with pytest.raises(Exception):
        parse_treatment("int8pc:smooth:smooth")


def test_int8pc_table_is_the_quantizers_gather():
    from graphs import gather_model

    from onnxhmf.quantize import int8_weight

    m = gather_model(vocab=200, d=32)
    E = numpy_helper.to_array(m.graph.initializer[0])
    t = IntTreatment("int8pc")
    assert "table" in t.sites() and t.nbytes(E.shape, "table") == E.size + 16
    q, notes = apply_treatments(m, {"E": t})
    assert {n.op_type for n in q.graph.node} >= {"Gather", "DequantizeLinear"} and not notes
    ids = np.array([[0, 5, 199], [7, 7, 1]], np.int64)
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, int8_weight(E, table=True)[ids], atol=1e-6)
    np.testing.assert_allclose(t.weight(E, None, "table"), int8_weight(E, table=True))


def test_cli_quantize_int8pc_smooth(tmp_path, capsys):
    import json

    from onnxhmf.cli import main

    src, cal = tmp_path / "in.onnx", tmp_path / "cal.npz"
    onnx.save(_outlier_block(), src)
    np.savez(cal, x=np.concatenate([f["x"] for f in _feeds(6)]))
    before = src.read_bytes()
    runs = {}
    for extra in ([], ["--smooth"]):
        out, rep = tmp_path / f"out{len(extra)}.onnx", tmp_path / f"r{len(extra)}.json"
        code = main([str(a) for a in ["optimize", src, out, "--quantize", "int8pc", "--calib", cal, "--report", rep,
                                      "-q", "--force", *extra]])
        assert code in (0, 1), capsys.readouterr().err
        m = onnx.load(out)
        onnx.checker.check_model(m)
        assert [i.name for i in m.graph.input] == ["x"] and [o.name for o in m.graph.output] == ["y"]
        runs[bool(extra)] = (m, json.loads(rep.read_text()))
    assert src.read_bytes() == before
    (plain, rp), (smoothed, rs) = runs[False], runs[True]
    notes = " ".join(rs["notes"])
    assert "smooth:" in notes and "folded" in notes and "smooth:" not in json.dumps(rp)
    assert sum(n.op_type == "MatMulInteger" for n in smoothed.graph.node) == 9
    held = _feeds(3, seed=9)
    ref = _run(_outlier_block(), held)
    err = {k: sum(float(np.sum((a - b) ** 2)) for a, b in zip(ref, _run(m, held))) for k, (m, _) in runs.items()}
    assert err[True] < 0.7 * err[False]


def test_cli_smooth_all_adds_the_narrow_sites(tmp_path, capsys):
    from onnxhmf.cli import main

    src, cal = tmp_path / "in.onnx", tmp_path / "cal.npz"
    onnx.save(_block(scalar_half=True), src)
    np.savez(cal, x=np.concatenate([f["x"] for f in _feeds(6)]))
    muls = {}
    for how in ("free", "cheap", "all"):
        out = tmp_path / f"{how}.onnx"
        code = main(["optimize", str(src), str(out), "--quantize", "int8pc", "--calib", str(cal), "-q", "--force",
                     "--smooth", how])
        assert code in (0, 1), capsys.readouterr().err
        muls[how] = sum(n.op_type == "Mul" and "smooth" in n.name for n in onnx.load(out).graph.node)
    assert muls == {"free": 0, "cheap": 2, "all": 3}  # Q/K/V and gate/up inputs; the FFN's second input too


@pytest.mark.parametrize("args,needle", [(["--quantize", "int8", "--smooth"], "--smooth goes with --quantize int8pc"),
                                         (["--quantize", "int8pc", "--smooth"], "--smooth needs calibration data")])
def test_cli_smooth_errors(args, needle, tmp_path, capsys):
    from onnxhmf.cli import main

    src = tmp_path / "in.onnx"
    onnx.save(_block(), src)
    code = main(["optimize", str(src), str(tmp_path / "o.onnx"), *args])
    err = capsys.readouterr().err
    assert code != 0 and needle in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_per_channel_drops_the_all_zero_weight_zero_points(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxhmf.quantize import quantize_int8

    m = _block()
    ours, done = quantize_int8(m, per_channel=True)
    assert len(done) == 9
    mi = [n for n in ours.graph.node if n.op_type == "MatMulInteger"]
    assert len(mi) == 9 and all(len(n.input) == 3 for n in mi)
    assert not any(t.name.endswith("weight_zero_point") or t.name.endswith("_zero_point") and t.data_type == TensorProto.INT8
                   for t in ours.graph.initializer)
    onnx.save(m, tmp_path / "in.onnx")
    quantize_dynamic(str(tmp_path / "in.onnx"), str(tmp_path / "ort.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    theirs = onnx.load(tmp_path / "ort.onnx")
    assert all(len(n.input) == 4 for n in theirs.graph.node if n.op_type == "MatMulInteger")
    assert len(theirs.graph.initializer) - len(ours.graph.initializer) == 9  # one zero-point vector per weight
    feeds = _feeds(2)
    for a, b in zip(_run(theirs, feeds), _run(ours, feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_minilm_smoothing_beats_per_channel_int8(minilm_path, tmp_path):
    """On real BERT activations (the calibration found beside MiniLM, held-out batches scored):
    smoothing first raises per-channel int8's sentence-embedding fidelity, and stays exact in float."""
    from onnxhmf.discover import discover_calibration
    from onnxhmf.fidelity import evaluate_fidelity
    from onnxhmf.quantize import quantize_int8

    d = discover_calibration(minilm_path)
    fit, held = d.split()
    m = onnx.load(minilm_path)
    smoothed, res = smooth_for_int8(m, fit, nodes="all")
    assert res.float_error <= 1e-5
    assert {n.split("folded by ")[1].split(",")[0] for n in res.notes if "folded by" in n} == {"node", "value"}
    cos = {}
    for tag, model in (("pc", m), ("sq", smoothed)):
        q, done = quantize_int8(model, per_channel=True)
        assert len(done) == 39
        p = tmp_path / f"{tag}.onnx"
        onnx.save(q, p)
        cos[tag] = evaluate_fidelity(minilm_path, p, held, vocab=d.vocab).outputs["sentence_embedding"].value
    assert cos["sq"] > cos["pc"] + 0.001, cos
