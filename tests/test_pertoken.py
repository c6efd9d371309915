"""--activations per-token: the int8 MatMulIntegers' inputs quantized with one scale per row
(onnxhmf/graph/pertoken.py)."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from graphs import matmul_model, token_batches, token_mlp_model
from onnxhmf.graph.pertoken import per_token_activations
from onnxhmf.graph.qdq import upgrade_opset


def _run(m, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _int8(m, tmp_path, per_channel=False):
    src, out = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(m, src)
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    return onnx.load(out)


def _err(y, ref):
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMax's axes: an attribute before 18, an input from 18
@pytest.mark.exact_int8
def test_per_token_is_exact_per_row_and_beats_per_tensor_on_outlier_tokens(tmp_path, opset):
    m = matmul_model(64, 48, ndim=3)
    if opset == 18:
        m.opset_import[0].version = 18
    q = _int8(m, tmp_path)
    pt = onnx.ModelProto()
    pt.CopyFrom(q)
    assert per_token_activations(pt) == 1
    onnx.checker.check_model(pt, full_check=True)
    ops = collections.Counter(n.op_type for n in pt.graph.node)
    assert ops["DynamicQuantizeLinear"] == 0 and ops["MatMulInteger"] == 1 and all(n.domain == "" for n in pt.graph.node)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, 16, 64)).astype(np.float32)
    X[0, 3] *= 50  # one outlier token: per tensor it coarsens every other row
    ref = _run(m, {"X": X})
    got = _run(pt, {"X": X})
    # the integers are what the formula says, row by row
    W = next(onnx.numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_quantized"))
    ws = next(onnx.numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_scale"))
    s = np.abs(X).max(-1, keepdims=True) / 127
    want = (np.round(X / s) @ W.astype(np.float32)) * s * ws
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    rows = [r for r in range(16) if r != 3]
    assert _err(got[0, rows], ref[0, rows]) < 0.2 * _err(_run(q, {"X": X})[0, rows], ref[0, rows])
    assert _err(got, ref) < 0.02


def test_the_inputs_own_dynamic_quantize_linear_is_kept(tmp_path):
    q = _int8(matmul_model(64, 48, ndim=2), tmp_path)
    mine = {n.output[0] for n in q.graph.node if n.op_type == "DynamicQuantizeLinear"}
    assert per_token_activations(q, keep=mine) == 0
    assert sum(n.op_type == "DynamicQuantizeLinear" for n in q.graph.node) == 1


def test_cli_per_token_int8_and_plan_replay(tmp_path, capsys):
    """--quantize int8 --activations per-token: standard ops, verified, names/IR kept, a note,
    more accurate than per-tensor; the setting is recorded and a plan file replays it; with no
    int8 in the plan the note says nothing was rewritten; a bad value is one error line."""
    from onnxhmf.api import optimize
    from onnxhmf.cli import main

    m = token_mlp_model(vocab=320, d=32, h=64)
    src, calib = tmp_path / "m.onnx", tmp_path / "cal.npz"
    onnx.save(m, src)
    np.savez(calib, **token_batches(320, 128, 12, seed=1))
    outs = {}
    for act in ("per-tensor", "per-token"):
        outs[act] = tmp_path / f"{act}.onnx"
        assert main(["optimize", str(src), str(outs[act]), "--quantize", "int8", "--activations", act]) == 0
    text = capsys.readouterr().out
    assert "per-token activations: 2 int8 MatMul inputs" in text
    pt = onnx.load(outs["per-token"])
    assert not any(n.op_type == "DynamicQuantizeLinear" for n in pt.graph.node)
    assert [i.name for i in pt.graph.input] == [i.name for i in m.graph.input] and pt.ir_version == m.ir_version
    feeds = {k: v[:4] for k, v in token_batches(320, 128, 4, seed=7).items()}
    ref = _run(m, feeds)
    e = {a: _err(_run(onnx.load(p), feeds), ref) for a, p in outs.items()}
    assert e["per-token"] < e["per-tensor"], e
    _, rep = optimize(m, quantize="int8", activations="per-token", verify=False)
    assert rep.planned["settings"]["activations"] == "per-token"
    plan = tmp_path / "plan.json"
    _, rep0 = optimize(m, quantize="int8", verify=False)
    plan.write_text(__import__("json").dumps(rep0.planned))
    replayed, rep2 = optimize(m, plan_file=plan, activations="per-token", verify=False)
    assert not any(n.op_type == "DynamicQuantizeLinear" for n in replayed.graph.node)
    assert any(n.startswith("per-token activations: 2") for n in rep2.notes)
    _, rep3 = optimize(m, keep=0.5, activations="per-token", verify=False)
    assert any("nothing is rewritten" in n for n in rep3.notes)
    assert main(["optimize", str(src), str(tmp_path / "x.onnx"), "--activations", "per-row"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.exact_int8
def test_per_token_after_an_opset_upgrade(tmp_path):
    """int8 and blocked sites in one model at opset 21 (ReduceMax with an axes input)."""
    m = matmul_model(64, 48, ndim=3)
    q = _int8(m, tmp_path, per_channel=True)
    upgrade_opset(q)
    assert per_token_activations(q) == 1
    onnx.checker.check_model(q, full_check=True)
    X = np.random.default_rng(2).standard_normal((2, 5, 64)).astype(np.float32)
    assert _err(_run(q, {"X": X}), _run(m, {"X": X})) < 0.02


@pytest.mark.exact_int8
def test_many_sites_get_distinct_short_names(tmp_path):
    """Four chained MatMuls (four DynamicQuantizeLinears): each rewrite has its own names, short
    ones (every node name is stored three times), and the model stays valid and accurate."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32) / 6, f"W{i}") for i in range(4)]
    nodes = [helper.make_node("MatMul", ["X" if i == 0 else f"h{i}", f"W{i}"], [f"h{i + 1}" if i < 3 else "Y"]) for i in range(4)]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["n", 32])],
                          [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["n", 32])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    q = _int8(m, tmp_path)
    assert per_token_activations(q) == 4
    onnx.checker.check_model(q, full_check=True)
    new = [n.name for n in q.graph.node if n.name.startswith("hmf.pt")]
    assert len(new) == len(set(new)) == 4 * 9 and max(map(len, new)) <= 14  # 8 to quantize, 1 to rescale
    X = rng.standard_normal((10, 32)).astype(np.float32)
    assert _err(_run(q, {"X": X}), _run(m, {"X": X})) < 0.03


@pytest.mark.exact_int8
def test_the_bert_pattern_stays_exact_under_onnxruntimes_fusions(tmp_path):
    """MatMul + bias Add (BERT's linears): onnxruntime fuses the quantizer's MatMulInteger → Cast →
    Mul(s_x·s_w) → Add into MatMulIntegerToFloat, which reads s_x as a scalar. The rewrite must not
    leave that pattern: with every optimization on, the output is the per-row formula."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(6)
    W = rng.standard_normal((64, 48)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["Y"])], "lin",
                          [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["n", "t", 64])],
                          [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["n", "t", 48])],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    q = _int8(m, tmp_path, per_channel=True)
    assert per_token_activations(q) == 1
    Wq = next(numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_quantized")).astype(np.float32)
    ws = next(numpy_helper.to_array(t) for t in q.graph.initializer if t.name == "W_scale")
    X = rng.standard_normal((3, 7, 64)).astype(np.float32)
    X[1, 2] *= 40
    s = np.abs(X).max(-1, keepdims=True) / 127
    want = (np.round(X / s) @ Wq) * ws * s + b
    np.testing.assert_allclose(_run(q, {"X": X}), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_auto_rewrites_only_the_inputs_that_pay(tmp_path, capsys):
    """Two MatMuls: one input has outlier tokens (per-token removes most of its loss), the other
    is even (little to gain). auto rewrites the first only, says so, and needs calibration data."""
    from onnx import helper, numpy_helper

    from onnxhmf.api import optimize
    from onnxhmf.cli import main

    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), n) for n in ("W1", "W2")]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["y"]), helper.make_node("MatMul", ["z", "W2"], ["w"])], "two",
                          [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["n", 16, 32]) for n in ("x", "z")],
                          [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["n", 16, 32]) for n in ("y", "w")], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    x = rng.standard_normal((64, 16, 32)).astype(np.float32)
    x[:, 0] *= 100  # the first token of every row is loud (an attention sink)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=x, z=rng.standard_normal((64, 16, 32)).astype(np.float32))
    out, rep = optimize(m, quantize="int8", activations="auto", calib=calib, verify=False)
    note = next(n for n in rep.notes if n.startswith("per-token activations (auto)"))
    assert "1 of 2" in note, note
    dql = [n.input[0] for n in out.graph.node if n.op_type == "DynamicQuantizeLinear"]
    assert dql == ["z"]  # x's was rewritten, z's kept
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    assert main(["optimize", str(src), str(tmp_path / "o.onnx"), "--quantize", "int8", "--activations", "auto"]) == 2
    err = capsys.readouterr().err
    assert "--activations auto needs calibration data" in err and len(err.strip().splitlines()) == 1


def test_auto_with_the_planner_is_chosen_once_on_the_final_model(tmp_path):
    """--plan auto with --activations auto: the trial builds keep per-tensor (no per-trial search);
    the final model gets auto's choice, with its note."""
    from onnxhmf.api import optimize

    m = token_mlp_model(vocab=320, d=32, h=64)
    calib = tmp_path / "cal.npz"
    np.savez(calib, **token_batches(320, 128, 12, seed=1))
    import onnxhmf.passes.pertoken as P

    calls = []
    real = P.choose_per_token
    P.choose_per_token = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        out, rep = optimize(m, calib=calib, plan={"target_ratio": 0.4}, activations="auto", verify=False)
    finally:
        P.choose_per_token = real
    assert len(calls) == 1
    assert any(n.startswith("per-token activations") for n in rep.notes), rep.notes


def test_auto_leaves_inputs_where_per_token_gains_nothing():
    """Every row already spans the same range (±1): per-token removes none of the loss, so auto
    rewrites nothing (it would only cost its passes)."""
    from onnx import helper, numpy_helper

    from onnxhmf.calibration import Calibration
    from onnxhmf.passes.pertoken import choose_per_token

    rng = np.random.default_rng(9)
    W = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "one",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16, 32])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 16, 32])], [W])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    import pathlib
    import tempfile

    q = _int8(m, pathlib.Path(tempfile.mkdtemp()))
    batches = [{"x": np.sign(rng.standard_normal((8, 16, 32))).astype(np.float32)} for _ in range(4)]
    c = choose_per_token(q, m, Calibration(batches=batches))
    assert c.candidates == 1 and c.chosen == [], c
