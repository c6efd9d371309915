"""int8 (--quantize int8, weight-only int8) and the mixed planner (--plan auto)."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import graphs
from onnxhmf.api import optimize, optimize_file
from onnxhmf.calibration import load_calibration
from onnxhmf.cli import main, parse_size
from onnxhmf.errors import OnnxHmfError
from onnxhmf.factorize.allocate import Option
from onnxhmf.passes.calibrated import fidelity, reference_outputs
from onnxhmf.planners.mixed import _fake_quant_inputs
from onnxhmf.quantize import int8_weight, int8w_weight, quantize_int8, weight_only

STANDARD = ("", "ai.onnx")


def run(model, feeds):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


@pytest.fixture
def tmodel():
    return graphs.token_mlp_model(vocab=300, d=32, h=64)  # metadata: author=tests


@pytest.fixture
def calib_npz(tmp_path):
    p = tmp_path / "calib.npz"
    np.savez(p, **graphs.token_batches(n=128, seed=1))
    return p


def _cos(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    keep = np.linalg.norm(b, axis=1) > 0  # padded rows are zero in both
    a, b = a[keep], b[keep]
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


# -- int8 -------------------------------------------------------------------------------------------
def test_quantize_int8_keeps_the_header_and_uses_standard_ops(tmodel):
    q, rep = optimize(tmodel, keep=1.0, quantize="int8", verify=False)
    weights = {t.name for t in tmodel.graph.initializer if len(t.dims) == 2}
    assert {s.weight for s in rep.rewritten} == weights  # every weight int8 ...
    assert {s.method for s in rep.rewritten} == {"int8"} and not any(s.rank for s in rep.rewritten)  # ... none factorized
    q2, rep2 = optimize(tmodel, quantize="int8", verify=False)  # --quantize int8 alone means int8 alone
    assert q2.SerializeToString() == q.SerializeToString()
    assert {n.domain for n in q.graph.node} <= set(STANDARD)
    ops = {n.op_type for n in q.graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear"} <= ops and "MatMul" not in ops
    assert q.ir_version == tmodel.ir_version
    assert {p.key: p.value for p in q.metadata_props}["author"] == "tests"
    for a, b in ((q.graph.input, tmodel.graph.input), (q.graph.output, tmodel.graph.output)):
        assert [v.SerializeToString() for v in a] == [v.SerializeToString() for v in b]  # names, symbolic dims
    onnx.checker.check_model(q, full_check=True)
    assert q.ByteSize() < 0.35 * tmodel.ByteSize()
    feeds = graphs.token_batches(n=16, seed=5)
    assert _cos(run(q, feeds)[0], run(tmodel, feeds)[0]) > 0.99


def test_int8_after_factorization_quantizes_the_factors(tmodel):
    q, rep = optimize(tmodel, keep=0.5, quantize="int8", embedding_method="skip", verify=False)
    assert {s.weight: s.method for s in rep.rewritten} == {"W1": "lmf", "W2": "lmf", "E": "int8"}  # E: int8, not factorized
    stored = {t.name: t.data_type for t in q.graph.initializer}
    for w in ("W1", "W2"):
        factors = [n for n in stored if n.startswith(w + ".") and n.endswith("_quantized")]
        assert len(factors) == 2 and all(stored[n] == onnx.TensorProto.INT8 for n in factors)
    big = [t.name for t in q.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1]
    assert not big  # only the scales stay float


def test_int8_weight_predicts_what_the_quantizer_stores():
    """The probe's int8 weights are exactly what onnxruntime's quantizer writes: a Gather of
    every row gives the stored table back; for a MatMul, X = I gives W (activations I are
    quantized exactly)."""
    g = graphs.gather_model(vocab=50, d=16)
    T = numpy_helper.to_array(g.graph.initializer[0])
    q, done = quantize_int8(g)
    assert done == ["E"]
    got = run(q, {"ids": np.arange(50, dtype=np.int64)[None]})[0][0]
    np.testing.assert_allclose(got, int8_weight(T, table=True), atol=1e-6)
    m = graphs.matmul_model(m=24, n=20, ndim=2)
    W = numpy_helper.to_array(m.graph.initializer[0])
    q, done = quantize_int8(m)
    got = run(q, {"X": np.eye(24, dtype=np.float32)})[0]
    np.testing.assert_allclose(got, int8_weight(W), atol=1e-6)


def test_fake_quant_probe_matches_matmulinteger(tmodel):
    """The planner's probe (weight fed as int8_weight, input through DynamicQuantizeLinear →
    DequantizeLinear) gives what the quantized model computes."""
    probe = onnx.ModelProto()
    probe.CopyFrom(tmodel)
    W2 = numpy_helper.to_array(next(t for t in tmodel.graph.initializer if t.name == "W2"))
    probe.graph.input.append(helper.make_tensor_value_info("W2", onnx.TensorProto.FLOAT, list(W2.shape)))
    flags = _fake_quant_inputs(probe, ["W2"])
    assert list(flags) == ["W2"]
    feeds = graphs.token_batches(n=16, seed=3)
    predicted = run(probe, {**feeds, "W2": int8_weight(W2), flags["W2"]: np.array(True)})[0]
    off = run(probe, {**feeds, "W2": W2, flags["W2"]: np.array(False)})[0]
    q, done = quantize_int8(tmodel, ["W2"])
    assert done == ["W2"]
    actual = run(q, feeds)[0]
    np.testing.assert_allclose(predicted, actual, atol=1e-4)
    np.testing.assert_allclose(off, run(tmodel, feeds)[0], atol=1e-6)
    weight_only = run(probe, {**feeds, "W2": int8_weight(W2), flags["W2"]: np.array(False)})[0]
    assert np.abs(weight_only - actual).max() > 10 * np.abs(predicted - actual).max()  # the input's error is seen


@pytest.mark.exact_int8
def test_per_token_probe_matches_the_per_token_model(tmodel):
    """With per_token the probe emulates graph/pertoken.py's rows, not DynamicQuantizeLinear."""
    from onnxhmf.graph.pertoken import per_token_activations

    probe = onnx.ModelProto()
    probe.CopyFrom(tmodel)
    W2 = numpy_helper.to_array(next(t for t in tmodel.graph.initializer if t.name == "W2"))
    probe.graph.input.append(helper.make_tensor_value_info("W2", onnx.TensorProto.FLOAT, list(W2.shape)))
    flags = _fake_quant_inputs(probe, ["W2"], per_token=True)
    feeds = graphs.token_batches(n=16, seed=3)
    predicted = run(probe, {**feeds, "W2": int8_weight(W2), flags["W2"]: np.array(True)})[0]
    q, _ = quantize_int8(tmodel, ["W2"])
    per_tensor = run(q, feeds)[0]
    assert per_token_activations(q) == 1
    actual = run(q, feeds)[0]
    np.testing.assert_allclose(predicted, actual, atol=1e-4)
    assert np.abs(per_tensor - actual).max() > 10 * np.abs(predicted - actual).max()


@pytest.mark.parametrize("bits,rows", [(8, 24), (4, 24), (4, 23)])
def test_weight_only_is_exact_per_column_and_folded_by_onnxruntime(tmp_path, bits, rows):
    """int8 / packed int4 weights with per-column scales: the graph rebuilds exactly the weight
    int8w_weight predicts, onnx.reference agrees, and onnxruntime folds the rebuild at load."""
    from onnx.reference import ReferenceEvaluator

    m = graphs.matmul_model(m=rows, n=20, ndim=2)  # 23 rows: int4 packs along the columns
    W = numpy_helper.to_array(m.graph.initializer[0]).copy()
    W[:, 3] *= 100.0  # one loud column: per-column scales keep the others fine
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(W, "W"))
    q = onnx.ModelProto()
    q.CopyFrom(m)
    assert weight_only(q, ["W"], bits) == ["W"]
    onnx.checker.check_model(q, full_check=True)
    stored = {t.name: t for t in q.graph.initializer}
    packed = stored[f"W.int{bits}w"]
    assert packed.data_type == (onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.UINT8)
    assert np.prod(packed.dims) == W.size * bits // 8
    X = np.eye(rows, dtype=np.float32)
    got = run(q, {"X": X})[0]
    np.testing.assert_allclose(got, int8w_weight(W, bits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ReferenceEvaluator(q).run(None, {"X": X})[0], got, rtol=1e-6, atol=1e-6)
    quiet = np.delete(np.arange(20), 3)
    if bits == 8:
        assert np.abs(got - W)[:, quiet].max() < np.abs(int8_weight(W) - W)[:, quiet].max() / 10
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(q.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node] == ["MatMul"]


def test_int8_runs_in_the_onnx_reference_at_opset_19():
    """onnx.reference has DequantizeLinear from opset 19: there the int8 model runs in both."""
    from onnx.reference import ReferenceEvaluator

    m = graphs.token_mlp_model()
    m.opset_import[0].version = 19
    m.ir_version = 9
    q, _ = optimize(m, keep=1.0, quantize="int8", verify=False)
    feeds = graphs.token_batches(n=8, seed=4)
    ref = ReferenceEvaluator(q).run(None, feeds)[0]
    np.testing.assert_allclose(ref, run(q, feeds)[0], rtol=1e-4, atol=1e-4)


# -- the planner --------------------------------------------------------------------------------------
def test_plan_respects_the_budget_and_reports_its_fidelity(tmodel, calib_npz, tmp_path):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(tmodel, src)
    target = int(0.45 * src.stat().st_size)
    rep = optimize_file(src, out, calib=calib_npz, plan={"target_size": target}, verify=False)
    size = out.stat().st_size
    assert size <= target and size == rep.plan["bytes"] == rep.bytes_after
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= set(STANDARD)
    treatments = {r["treatment"].split()[0] for r in rep.plan["sites"]}
    assert treatments - {"dense"}  # something was compressed
    # the reported held-out fidelity is what the written model measures on the same batches
    cal = load_calibration(calib_npz, tmodel, samples=256)
    _, held = cal.split(0.25)
    assert fidelity(model, reference_outputs(tmodel, held), held) == pytest.approx(rep.plan["heldout_fidelity"], abs=1e-5)
    assert rep.plan["latency_ratio"] is None  # measured only for --max-latency-ratio
    meta = json.loads({p.key: p.value for p in model.metadata_props}["onnxhmf"])
    assert meta["plan"] == {"target_size": target}


def test_plan_beats_int8_alone_at_its_size(tmodel, calib_npz, tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(tmodel, src)
    q, _ = optimize(tmodel, keep=1.0, quantize="int8", verify=False)
    p, rep = optimize(tmodel, calib=calib_npz, plan={"target_size": q.ByteSize()}, verify=False)
    assert p.ByteSize() <= q.ByteSize()
    cal = load_calibration(calib_npz, tmodel, samples=256)
    _, held = cal.split(0.25)
    refs = reference_outputs(tmodel, held)
    assert fidelity(p, refs, held) >= fidelity(q, refs, held) - 1e-6


def test_target_fidelity_gives_a_smaller_model_that_meets_it(tmodel, calib_npz):
    goal = 0.995
    model, rep = optimize(tmodel, calib=calib_npz, plan={"target_fidelity": goal}, verify=False)
    assert rep.plan["heldout_fidelity"] >= goal
    assert model.ByteSize() < tmodel.ByteSize()


def test_target_below_the_unplanned_bytes_is_refused_before_measuring(tmp_path, monkeypatch):
    """A conv-like model: most bytes are a constant no plan touches; a target under them is refused
    before the calibration is even read (on PP-OCR the full search took minutes to say so)."""
    from onnxhmf.planners import mixed

    rng = np.random.default_rng(0)
    W = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W")
    C = numpy_helper.from_array(rng.standard_normal((1, 64, 32, 32)).astype(np.float32), "C")  # 256 KB, not a weight site
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Add", ["z", "C"], ["w"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 64]),
                           helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["n", 64, 32, 32])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 64]),
                           helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, ["n", 64, 32, 32])], [W, C])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=rng.standard_normal((32, 64)).astype(np.float32),
             z=rng.standard_normal((32, 64, 32, 32)).astype(np.float32))

    def never(*a, **k):
        raise AssertionError("the calibration was read")

    monkeypatch.setattr(mixed, "load_for_plan", never)
    with pytest.raises(OnnxHmfError, match=r"below what no plan changes: 26\d,\d{3} B"):
        optimize(model, calib=calib, plan={"target_ratio": 0.5}, verify=False)
    monkeypatch.undo()
    # a target above those bytes goes on to the search (and meets it)
    out, _ = optimize(model, calib=calib, plan={"target_size": model.ByteSize() - 8000}, verify=False)
    assert out.ByteSize() <= model.ByteSize() - 8000


def test_plan_errors(tmodel, calib_npz, tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save(tmodel, src)
    with pytest.raises(OnnxHmfError, match="below the smallest plan"):
        optimize(tmodel, calib=calib_npz, plan={"target_size": 1000}, verify=False)
    with pytest.raises(OnnxHmfError, match="without --quantize"):
        optimize(tmodel, calib=calib_npz, plan={"target_size": 10_000}, quantize="int8", verify=False)
    with pytest.raises(OnnxHmfError, match="needs calibration"):
        optimize(tmodel, plan={"target_size": 10_000}, verify=False)
    assert main(["optimize", str(src), str(tmp_path / "o.onnx"), "--plan", "auto", "--calib", str(calib_npz)]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["optimize", str(src), str(tmp_path / "o.onnx"), "--target-size", "1MB"]) == 2
    assert "go with --plan auto" in capsys.readouterr().err
    code = main(["optimize", str(src), str(tmp_path / "o.onnx"), "--plan", "auto", "--calib", str(calib_npz),
                 "--target-ratio", "0.5", "--max-latency-ratio", "0.01", "-q"])
    assert code != 0 and "--max-latency-ratio" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()
    assert [parse_size(s) for s in ("22800000", "22.8MB", "900kb", "1MiB")] == [22_800_000, 22_800_000, 900_000, 2**20]


def test_int8_never_stores_a_weight_twice_and_dry_run_predicts_the_size(tmp_path, capsys):
    """A tied table's factor is read by a Gather and, through Transpose, by the head: int8 for
    the Gather alone would store it twice, so quantize_int8 leaves it float. --dry-run's size
    with --quantize int8 is within 3% of the file written."""
    m = graphs.tied_model(vocab=400, d=32)
    src = tmp_path / "tied.onnx"
    onnx.save(m, src)
    for keep in ("0.5", "1"):
        out = tmp_path / f"q{keep}.onnx"
        assert main(["optimize", str(src), str(out), "--keep", keep, "--quantize", "int8", "--min-cosine", "0", "--min-top1", "0", "-q"]) == 0
        q = onnx.load(out)
        names = {t.name for t in q.graph.initializer}
        assert not [n for n in names if n + "_quantized" in names]
        assert main(["optimize", str(src), str(out), "--keep", keep, "--quantize", "int8", "--dry-run"]) == 0
        line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("file:")][-1]
        predicted = int(line.split("~")[1].split()[0].replace(",", ""))
        assert abs(predicted - out.stat().st_size) < 0.03 * out.stat().st_size, (keep, predicted, out.stat().st_size)


def test_too_slow_plans_again_without_the_slower_forms(tmodel, calib_npz, monkeypatch):
    """--max-latency-ratio: a plan measured too slow is planned again without weight-only
    integers, then without factored forms, ...; the first within the limit is kept and says so.
    The latency is faked here (slow while any weight is factored) so that the ladder is what is tested."""
    import onnxhmf.planners.mixed as mixed

    seen = []

    def fake(base, model, data, repeats=7):
        factored = sum(n.op_type in ("MatMul", "MatMulInteger") for n in model.graph.node) > \
            sum(n.op_type in ("MatMul", "MatMulInteger") for n in base.graph.node)
        seen.append(factored)
        return 2.0 if factored else 0.5

    monkeypatch.setattr(mixed, "latency_ratio", fake)
    # (the size search keeps the knapsack's factored plan: its measured comparison without low-rank
    # forms, test_plan_auto_measures_its_knapsack_without_lowrank_forms, would pick another)
    monkeypatch.setattr(mixed._Search, "_unfactored", lambda self, res, target: res)
    # the one search's latency cap predicts nothing here (no profiled MatMuls): the fallback is tested
    monkeypatch.setattr(mixed.LatencyCap, "measure", classmethod(lambda cls, work, feeds, limit, planner: cls(limit, 1.0, {}, 1e9)))
    model, rep = optimize(tmodel, calib=calib_npz, plan={"target_ratio": 0.3, "max_latency_ratio": 1.0}, verify=False)
    kinds = {r["treatment"].split()[0] for r in rep.plan["sites"]}
    assert seen[0] and not seen[-1]  # the first plan was factored and "slow", the kept one is not
    assert not any("lmf" in k for k in kinds) and rep.plan["latency_ratio"] == 0.5
    assert "factored forms" in rep.plan["note"]


def test_a_tied_table_may_be_int8():
    """A table read by a Gather and, through a Transpose, by the head MatMul: the quantizer takes
    the Gather and the head reads its DequantizeLinear, so int8 is an option for it."""
    from onnxhmf.graph.index import GraphIndex
    from onnxhmf.graph.sites import find_weight_groups
    from onnxhmf.planners.mixed import _int8_uses
    from onnxhmf.quantize import weight_nodes

    from test_safety_opsets import embedding

    for tied in (False, True):
        model = embedding(17, tied=tied)
        (g,) = find_weight_groups(GraphIndex(model))
        direct, gather, only_gather = _int8_uses(g, len(weight_nodes(model).get(g.name, [])))
        assert direct and gather and only_gather == (not tied)


def test_the_latency_cap_is_inside_the_one_search(tmodel, calib_npz, monkeypatch):
    """With a predicted latency per option the first search already keeps within the limit:
    here factored forms are predicted slow (the profile and factors are faked), so the first plan
    has none and nothing is planned twice."""
    import onnxhmf.planners.mixed as mixed
    from onnxhmf.planners.latency import LatencyCap

    def measure(cls, work, feeds, limit, planner):
        weights = {n: (1e-3, 6, planner.groups[n].shape[0]) for n in planner.options}
        f = {"int8": 0.5, "int4b": 0.9, "int8b": 0.8, "lmf": 9.0, "lmf-int8": 9.0, "r0": 1}
        factors = {(6, g.shape[0], g.shape[1]): f for g in (planner.groups[n] for n in planner.options)}
        return cls(limit, 1.0, weights, sum(t for t, _, _ in weights.values()), factors)

    runs = []
    monkeypatch.setattr(mixed.LatencyCap, "measure", classmethod(measure))
    monkeypatch.setattr(mixed, "latency_ratio", lambda base, model, data, repeats=7: runs.append(1) or 0.9)
    _, rep = optimize(tmodel, calib=calib_npz, plan={"target_ratio": 0.4, "max_latency_ratio": 1.0}, verify=False)
    kinds = [r["treatment"].split()[0] for r in rep.plan["sites"]]
    assert not any("lmf" in k for k in kinds) and set(kinds) - {"dense"}
    assert len(runs) == 1 and "note" not in rep.plan  # measured once, no fallback
    cap = LatencyCap(1.0, 1.0, {"w": (1e-3, 6, 4)}, 1e-3, {(6, 4, 8): {"int8": 0.5, "lmf": 2.0, "lmf-int8": 1.0, "r0": 2}})
    p = type("P", (), {"groups": {"w": type("G", (), {"shape": (4, 8)})()}, "rank_multiple": 1, "costs": None})()
    assert cap.resource(p, "w", Option(1, 0.0, ("int8", 1.0))) == pytest.approx(0.5e-3)
    assert cap.resource(p, "w", Option(1, 0.0, ("int8w", 1.0))) == pytest.approx(1e-3)  # runs as the float MatMul
    assert cap.resource(p, "w", Option(1, 0.0, ("lmf-int8", 0.5))) == pytest.approx(1e-3 * 1.0 * 1 / 2)  # rank 1 of r0 2


class _FakePlanner:
    """Two weights; 'lmf' is predicted cheap and nearly lossless; what the built model loses
    with it is ``lmf_true_loss`` a weight (``_measure`` stands in for building and measuring)."""

    def __init__(self, lmf_true_loss):
        self.options = {w: [Option(100, 0.0, ("dense", 1.0)), Option(30, 0.001, ("lmf", 0.3)),
                            Option(40, 0.01, ("int4b128", 1.0))] for w in ("a", "b")}
        self.fixed, self.caps, self.lmf_true_loss = 10, [], lmf_true_loss

    def allocate(self, budget):
        from onnxhmf.factorize.allocate import allocate

        return dict(zip(self.options, allocate(list(self.options.values()), budget - self.fixed)))

    def floor(self):
        return self.fixed + sum(min(o.cost for o in v) for v in self.options.values())

    def _measure(self, choice):
        loss = sum(self.lmf_true_loss if o.tag[0] == "lmf" else o.error for o in choice.values())
        return sum(o.cost for o in choice.values()) + self.fixed, loss


@pytest.mark.parametrize("lmf_true_loss,winner", [(0.05, "int4b128"), (0.002, "lmf")])
def test_plan_auto_measures_its_knapsack_without_lowrank_forms(monkeypatch, lmf_true_loss, winner):
    from onnxhmf.planners import mixed

    p = _FakePlanner(lmf_true_loss)

    def measure(self, choice, row):
        size, loss = p._measure(choice)
        self.tried.append({**row, "bytes": size})
        return mixed._Trial(choice, size, 1 - loss, loss, None)

    monkeypatch.setattr(mixed._Search, "_measure", measure)
    search = mixed._Search(p, None, {"target_size": 100}, 1000)
    res = search._unfactored(search.trial(100), 100)
    assert {o.tag[0] for o in res.choice.values()} == {winner}
    assert any(t.get("unfactored") for t in search.tried)
    assert all(o.tag[0] == "lmf" for o in p.allocate(100).values())  # the full menu is back


def test_plan_auto_without_lowrank_forms_stops_at_the_cheapest_plan(monkeypatch):
    """Built plans overshooting their estimate lower the budget; below the cheapest plan without
    low-rank forms the knapsack's own plan is kept (no 'no plan fits' error)."""
    from onnxhmf.planners import mixed

    p = _FakePlanner(0.05)

    def measure(self, choice, row):
        size, loss = p._measure(choice)
        self.tried.append({**row, "bytes": size + (30 if "lmf" not in str(choice) else 0)})
        return mixed._Trial(choice, self.tried[-1]["bytes"], 1 - loss, loss, None)

    monkeypatch.setattr(mixed._Search, "_measure", measure)
    search = mixed._Search(p, None, {"target_size": 100}, 1000)
    first = search.trial(100)
    assert search._unfactored(first, 100) is first
    assert sum(bool(t.get("unfactored")) for t in search.tried) == 1
    # the floor itself can be out of the knapsack's reach (it rounds costs up to budget/4000 units)
    from onnxhmf.factorize.allocate import allocate
    with pytest.raises(ValueError):
        allocate([[Option(4001, 0.0)], [Option(3999, 0.0)]], 8000, resolution=2)
