"""--compact-names (graph/names.py): the same graph in fewer bytes, and plans that count it."""
import numpy as np
import onnx
import pytest

import graphs
from onnxhmf import optimize
from onnxhmf.graph.names import compact_names, compacted_bytes
from onnxhmf.verify import run_onnxruntime
from test_control_flow import assert_exact, if_model, loop_model, scan_model


def _long_names(model: onnx.ModelProto, depth: int = 1) -> onnx.ModelProto:
    """The model with every node output renamed the way exporters name them (paths ``depth``
    scopes deep)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = {v.name for v in m.graph.input} | {v.name for v in m.graph.output} | {t.name for t in m.graph.initializer}
    scope = "/model" + "/encoder" * depth
    new = {o: f"{scope}/block.{i}/{n.op_type}_output_0" for i, n in enumerate(m.graph.node)
           for o in n.output if o not in keep}
    for i, n in enumerate(m.graph.node):
        n.name = f"{scope}/block.{i}/{n.op_type}"
        n.input[:] = [new.get(x, x) for x in n.input]
        n.output[:] = [new.get(x, x) for x in n.output]
    return m


def _names(model):
    g = model.graph
    return [v.name for v in g.input], [v.name for v in g.output], [t.name for t in g.initializer]


@pytest.mark.parametrize("build", [if_model, loop_model, scan_model, lambda: _long_names(graphs.mlp_model())])
def test_renamed_graph_computes_the_same_and_keeps_its_interface(build):
    src = build()
    out = onnx.ModelProto()
    out.CopyFrom(src)
    n = compact_names(out)
    assert n > 0 and out.ByteSize() < src.ByteSize()
    assert _names(out) == _names(src)
    assert all(node.name == "" for node in out.graph.node)
    again = onnx.ModelProto()
    again.CopyFrom(out)
    compact_names(again)
    assert again == out  # applied twice: the same names
    assert compacted_bytes(src) == out.ByteSize() and src.graph.node[0].name == build().graph.node[0].name
    if build in (if_model, loop_model, scan_model):
        assert_exact(src, out)  # bodies' references to outer names still resolve, both branches
    else:
        x = np.random.default_rng(0).standard_normal((2, 3, 32)).astype(np.float32)
        np.testing.assert_array_equal(run_onnxruntime(src, {"X": x})["Y"], run_onnxruntime(out, {"X": x})["Y"])


def test_new_names_never_clash_with_kept_ones():
    m = graphs.mlp_model()
    m.graph.input[0].name, first = "t0", m.graph.input[0].name  # a graph input already named like a new name
    for node in m.graph.node:
        node.input[:] = ["t0" if x == first else x for x in node.input]
    out = onnx.ModelProto()
    out.CopyFrom(m)
    compact_names(out)
    made = [o for node in out.graph.node for o in node.output]
    assert "t0" not in made and all(o.startswith("_t") for o in made if o not in _names(out)[1])
    onnx.checker.check_model(out)


def test_a_planned_target_spends_what_the_names_free(tmp_path):
    m = _long_names(graphs.token_mlp_model(vocab=300, d=32, h=64), depth=60)  # names: 1/4 of the bytes
    calib = tmp_path / "calib.npz"
    np.savez(calib, **graphs.token_batches(n=64, seed=1))
    target = int(0.35 * m.ByteSize())
    plain, _ = optimize(m, calib=calib, plan={"target_size": target}, verify=False)
    short, rep = optimize(m, calib=calib, plan={"target_size": target}, compact_names=True, verify=False)
    assert short.ByteSize() <= target and plain.ByteSize() <= target
    assert all(node.name == "" for node in short.graph.node) and _names(short)[:2] == _names(m)[:2]
    assert any(n.startswith("compact names:") for n in rep.notes)
    weights = {t.name: t for t in short.graph.initializer}
    # the bytes the names freed went to the weights: more of them than in the plain plan
    assert sum(t.ByteSize() for t in weights.values()) > sum(t.ByteSize() for t in plain.graph.initializer)


def test_float16_biases_store_the_vectors_in_half_and_load_as_float():
    from onnxhmf.graph.half import float16_biases, float16_saving

    src = graphs.mlp_model()  # b1 is read by Add at input 0, b2 at input 1; sqrt2/one/half are scalars of Div/Add/Mul
    out = onnx.ModelProto()
    out.CopyFrom(src)
    saving = float16_saving(src)
    assert float16_biases(out) == 2 and float16_biases(out) == 0  # b1, b2; applied twice: nothing more
    assert saving - 2 * 40 <= src.ByteSize() - out.ByteSize() <= saving == 2 * (96 + 32)  # less a Cast node each
    kinds = {t.name: t.data_type for t in out.graph.initializer}
    assert kinds["b1.f16"] == kinds["b2.f16"] == onnx.TensorProto.FLOAT16 and kinds["W1"] == onnx.TensorProto.FLOAT
    assert [n.op_type for n in out.graph.node[:2]] == ["Cast", "Cast"] and _names(out)[:2] == _names(src)[:2]
    onnx.checker.check_model(out)
    x = np.random.default_rng(0).standard_normal((2, 3, 32)).astype(np.float32)
    a, b = run_onnxruntime(src, {"X": x})["Y"], run_onnxruntime(out, {"X": x})["Y"]
    assert 0 < np.abs(a - b).max() <= 2e-3 * np.abs(a).max()  # float16 rounding, nothing worse


def test_float16_biases_leave_what_float16_cannot_hold_or_other_readers_read():
    from onnxhmf.graph.half import float16_biases

    m = graphs.mlp_model()
    b1 = next(t for t in m.graph.initializer if t.name == "b1")
    arr = onnx.numpy_helper.to_array(b1).copy()
    arr[0] = 1e6  # past float16's range
    b1.CopyFrom(onnx.numpy_helper.from_array(arr, "b1"))
    m.graph.node.append(onnx.helper.make_node("Identity", ["b2"], ["b2_out"]))  # b2 also read by an Identity
    m.graph.output.append(onnx.helper.make_tensor_value_info("b2_out", onnx.TensorProto.FLOAT, [32]))
    assert float16_biases(m) == 0


def _with_biases(m: onnx.ModelProto) -> onnx.ModelProto:
    """token_mlp_model with a bias Add after each MatMul."""
    rng = np.random.default_rng(3)
    nodes = []
    for node in m.graph.node:
        nodes.append(node)
        if node.op_type == "MatMul":
            n = 64 if node.name == "up" else 32
            m.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"{node.name}.bias"))
            out = node.output[0]
            node.output[0] = out + "_mm"
            nodes.append(onnx.helper.make_node("Add", [out + "_mm", f"{node.name}.bias"], [out], name=f"{node.name}_bias"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    return m


def test_a_plan_with_float16_biases_measures_and_writes_them(tmp_path):
    m = _with_biases(graphs.token_mlp_model(vocab=300, d=32, h=64))
    calib = tmp_path / "calib.npz"
    np.savez(calib, **graphs.token_batches(n=64, seed=1))
    target = int(0.35 * m.ByteSize())
    out, rep = optimize(m, calib=calib, plan={"target_size": target}, float16_biases=True, verify=False)
    assert out.ByteSize() <= target
    halves = [t.name for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert sorted(halves) == ["down.bias.f16", "up.bias.f16"]
    assert any(n.startswith("float16 biases: 2 ") for n in rep.notes)
    feeds = graphs.token_batches(n=4, seed=5)
    a, b = run_onnxruntime(m, feeds)["Y"], run_onnxruntime(out, feeds)["Y"]
    assert np.isfinite(b).all() and b.shape == a.shape
