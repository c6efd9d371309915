"""Non-finite and degenerate weights x every method: a NaN/Inf weight never reaches a
factorization (it is left untouched with the reason, or the run ends in one clear line), and
degenerate ones (zeros, a constant, rank 1, huge, subnormal, one row or column) give a valid
model. stderr (file descriptor 2, where LAPACK writes) holds nothing but that one line."""
import json
import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import graphs
from onnxhmf.cli import main
from onnxhmf.verify import run_onnxruntime

SCALE = float(os.environ.get("ONNXHMF_FUZZ_SCALE", "1"))  # more examples for a longer hunt


def set_weight(model, name, W):
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(np.asarray(W, np.float32), name))
    return model


def weight(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def relu_model(m=32, n=48):
    """X → MatMul(W1) → Relu → MatMul(W2): an -inf in W1 is harmless where X·W1 stays finite
    (W1[:, j] = -inf only matters if X's row has a non-zero there; the Relu then gives 0)."""
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["Y"], name="mm2")]
    W1, W2 = graphs.matrix(m, n, 0), graphs.matrix(n, m, 1)
    return graphs.model(nodes, [graphs.vi("X", ["batch", m])], [graphs.vi("Y", ["batch", m])],
                        [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")])


def run(capfd, tmp_path, model, *args):
    src, out, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    code = main(["optimize", str(src), str(out), "--force", "-q", "--report", str(rep), *map(str, args)])
    _, err = capfd.readouterr()
    return code, err, out, rep


def test_minus_inf_before_relu_left_untouched_with_reason(tmp_path, capfd):
    model = relu_model()
    W1 = weight(model, "W1").copy()
    W1[3, 5] = -np.inf
    set_weight(model, "W1", W1)
    code, err, out, rep = run(capfd, tmp_path, model, "--method", "hmf", "--min-cosine", "0")
    assert code == 0, err
    report = json.loads(rep.read_text())
    site = next(s for s in report["sites"] if s["weight"] == "W1")
    assert site["status"] == "skipped" and "NaN or Inf" in site["reason"]
    assert next(s for s in report["sites"] if s["weight"] == "W2")["status"] == "rewritten"
    np.testing.assert_array_equal(weight(onnx.load(out), "W1"), W1)  # bit for bit


@pytest.mark.parametrize("method", ["lmf", "hmf", "prune", "int8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_only_weight_is_one_error_line(method, bad, tmp_path, capfd):
    model = graphs.matmul_model(32, 32, ndim=2)
    W = weight(model, "W").copy()
    W[0, 0] = bad
    set_weight(model, "W", W)
    args = ["--quantize", "int8"] if method == "int8" else ["--method", method]
    code, err, out, rep = run(capfd, tmp_path, model, *args)
    assert code == 2 and err.startswith("onnxhmf: error: no compressible weights") and err.count("\n") == 1, err
    assert "NaN or Inf" in err and not out.exists()


def test_inspect_reports_non_finite_weight(tmp_path, capfd):
    model = relu_model()
    W1 = weight(model, "W1").copy()
    W1[0, 0] = np.nan
    p = tmp_path / "in.onnx"
    onnx.save(set_weight(model, "W1", W1), p)
    assert main(["inspect", str(p), "--json"]) == 0
    out, err = capfd.readouterr()
    assert err == ""
    sites = {s["weight"]: s for s in json.loads(out)["sites"]}
    assert "NaN or Inf" in sites["W1"]["skipped"] and sites["W2"]["skipped"] == ""


# -- the property: special values and degenerate shapes x methods --------------------------------

SPECIAL = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
DEGENERATE = ["zeros", "constant", "rank1", "huge", "subnormal", "plain"]
METHODS = {"lmf": ["--method", "lmf"], "hmf": ["--method", "hmf"], "prune": ["--method", "prune"],
           "int8": ["--quantize", "int8"], "lmf+int8": ["--quantize", "int8", "--keep", "0.5"],
           "ae": ["--embedding-method", "ae", "--ae-epochs", "1"], "embed-hmf": ["--method", "hmf", "--embedding-method", "hmf"]}


def degenerate(kind, shape, rng):
    W = graphs.matrix(*shape, seed=int(rng.integers(100)))
    if kind == "zeros":
        return W * 0
    if kind == "constant":
        return np.full(shape, 0.75, np.float32)
    if kind == "rank1":
        return np.outer(W[:, 0], W[0]).astype(np.float32)
    if kind == "huge":
        return (W / np.abs(W).max() * 1e30).astype(np.float32)
    if kind == "subnormal":
        return (W * 1e-40).astype(np.float32)
    return W


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy noise on stderr counts as a failure
@settings(max_examples=int(40 * SCALE), deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["relu", "tied"]), method=st.sampled_from(sorted(METHODS)), shape_kind=st.sampled_from(DEGENERATE),
       special=st.sampled_from([None, "nan", "inf", "-inf"]), n_special=st.integers(1, 5), seed=st.integers(0, 1000))
def test_property_weights_x_methods(tmp_path_factory, capfd, kind, method, shape_kind, special, n_special, seed):
    rng = np.random.default_rng(seed)
    tmp = tmp_path_factory.mktemp("w")
    model = relu_model() if kind == "relu" else graphs.tied_model(120, 24)
    name = "W1" if kind == "relu" else "E"
    W = degenerate(shape_kind, weight(model, name).shape, rng)
    if special is not None:
        idx = rng.integers(0, W.size, n_special)
        W.flat[idx] = SPECIAL[special]
    set_weight(model, name, W)
    code, err, out, rep = run(capfd, tmp, model, *METHODS[method], "--min-cosine", "0", "--min-top1", "0")
    assert "Traceback" not in err and "DLASCL" not in err and "Warning" not in err, err
    if code != 0:
        assert code in (1, 2) and err.startswith("onnxhmf: error:") and err.count("\n") == 1, err
        assert not out.exists()
        return
    assert err == ""
    result = onnx.load(out)
    onnx.checker.check_model(result, full_check=True)
    report = json.loads(rep.read_text())
    if special is not None:  # left untouched, bit for bit, with the reason
        site = next(s for s in report["sites"] if s["weight"] == name)
        assert site["status"] == "skipped" and "NaN or Inf" in site["reason"]
        np.testing.assert_array_equal(weight(result, name), W)
    feeds = {vi.name: (rng.integers(0, 120, (2, 5)) if vi.type.tensor_type.elem_type == onnx.TensorProto.INT64
                       else rng.standard_normal((2, 32)).astype(np.float32)) for vi in model.graph.input}
    if special is not None and "int8" in method:
        return  # Inf activations poison int8's per-tensor activation scale for the whole batch (see docs/safety.md)
    got, want = run_onnxruntime(result, feeds), run_onnxruntime(model, feeds)
    for k in want:  # nothing non-finite where the original is finite
        assert not (np.isfinite(want[k]) & ~np.isfinite(got[k])).any()


@pytest.mark.parametrize("extra", [[], ["--sequential"], ["--plan", "auto", "--target-ratio", "0.5"], ["--method", "hmf"]])
def test_calibrated_paths_with_a_non_finite_weight_one_line(tmp_path, capfd, extra):
    """NaN in W1 makes W2's activations NaN: they never reach the whitening's eigen/SVD routines."""
    model = relu_model()
    W1 = weight(model, "W1").copy()
    W1[0, 0] = np.nan
    set_weight(model, "W1", W1)
    np.savez(tmp_path / "c.npz", X=np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32))
    code, err, out, rep = run(capfd, tmp_path, model, "--calib", tmp_path / "c.npz", "--calib-batch", "4", *extra)
    assert code == 2 and err.startswith("onnxhmf: error: calibration") and err.count("\n") == 1, err
    assert "NaN or Inf" in err and not out.exists()


def test_storage_ae_leaves_a_non_finite_weight(tmp_path, capfd):
    model = relu_model(32, 32)
    W1 = weight(model, "W1").copy()
    W1[0, 0] = np.inf
    set_weight(model, "W1", W1)
    code, err, out, rep = run(capfd, tmp_path, model, "--storage-ae-include", "W.*", "--storage-ae-epochs", "1",
                              "--min-cosine", "0")
    if code == 0:
        np.testing.assert_array_equal(weight(onnx.load(out), "W1"), W1)
        site = next(s for s in json.loads(rep.read_text())["sites"] if s["weight"] == "W1")
        assert site["status"] == "skipped" and "NaN or Inf" in site["reason"], site
    else:
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("flags", [[], ["--keep", "0.5"]])
def test_a_model_whose_own_output_is_all_nan_says_so(flags, tmp_path, capfd):
    """A NaN in a constant that no treatment touches (a bias) makes the input's own output NaN
    everywhere: verification fails saying that, not "mean cosine 0"."""
    model = graphs.mlp_model()
    set_weight(model, "b2", np.full(32, np.nan, np.float32))
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    code = main(["optimize", str(src), str(out), "-q", *flags])
    _, err = capfd.readouterr()
    assert code == 1 and err.count("\n") == 1, err
    assert "Y: the input model's own output is NaN or Inf everywhere" in err and not out.exists()


def test_a_model_whose_own_output_is_nan_in_places_is_compared_where_it_is_finite(tmp_path, capfd):
    """A NaN in part of a constant no treatment touches (one bias entry) makes one output column
    NaN in the input too: the rest is compared, the output is written, and the notes say so."""
    model = graphs.mlp_model()
    b2 = np.zeros(32, np.float32)
    b2[5] = np.nan
    set_weight(model, "b2", b2)
    src, out, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "rep.json"
    onnx.save(model, src)
    assert main(["optimize", str(src), str(out), "-q", "--keep", "0.5", "--report", str(rep)]) == 0, capfd.readouterr()
    report = json.loads(rep.read_text())
    assert out.exists() and report["passed"] and report["outputs"][0]["mean_cosine"] > 0.5
    assert any("own output Y is NaN or Inf in" in n and "compared where it is finite" in n for n in report["notes"])
