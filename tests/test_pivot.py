"""Pivoted low-rank storage (factorize/pivot.py): exact for the rank-r product, r(m+n−r) numbers."""
import numpy as np
import pytest

import graphs
from onnxhmf.factorize.hmf import hmf
from onnxhmf.factorize.pivot import (
    pivot_factors,
    pivot_hybrid,
    pivoted_breakeven_rank,
    pivoted_params,
    pivoted_rank_for_budget,
    pivoted_rank_for_keep,
)
from onnxhmf.factorize.svd import lmf, rank_for_keep
from onnxhmf.factorize.whiten import weighted_lmf, whitened_hmf


@pytest.mark.parametrize("m,n,r", [(48, 40, 7), (40, 48, 12), (64, 64, 63), (300, 20, 5)])
def test_pivoted_form_reproduces_the_rank_r_product(m, n, r):
    W = graphs.matrix(m, n, seed=m + n)
    f = lmf(W, r)
    p = pivot_factors(f.A, f.B, f.residual_sq, f.total_sq)
    np.testing.assert_allclose(p.reconstruct(), f.A @ f.B, atol=1e-10 * np.abs(W).max())
    assert p.params == pivoted_params(m, n, r) == r * (m + n - r) < f.params
    assert p.F.shape == (m, r) and p.C.shape == (r, n - r)
    assert sorted(p.order.tolist()) == list(range(n))
    # the pivot columns are columns of the product itself
    np.testing.assert_allclose(p.F, (f.A @ f.B)[:, p.order[:r]], atol=1e-10)
    assert p.relative_error == pytest.approx(f.relative_error)


def test_pivots_are_well_conditioned_and_survive_float32():
    W = graphs.matrix(128, 96, seed=3, decay=0.97)
    f = lmf(W, 60)
    p = pivot_factors(f.A, f.B)
    assert np.abs(p.C).max() < 50  # pivoting keeps the coefficients moderate
    F32, C32 = p.F.astype(np.float32), p.C.astype(np.float32)
    W32 = np.concatenate([F32, F32 @ C32], axis=1)[:, p.inverse]
    Wr = f.A @ f.B
    assert np.linalg.norm(W32 - Wr) / np.linalg.norm(Wr) < 1e-5


def test_rank_deficient_factors_drop_absent_directions():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((40, 4)) @ rng.standard_normal((4, 30))  # float64, rank exactly 4
    f = lmf(W, 8)  # 4 of the 8 directions hold (numerically) nothing
    p = pivot_factors(f.A, f.B, f.residual_sq, f.total_sq)
    assert p.rank == 4
    np.testing.assert_allclose(p.reconstruct(), W, atol=1e-9)
    assert np.abs(p.C).max() < 1e3


def test_costs_and_ranks_in_the_pivoted_currency():
    assert pivoted_breakeven_rank(384, 1536) == 383
    for m, n in [(384, 384), (384, 1536), (30522, 384), (7, 3)]:
        assert pivoted_params(m, n, min(m, n)) == m * n  # break-even exactly at full rank
        assert pivoted_params(m, n, min(m, n) - 1) < m * n
        assert pivoted_rank_for_keep(m, n, 1.0) == min(m, n)
        for keep in (0.9, 0.75, 0.5, 0.25, 0.05):
            r = pivoted_rank_for_keep(m, n, keep)
            budget = int(np.floor(keep * m * n + 1e-9))
            assert pivoted_params(m, n, r) <= budget < pivoted_params(m, n, r + 1) or r == min(m, n)
            assert r >= rank_for_keep(m, n, keep)  # never less rank than A·B at the same keep
            # the keep of a rank maps back to that rank (the allocation passes keeps around)
            assert r == 0 or pivoted_rank_for_keep(m, n, pivoted_params(m, n, r) / (m * n)) == r
    assert pivoted_rank_for_keep(384, 384, 0.75) == 192  # square at 0.75: n/2 (A·B: 0.375·n = 144)
    assert rank_for_keep(384, 384, 0.75) == 144
    assert pivoted_rank_for_keep(64, 64, 0.75, multiple=8) == 32
    assert pivoted_rank_for_budget(10, 10, 5) == 0
    assert pivoted_rank_for_budget(10, 10, 100, k=3) == 7
    assert pivoted_params(10, 10, 7, k=3) == 30 + 7 * 10


def test_whitened_factors_pivot_exactly():
    rng = np.random.default_rng(0)
    W = graphs.matrix(32, 24, seed=5)
    X = rng.standard_normal((200, 32)) * np.linspace(0.1, 3, 32)
    f = weighted_lmf(W, 10, X.T @ X)
    p = pivot_factors(f.A, f.B, f.residual_sq, f.total_sq)
    np.testing.assert_allclose(p.reconstruct(), f.A @ f.B, atol=1e-9)


def test_hmf_with_pivots_spends_the_budget_on_rank():
    W = graphs.matrix(64, 48, seed=2, decay=0.95)
    budget = int(0.6 * W.size)
    plain = hmf(W, budget, axis="columns")
    piv = hmf(W, budget, axis="columns", pivoted=True)
    pf = pivot_hybrid(piv.D, piv.dense_idx, piv.rest_idx, piv.A, piv.B, piv.residual_sq, piv.total_sq)
    assert pf.params == pivoted_params(64, 48, piv.rank, piv.k) <= budget
    assert piv.rank > plain.rank and piv.residual_sq < plain.residual_sq
    np.testing.assert_allclose(pf.reconstruct(), piv.reconstruct(), atol=1e-9)
    np.testing.assert_array_equal(pf.F[:, : pf.k], W[:, piv.dense_idx])  # dense columns bit-exact
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 64))
    wh = whitened_hmf(W, budget, X.T @ X, pivoted=True)
    assert pivoted_params(64, 48, wh.rank, wh.k) <= budget


# ----------------------------------------------------------------------------- graphs
import onnx  # noqa: E402
from onnx import external_data_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from onnxhmf import optimize, optimize_file  # noqa: E402
from onnxhmf.verify import run_onnxruntime  # noqa: E402
from test_rewrite import STANDARD_OPS, assert_same_interface, assert_same_outputs, feeds_for, run_both  # noqa: E402

PIVOT_OPS = STANDARD_OPS | {"Concat", "Shape", "Reshape", "Flatten"}


def _exact(original, **kw):
    out, report = optimize(original, verify=False, **kw)
    assert report.rewritten, report.format()
    assert_same_interface(original, out)
    assert {n.op_type for n in out.graph.node} <= PIVOT_OPS | {n.op_type for n in original.graph.node}
    assert_same_outputs(original, out)
    return out, report


@pytest.mark.parametrize("make", [
    lambda: graphs.matmul_model(true_rank=10),
    lambda: graphs.matmul_model(ndim=2, true_rank=10),
    lambda: graphs.matmul_model(source="transpose_initializer", true_rank=10),
    lambda: graphs.matmul_model(source="constant", true_rank=10),
    lambda: graphs.gemm_model(true_rank=10),
    lambda: graphs.gemm_model(trans_b=1, alpha=0.7, beta=0.3, c="vector", true_rank=10),
    lambda: graphs.gemm_model(trans_b=0, alpha=1.5, beta=2.0, c="matrix", via_transpose=True, true_rank=10),
    lambda: graphs.gather_model(true_rank=10),
    lambda: graphs.tied_model(true_rank=10),
], ids=["matmul3d", "matmul2d", "transposed", "constant", "gemm", "gemm_transB_bias", "gemm_via_transpose", "gather", "tied"])
def test_pivoted_rewrite_is_exact_at_full_rank(make):
    model = make()
    out, report = _exact(model, rank=10)
    site = report.rewritten[0]
    m, n = site.shape
    assert site.rank == 10 and "pivoted" in site.detail
    assert site.params_after < 10 * (m + n)  # fewer numbers than A·B at the same rank, index maps included
    names = {t.name for t in out.graph.initializer}
    assert any(x.endswith(".piv_F") for x in names) and any(x.endswith(".piv_C") for x in names)


def test_no_pivot_keeps_a_b():
    model = graphs.matmul_model(true_rank=10)
    out, report = optimize(model, rank=6, verify=False, pivot=False)
    assert report.rewritten[0].params_after == 6 * (48 + 40)
    assert not any(".piv_" in t.name for t in out.graph.initializer)


def test_tied_table_serves_gather_and_head_from_one_pair():
    model = graphs.tied_model(vocab=200, d=32, true_rank=10)
    out, report = _exact(model, rank=10)
    floats = [t for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    assert sorted(tuple(t.dims) for t in floats) == [(10, 22), (200, 10)]  # W_p (V×r), C (r×(d−r)): stored once
    ints = [t for t in out.graph.initializer if t.data_type == onnx.TensorProto.INT32]
    assert max(int(np.prod(t.dims)) for t in ints) <= 32  # maps over the d features, never the V rows


def test_fold_removes_the_gather_and_equals_the_gather_form():
    model = graphs.mlp_model(32, 96, true_rank=12)
    folded, rep = _exact(model, rank=12)
    gathered, rep_g = _exact(model, rank=12, fold=False)
    w1 = {s.weight: s for s in rep.sites}["W1"]
    assert "perm folded" in w1.detail and "perm gather" in {s.weight: s for s in rep_g.sites}["W1"].detail
    assert not any(n.op_type == "Gather" and n.name.startswith("ffn_in") for n in folded.graph.node)
    assert any(n.op_type == "Gather" and n.name.startswith("ffn_in") for n in gathered.graph.node)
    assert "b1" not in {t.name for t in folded.graph.initializer}  # replaced by its permuted copy
    assert w1.params_after < {s.weight: s for s in rep_g.sites}["W1"].params_after  # no index map


def test_keep_buys_more_rank_pivoted():
    model = graphs.matmul_model(64, 64)
    _, piv = optimize(model, keep=0.75, verify=False)
    _, ab = optimize(model, keep=0.75, verify=False, pivot=False)
    assert ab.rewritten[0].rank == 24
    assert piv.rewritten[0].rank == 31  # r(128 − r) + 64 (map) + 2 (shape) ≤ 3072
    assert piv.rewritten[0].params_after <= 0.75 * 64 * 64 < piv.rewritten[0].params_after + 2 * 64
    assert piv.rewritten[0].rel_error < ab.rewritten[0].rel_error


def test_hmf_with_pivots_exact_where_the_hybrid_is(monkeypatch):
    model, dense = graphs.column_hybrid_mlp(monkeypatch)
    for fold in (True, False):
        out, report = _exact(model, method="hmf", keep=0.9, fold=fold)
        w1 = {s.weight: s for s in report.sites}["W1"]
        assert w1.dense == len(dense) and w1.rank == 8 and "pivot" in w1.detail
        assert w1.params_after <= 32 * 20 + 8 * (32 + 96 - 20 - 8) + 96 + 8


def test_pivoted_factors_go_to_an_external_data_file(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(graphs.mlp_model(64, 192, true_rank=16), src, save_as_external_data=True, location="w.bin", size_threshold=0)
    out = tmp_path / "out.onnx"
    report = optimize_file(src, out, rank=16, save_external_data=True, external_data_size_threshold=256)
    assert all("pivoted" in s.detail for s in report.rewritten)
    m = onnx.load(out, load_external_data=False)
    big = [t for t in m.graph.initializer if ".piv_F" in t.name]
    assert big and all(external_data_helper.uses_external_data(t) for t in big)
    feeds = feeds_for(onnx.load(src))
    np.testing.assert_allclose(run_onnxruntime(str(out), feeds)["Y"], run_onnxruntime(str(src), feeds)["Y"], atol=1e-4)


def test_shared_basis_pivoted_over_the_stacked_outputs():
    model = graphs.qkv_model(d=32, n=32, shared_rows=16)
    keep = 0.6
    out, rep = optimize(model, keep=keep, share_bases=True, min_cosine=None)
    details = [s.detail for s in rep.rewritten]
    assert all(d.startswith("shared basis") and "pivoted" in d for d in details), details
    assert sum(s.params_after for s in rep.rewritten) <= keep * 3 * 32 * 32
    ab, rep_ab = optimize(model, keep=keep, share_bases=True, min_cosine=None, pivot=False)
    assert all("pivoted" not in s.detail for s in rep_ab.rewritten)
    assert rep.rewritten[0].rank > rep_ab.rewritten[0].rank  # the same budget buys more shared rank
    X = np.random.default_rng(1).standard_normal((2, 7, 32)).astype(np.float32)
    ref = run_onnxruntime(model, {"X": X})
    err = lambda m: sum(float(np.sum((ref[k] - v) ** 2)) for k, v in run_onnxruntime(m, {"X": X}).items())  # noqa: E731
    assert err(out) < err(ab)
    # rank 16 holds the shared row space (the rest is 1% noise); both runtimes agree
    near, _ = optimize(graphs.qkv_model(d=32, n=32, shared_rows=16), rank=16, share_bases=True, verify=False)
    _, a_ort, a_ref = run_both(graphs.qkv_model(d=32, n=32, shared_rows=16))
    _, b_ort, b_ref = run_both(near)
    for k in a_ort:
        assert np.abs(b_ort[k] - a_ort[k]).max() < 0.01 * np.abs(a_ort[k]).max()
        np.testing.assert_allclose(b_ref[k], b_ort[k], atol=1e-4, rtol=1e-4)


def test_plan_auto_offers_and_assembles_pivoted_treatments(tmp_path):
    """The mixed planner measures pivoted LMF (plmf, plmf-int8, plmf-int8w) beside A·B from one
    measurement per rank: at a rank both forms store, the pivoted one costs fewer bytes; ranks
    above A·B's break-even exist only pivoted. A plan using them assembles and runs."""
    from onnxhmf.graph.index import GraphIndex
    from onnxhmf.graph.sites import find_weight_groups
    from onnxhmf.options import Options
    from onnxhmf.planners.common import pivot_costs
    from onnxhmf.planners.measured import load_for_plan
    from onnxhmf.planners.mixed import _options
    from onnxhmf.passes.factorize import FactorizePass

    model = graphs.token_mlp_model(vocab=300, d=32, h=64)
    p = tmp_path / "calib.npz"
    np.savez(p, **graphs.token_batches(n=128, seed=1))
    options = Options.from_kwargs(calib=str(p), plan={"target_ratio": 0.4})
    c = load_for_plan(model, options, 0.25)
    fpass = FactorizePass(stats=c.stats)
    costs = pivot_costs(model, find_weight_groups(GraphIndex(model)), options)
    opts = _options(model, fpass, c.groups, c.fit, 1, lambda it, *a: it, {}, costs)
    for name, o in opts.items():
        kinds = {x.tag[0] for x in o}
        assert {"lmf", "plmf", "plmf-int8"} <= kinds, (name, kinds)
        ab = {round(x.error, 12): x.cost for x in o if x.tag[0] == "lmf"}
        piv = {round(x.error, 12): x.cost for x in o if x.tag[0] == "plmf"}
        shared = set(ab) & set(piv)
        assert shared and all(piv[e] < ab[e] for e in shared)
        assert min(piv) < min(ab)  # the lowest low-rank loss is at a rank only the pivoted form affords
    out, rep = optimize(model, calib=p, plan={"target_ratio": 0.4}, verify=False)
    _, rep_ab = optimize(model, calib=p, plan={"target_ratio": 0.4}, verify=False, pivot=False)
    assert not any(s["treatment"].startswith("plmf") for s in rep_ab.plan["sites"])
    assert out.ByteSize() <= 0.4 * model.ByteSize() + 1
