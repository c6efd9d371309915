"""--int8-weights: MatMulInteger weights shifted losslessly to uint8 (onnxhmf/graph/unsigned.py)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import if_model, tied_model
from onnxhmf.graph.unsigned import SHIFT_ZERO, signed_weights, unsigned_weights

K, N = 64, 24


def _run(m, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _mmi_model(zero: str, shared_b: bool = False) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """Two MatMulIntegers Y_i = (A − 100)·(B_i − z_i) on full-range int8 weights, with the weight
    zero point ``zero``: 'none' (absent), 'scalar', 'column' ([N]) or 'shared' (one scalar, both nodes)."""
    rng = np.random.default_rng(3)
    Bs = [rng.integers(-128, 128, (K, N)).astype(np.int8) for _ in range(2)]
    if shared_b:
        Bs[1] = Bs[0]
    zs = {"none": [None, None], "scalar": [np.array(-3, np.int8), np.array(5, np.int8)],
          "column": [rng.integers(-128, 128, N).astype(np.int8) for _ in range(2)],
          "shared": [np.array(7, np.int8)] * 2}[zero]
    inits = [numpy_helper.from_array(np.array(100, np.uint8), "za")]
    nodes = []
    for i in range(2):
        b = "B0" if shared_b else f"B{i}"
        if i == 0 or not shared_b:
            inits.append(numpy_helper.from_array(Bs[i], b))
        z = "z" if zero == "shared" else f"z{i}"
        if zs[i] is not None and (i == 0 or zero != "shared"):
            inits.append(numpy_helper.from_array(zs[i], z))
        nodes.append(helper.make_node("MatMulInteger", ["A", b, "za"] + ([z] if zs[i] is not None else []), [f"Y{i}"]))
    g = helper.make_graph(nodes, "mmi", [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, K])],
                          [helper.make_tensor_value_info(f"Y{i}", TensorProto.INT32, [None, N]) for i in range(2)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    A = rng.integers(0, 256, (16, K)).astype(np.uint8)
    ref = [(A.astype(np.int64) - 100) @ (Bs[i].astype(np.int64) - (0 if zs[i] is None else zs[i].astype(np.int64)))
           for i in range(2)]
    return m, [A, *ref]


@pytest.mark.parametrize("zero", ["none", "scalar", "column", "shared"])
def test_the_shift_computes_the_integer_products_exactly(zero):
    """After the shift every weight and zero point is uint8 and onnxruntime's result equals the
    integer product, on every CPU (uint8×uint8 does not saturate); the input model is untouched."""
    m, (A, *ref) = _mmi_model(zero)
    before = m.SerializeToString()
    out = onnx.ModelProto()
    out.CopyFrom(m)
    assert unsigned_weights(out) == 2
    assert m.SerializeToString() == before
    onnx.checker.check_model(out)
    inits = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        assert inits[node.input[1]].data_type == TensorProto.UINT8
        assert inits[node.input[3]].data_type == TensorProto.UINT8
    if zero == "none":
        assert all(n.input[3] == SHIFT_ZERO for n in out.graph.node)
        assert sum(t.name == SHIFT_ZERO for t in out.graph.initializer) == 1
    for y, r in zip(_run(out, {"A": A}), ref):
        np.testing.assert_array_equal(y, r)
    assert signed_weights(m) == 2 and signed_weights(out) == 0


def test_a_zero_point_shared_with_an_unshifted_weight_gets_its_own_copy():
    """``only`` shifts the nodes whose input it names; a zero point the other node still reads
    as int8 is copied, not changed, and both products stay exact."""
    m, (A, *ref) = _mmi_model("shared")
    m.graph.node[1].input[0] = "A2"
    m.graph.input.append(helper.make_tensor_value_info("A2", TensorProto.UINT8, [None, K]))
    assert unsigned_weights(m, only={"A"}) == 1
    inits = {t.name: t for t in m.graph.initializer}
    assert inits["B0"].data_type == TensorProto.UINT8 and inits["B1"].data_type == TensorProto.INT8
    assert inits["z"].data_type == TensorProto.INT8 and m.graph.node[0].input[3] == "z.u8"
    y0 = _run(m, {"A": A, "A2": A})[0]
    np.testing.assert_array_equal(y0, ref[0])
    assert signed_weights(m) == 1


def test_a_weight_read_twice_is_shifted_once_and_other_readers_keep_it_int8():
    m, (A, *ref) = _mmi_model("scalar", shared_b=True)  # one B, two different zero points: left alone
    assert unsigned_weights(m) == 0
    m, (A, *ref) = _mmi_model("none", shared_b=True)  # one B, no zero point: shifted once for both
    assert unsigned_weights(m) == 1
    for y, r in zip(_run(m, {"A": A}), ref):
        np.testing.assert_array_equal(y, r)
    m, _ = _mmi_model("none")
    m.graph.node.append(helper.make_node("Cast", ["B0"], ["B0f"], to=TensorProto.FLOAT))  # another reader
    m.graph.output.append(helper.make_tensor_value_info("B0f", TensorProto.FLOAT, [K, N]))
    assert unsigned_weights(m) == 1  # B1 only
    assert {t.name: t.data_type for t in m.graph.initializer}["B0"] == TensorProto.INT8


def test_weights_inside_control_flow_bodies_are_shifted_too(tmp_path):
    """An int8 plan of a model with an If: the MatMulIntegers in its branches get uint8 weights,
    and the output agrees with the int8 one."""
    from onnxhmf.api import optimize

    m = if_model()
    q, _ = optimize(m, quantize="int8", int8_weights="int8", verify=False)
    u, rep = optimize(m, quantize="int8", int8_weights="uint8", verify=False)
    assert signed_weights(q) > 0 and signed_weights(u) == 0
    assert any(n.startswith("uint8 weights: ") for n in rep.notes)
    feeds = {i.name: np.random.default_rng(0).standard_normal([d.dim_value or 2 for d in i.type.tensor_type.shape.dim])
             .astype(np.float32) if i.type.tensor_type.elem_type == TensorProto.FLOAT else np.array(True)
             for i in m.graph.input}
    ref, a, b = _run(m, feeds)[0], _run(q, feeds)[0], _run(u, feeds)[0]
    assert np.linalg.norm(b - ref) <= 1.5 * np.linalg.norm(a - ref) + 1e-6


def test_uint8_weights_keep_a_tied_lm_heads_rows_asymmetric_and_verify():
    """--int8-weights uint8 on a tied table: its rows are uint8 with a zero point per row, the head
    is uint8×uint8, nothing int8 is left for the saturating kernel, and verification passes."""
    from onnxhmf.api import optimize

    m = tied_model(vocab=120, d=32)
    feeds = {"ids": np.random.default_rng(0).integers(0, 120, (4, 8)).astype(np.int64)}
    out, rep = optimize(m, quantize="int8", int8_weights="uint8")
    assert signed_weights(out) == 0
    rows = [t for t in out.graph.initializer if t.name.startswith("E.rows8")]
    assert {t.data_type for t in rows if t.name == "E.rows8"} == {TensorProto.UINT8}
    assert any(t.name == "E.rows8.zero" for t in rows)
    assert any("uint8 rows, one scale and zero point per row" in n for n in rep.notes)
    signed, _ = optimize(m, quantize="int8", int8_weights="int8")
    assert signed_weights(signed) == 1
    ref, y = _run(m, feeds)[0], _run(out, feeds)[0]
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.05
    assert out.ByteSize() <= signed.ByteSize() + 120 + 300  # a zero point per row and its Reshape


@pytest.mark.parametrize("saturates", [True, False])
def test_auto_takes_the_uint8_forms_only_where_the_cpu_saturates(saturates, monkeypatch):
    import onnxhmf.runtime as runtime
    from onnxhmf.executor import unsigned_forms

    monkeypatch.setattr(runtime, "matmulinteger_saturates", lambda: saturates)
    assert unsigned_forms({}) == ((True, "per-token") if saturates else (False, "none"))
    assert unsigned_forms({"int8_weights": "uint8"}) == (True, "all")
    assert unsigned_forms({"int8_weights": "int8"}) == (False, "none")


def test_per_token_inputs_shift_their_weights_when_asked():
    """per_token_activations(unsigned=True) shifts the weights of the MatMulIntegers it rewrites
    the inputs of, and only those."""
    from onnxhmf.api import optimize
    from onnxhmf.graph.pertoken import candidates, per_token_activations
    import graphs

    q, _ = optimize(graphs.mlp_model(), quantize="int8", int8_weights="int8", verify=False)
    first = candidates(q)[:1]
    assert signed_weights(q) == 2
    per_token_activations(q, only=set(first), unsigned=True)
    assert signed_weights(q) == 1
    onnx.checker.check_model(q)


def test_a_bad_int8_weights_value_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    import graphs
    from onnxhmf.errors import OnnxHmfError
    from onnxhmf.options import Methods

    with pytest.raises(OnnxHmfError, match="int8 weights must be auto, int8 or uint8"):
        Methods(int8_weights="int4")
    src = tmp_path / "m.onnx"
    onnx.save(graphs.mlp_model(), src)
    r = subprocess.run([sys.executable, "-m", "onnxhmf.cli", "optimize", str(src), str(tmp_path / "o.onnx"),
                        "--int8-weights", "int4"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--int8-weights" in r.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("unsigned", [True, False])
def test_the_planners_tied_probe_is_the_table_the_executor_stores(unsigned):
    """int8_weight(tied=True, unsigned=u) is exactly the table quantize_int8(unsigned_head=u)
    stores: gathering every row of the written model gives it back."""
    from onnxhmf.quantize import int8_weight, quantize_int8

    m = tied_model(vocab=60, d=32)
    E = numpy_helper.to_array(m.graph.initializer[0])
    q, done = quantize_int8(m, unsigned_head=unsigned)
    assert done == ["E"]
    q.graph.output.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, None))
    got = _run(q, {"ids": np.arange(60, dtype=np.int64)[None]})[1][0]
    np.testing.assert_allclose(got, int8_weight(E, tied=True, unsigned=unsigned), atol=1e-6)
    other = int8_weight(E, tied=True, unsigned=not unsigned)
    assert np.abs(got - other).max() > 1e-4  # the two forms differ: the test tells them apart
