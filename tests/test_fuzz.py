"""Property-based fuzzing: random small graphs mixing every site variant the optimizer handles.

Graphs chain MatMul (2-D or 3-D activations; the weight an initializer, a Constant, or a
Transpose of either), Gemm (every transB/alpha/beta/C combination, optionally through a
Transpose), Gather embedding tables (optionally tied to a head that reads Transpose(E)) and
weights shared by several nodes (one read as W, another as Wᵀ); and sometimes a weight the
optimizer must leave alone (on the left of a MatMul, or in a Gemm with transA=1).

(a) Full rank: LMF at rank min(m, n), and HMF with a random dense set and a full-rank rest, are
    exact by construction, so the rewritten graph must reproduce the original. The pass itself
    never picks a rank that saves nothing, so these call the math and the rewrites directly.
(b) Any rank/keep, through the public optimize(): the output passes onnx.checker (full_check),
    runs in onnxruntime and in onnx.reference (which agree), and keeps its I/O signature.

~200 examples in all (derandomized, so CI sees the same graphs every run).
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import graphs
from onnxhmf.api import optimize
from onnxhmf.errors import OnnxHmfError
from onnxhmf.factorize.hmf import hmf_fixed
from onnxhmf.factorize.svd import lmf
from onnxhmf.graph.edit import GraphEditor
from onnxhmf.graph.hybrid import rewrite_embedding_hybrid, rewrite_hybrid
from onnxhmf.graph.index import GraphIndex
from onnxhmf.graph.rewrite import factor_orientation, rewrite_lowrank
from onnxhmf.graph.sites import find_weight_groups
from onnxhmf.verify import make_inputs, run_onnxruntime

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# ONNXHMF_FUZZ_SCALE=10 runs ten times as many examples (a longer local hunt; CI runs scale 1)
SCALE = float(os.environ.get("ONNXHMF_FUZZ_SCALE", "1"))
dims = st.integers(5, 20)


@st.composite
def site_specs(draw, three_d: bool):
    """One linear layer: ("matmul", n, source) | ("gemm", n, transB, alpha, beta, C, via_T) | ("shared", how)."""
    kinds = ["matmul", "shared"] + ([] if three_d else ["gemm"])
    kind = draw(st.sampled_from(kinds))
    if kind == "matmul":
        return ("matmul", draw(dims), draw(st.sampled_from(["initializer", "constant", "transpose_initializer", "transpose_constant"])))
    if kind == "gemm":
        return ("gemm", draw(dims), draw(st.integers(0, 1)), draw(st.sampled_from([1.0, 0.5, -2.0])),
                draw(st.sampled_from([1.0, 0.25, 0.0])), draw(st.sampled_from(["none", "vector", "matrix"])), draw(st.booleans()))
    # the same square W read twice: plainly, then transposed (Transpose node, or Gemm transB on 2-D)
    return ("shared", draw(st.sampled_from(["transpose"] + ([] if three_d else ["gemm_transB"]))))


@st.composite
def random_models(draw) -> onnx.ModelProto:
    three_d = draw(st.booleans())
    d = draw(dims)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    layers = draw(st.lists(site_specs(three_d), min_size=1, max_size=3))
    gather = draw(st.sampled_from(["none", "plain", "tied", "untransposed"]))
    # a weight the optimizer must leave alone: on the left of a MatMul, or in a Gemm with transA=1
    side = draw(st.sampled_from(["none", "none", "left_matmul", "gemm_transA"]))
    lead = ["batch", "seq"] if three_d else ["batch"]
    nodes, inits, inputs, outputs = [], [], [graphs.vi("X", lead + [d])], []
    count = iter(range(100))

    def weight(m, n, source):
        """A name that reads W (m×n) the way ``source`` says."""
        i = next(count)
        W = graphs.matrix(m, n, seed + i)
        stored = W.T.copy() if source.startswith("transpose") else W
        name = f"W{i}"
        if source.endswith("constant"):
            nodes.append(graphs.const_node(name, stored))
        else:
            inits.append(numpy_helper.from_array(stored, name))
        if source.startswith("transpose"):
            nodes.append(helper.make_node("Transpose", [name], [f"{name}_t"], name=f"tr{i}", perm=[1, 0]))
            return f"{name}_t"
        return name

    h, width = "X", d
    for k, spec in enumerate(layers):
        y = f"h{k}"
        if spec[0] == "matmul":
            _, n, source = spec
            nodes.append(helper.make_node("MatMul", [h, weight(width, n, source)], [y], name=f"mm{k}"))
            width = n
        elif spec[0] == "gemm":
            _, n, trans_b, alpha, beta, c, via_t = spec
            # Gemm reads op(B) = B (transB=0) or Bᵀ (transB=1), with op(B) = W (m×n); via_t: B = Transpose(stored)
            i = next(count)
            W = graphs.matrix(width, n, seed + i)
            B = W.T if trans_b else W
            b = f"W{i}"
            inits.append(numpy_helper.from_array((B.T if via_t else B).copy(), b))
            if via_t:
                nodes.append(helper.make_node("Transpose", [b], [f"{b}_t"], name=f"tr{i}", perm=[1, 0]))
                b = f"{b}_t"
            ins = [h, b]
            if c != "none":
                C = rng.standard_normal((n,) if c == "vector" else (1, n)).astype(np.float32)
                inits.append(numpy_helper.from_array(C, f"C{k}"))
                ins.append(f"C{k}")
            nodes.append(helper.make_node("Gemm", ins, [y], name=f"gemm{k}", transB=trans_b, alpha=alpha, beta=beta))
            width = n
        else:
            w = weight(width, width, "initializer")
            nodes.append(helper.make_node("MatMul", [h, w], [f"{y}a"], name=f"sh{k}a"))
            if spec[1] == "transpose":
                nodes.append(helper.make_node("Transpose", [w], [f"{w}_t{k}"], name=f"sh{k}t", perm=[1, 0]))
                nodes.append(helper.make_node("MatMul", [f"{y}a", f"{w}_t{k}"], [y], name=f"sh{k}b"))
            else:
                nodes.append(helper.make_node("Gemm", [f"{y}a", w], [y], name=f"sh{k}b", transB=1))
        h = y
    outputs.append(graphs.vi(h, lead + [width]))
    if gather != "none":
        V, e = draw(st.integers(12, 40)), draw(dims)
        inputs.append(graphs.vi("ids", ["batch", "seq"], TensorProto.INT64))
        inits.append(numpy_helper.from_array(graphs.matrix(V, e, seed + 99), "E"))
        nodes.append(helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed", axis=0))
        outputs.append(graphs.vi("emb", ["batch", "seq", e]))
        if gather == "tied":
            nodes.append(helper.make_node("Transpose", ["E"], ["E_t"], name="head_t", perm=[1, 0]))
            nodes.append(helper.make_node("MatMul", ["emb", "E_t"], ["logits"], name="head"))
            outputs.append(graphs.vi("logits", ["batch", "seq", V]))
        if gather == "untransposed":  # a MatMul reading the table as is: Z = P·E
            inputs.append(graphs.vi("P", ["batch", V]))
            nodes.append(helper.make_node("MatMul", ["P", "E"], ["PE"], name="pe"))
            outputs.append(graphs.vi("PE", ["batch", e]))
    if side != "none":
        p, q = draw(dims), draw(dims)
        L = graphs.matrix(p, q, seed + 77)
        if side == "left_matmul":  # Z = L·X2, X2 (q × cols)
            inits.append(numpy_helper.from_array(L, "L0"))
            inputs.append(graphs.vi("X2", [q, "cols"]))
            nodes.append(helper.make_node("MatMul", ["L0", "X2"], ["Z"], name="left_mm"))
            outputs.append(graphs.vi("Z", [p, "cols"]))
        else:  # Z = X2ᵀ·L, X2 (p × batch)
            inits.append(numpy_helper.from_array(L, "L0"))
            inputs.append(graphs.vi("X2", [p, "batch"]))
            nodes.append(helper.make_node("Gemm", ["X2", "L0"], ["Z"], name="gemm_ta", transA=1))
            outputs.append(graphs.vi("Z", ["batch", q]))
    return graphs.model(nodes, inputs, outputs, inits)


def signature(model: onnx.ModelProto):
    def one(vi):
        tt = vi.type.tensor_type
        return vi.name, tt.elem_type, [d.dim_param or d.dim_value for d in tt.shape.dim]

    init = {t.name for t in model.graph.initializer}
    return [one(v) for v in model.graph.input if v.name not in init], [one(v) for v in model.graph.output]


def full_rank(model: onnx.ModelProto, method: str, rng: np.random.Generator) -> onnx.ModelProto:
    """Rewrite every group at full rank (LMF) or with a random dense set and a full-rank rest (HMF)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    groups = find_weight_groups(index)
    skipped = {g.name: g.skip_reason for g in groups if g.skip_reason}
    assert set(skipped) <= {"L0"}, skipped  # only the deliberately unsupported side weight
    if "L0" in skipped:
        assert "transA" in skipped["L0"]  # (a left-side MatMul weight is not even a candidate)
    groups = [g for g in groups if g.skip_reason is None]
    assert groups
    editor = GraphEditor(out)
    for g in groups:
        gather = any(u.kind == "gather" for u in g.uses)
        transposed = factor_orientation(g)
        W = index.array(g.ref)
        W = W.T if transposed else W
        if method == "lmf":
            f = lmf(W, min(W.shape))
            rewrite_lowrank(editor, g, f.A, f.B, transposed)
            continue
        if gather and any(u.kind != "gather" and not u.transposed for u in g.uses):
            continue  # embedding HMF needs heads that read Eᵀ (the pass uses plain LMF here)
        axis = 0 if gather else int(rng.integers(0, 2))
        side = W.shape[axis]  # columns (axis 1) or rows (axis 0) to choose dense ones from
        dense = np.sort(rng.choice(side, size=int(rng.integers(0, side)), replace=False))
        rest = side - dense.size
        hf = hmf_fixed(W, dense, min(rest, W.shape[1 - axis]), axis=axis)
        assert hf.residual_sq <= 1e-10 * max(hf.total_sq, 1.0)
        if gather:
            rewrite_embedding_hybrid(editor, g, hf)
        else:
            rewrite_hybrid(editor, g, hf, transposed)
    editor.commit()
    return out


def assert_close(ref: dict, got: dict, tol: float = 1e-5):
    assert ref.keys() == got.keys()
    for k in ref:
        r, g = ref[k].astype(np.float64), got[k].astype(np.float64)
        assert r.shape == g.shape and ref[k].dtype == got[k].dtype, k
        scale = max(1.0, float(np.abs(r).max()))
        err = float(np.abs(r - g).max()) / scale
        assert err <= tol, f"{k}: max abs error {err:.3g} (relative to max |ref| {scale:.3g}) > {tol}"


@pytest.mark.parametrize("method", ["lmf", "hmf"])
@settings(max_examples=int(60 * SCALE), **SETTINGS)
@given(model=random_models(), seed=st.integers(0, 1000))
def test_full_rank_reproduces_original(method, model, seed):
    feeds = make_inputs(model, seed=seed)
    ref = run_onnxruntime(model, feeds)
    out = full_rank(model, method, np.random.default_rng(seed))
    onnx.checker.check_model(out, full_check=True)
    assert signature(out) == signature(model)
    names = {t.name for t in out.graph.initializer}
    assert not any(n.startswith("W") and n[1:].isdigit() for n in names)  # dense weights gone
    assert ("E" in names) == (method == "hmf" and "pe" in {n.name for n in model.graph.node})
    assert ("L0" in names) == ("L0" in {t.name for t in model.graph.initializer})  # the unsupported one kept
    assert_close(ref, run_onnxruntime(out, feeds))


@settings(max_examples=int(80 * SCALE), **SETTINGS)
@given(model=random_models(), method=st.sampled_from(["lmf", "hmf", "prune"]), keep=st.floats(0.3, 0.95),
       rank=st.one_of(st.none(), st.integers(1, 12)), seed=st.integers(0, 1000))
def test_any_rank_is_valid_and_runs_everywhere(model, method, keep, rank, seed):
    kw = dict(keep=None, rank=rank) if (rank is not None and method == "lmf") else dict(keep=keep)
    try:
        out, report = optimize(model, method=method, verify=False, seed=seed, **kw)
    except OnnxHmfError as e:  # every site too small for this keep: refused with a reason, nothing else
        assert "no compressible weights" in str(e)
        event("nothing rewritten")
        return
    event(f"{method}: {len(report.rewritten)}/{len(report.sites)} sites rewritten")
    assert report.rewritten
    before = {t.name: t for t in model.graph.initializer}
    if "L0" in before:  # the unsupported weight is skipped with a reason and stored unchanged
        assert any(s.weight == "L0" and s.status == "skipped" and s.reason for s in report.sites) or "left_mm" in {n.name for n in model.graph.node}
        after = next(t for t in out.graph.initializer if t.name == "L0")
        np.testing.assert_array_equal(numpy_helper.to_array(after), numpy_helper.to_array(before["L0"]))
    onnx.checker.check_model(out, full_check=True)
    assert signature(out) == signature(model)
    assert out.ir_version == model.ir_version and list(out.opset_import) == list(model.opset_import)
    feeds = make_inputs(model, seed=seed)
    got = run_onnxruntime(out, feeds)
    sess = ReferenceEvaluator(out)
    ref_rt = dict(zip([o.name for o in out.graph.output], sess.run(None, feeds)))
    assert_close(got, ref_rt, 1e-4)  # the two runtimes agree on the rewritten graph
    if method == "lmf" and all(s.rel_error is not None and s.rel_error < 1e-6 for s in report.rewritten):
        assert_close(run_onnxruntime(model, feeds), got, 1e-4)


def test_hmf_embedding_read_untransposed_falls_back_to_lmf():
    """Dense rows (embedding HMF) need every MatMul to read Eᵀ; with one reading E itself the pass
    must use plain low rank instead of failing (outlier rows make HMF want dense rows here)."""
    E = graphs.matrix(120, 16, decay=0.5)
    E[:5] = np.random.default_rng(0).standard_normal((5, 16)) * 50
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], name="g", axis=0),
             helper.make_node("MatMul", ["P", "E"], ["Z"], name="mm")]
    model = graphs.model(nodes, [graphs.vi("ids", ["b", "s"], TensorProto.INT64), graphs.vi("P", ["b", 120])],
                         [graphs.vi("emb", ["b", "s", 16]), graphs.vi("Z", ["b", 16])], [numpy_helper.from_array(E, "E")])
    out, report = optimize(model, method="hmf", keep=0.5)
    (site,) = report.sites
    assert site.status == "rewritten" and "untransposed" in site.detail and site.params_after <= 0.5 * E.size
    r = int(0.5 * E.size) // sum(E.shape)
    assert site.rank == r and site.rel_error == pytest.approx(lmf(E, r).relative_error)
    assert report.verified and all(o.mean_cosine > 0.9 for o in report.outputs)
    onnx.checker.check_model(out, full_check=True)
