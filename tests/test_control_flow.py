"""Weights inside If/Loop/Scan bodies: found in every graph, rewritten where they are read,
factorized once when read inside and outside, exact at full rank in onnxruntime and onnx.reference."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import graphs
from onnxhmf import optimize
from onnxhmf.calibration import Calibration
from onnxhmf.capture import capture_stats
from onnxhmf.factorize.prune import magnitude_prune
from onnxhmf.graph.index import GraphIndex
from onnxhmf.graph.sites import find_weight_groups
from onnxhmf.verify import run_onnxruntime

M, R = 24, 4  # width of every activation, true rank of every weight
vi, init = graphs.vi, numpy_helper.from_array


def w(seed, m=M, n=M):
    return graphs.matrix(m, n, seed=seed, true_rank=R)


def if_model():
    """An If on a bool input. then: MatMul on its own initializer Wb, Relu, Gemm(transB) on a
    Constant Gc, MatMul on Transpose(outer T). else: MatMul on its own initializer also named
    Wb, and on the outer Ws, which the main graph reads too; Gather of a body table E."""
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "Wb"], ["t0"], name="then_mm"),
         helper.make_node("Relu", ["t0"], ["t1"], name="then_relu"),
         graphs.const_node("Gc", w(2)),
         helper.make_node("Gemm", ["t1", "Gc", "bias"], ["t2"], name="then_gemm", transB=1, alpha=0.5),
         helper.make_node("Transpose", ["T"], ["Tt"], name="then_tr", perm=[1, 0]),
         helper.make_node("MatMul", ["t2", "Tt"], ["t"], name="then_mm2")],
        "then", [], [vi("t", ["batch", M])], [init(w(1), "Wb")])
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "Wb"], ["e0"], name="else_mm"),
         helper.make_node("MatMul", ["e0", "Ws"], ["e1"], name="else_mm_shared"),
         helper.make_node("Gather", ["E", "ids"], ["e2"], name="else_gather"),
         helper.make_node("Add", ["e1", "e2"], ["e"], name="else_add")],
        "else", [], [vi("e", ["batch", M])], [init(w(3), "Wb"), init(graphs.matrix(40, M, seed=4, true_rank=R), "E")])
    nodes = [
        helper.make_node("MatMul", ["X", "Ws"], ["Y0"], name="main_mm"),
        helper.make_node("If", ["cond"], ["Y1"], name="vad", then_branch=then_g, else_branch=else_g),
        helper.make_node("Add", ["Y0", "Y1"], ["Y"], name="main_add"),
    ]
    inits = [init(w(5), "Ws"), init(w(6), "T"), init(np.linspace(-1, 1, M).astype(np.float32), "bias")]
    return graphs.model(nodes, [vi("X", ["batch", M]), vi("ids", ["batch"], TensorProto.INT64), vi("cond", [], TensorProto.BOOL)],
                        [vi("Y", ["batch", M])], inits)


def loop_model():
    """Loop (2 trips) whose body reads the outer Wo and holds an If, whose then branch holds
    Wi: a weight two bodies deep."""
    inner_then = helper.make_graph([helper.make_node("MatMul", ["h1", "Wi"], ["it"], name="inner_mm")], "it", [],
                                   [vi("it", ["batch", M])], [init(w(7), "Wi")])
    inner_else = helper.make_graph([helper.make_node("Identity", ["h1"], ["ie"], name="inner_id")], "ie", [],
                                   [vi("ie", ["batch", M])])
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "Wo"], ["h0"], name="body_mm"),
         helper.make_node("Tanh", ["h0"], ["h1"], name="body_tanh"),
         helper.make_node("If", ["cond"], ["h_out"], name="inner_if", then_branch=inner_then, else_branch=inner_else),
         helper.make_node("Identity", ["c_in"], ["c_out"], name="body_c")],
        "body", [vi("i", [], TensorProto.INT64), vi("c_in", [], TensorProto.BOOL), vi("h_in", ["batch", M])],
        [vi("c_out", [], TensorProto.BOOL), vi("h_out", ["batch", M])])
    nodes = [helper.make_node("Loop", ["trips", "", "X"], ["Y"], name="loop", body=body)]
    inits = [init(w(8), "Wo"), init(np.array(2, np.int64), "trips")]
    return graphs.model(nodes, [vi("X", ["batch", M]), vi("cond", [], TensorProto.BOOL)], [vi("Y", ["batch", M])], inits)


def scan_model():
    """An RNN cell as a Scan: h' = Tanh(x_t·Wx + h·Wh), Wx a body initializer, Wh outer."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "Wx"], ["a"], name="scan_mm_x"),
         helper.make_node("MatMul", ["h", "Wh"], ["b"], name="scan_mm_h"),
         helper.make_node("Add", ["a", "b"], ["s"], name="scan_add"),
         helper.make_node("Tanh", ["s"], ["h_next"], name="scan_tanh"),
         helper.make_node("Identity", ["h_next"], ["y_t"], name="scan_y")],
        "cell", [vi("h", ["batch", M]), vi("x_t", ["batch", M])], [vi("h_next", ["batch", M]), vi("y_t", ["batch", M])],
        [init(w(9), "Wx")])
    nodes = [helper.make_node("Scan", ["H0", "X"], ["H", "Ys"], name="rnn", body=body, num_scan_inputs=1)]
    return graphs.model(nodes, [vi("H0", ["batch", M]), vi("X", ["seq", "batch", M])],
                        [vi("H", ["batch", M]), vi("Ys", ["seq", "batch", M])], [init(w(10), "Wh")])


def feeds(model, cond=True, seed=0, batch=3):
    rng = np.random.default_rng(seed)
    out = {}
    for i in model.graph.input:
        dims = [d.dim_value or {"batch": batch, "seq": 5}[d.dim_param] for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == TensorProto.BOOL:
            out[i.name] = np.array(cond)
        elif i.type.tensor_type.elem_type == TensorProto.INT64:
            out[i.name] = rng.integers(0, 40, dims).astype(np.int64)
        else:
            out[i.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def outputs(model, f):
    ort = run_onnxruntime(model, f)
    ref = dict(zip([o.name for o in model.graph.output], ReferenceEvaluator(model).run(None, f)))
    return ort, ref


def assert_exact(original, out, conds=(True, False)):
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == original.ir_version and list(out.opset_import) == list(original.opset_import)
    for cond in conds:
        f = feeds(original, cond)
        a_ort, a_ref = outputs(original, f)
        b_ort, b_ref = outputs(out, f)
        for k in a_ort:
            np.testing.assert_allclose(b_ort[k], a_ort[k], atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(b_ref[k], a_ref[k], atol=1e-5, rtol=1e-5)


def body(model, node_name, attr):
    return next(next(a.g for a in n.attribute if a.name == attr) for n in model.graph.node if n.name == node_name)


def test_sites_found_in_every_graph_with_their_scope():
    groups = {g.name: g for g in find_weight_groups(GraphIndex(if_model()))}
    assert set(groups) == {"Ws", "T", "vad.then_branch::Wb", "Gc", "vad.else_branch::Wb", "E"}
    assert all(g.skip_reason is None for g in groups.values()), {g.name: g.skip_reason for g in groups.values()}
    ws = groups["Ws"]
    assert ws.ref.scope == "" and [(u.node.name, u.scope) for u in ws.uses] == [("main_mm", ""), ("else_mm_shared", "vad.else_branch")]
    assert groups["T"].uses[0].transposed and groups["T"].uses[0].via_transpose == "Tt"
    assert groups["Gc"].ref.kind == "constant" and groups["Gc"].ref.scope == "vad.then_branch"
    assert groups["E"].ops == "gather" and groups["E"].ref.scope == "vad.else_branch"


@pytest.mark.parametrize("build", [if_model, loop_model, scan_model])
def test_lmf_at_full_rank_is_exact(build):
    model = build()
    out, report = optimize(model, rank=R, verify=False)
    n = len(find_weight_groups(GraphIndex(model)))
    assert len(report.rewritten) == n and n >= 2, report.format()
    assert all(s.rel_error < 1e-5 for s in report.rewritten)
    assert_exact(model, out)


def test_factors_live_where_the_weight_lived():
    model = if_model()
    out, _ = optimize(model, rank=R, verify=False)
    main = {t.name for t in out.graph.initializer}
    then_i = {t.name for t in body(out, "vad", "then_branch").initializer}
    else_i = {t.name for t in body(out, "vad", "else_branch").initializer}
    # Ws (read in main and in else) factorized once, stored once in the main graph
    assert {"Ws.lmf_A", "Ws.lmf_B", "T.lmf_A", "T.lmf_B"} <= main and "Ws" not in main and "T" not in main
    assert not any(n.startswith("Ws.") for n in then_i | else_i)
    assert {"Gc.lmf_A", "Gc.lmf_B"} <= then_i and {"E.lmf_A", "E.lmf_B"} <= else_i and "Wb" not in then_i | else_i
    wa = [n for n in then_i | else_i if n.startswith("Wb.lmf_A")]
    assert len(wa) == 2 and len(set(wa)) == 2 and not (then_i & else_i)  # names unique across graphs
    then_ops = [n.op_type for n in body(out, "vad", "then_branch").node]
    assert "Constant" not in then_ops and "Transpose" not in then_ops  # Gc's Constant and Transpose(T) gone
    names = [n.name for g in (out.graph, body(out, "vad", "then_branch"), body(out, "vad", "else_branch")) for n in g.node]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("method", ["hmf", "prune"])
def test_hmf_and_prune_inside_bodies(method):
    model = scan_model() if method == "hmf" else if_model()
    out, report = optimize(model, method=method, keep=0.6, verify=False, fold=True)
    assert {s.weight for s in report.rewritten} == {g.name for g in find_weight_groups(GraphIndex(model))}
    if method == "hmf":  # true rank 4 fits the budget: HMF (or its LMF fallback) is exact
        assert_exact(model, out)
        return
    wb = next(t for t in body(out, "vad", "then_branch").initializer if t.name == "Wb")
    np.testing.assert_array_equal(numpy_helper.to_array(wb), magnitude_prune(w(1), int(0.6 * M * M)).W)
    f = feeds(model)
    b_ort, b_ref = outputs(out, f)
    np.testing.assert_allclose(b_ort["Y"], b_ref["Y"], atol=1e-5, rtol=1e-5)


def test_selection_and_keeps_by_qualified_name():
    model = if_model()
    _, report = optimize(model, rank=R, verify=False, exclude=[r"^vad\.then_branch::Wb$"])
    st = {s.weight: s.status for s in report.sites}
    assert st["vad.then_branch::Wb"] == "skipped" and st["vad.else_branch::Wb"] == "rewritten"
    _, report = optimize(model, rank=R, verify=False, include=["else_mm"])  # node names in bodies match too
    assert {s.weight for s in report.rewritten} == {"vad.else_branch::Wb", "Ws"}


def test_body_output_weight_and_other_readers_are_skipped():
    m = if_model()
    then_g = body(m, "vad", "then_branch")
    then_g.node.append(helper.make_node("Identity", ["Wb"], ["wb_copy"], name="then_reads"))
    then_g.output.append(vi("wb_copy", [M, M]))
    else_g = body(m, "vad", "else_branch")
    else_g.node.append(helper.make_node("Identity", ["Ws"], ["ws_copy"], name="else_out"))
    else_g.output.append(vi("ws_copy", [M, M]))
    m.graph.node[1].output.append("Y2")
    groups = {g.name: g for g in find_weight_groups(GraphIndex(m))}
    assert "Identity node 'then_reads'" in groups["vad.then_branch::Wb"].skip_reason
    assert "Identity node 'else_out'" in groups["Ws"].skip_reason
    assert groups["T"].skip_reason is None


def test_calibration_captures_body_activations():
    """If branches: a value of the branch taken counts, the other branch adds no rows; Loop and
    Scan: every iteration's rows. Grams checked against numpy."""
    model = if_model()
    batches = [feeds(model, c, s, batch=8) for s, c in enumerate((True, False, True))]
    st = capture_stats(model, Calibration(batches), ["X", "t1", "e0"])
    assert not st.uncaptured
    relu = lambda z: np.maximum(z, 0)  # noqa: E731
    t1 = [relu(b["X"] @ w(1)) for b in batches if b["cond"]]
    e0 = [b["X"] @ w(3) for b in batches if not b["cond"]]
    np.testing.assert_allclose(st.grams["t1"], sum(x.T @ x for x in t1), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(st.grams["e0"], sum(x.T @ x for x in e0), rtol=1e-4, atol=1e-3)
    assert st.rows == {"X": 24, "t1": 16, "e0": 8}
    loop = loop_model()
    b = feeds(loop)
    st = capture_stats(loop, Calibration([b]), ["h_in", "h1"])
    h = b["X"]
    expect = {"h_in": 0, "h1": 0}
    for _ in range(2):
        expect["h_in"] = expect["h_in"] + h.T @ h
        h1 = np.tanh(h @ w(8))
        expect["h1"] = expect["h1"] + h1.T @ h1
        h = h1 @ w(7) if b["cond"] else h1
    for k in expect:
        np.testing.assert_allclose(st.grams[k], expect[k], rtol=1e-4, atol=1e-3)
    scan = scan_model()
    b = feeds(scan)
    st = capture_stats(scan, Calibration([b]), ["x_t"])
    xs = b["X"].reshape(-1, M)
    np.testing.assert_allclose(st.grams["x_t"], xs.T @ xs, rtol=1e-4, atol=1e-3)
    assert st.rows["x_t"] == 15


def test_calibrated_factorization_whitens_body_sites():
    model = if_model()
    cal = Calibration([feeds(model, c, s, batch=8) for s, c in enumerate((True, False, True))])
    out, report = optimize(model, rank=R, verify=False, calib=cal, allocation="uniform")
    by = {s.weight: s for s in report.sites}
    for name in ("Ws", "vad.then_branch::Wb", "vad.else_branch::Wb", "T"):
        assert by[name].status == "rewritten" and "whitened" in by[name].detail and "not whitened" not in by[name].detail
    assert_exact(model, out)


def test_uncapturable_body_activation_is_fitted_unwhitened_with_the_reason():
    model = if_model()
    else_g = body(model, "vad", "else_branch")
    for n in else_g.node:  # the else branch's first MatMul now writes "t1", a name the then branch defines too
        n.output[:] = ["t1" if o == "e0" else o for o in n.output]
        n.input[:] = ["t1" if i == "e0" else i for i in n.input]
    cal = Calibration([feeds(model, True, 0), feeds(model, False, 1)])
    st = capture_stats(model, cal, ["t1"])
    assert "several sibling bodies" in st.uncaptured["t1"]
    out, report = optimize(model, rank=R, verify=False, calib=cal, allocation="uniform")
    by = {s.weight: s for s in report.sites}
    assert "not whitened: 't1'" in by["Ws"].detail and "several sibling bodies" in by["Ws"].detail
    assert "not whitened" not in by["vad.else_branch::Wb"].detail  # reads X
    assert_exact(model, out)


@pytest.mark.parametrize("method", ["lmf", "hmf"])
def test_tied_table_inside_a_body(method):
    """A body's own table read by its Gather and, through Transpose, by its head: one group,
    factor Transposes prepended inside that body."""
    E = graphs.matrix(60, M, seed=11, true_rank=R)
    then_g = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["h"], name="emb"),
         helper.make_node("Transpose", ["E"], ["Et"], name="tr", perm=[1, 0]),
         helper.make_node("MatMul", ["h", "Et"], ["t"], name="head")],
        "then", [], [vi("t", ["batch", 60])], [init(E, "E")])
    else_g = helper.make_graph([helper.make_node("Gather", ["Z", "ids"], ["e"], name="zeros")], "else", [],
                               [vi("e", ["batch", 60])], [init(np.zeros((60, 60), np.float32), "Z")])
    model = graphs.model([helper.make_node("If", ["cond"], ["Y"], name="br", then_branch=then_g, else_branch=else_g)],
                         [vi("ids", ["batch"], TensorProto.INT64), vi("cond", [], TensorProto.BOOL)], [vi("Y", ["batch", 60])])
    out, report = optimize(model, method=method, keep=0.5, verify=False, include=["^E$"])
    (site,) = report.rewritten
    assert site.ops == "gather+matmul" and len(site.nodes) == 2
    assert "Transpose" in [n.op_type for n in body(out, "br", "then_branch").node]
    assert not out.graph.initializer
    assert_exact(model, out, conds=(True,))


def test_measured_allocation_feeds_body_weights_and_scalar_inputs():
    """The sensitivity probe lifts a body's own initializers into the main graph so they can be
    fed; a scalar input (the If's condition) keeps the batches as they are."""
    model = if_model()
    cal = Calibration([feeds(model, c, s, batch=8) for s, c in enumerate((True, False, True, False))])
    from onnxhmf.passes.calibrated import measure_sensitivities
    from onnxhmf.passes.factorize import FactorizePass

    groups = [g for g in find_weight_groups(GraphIndex(model)) if g.skip_reason is None]
    sens = measure_sensitivities(model, FactorizePass(), groups, cal)
    assert {"Ws", "T", "E"} <= set(sens) and "vad.then_branch::Wb" not in sens  # two bodies hold a "Wb"
    m2 = if_model()
    body(m2, "vad", "else_branch").initializer[0].name = "Wb2"
    for n in body(m2, "vad", "else_branch").node:
        n.input[:] = ["Wb2" if i == "Wb" else i for i in n.input]
    groups = [g for g in find_weight_groups(GraphIndex(m2)) if g.skip_reason is None]
    sens = measure_sensitivities(m2, FactorizePass(), groups, cal)
    assert {"Wb", "Wb2"} <= set(sens)
    assert sens["Wb"][1].error > 0 and sens["Wb2"][1].error > 0  # the probe really changed the body's weight
    out, report = optimize(m2, keep=0.5, verify=False, calib=cal)
    assert report.settings["calibration"]["allocation"] == "measured" and report.rewritten


def test_external_data_with_body_weights(tmp_path):
    """Body initializers stored as external data are read lazily, their factors spilled and
    written next to the output; the result is exact."""
    from onnxhmf.api import optimize_file

    model = if_model()
    onnx.save(if_model(), tmp_path / "in.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="in.data", size_threshold=0)
    report = optimize_file(tmp_path / "in.onnx", tmp_path / "out.onnx", rank=R, verify=False, save_external_data=True,
                           external_data_size_threshold=0)
    assert len(report.rewritten) == 6 and (tmp_path / "out.onnx.data").is_file()
    lazy = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in body(lazy, "vad", "then_branch").initializer)
    assert_exact(model, onnx.load(tmp_path / "out.onnx"))


def test_hmf_permutation_folded_inside_a_body():
    """HMF with dense columns inside a branch: the column order is folded into the branch's
    bias and next MatMul (no Gather), exact when the rest is low rank."""
    rng = np.random.default_rng(3)
    Wh = graphs.matrix(64, 64, seed=12, true_rank=8)
    Wh[:, [5, 17, 30, 41, 50, 63]] += 3 * rng.standard_normal((64, 6)).astype(np.float32)  # 6 outlier columns
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "Wh"], ["a"], name="up"),
         helper.make_node("Add", ["a", "bh"], ["b"], name="bias"),
         helper.make_node("Relu", ["b"], ["c"], name="act"),
         helper.make_node("MatMul", ["c", "Wd"], ["t"], name="down")],
        "then", [], [vi("t", ["batch", 64])],
        [init(Wh, "Wh"), init(rng.standard_normal(64).astype(np.float32), "bh"), init(graphs.matrix(64, 64, seed=13), "Wd")])
    else_g = helper.make_graph([helper.make_node("Identity", ["X"], ["e"], name="pass")], "else", [], [vi("e", ["batch", 64])])
    model = graphs.model([helper.make_node("If", ["cond"], ["Y"], name="br", then_branch=then_g, else_branch=else_g)],
                         [vi("X", ["batch", 64]), vi("cond", [], TensorProto.BOOL)], [vi("Y", ["batch", 64])])
    out, report = optimize(model, method="hmf", keep=0.4, verify=False, include=["^Wh$"])
    (site,) = report.rewritten
    assert site.dense >= 6 and "perm folded" in site.detail, site
    ops = [n.op_type for n in body(out, "br", "then_branch").node]
    assert "Gather" not in ops and "Concat" in ops
    inits = {t.name for t in body(out, "br", "then_branch").initializer}
    assert "bh.perm" in inits and "bh" not in inits and "Wd" in inits  # Wd's rows permuted in place
    assert_exact(model, out, conds=(True,))


def test_report_says_where_a_body_site_lives():
    _, report = optimize(if_model(), rank=R, verify=False)
    by = {s.weight: s.detail for s in report.rewritten}
    assert by["vad.then_branch::Wb"] == "in body 'vad.then_branch'"
    assert by["Ws"] == "read in the main graph, body 'vad.else_branch'; factors in the main graph"
    assert by["T"] == "read in body 'vad.then_branch'; factors in the main graph"
    _, report = optimize(graphs.matmul_model(48, 40, true_rank=12), rank=12, verify=False)
    assert report.rewritten[0].detail == ""


def test_sequential_calibration_with_bodies():
    """--sequential runs on bodies (their sites are ordered by the main graph's dataflow, so one
    body's sites form one stage, calibrated on captured body activations); exact at true rank."""
    model = scan_model()
    cal = Calibration([feeds(model, True, s, batch=4) for s in range(3)])
    out, report = optimize(model, rank=R, verify=False, calib=cal, allocation="uniform", sequential=True)
    assert len(report.rewritten) == 2
    assert all(s.detail.startswith("whitened") for s in report.rewritten), report.format()
    assert_exact(model, out, conds=(True,))
