"""Valid models at every opset the tool accepts (7-21) x every treatment: the rewrite emits
only what the model's opset allows (Slice with attributes below 10, no int32 Min/Max below
12), keeps the opset unless a treatment needs another one (and says so), and the result passes
onnx.checker and runs in onnxruntime; or the site is left with its reason. Never "internal
error"."""
import json
import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxhmf.cli import main
from onnxhmf.verify import run_onnxruntime

F = TensorProto.FLOAT
SCALE = float(os.environ.get("ONNXHMF_FUZZ_SCALE", "1"))  # more examples for a longer hunt


def outlier_matrix(m, n, seed, axis, k=8):
    """Low rank plus k large columns (axis 1) or rows (axis 0): HMF keeps those dense and wins."""
    rng = np.random.default_rng(seed)
    W = graphs.matrix(m, n, seed, decay=0.8) * 0.1
    idx = rng.choice(n if axis == 1 else m, k, replace=False)
    if axis == 1:
        W[:, idx] = rng.standard_normal((m, k)) * 5
    else:
        W[idx] = rng.standard_normal((k, n)) * 5
    return W.astype(np.float32)


def mlp(opset, ndim, seed=0, bias_out=False, bias_in_if=False):
    """X → MatMul(W1) → Add(b1) → Relu → MatMul(W2) → Y, W1 with outlier columns (HMF folds its
    column order into b1 and W2's rows). Optionally b1 is also a graph output, or read in an If."""
    d, h = 24, 48
    W1, W2 = outlier_matrix(d, h, seed, 1), graphs.matrix(h, d, seed + 1)
    b1 = np.linspace(-1, 1, h).astype(np.float32)
    shape = ["batch", d] if ndim == 2 else ["batch", "seq", d]
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"], name="mm1"), helper.make_node("Add", ["h", "b1"], ["ha"], name="add"),
             helper.make_node("Relu", ["ha"], ["hr"], name="relu"), helper.make_node("MatMul", ["hr", "W2"], ["Y"], name="mm2")]
    outputs = [graphs.vi("Y", shape[:-1] + [d])]
    inputs = [graphs.vi("X", shape)]
    if bias_out:
        outputs.append(graphs.vi("b1", [h]))
    if bias_in_if:
        then_g = helper.make_graph([helper.make_node("Identity", ["b1"], ["t"])], "then", [], [graphs.vi("t", [h])])
        else_g = helper.make_graph([helper.make_node("Neg", ["b1"], ["e"])], "else", [], [graphs.vi("e", [h])])
        nodes.append(helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_g, else_branch=else_g))
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
        outputs.append(graphs.vi("z", [h]))
    inits = [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(W2, "W2")]
    return graphs.model(nodes, inputs, outputs, inits, opset=opset)


def embedding(opset, tied, scalar=False, seed=0):
    """Gather(E, ids) (and a tied head MatMul(h, Eᵀ)), E with outlier rows; ids scalar or [batch, seq]."""
    V, d = 160, 24
    E = outlier_matrix(V, d, seed, 0, k=12)
    ids_shape = [] if scalar else ["batch", "seq"]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="gather")]
    out = graphs.vi("h", ids_shape + [d])
    if tied:
        nodes += [helper.make_node("Transpose", ["E"], ["Et"], name="tr", perm=[1, 0]),
                  helper.make_node("MatMul", ["h", "Et"], ["logits"], name="head")]
        out = graphs.vi("logits", ids_shape + [V])
    return graphs.model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ids_shape)], [out],
                        [numpy_helper.from_array(E, "E")], opset=opset)


TREATMENTS = {
    "lmf": ["--method", "lmf"],
    "hmf": ["--method", "hmf"],
    "hmf-nofold": ["--method", "hmf", "--no-fold"],
    "prune": ["--method", "prune"],
    "int8": ["--quantize", "int8"],
    "lmf+int8": ["--method", "lmf", "--quantize", "int8"],
}


def run_cli(capsys, tmp_path, model, *args):
    src, out, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    code = main([str(src), str(out)][:0] + ["optimize", str(src), str(out), "--force", "-q", "--min-cosine", "0",
                                              "--min-top1", "0", "--keep", "0.6", "--report", str(rep), *map(str, args)])
    _, err = capsys.readouterr()
    return code, err, out, rep


def check_result(model, code, err, out, rep, feeds):
    assert "internal error" not in err and "Traceback" not in err, err
    if code != 0:  # a clean refusal is allowed, never an internal error
        assert code == 2 and err.startswith("onnxhmf: error:") and err.count("\n") == 1, err
        return None
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    new_opset = m.opset_import[0].version
    old_opset = model.opset_import[0].version
    report = json.loads(rep.read_text())
    if new_opset != old_opset:  # changed only by a treatment that needs it, and said so
        assert any("opset" in n and str(new_opset) in n for n in report["notes"]), report["notes"]
    got, want = run_onnxruntime(m, feeds), run_onnxruntime(model, feeds)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype and np.isfinite(got[k]).all()
    return report


def feeds_for(model, rng):
    feeds = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        dims = [d.dim_value or 3 for d in tt.shape.dim]
        if vi.name in {t.name for t in model.graph.initializer}:
            continue
        if tt.elem_type == TensorProto.INT64:
            feeds[vi.name] = rng.integers(0, 160, dims).astype(np.int64)
        elif tt.elem_type == TensorProto.BOOL:
            feeds[vi.name] = np.array(True)
        else:
            feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


# -- issue 13's examples --------------------------------------------------------------------

@pytest.mark.parametrize("opset", [7, 8, 9, 10])
def test_hmf_below_opset_10_emits_slice_with_attributes(opset, tmp_path, capsys):
    model = mlp(opset, ndim=3)
    code, err, out, rep = run_cli(capsys, tmp_path, model, "--method", "hmf", "--no-fold")
    report = check_result(model, code, err, out, rep, feeds_for(model, np.random.default_rng(0)))
    site = next(s for s in report["sites"] if s["weight"] == "W1")
    assert site["status"] == "rewritten" and site["method"] == "hmf" and site["dense"] > 0, site
    assert onnx.load(out).opset_import[0].version == opset


@pytest.mark.parametrize("opset", [7, 9, 11, 12])
@pytest.mark.parametrize("tied", [False, True])
def test_embedding_hmf_below_opset_12(opset, tied, tmp_path, capsys):
    model = embedding(opset, tied)
    code, err, out, rep = run_cli(capsys, tmp_path, model, "--method", "hmf", "--embedding-method", "hmf")
    report = check_result(model, code, err, out, rep, feeds_for(model, np.random.default_rng(0)))
    site = report["sites"][0]
    assert site["status"] == "rewritten" and site["dense"] > 0, site
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert ("Cast" in ops) == (opset < 12)  # the float route for Min/Max only where int32 is not allowed


@pytest.mark.parametrize("opset", [7, 9, 10, 14])
def test_pivoted_tied_head_below_opset_15(opset, tmp_path, capsys):
    """The tied head's pivoted order is restored through Shape → Slice: Slice with attributes
    before opset 10, with inputs from 10 (found by the property below at opset 7)."""
    model = embedding(opset, tied=True, seed=3)
    code, err, out, rep = run_cli(capsys, tmp_path, model, "--method", "lmf", "--embedding-method", "svd")
    assert check_result(model, code, err, out, rep, feeds_for(model, np.random.default_rng(3))) is not None
    assert any(n.op_type == "Slice" for n in onnx.load(out).graph.node) == (opset < 15)


def test_embedding_hmf_scalar_index(tmp_path, capsys):
    model = embedding(17, tied=False, scalar=True)
    code, err, out, rep = run_cli(capsys, tmp_path, model, "--method", "hmf", "--embedding-method", "hmf")
    assert code == 0, err
    report = check_result(model, code, err, out, rep, {"ids": np.array(7, np.int64)})
    assert report["sites"][0]["status"] == "rewritten"
    E = numpy_helper.to_array(model.graph.initializer[0])
    got = run_onnxruntime(onnx.load(out), {"ids": np.array(7, np.int64)})["h"]
    assert got.shape == (24,) and np.corrcoef(got, E[7])[0, 1] > 0.9


@pytest.mark.parametrize("where", ["graph_output", "if_branch"])
def test_hmf_fold_keeps_a_bias_read_elsewhere(where, tmp_path, capsys):
    model = mlp(17, ndim=2, bias_out=where == "graph_output", bias_in_if=where == "if_branch")
    code, err, out, rep = run_cli(capsys, tmp_path, model, "--method", "hmf")
    feeds = feeds_for(model, np.random.default_rng(0))
    report = check_result(model, code, err, out, rep, feeds)
    assert report["sites"][0]["status"] == "rewritten"
    m = onnx.load(out)
    b1 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "b1"))
    np.testing.assert_array_equal(b1, numpy_helper.to_array(model.graph.initializer[1]))  # the exact bias, unpermuted
    got, want = run_onnxruntime(m, feeds), run_onnxruntime(model, feeds)
    other = "b1" if where == "graph_output" else "z"
    np.testing.assert_array_equal(got[other], want[other])


def test_quantize_on_ir3_model_told_why(tmp_path, capsys):
    model = mlp(9, ndim=2)
    model.ir_version = 3
    for t in model.graph.initializer:  # IR 3: every initializer is a graph input
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    code, err, out, rep = run_cli(capsys, tmp_path, model, "--quantize", "int8")
    assert code == 2 and "graph input" in err and err.count("\n") == 1, err
    code, err, out, rep = run_cli(capsys, tmp_path, model)
    assert code == 2 and "also a graph input" in err and "keep_initializers_as_inputs" in err, err


# -- the property: opsets 7-21 x treatments x models -----------------------------------------

@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy noise on stderr counts as a failure
@settings(max_examples=int(40 * SCALE), deadline=None, suppress_health_check=list(HealthCheck))
@given(opset=st.integers(7, 21), treatment=st.sampled_from(sorted(TREATMENTS)),
       kind=st.sampled_from(["mlp2", "mlp3", "gather", "tied", "scalar", "gemm"]), embed=st.sampled_from(["svd", "hmf", "prune"]),
       seed=st.integers(0, 50), gemm=st.tuples(st.sampled_from(["none", "vector", "matrix"]), st.integers(0, 1), st.booleans()))
def test_property_every_opset_and_treatment(tmp_path_factory, capsys, opset, treatment, kind, embed, seed, gemm):
    tmp = tmp_path_factory.mktemp("o")
    if kind == "gemm":  # Gemm with C absent / a vector / a matrix, transB, B behind a Transpose
        model = graphs.gemm_model(48, 40, trans_b=gemm[1], c=gemm[0], via_transpose=gemm[2], seed=seed)
        model.opset_import[0].version = opset
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError:  # (C is optional only from opset 11)
            return
    else:
        model = (mlp(opset, 2 if kind == "mlp2" else 3, seed) if kind.startswith("mlp")
                 else embedding(opset, tied=kind == "tied", scalar=kind == "scalar", seed=seed))
    onnx.checker.check_model(model, full_check=True)
    args = TREATMENTS[treatment] + (["--embedding-method", embed] if "int8" not in treatment else [])
    code, err, out, rep = run_cli(capsys, tmp, model, *args)
    feeds = feeds_for(model, np.random.default_rng(seed)) if kind != "scalar" else {"ids": np.array(seed, np.int64)}
    check_result(model, code, err, out, rep, feeds)


@pytest.mark.parametrize("method", ["lmf", "hmf", "prune"])
@pytest.mark.parametrize("opset", [7, 8])
def test_ir3_constant_weights_factorized_as_constants(method, opset, tmp_path, capsys):
    """IR 3 wants every initializer to be a graph input: new factors become Constant nodes."""
    model = graphs.matmul_model(32, 32, ndim=2, source="constant")
    model.ir_version, model.opset_import[0].version = 3, opset
    onnx.checker.check_model(model, full_check=True)
    code, err, out, rep = run_cli(capsys, tmp_path, model, "--method", method)
    report = check_result(model, code, err, out, rep, {"X": np.ones((2, 32), np.float32)})
    assert report is not None and report["sites"][0]["status"] == "rewritten"
    m = onnx.load(out)
    assert m.ir_version == 3 and all(t.name in {i.name for i in m.graph.input} for t in m.graph.initializer)
