"""Every site variant: found, rewritten with standard ops, exact at full rank, Eckart–Young below it."""
import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import graphs
from onnxhmf import optimize
from onnxhmf.verify import run_onnxruntime

STANDARD_OPS = {"MatMul", "Gemm", "Gather", "Transpose", "Mul", "Add", "If", "Identity", "Constant"}


def feeds_for(model, rows=5, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        if vi.name in {t.name for t in model.graph.initializer}:
            continue
        et = vi.type.tensor_type.elem_type
        dims = [d.dim_value if d.HasField("dim_value") else (2 if i == 0 else rows) for i, d in enumerate(vi.type.tensor_type.shape.dim)]
        if et == onnx.TensorProto.INT64:
            out[vi.name] = rng.integers(0, 200, size=dims).astype(np.int64)
        elif et == onnx.TensorProto.BOOL:
            out[vi.name] = np.array(True)
        else:
            out[vi.name] = rng.standard_normal(dims).astype(onnx.helper.tensor_dtype_to_np_dtype(et))
    return out


def run_both(model):
    onnx.checker.check_model(model, full_check=True)
    feeds = feeds_for(model)
    ort_out = run_onnxruntime(model, feeds)
    ref_out = dict(zip([o.name for o in model.graph.output], ReferenceEvaluator(model).run(None, feeds)))
    return feeds, ort_out, ref_out


def assert_same_interface(a, b):
    assert [(i.name, i.type) for i in a.graph.input] == [(i.name, i.type) for i in b.graph.input]
    assert [(o.name, o.type) for o in a.graph.output] == [(o.name, o.type) for o in b.graph.output]
    assert a.ir_version == b.ir_version
    assert list(a.opset_import) == list(b.opset_import)
    assert {p.key: p.value for p in a.metadata_props}.items() <= {p.key: p.value for p in b.metadata_props}.items()
    assert "onnxhmf" in {p.key for p in b.metadata_props}


def assert_same_outputs(original, out, tol=1e-5):
    """Both models pass the checker and agree in onnxruntime and onnx.reference to ``tol``."""
    _, a_ort, a_ref = run_both(original)
    _, b_ort, b_ref = run_both(out)
    for k in a_ort:
        np.testing.assert_allclose(b_ort[k], a_ort[k], atol=tol, rtol=tol)
        np.testing.assert_allclose(b_ref[k], a_ref[k], atol=tol, rtol=tol)


def check_full_rank(original, rank, n_sites=1):
    out, report = optimize(original, rank=rank, verify=False, pivot=False)  # A·B (pivoted: tests/test_pivot.py)
    assert len(report.rewritten) == n_sites, report.format()
    assert_same_interface(original, out)
    assert {n.op_type for n in out.graph.node} <= STANDARD_OPS
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)
    assert_same_outputs(original, out)
    return out, report


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("source", ["initializer", "constant", "transpose_initializer", "transpose_constant"])
def test_matmul_full_rank_exact(ndim, source):
    model = graphs.matmul_model(48, 40, ndim=ndim, source=source, true_rank=12)
    out, report = check_full_rank(model, rank=12)
    # The dense weight and its Transpose/Constant nodes are gone.
    assert "W" not in {t.name for t in out.graph.initializer}
    assert not any(n.op_type in ("Constant",) for n in out.graph.node)
    assert report.sites[0].rel_error < 1e-6


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("c", ["none", "vector", "matrix"])
@pytest.mark.parametrize("via_transpose", [False, True])
def test_gemm_full_rank_exact(trans_b, alpha, beta, c, via_transpose):
    model = graphs.gemm_model(48, 40, trans_b=trans_b, alpha=alpha, beta=beta, c=c, via_transpose=via_transpose, true_rank=12)
    out, _ = check_full_rank(model, rank=12)
    assert "B" not in {t.name for t in out.graph.initializer}
    if c != "none":
        assert "C" in {t.name for t in out.graph.initializer}


def test_gather_full_rank_exact():
    check_full_rank(graphs.gather_model(200, 32, true_rank=16), rank=16)


def test_tied_table_factorized_once():
    model = graphs.tied_model(200, 32, true_rank=16)
    out, report = check_full_rank(model, rank=16)
    site = report.rewritten[0]
    assert site.ops == "gather+matmul" and len(site.nodes) == 2
    # Stored once: exactly two factor initializers, holding r·(V+d) values, no copy of E.
    factors = [t for t in out.graph.initializer if t.name.startswith("E.")]
    assert len(factors) == 2 and sum(int(np.prod(t.dims)) for t in factors) == 16 * (200 + 32)
    assert "E" not in {t.name for t in out.graph.initializer}


@pytest.mark.parametrize(
    "build,rank,shape",
    [
        (lambda: graphs.matmul_model(48, 40, ndim=2), 7, (48, 40)),
        (lambda: graphs.matmul_model(48, 40, ndim=2, source="transpose_initializer"), 5, (48, 40)),
        (lambda: graphs.gemm_model(48, 40, trans_b=1), 9, (48, 40)),
    ],
)
def test_low_rank_error_is_the_discarded_spectrum(build, rank, shape):
    """Feeding X = I makes the output the effective weight, so ‖Y − Y'‖² = Σ_{i>r} σ_i²."""
    model = build()
    out, report = optimize(model, rank=rank, verify=False, pivot=False)
    m, n = shape
    eye = {"X": np.eye(m, dtype=np.float32)}
    W = run_onnxruntime(model, eye)["Y"].astype(np.float64)
    W_r = run_onnxruntime(out, eye)["Y"].astype(np.float64)
    s = np.linalg.svd(W, compute_uv=False)
    err = np.sum((W - W_r) ** 2)
    assert err == pytest.approx(np.sum(s[rank:] ** 2), rel=1e-3)
    assert report.sites[0].rel_error == pytest.approx(np.sqrt(err / np.sum(W**2)), rel=1e-3)
    assert report.sites[0].params_after == rank * (m + n)


def test_fp16_weight_factorized_in_fp32_stored_fp16():
    model = graphs.matmul_model(48, 40, ndim=2, dtype=np.float16, true_rank=12)
    out, report = optimize(model, rank=12, verify=False)
    inits = {t.name: t for t in out.graph.initializer}
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in inits.values() if t.data_type != onnx.TensorProto.INT32)
    feeds = feeds_for(model)
    np.testing.assert_allclose(run_onnxruntime(out, feeds)["Y"], run_onnxruntime(model, feeds)["Y"], atol=0.05, rtol=0.02)


@pytest.mark.parametrize(
    "build,reason",
    [
        (graphs.shared_with_add_model, "read by Add"),
        (graphs.int_weight_model, "dtype INT64"),
        (graphs.weight_is_input_model, "also a graph input"),  # not a constant: skipped, and told why
    ],
)
def test_unrewritable_weights_are_left_alone(build, reason):
    model = build()
    from onnxhmf.graph.index import GraphIndex
    from onnxhmf.graph.sites import find_weight_groups

    groups = find_weight_groups(GraphIndex(model))
    if reason is None:
        assert groups == []
    else:
        assert len(groups) == 1 and reason in groups[0].skip_reason


def test_weight_read_inside_if_is_rewritten():
    """W is read only inside the If's then branch (an outer-scope read): it is a site now, its
    factors stay in the main graph and the branch's MatMul becomes two (exactness at full rank:
    tests/test_control_flow.py)."""
    model = graphs.if_model()
    out, report = optimize(model, rank=4, verify=False)
    by_name = {s.weight: s for s in report.sites}
    assert by_name["W2"].status == "rewritten" and by_name["W"].status == "rewritten"
    inits = {t.name for t in out.graph.initializer}
    assert "W" not in inits and {"W.lmf_A", "W.lmf_B"} <= inits
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    then_g = next(a.g for a in if_node.attribute if a.name == "then_branch")
    assert [n.op_type for n in then_g.node] == ["MatMul", "MatMul"] and then_g.node[0].input[1] == "W.lmf_A"
    _, b_ort, b_ref = run_both(out)
    np.testing.assert_allclose(b_ort["Y"], b_ref["Y"], atol=1e-4, rtol=1e-4)


def test_input_proto_not_modified():
    model = graphs.tied_model()
    before = model.SerializeToString()
    optimize(model, rank=4, verify=False)
    assert model.SerializeToString() == before


def test_keep_budget_and_skip_when_no_saving():
    model = graphs.matmul_model(48, 40, ndim=2)
    out, report = optimize(model, keep=0.5, verify=False)
    s = report.sites[0]
    # pivoted (the default): r(88 − r) + 40 (index map) ≤ 960 gives r = 12 (A·B: ⌊960/88⌋ = 10)
    assert s.rank == 12 > int(0.5 * 48 * 40 / 88) and s.params_after <= 0.5 * 48 * 40
    assert report.params_after == s.params_after
    with pytest.raises(Exception, match="no compressible weights"):
        optimize(model, rank=30, verify=False, pivot=False)  # 30·88 > 48·40
    with pytest.raises(Exception, match="no compressible weights"):
        optimize(model, rank=40, verify=False)  # pivoted: 40·48 = 48·40


def test_include_exclude_min_params():
    model = graphs.if_model()
    _, report = optimize(model, rank=4, verify=False, include=["mm2"])
    assert [s.weight for s in report.rewritten] == ["W2"]
    with pytest.raises(Exception, match="--exclude"):
        optimize(model, rank=4, verify=False, exclude=["W"])  # W (read in the If) and W2
    with pytest.raises(Exception, match="min-params"):
        optimize(model, rank=4, verify=False, min_params=10**6)
