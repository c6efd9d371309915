"""HMF and pruning rewrites: exact where the factors are exact, folded or gathered permutations,
embedding rows bit-exact for dense tokens, parameter accounting equal to what is stored."""
import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import graphs
from onnxhmf import optimize
from onnxhmf.executor import execute
from onnxhmf.options import Options
from onnxhmf.planners.uniform import uniform_plan
from onnxhmf.factorize.hmf import hmf_fixed
from onnxhmf.graph.edit import GraphEditor
from onnxhmf.graph.hybrid import rewrite_embedding_hybrid, rewrite_hybrid
from onnxhmf.graph.index import GraphIndex
from onnxhmf.graph.sites import find_weight_groups
from onnxhmf.verify import run_onnxruntime
from test_rewrite import feeds_for

STANDARD = {"MatMul", "Gemm", "Gather", "Transpose", "Concat", "Add", "Sub", "Mul", "Div", "Min", "Max", "Erf", "Identity",
            "Shape", "Slice", "Reshape"}


def rewrite_with(model, make_hf, embedding=False):
    """Apply hand-made hybrid factors to the model's only weight group."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    (group,) = [g for g in find_weight_groups(index) if g.skip_reason is None]
    transposed = all(u.transposed for u in group.uses) and not embedding
    W = index.array(group.ref)
    hf = make_hf(W.T if transposed else W)
    ed = GraphEditor(out)
    stored = rewrite_embedding_hybrid(ed, group, hf) if embedding else rewrite_hybrid(ed, group, hf, transposed)
    ed.commit()
    onnx.checker.check_model(out, full_check=True)
    return out, stored


def assert_outputs_close(a, b, atol=1e-5, feeds=None):
    feeds = feeds or feeds_for(a)
    ra, rb = run_onnxruntime(a, feeds), run_onnxruntime(b, feeds)
    ref_b = ReferenceEvaluator(b).run(None, feeds)
    for (k, x), y in zip(ra.items(), ref_b):
        np.testing.assert_allclose(rb[k], x, atol=atol, rtol=1e-5)
        np.testing.assert_allclose(y, x, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("source", ["initializer", "transpose_initializer", "constant"])
def test_linear_hmf_exact_when_rest_is_low_rank(axis, source):
    model = graphs.matmul_model(48, 40, ndim=3, source=source, true_rank=10)
    dense = np.array([1, 5, 17, 30])
    out, stored = rewrite_with(model, lambda W: hmf_fixed(W, dense, 10, axis=axis))
    assert [(v.name, v.type) for v in out.graph.input] == [(v.name, v.type) for v in model.graph.input]
    assert [(v.name, v.type) for v in out.graph.output] == [(v.name, v.type) for v in model.graph.output]
    assert {n.op_type for n in out.graph.node} <= STANDARD
    assert_outputs_close(model, out)
    # Everything stored is counted: factors plus the int32 index map(s).
    new = [t for t in out.graph.initializer]
    assert sum(int(np.prod(t.dims)) for t in new) == stored


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta,c", [(1.0, 1.0, "none"), (0.5, 2.0, "vector"), (1.0, 1.0, "matrix")])
@pytest.mark.parametrize("axis", [0, 1])
def test_gemm_hmf_keeps_semantics(trans_b, alpha, beta, c, axis):
    model = graphs.gemm_model(48, 40, trans_b=trans_b, alpha=alpha, beta=beta, c=c, true_rank=10)
    out, _ = rewrite_with(model, lambda W: hmf_fixed(W, np.array([0, 9, 33]), 10, axis=axis))
    assert_outputs_close(model, out)


def test_embedding_hmf_dense_rows_bit_exact_and_tied_head_exact():
    model = graphs.tied_model(200, 32, true_rank=8)
    dense = np.array([0, 3, 4, 150, 199])
    out, stored = rewrite_with(model, lambda E: hmf_fixed(E, dense, 8, axis=0), embedding=True)
    names = {t.name for t in out.graph.initializer}
    assert "E" not in names  # stored once, as factors
    assert stored == sum(int(np.prod(t.dims)) for t in out.graph.initializer if t.name.startswith("E."))
    ids = np.array([[0, 3, 4, 150, 199, 7, 8, 100]], np.int64)
    assert_outputs_close(model, out, atol=1e-5, feeds={"ids": ids})
    # The Gather path alone: dense tokens' rows are bit-exact.
    emb = onnx.ModelProto()
    emb.CopyFrom(out)
    gather_out = next(n for n in emb.graph.node if n.name == "embed/hmf/Add").output[0]
    emb.graph.output.append(onnx.helper.make_tensor_value_info(gather_out, onnx.TensorProto.FLOAT, None))
    rows = run_onnxruntime(emb, {"ids": ids[:, :5]})[gather_out][0]
    E = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "E"))
    assert np.array_equal(rows, E[dense])


def test_fold_removes_the_permutation_and_matches_gather_form():
    model = graphs.mlp_model(32, 96, true_rank=None)
    folded, rep_f = optimize(model, method="hmf", keep=0.6, verify=False, pivot=False)  # today's HMF
    gathered, rep_g = optimize(model, method="hmf", keep=0.6, verify=False, fold=False, pivot=False)
    ffn_in = {s.weight: s for s in rep_f.sites}["W1"]
    if ffn_in.dense and "cols" in ffn_in.detail:
        assert "folded" in ffn_in.detail
        assert not any(n.op_type == "Gather" for n in folded.graph.node)
        assert any(n.op_type == "Gather" for n in gathered.graph.node)
        assert {s.weight: s for s in rep_g.sites}["W1"].params_after > ffn_in.params_after  # inv map saved
    feeds = feeds_for(model)
    np.testing.assert_allclose(run_onnxruntime(folded, feeds)["Y"], run_onnxruntime(gathered, feeds)["Y"], atol=1e-4)


def test_fold_forced_columns_exact_at_full_budget(monkeypatch):
    """Columns HMF on W1 with exact factors: folded output equals the original."""
    model, _ = graphs.column_hybrid_mlp(monkeypatch)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    reports = execute(out, uniform_plan(out, Options.from_kwargs(method="hmf", keep=0.9))).sites
    by = {r.weight: r for r in reports}
    assert "folded" in by["W1"].detail
    assert not any(n.op_type == "Gather" and n.name.startswith("ffn_in") for n in out.graph.node)
    assert "b1" not in {t.name for t in out.graph.initializer}  # replaced by its permuted copy
    onnx.checker.check_model(out, full_check=True)
    W2_err = by["W2"].rel_error
    feeds = feeds_for(model)
    if W2_err < 1e-6:
        assert_outputs_close(model, out, atol=1e-4)
    else:  # W2 itself compressed: compare with the same compression without folding
        monkeypatch.setattr(fz, "hmf", exact_cols)
        ref = onnx.ModelProto()
        ref.CopyFrom(model)
        execute(ref, uniform_plan(ref, Options.from_kwargs(method="hmf", keep=0.9, fold=False)))
        np.testing.assert_allclose(run_onnxruntime(out, feeds)["Y"], run_onnxruntime(ref, feeds)["Y"], atol=1e-4)


@pytest.mark.parametrize("keep", [0.3, 0.6])
def test_hmf_pass_respects_budget_and_accounting(keep):
    model = graphs.mlp_model(32, 96)
    out, rep = optimize(model, method="hmf", keep=keep, verify=False)
    for s in rep.rewritten:
        assert s.params_after <= keep * s.params_before
    stored = sum(int(np.prod(t.dims)) for t in out.graph.initializer)
    assert stored == rep.params_after


def test_prune_pass_keeps_exactly_budget_nonzeros():
    model = graphs.mlp_model(32, 96)
    out, rep = optimize(model, method="prune", keep=0.4, verify=False)
    W1 = onnx.numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "W1"))
    assert np.count_nonzero(W1) == int(0.4 * 32 * 96) == {s.weight: s for s in rep.sites}["W1"].params_after
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]  # same graph, zeros inside


def test_embedding_hmf_without_tied_head():
    model = graphs.gather_model(200, 32, true_rank=8)
    dense = np.array([2, 50, 51])
    out, stored = rewrite_with(model, lambda E: hmf_fixed(E, dense, 8, axis=0), embedding=True)
    assert not any(t.name.endswith("hmf_inv") for t in out.graph.initializer)  # no head, no inverse map
    ids = np.array([[2, 50, 51, 0, 199, 7]], np.int64)
    assert_outputs_close(model, out, feeds={"ids": ids})
