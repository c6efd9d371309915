"""`verify` without holes, the default check, generated inputs that say what they could not
make, bad option values as one line, and nothing else on stderr (file descriptor 2)."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxhmf.cli import main
from onnxhmf.verify import run_onnxruntime

I64 = TensorProto.INT64


def run(capfd, *args):
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def one_line(code, err, needle, want=2):
    assert code == want, err
    assert err.startswith("onnxhmf: error:") and err.count("\n") == 1 and needle in err, err


def with_output_tail(model, op_nodes, inits=(), out_type=None):
    """``model`` with extra nodes after its output Y (renamed), e.g. Y = Add(Y0, c)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        n.output[:] = ["Y0" if o == "Y" else o for o in n.output]
    m.graph.node.extend(op_nodes)
    m.graph.initializer.extend(inits)
    if out_type is not None:
        m.graph.output[0].type.tensor_type.elem_type = out_type
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.fixture
def ref(tmp_path):
    p = tmp_path / "ref.onnx"
    onnx.save(graphs.matmul_model(32, 32, ndim=2), p)
    return p


def cand(tmp_path, ref, nodes, inits=(), out_type=None):
    p = tmp_path / "cand.onnx"
    onnx.save(with_output_tail(onnx.load(ref), nodes, inits, out_type), p)
    return p


# -- verify holes ----------------------------------------------------------------------------

def test_verify_default_criterion_fails_a_far_candidate_and_is_stated(ref, tmp_path, capfd):
    c = cand(tmp_path, ref, [helper.make_node("Add", ["Y0", "off"], ["Y"])], [numpy_helper.from_array(np.float32(4750), "off")])
    code, out, err = run(capfd, "verify", ref, c)
    assert code == 1, out + err
    assert "criterion: mean cosine >= 0.9" in out and "verification: FAILED" in out
    code, out, err = run(capfd, "verify", ref, ref)
    assert code == 0 and "criterion: mean cosine >= 0.9" in out and "PASSED" in out


@pytest.mark.parametrize("where", ["one", "all"])
def test_nan_candidate_fails_every_check(ref, tmp_path, capfd, where):
    bad = np.zeros(32, np.float32)
    bad[3 if where == "one" else slice(None)] = np.nan
    c = cand(tmp_path, ref, [helper.make_node("Add", ["Y0", "nan"], ["Y"])], [numpy_helper.from_array(bad, "nan")])
    for args in (["--atol", "1e-3"], ["--rtol", "1e-3"], ["--atol", "1e-3", "--check-error-stat", "mean"], ["--min-cosine", "0"], []):
        code, out, err = run(capfd, "verify", ref, c, *args)
        assert code == 1 and "NaN or Inf where the reference is finite" in out, (args, out)


def test_dtype_change_is_reported(ref, tmp_path, capfd):
    c = cand(tmp_path, ref, [helper.make_node("Cast", ["Y0"], ["Y"], to=TensorProto.FLOAT16)], out_type=TensorProto.FLOAT16)
    code, out, err = run(capfd, "verify", ref, c, "--atol", "1")
    assert code == 1 and "dtype changed float32 -> float16" in out


@pytest.mark.parametrize("spec,needle", [("X:0,32", "positive"), ("X:2147483648,32", "more than"), ("X:-1,32", "positive")])
def test_empty_and_huge_input_shapes_refused(ref, tmp_path, capfd, spec, needle):
    for cmd in (["verify", ref, ref], ["optimize", ref, tmp_path / "o.onnx"]):
        one_line(*run(capfd, *cmd, "--input-shapes", spec)[::2], needle)
    assert not (tmp_path / "o.onnx").exists()


# -- bad option values: one line ----------------------------------------------------------------

def test_bad_option_values_one_line(tmp_path, capfd):
    p = tmp_path / "tok.onnx"
    onnx.save(graphs.token_mlp_model(300, 32, 64), p)
    np.savez(tmp_path / "c.npz", **graphs.token_batches(300, 16, 8))
    out = tmp_path / "o.onnx"
    one_line(*run(capfd, "optimize", p, out, "--seed", "-1")[::2], "--seed")
    one_line(*run(capfd, "verify", p, p, "--seed", "-1")[::2], "--seed")
    one_line(*run(capfd, "optimize", p, out, "--calib", tmp_path / "c.npz", "--damp", "1e308")[::2], "--damp")
    one_line(*run(capfd, "optimize", p, out, "--embedding-method", "ae", "--ae-loss-weights", "nan,0.1")[::2], "--ae-loss-weights")
    one_line(*run(capfd, "optimize", p, out, "--embedding-method", "ae", "--ae-loss-weights", "0.1,inf")[::2], "--ae-loss-weights")
    assert not out.exists()


# -- the default check ------------------------------------------------------------------------------

def test_default_check_has_top1_for_logits(tmp_path, capfd):
    """Cosine on logits passes a model that changes a third of the argmaxes; top-1 does not."""
    p = tmp_path / "tied.onnx"
    onnx.save(graphs.tied_model(200, 32), p)
    code, out, err = run(capfd, "optimize", p, tmp_path / "o.onnx", "--rank", "8")
    one_line(code, err, "top-1 agreement", want=1)
    assert "criterion: mean cosine >= 0.9; top-1 agreement >= 0.9" in out
    cos = float(out.split("logits")[1].split()[3])  # the table's cosine column: high, yet top-1 fails
    assert cos > 0.9
    code, out, err = run(capfd, "optimize", p, tmp_path / "o.onnx", "--rank", "8", "--min-top1", "0.5", "-q")
    assert code == 0, err


@pytest.mark.slow
def test_glassllm_at_keep_075_fails_on_top1(glassllm_path, tmp_path, capfd):
    """--keep 0.75 (the default before the fidelity-target planner): logits cosine 0.97, top-1 0.60."""
    code, out, err = run(capfd, "optimize", glassllm_path, tmp_path / "o.onnx", "-q", "--keep", "0.75")
    one_line(code, err, "top-1 agreement", want=1)
    assert not (tmp_path / "o.onnx").exists()


# -- --quantize int8 keeps the factorizer's rules -------------------------------------------------

def test_int8_keeps_graph_inputs_outputs_and_says_opset(tmp_path, capfd):
    d = 32
    W, Wi, Wo = graphs.matrix(d, d, 0), graphs.matrix(d, d, 1), graphs.matrix(d, d, 2)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["a"], name="mm"), helper.make_node("MatMul", ["a", "Wi"], ["b"], name="mmi"),
             helper.make_node("MatMul", ["b", "Wo"], ["Y"], name="mmo")]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(Wi, "Wi"), numpy_helper.from_array(Wo, "Wo")]
    model = graphs.model(nodes, [graphs.vi("X", ["batch", d]), graphs.vi("Wi", [d, d])],
                         [graphs.vi("Y", ["batch", d]), graphs.vi("Wo", [d, d])], inits, opset=9)
    p, out, rep = tmp_path / "in.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, p)
    code, _, err = run(capfd, "optimize", p, out, "--keep", "1", "--quantize", "int8", "-q", "--report", rep)
    assert code == 0, err
    m = onnx.load(out)
    assert "Wi" in {i.name for i in m.graph.input}  # still an input the caller may feed
    inits = {t.name: t for t in m.graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(inits["Wi"]), Wi)
    np.testing.assert_array_equal(numpy_helper.to_array(inits["Wo"]), Wo)
    assert "W" not in inits  # the plain weight was quantized
    notes = json.loads(rep.read_text())["notes"]
    assert any("'Wi' stays float" in n and "graph input" in n for n in notes)
    assert any("'Wo' stays float" in n and "graph output" in n for n in notes)
    assert any("raised from 9 to 11" in n for n in notes) and m.opset_import[0].version == 11
    x = np.random.default_rng(0).standard_normal((2, d)).astype(np.float32)
    wi = np.eye(d, dtype=np.float32)
    got = run_onnxruntime(m, {"X": x, "Wi": wi})
    np.testing.assert_array_equal(got["Wo"], Wo)
    np.testing.assert_allclose(got["Y"], x @ W @ wi @ Wo, rtol=0.1, atol=0.1)


# -- generated inputs: made right, or the input named with how to give it ------------------------

def gather_axis1_model():
    T = graphs.matrix(40, 8, 3)  # ids index T's 8 columns, not its 40 rows
    W = graphs.matrix(40, 32, 4)
    nodes = [helper.make_node("Gather", ["T", "ids"], ["g"], name="g", axis=1),
             helper.make_node("Transpose", ["g"], ["gt"], name="t", perm=[1, 2, 0]),
             helper.make_node("MatMul", ["gt", "W"], ["Y"], name="mm")]
    return graphs.model(nodes, [graphs.vi("ids", ["batch", "seq"], I64)], [graphs.vi("Y", ["batch", "seq", 32])],
                        [numpy_helper.from_array(T, "T"), numpy_helper.from_array(W, "W")])


def positions_model(table=32):
    E, P, W = graphs.matrix(300, 32, 0), graphs.matrix(table, 32, 1), graphs.matrix(32, 32, 2)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["e"], name="ge"),
             helper.make_node("Gather", ["P", "position_ids"], ["p"], name="gp"),
             helper.make_node("Add", ["e", "p"], ["x"], name="add"), helper.make_node("MatMul", ["x", "W"], ["Y"], name="mm")]
    return graphs.model(nodes, [graphs.vi("input_ids", ["batch", "seq"], I64), graphs.vi("position_ids", ["batch", "seq"], I64)],
                        [graphs.vi("Y", ["batch", "seq", 32])],
                        [numpy_helper.from_array(E, "E"), numpy_helper.from_array(P, "P"), numpy_helper.from_array(W, "W")])


def scalar_rate_model():
    W = graphs.matrix(32, 32, 0)
    nodes = [helper.make_node("Mul", ["X", "sample_rate"], ["xs"], name="scale"), helper.make_node("MatMul", ["xs", "W"], ["Y"], name="mm")]
    return graphs.model(nodes, [graphs.vi("X", ["batch", 32]), graphs.vi("sample_rate", [])], [graphs.vi("Y", ["batch", 32])],
                        [numpy_helper.from_array(W, "W")])


def frames_model(frame=400):
    """audio [batch, samples] → Reshape to [-1, frame]: the sample count must be a multiple of the frame."""
    W = graphs.matrix(frame, 16, 0)
    nodes = [helper.make_node("Reshape", ["audio", "shape"], ["frames"], name="frame"),
             helper.make_node("MatMul", ["frames", "W"], ["Y"], name="mm")]
    return graphs.model(nodes, [graphs.vi("audio", ["batch", "samples"])], [graphs.vi("Y", ["n", 16])],
                        [numpy_helper.from_array(np.array([-1, frame], np.int64), "shape"), numpy_helper.from_array(W, "W")])


def test_ids_for_gather_on_axis_1_generated_below_that_axis(tmp_path, capfd):
    p = tmp_path / "in.onnx"
    onnx.save(gather_axis1_model(), p)
    code, out, err = run(capfd, "optimize", p, tmp_path / "o.onnx", "-q", "--min-cosine", "0")
    assert code == 0 and err == "", err


def test_position_ids_past_the_table_named(tmp_path, capfd):
    p = tmp_path / "in.onnx"
    onnx.save(positions_model(32), p)
    out = tmp_path / "o.onnx"
    one_line(*run(capfd, "optimize", p, out)[::2], "--input-shapes position_ids:2,32")
    one_line(*run(capfd, "verify", p, p)[::2], "input 'position_ids'")
    code, _, err = run(capfd, "optimize", p, out, "-q", "--min-cosine", "0", "--input-shapes", "position_ids:2,32",
                       "--input-shapes", "input_ids:2,32")
    assert code == 0 and err == "", err


def test_scalar_sample_rate_named_and_given_with_inputs(tmp_path, capfd):
    p = tmp_path / "in.onnx"
    onnx.save(scalar_rate_model(), p)
    out = tmp_path / "o.onnx"
    one_line(*run(capfd, "optimize", p, out)[::2], "'sample_rate' is a scalar")
    np.savez(tmp_path / "f.npz", X=np.ones((2, 32), np.float32), sample_rate=np.float32(16000))
    code, _, err = run(capfd, "optimize", p, out, "-q", "--inputs", tmp_path / "f.npz")
    assert code == 0 and err == "", err


def test_fixed_frame_length_failure_names_generated_inputs_no_ort_log(tmp_path, capfd):
    p = tmp_path / "in.onnx"
    onnx.save(frames_model(400), p)
    out = tmp_path / "o.onnx"
    code, _, err = run(capfd, "optimize", p, out)
    one_line(code, err, "onnxruntime failed")
    assert "audio 2x64 random normal" in err and "symbolic batch, samples set by default" in err
    assert "--input-shapes" in err and "--inputs" in err and "[E:onnxruntime" not in err
    code, _, err = run(capfd, "optimize", p, out, "-q", "--input-shapes", "audio:2,800")
    assert code == 0 and err == "", err


def test_quiet_has_no_numpy_warnings_on_exact_zeros(tmp_path, capfd):
    """Outputs with exact zeros (a Relu) give infinite relative errors: no RuntimeWarning, with -q or without."""
    W = graphs.matrix(32, 32, 0)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["Y"], name="relu")]
    model = graphs.model(nodes, [graphs.vi("X", ["batch", 32])], [graphs.vi("Y", ["batch", 32])], [numpy_helper.from_array(W, "W")])
    p = tmp_path / "in.onnx"
    onnx.save(model, p)
    code, _, err = run(capfd, "optimize", p, tmp_path / "o.onnx", "-q", "--min-cosine", "0")
    assert code == 0 and err == "", err
    code, out, err = run(capfd, "verify", p, tmp_path / "o.onnx", "--min-cosine", "0")
    assert code == 0 and err == "", err


# -- the property: hostile option values -------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FLOAT_OPTIONS = {  # option: extra arguments it needs
    "--keep": [], "--min-cosine": [], "--min-top1": [], "--damp": ["CALIB"], "--min-fidelity": ["CALIB"],
    "--ae-lr": ["--embedding-method", "ae", "--ae-epochs", "1"], "--storage-ae-keep": ["--storage-ae-include", "W1"],
    "--target-ratio": ["CALIB", "--plan", "auto"], "--target-fidelity": ["CALIB", "--plan", "auto"],
    "--max-latency-ratio": ["CALIB", "--plan", "auto", "--target-ratio", "0.5"], "--atol": [], "--rtol": [],
}
HOSTILE = ["nan", "-nan", "inf", "-inf", "1e308", "-1e308", "-1", "0", "1e-320", "2", "x", ""]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy noise on stderr counts as a failure
@settings(max_examples=int(40 * float(__import__("os").environ.get("ONNXHMF_FUZZ_SCALE", "1"))), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(option=st.sampled_from(sorted(FLOAT_OPTIONS)), value=st.sampled_from(HOSTILE))
def test_property_hostile_option_values(tmp_path_factory, capfd, option, value):
    """Any value of any numeric option: exit 0, or one error line (exit 1 or 2); no traceback,
    and never an input or stray file changed."""
    tmp = tmp_path_factory.mktemp("opt")
    p = tmp / "tok.onnx"
    onnx.save(graphs.token_mlp_model(300, 32, 64), p)
    np.savez(tmp / "c.npz", **graphs.token_batches(300, 32, 8))
    extra = [str(tmp / "c.npz") if a == "CALIB" else a for a in FLOAT_OPTIONS[option]]
    extra = [x for a in extra for x in (["--calib", a] if a.endswith("c.npz") else [a])]
    before = sorted(tmp.iterdir())
    code, out, err = run(capfd, "optimize", p, tmp / "o.onnx", "-q", "--calib-batch", "8", *extra, f"{option}={value}")
    assert "Traceback" not in err and "Warning" not in err, err
    if code != 0:
        assert code in (1, 2) and err.startswith("onnxhmf: error:") and err.count("\n") == 1, err
        assert sorted(tmp.iterdir()) == before
    else:
        assert err == "" and (tmp / "o.onnx").exists()


def test_the_cosine_is_over_the_rows_whose_reference_is_finite():
    """The input's own output NaN in places (a NaN in one row of a tied table): there is nothing
    to be alike to there; the rest is compared, and a candidate row NaN where the reference is
    finite counts as nothing alike."""
    from onnxhmf.verify import check_outputs, compare_outputs

    rng = np.random.default_rng(0)
    r = rng.standard_normal((4, 8)).astype(np.float32)
    r[1] = np.nan
    r[:, 0] = np.nan  # (a NaN row of a tied table: one NaN column in every row)
    c = r + 1e-3 * rng.standard_normal(r.shape).astype(np.float32)
    s = compare_outputs({"y": r}, {"y": c})[0]
    assert s.mean_cosine > 0.999
    assert check_outputs({"y": r}, {"y": c}, [s], min_cosine=0.99, min_top1=None, atol={"y": 1.0}) == []
    c[2] = np.nan  # NaN where the reference is finite: a row that counts 0, and its own failure
    s = compare_outputs({"y": r}, {"y": c})[0]
    assert s.mean_cosine == pytest.approx(2 / 3, abs=1e-3)
    fails = check_outputs({"y": r}, {"y": c}, [s], min_cosine=0.99, min_top1=None, atol={"y": 1.0})
    assert any("NaN or Inf where the reference is finite" in f for f in fails) and any("mean cosine" in f for f in fails)
