"""Recurrent ops: the math (factorize/recurrent.py), the op-form rewrite of W, the Scan lowering
(exact against the op in onnxruntime and onnx.reference), and the pass through the API/CLI."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import onnxhmf
from onnxhmf.factorize.recurrent import gate_errors, gate_hmf, input_hmf, shared_input_lmf, stack_inputs
from onnxhmf.factorize.svd import lmf
from onnxhmf.graph.edit import GraphEditor
from onnxhmf.graph.index import GraphIndex
from onnxhmf.graph.recurrent import find_recurrent_sites, rewrite_input_hybrid, rewrite_input_lowrank
from onnxhmf.graph.recurrent_scan import Projection, lower_to_scan, lowering_blocker, r_parts
from onnxhmf.passes.recurrent import RecurrentPass
from recurrent_graphs import feeds, rnn_model

ATOL = 1e-5


def _ort(m, f):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, f)


def _ref(m, f):
    return ReferenceEvaluator(m).run(None, f)


def _max_diff(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def _edit(model, fn):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    index = GraphIndex(m)
    editor = GraphEditor(m)
    site = find_recurrent_sites(index)[0]
    fn(editor, index, site)
    editor.commit()
    onnx.checker.check_model(m)
    return m


# -- math ------------------------------------------------------------------------------------

def test_shared_basis_is_exact_at_full_rank_and_counts_params():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((2, 48, 10))
    b = shared_input_lmf(W, 10)
    assert np.abs(b.reconstruct() - W).max() < 1e-10
    assert b.V.shape == (10, 10) and b.U.shape == (2, 48, 10)
    low = shared_input_lmf(W, 4)
    assert low.params == 4 * (10 + 96)
    # one basis for both directions is the LMF of the stacked matrix: same error
    assert low.factors.residual_sq == pytest.approx(lmf(stack_inputs(W), 4).residual_sq)


def test_whitened_basis_lowers_the_gate_preactivation_error():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((500, 12)) * np.geomspace(10, 0.1, 12)  # anisotropic inputs
    W = rng.standard_normal((2, 32, 12))
    out_err = lambda b: sum(np.sum((X @ (W[d] - b.reconstruct()[d]).T) ** 2) for d in range(2))  # noqa: E731
    plain, white = shared_input_lmf(W, 3), shared_input_lmf(W, 3, X.T @ X, damp=1e-6)
    assert out_err(white) < 0.9 * out_err(plain)


def test_input_hmf_keeps_dense_inputs_exact_within_budget():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((1, 64, 2)) @ rng.standard_normal((1, 2, 20))  # rank 2 ...
    W[0, :, [3, 5, 11]] = rng.standard_normal((3, 64)) * 5  # ... plus 3 independent outlier input features
    budget = 3 * 64 + 2 * (17 + 64)  # room for them dense plus rank 2: exact; LMF gets rank 4 < 5
    hf = input_hmf(W, budget)
    assert hf.params <= budget and hf.axis == 0
    assert set(hf.dense_idx) == {3, 5, 11}
    assert hf.relative_error < 1e-6 < lmf(stack_inputs(W), budget // (20 + 64)).relative_error


def test_gate_hmf_picks_the_sensitive_gate_and_never_loses_to_lmf():
    rng = np.random.default_rng(3)
    H = 16
    Wt = rng.standard_normal((24, 2)) @ rng.standard_normal((2, 4 * H)) * 0.2  # in × 4H, low rank ...
    Wt[:, 3 * H: 3 * H + 4] += rng.standard_normal((24, 4)) * 3  # ... but gate 3 has 4 outlier rows
    budget = Wt.size // 3
    g = gate_hmf(Wt, budget, 4)
    hf = g.factors
    assert hf.params <= budget
    assert hf.k and set(hf.dense_idx) <= set(range(3 * H, 3 * H + 4))  # only outlier rows of gate 3
    assert hf.residual_sq <= min(t[3] for t in g.tried) + 1e-12
    assert hf.relative_error < 1e-6 < lmf(Wt, budget // sum(Wt.shape)).relative_error
    shares = gate_errors(Wt, 2, 4)
    assert shares.sum() == pytest.approx(1.0) and shares.argmax() == 3


# -- graph: op form ----------------------------------------------------------------------------

CASES = [("LSTM", 1, {}), ("LSTM", 2, {"initial": True, "seq_lens": True}), ("GRU", 2, {}),
         ("GRU", 1, {"lbr": 0, "seq_lens": True}), ("RNN", 2, {"initial": True})]


@pytest.mark.parametrize("op,dirs,kw", CASES)
def test_op_form_exact_at_full_rank(op, dirs, kw):
    m = rnn_model(op, dirs=dirs, **kw)
    f = feeds(m)
    base, base_ref = _ort(m, f), _ref(m, f)  # each runtime against itself (onnx.reference and
    # onnxruntime differ on sequence_lens)

    def lowrank(editor, index, site):
        b = shared_input_lmf(index.array(site.W), site.input_size)
        rewrite_input_lowrank(editor, site, b.V, b.U)

    def hybrid(editor, index, site):
        W = index.array(site.W)
        hf = input_hmf(W, 10**6)  # everything fits: all inputs dense
        assert hf.k == site.input_size
        rewrite_input_hybrid(editor, site, hf)

    for fn in (lowrank, hybrid):
        m2 = _edit(m, fn)
        node = next(n for n in m2.graph.node if n.op_type == op)
        assert [a for a in node.attribute] == [a for a in m.graph.node[0].attribute]  # attributes kept
        assert list(node.input[2:]) == list(m.graph.node[0].input[2:])  # R, B, sequence_lens, states kept
        assert _max_diff(base, _ort(m2, f)) < ATOL
        assert _max_diff(base_ref, _ref(m2, f)) < ATOL


def test_op_form_layout_1_in_onnx_reference():
    """onnxruntime refuses layout 1 (batch-first) recurrent ops; onnx.reference runs them."""
    m = rnn_model("LSTM", dirs=2, layout=1, initial=True)
    f = feeds(m)
    base = _ref(m, f)
    m2 = _edit(m, lambda e, i, s: rewrite_input_lowrank(e, s, *(lambda b: (b.V, b.U))(shared_input_lmf(i.array(s.W), 24))))
    assert _max_diff(base, _ref(m2, f)) < ATOL


# -- graph: lowering to Scan ---------------------------------------------------------------------

LOWER = [("LSTM", 1, {}), ("LSTM", 2, {"initial": True}), ("GRU", 1, {"initial": True}), ("GRU", 2, {}),
         ("GRU", 2, {"lbr": 0}), ("RNN", 2, {})]


def _dense_lowering(editor, index, site):
    assert lowering_blocker(site, 17) is None
    R = index.array(site.R)
    lower_to_scan(editor, index, site, Projection("dense", T=stack_inputs(index.array(site.W))),
                  [[Projection("dense", T=t) for t in r_parts(site, R[d])] for d in range(site.dirs)])


@pytest.mark.parametrize("op,dirs,kw", LOWER)
def test_lowering_exact(op, dirs, kw):
    m = rnn_model(op, dirs=dirs, **kw)
    f = feeds(m)
    base = _ort(m, f)
    m2 = _edit(m, _dense_lowering)
    assert {n.op_type for n in m2.graph.node} >= {"Scan", "MatMul"} and op not in {n.op_type for n in m2.graph.node}
    assert _max_diff(base, _ort(m2, f)) < ATOL
    assert _max_diff(base, _ref(m2, f)) < ATOL


def test_lowering_blockers():
    assert "sequence_lens" in lowering_blocker(find_recurrent_sites(GraphIndex(rnn_model("LSTM", seq_lens=True)))[0], 17)
    assert "layout 0" in lowering_blocker(find_recurrent_sites(GraphIndex(rnn_model("GRU", layout=1)))[0], 17)
    assert "opset" in lowering_blocker(find_recurrent_sites(GraphIndex(rnn_model("GRU")))[0], 12)


# -- the pass --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lmf", "hmf"])
@pytest.mark.parametrize("lower", [False, True])
def test_pass_full_rank_exact_and_reports(method, lower):
    m = rnn_model("LSTM", dirs=2, I=20, H=12, low_rank=4)  # rank-4 W and R: rank 4 reproduces them
    f = feeds(m)
    base = _ort(m, f)
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    keep = 0.45 if method == "hmf" else None
    reps = RecurrentPass(method=method, keep=keep, rank=4 if method == "lmf" else None, lower=lower).run(m2)
    onnx.checker.check_model(m2)
    w = next(r for r in reps if r.weight == "W")
    assert w.status == "rewritten" and w.params_after < w.params_before
    assert w.rel_error < 1e-6
    assert _max_diff(base, _ort(m2, f)) < 1e-4
    r = next(r for r in reps if r.weight == "R")
    assert (r.status == "rewritten") == lower
    if lower:
        assert r.params_after < r.params_before and r.rel_error < 1e-6
        assert "Scan" in {n.op_type for n in m2.graph.node}


def test_optimize_api_and_dry_run_list_recurrent_weights():
    m = rnn_model("GRU", dirs=2, I=32, H=16, low_rank=6)
    out, rep = onnxhmf.optimize(m, rank=6, inputs=feeds(m))
    assert rep.passed
    assert [(s.weight, s.status) for s in rep.sites] == [("W", "rewritten"), ("R", "skipped")]
    assert "--lower-recurrent" in rep.sites[1].reason
    _, plan = onnxhmf.optimize(m, keep=0.5, lower_recurrent=True, dry_run=True)
    planned = {d.weight: d for d in plan.decisions if d.changes}
    assert set(planned) == {"W", "R"} and planned["W"].params_after == planned["W"].rank * (32 + 96)
    assert planned["W"].ops == "gru→scan" and "W" in plan.format() and "R" in plan.format()
    assert plan.params_after < plan.params_before
    _, kept = onnxhmf.optimize(m, keep=1.0, dry_run=True)
    assert not [d for d in kept.decisions if d.changes]
    _, fused = onnxhmf.optimize(m, keep=0.5, dry_run=True)
    assert {d.weight: d.changes for d in fused.decisions} == {"W": True, "R": False}


def test_prune_and_selection_skip_recurrent_weights():
    m = rnn_model("LSTM")
    reps = RecurrentPass(method="prune").run(onnx.ModelProto.FromString(m.SerializeToString()))
    assert reps[0].status == "skipped" and "not implemented" in reps[0].reason
    from onnxhmf.options import Selection
    reps = RecurrentPass(selection=Selection(exclude=("^lstm0$",))).run(onnx.ModelProto.FromString(m.SerializeToString()))
    assert reps[0].status == "skipped" and "exclude" in reps[0].reason


def test_cli_lower_recurrent(tmp_path, capsys):
    from onnxhmf.cli import main

    m = rnn_model("LSTM", dirs=2, I=32, H=16, low_rank=6)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    code = main(["optimize", str(src), str(dst), "--rank", "6", "--lower-recurrent", "--input-shapes", "X:5,2,32",
                 "--no-measure"])
    text = capsys.readouterr().out
    assert code == 0, text
    out = onnx.load(dst)
    assert "Scan" in {n.op_type for n in out.graph.node} and "LSTM" not in {n.op_type for n in out.graph.node}
    assert "lstm→scan" in text


def test_calibrated_pass_whitens_w_by_x_and_r_by_y():
    from onnxhmf.calibration import Calibration

    m = rnn_model("GRU", dirs=1, I=32, H=16)
    rng = np.random.default_rng(5)
    basis = rng.standard_normal((3, 32)).astype(np.float32)  # X lives in a 3-D subspace
    cal = Calibration([{"X": (rng.standard_normal((6, 4, 3)) @ basis).astype(np.float32)} for _ in range(4)])
    rp = RecurrentPass(keep=0.3, lower=True)
    rp.calibrate(m, cal)
    assert set(rp.grams) == {"X", "Y"} and rp.grams["X"].shape == (32, 32) and rp.grams["Y"].shape == (16, 16)
    m2 = onnx.ModelProto.FromString(m.SerializeToString())
    reps = {r.weight: r for r in rp.run(m2)}
    assert "whitened by the Gram of Y" in reps["R"].detail
    test = {"X": (rng.standard_normal((5, 2, 3)) @ basis).astype(np.float32)}
    plain = onnx.ModelProto.FromString(m.SerializeToString())
    plain_reps = {r.weight: r for r in RecurrentPass(keep=0.3, lower=True).run(plain)}
    # rank 5 covers the 3-D input subspace: the (damped) output error is far below the Frobenius one
    assert reps["W"].rel_error < 0.2 * plain_reps["W"].rel_error
    err = lambda c: np.abs(_ort(c, test)[0] - _ort(m, test)[0]).max()  # noqa: E731
    assert err(m2) < err(plain)


def test_shared_or_computed_w_is_not_rewritten():
    m = rnn_model("GRU")
    second = onnx.helper.make_node("GRU", ["X", "W", "R"], ["Y2"], name="gru1", hidden_size=16)
    m.graph.node.append(second)
    m.graph.output.append(onnx.helper.make_tensor_value_info("Y2", onnx.TensorProto.FLOAT, [None] * 4))
    sites = find_recurrent_sites(GraphIndex(m))
    assert len(sites) == 2 and all("also read by GRU" in s.skip_reason for s in sites)
    reps = RecurrentPass(keep=0.5).run(m)
    assert all(r.status == "skipped" for r in reps)
    m2 = rnn_model("LSTM")
    m2.graph.input.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [1, 64, 24]))
    assert find_recurrent_sites(GraphIndex(m2)) == []  # an overridable W is not a constant
