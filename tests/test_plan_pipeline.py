"""The Plan: every planner returns one, the executor applies one, a saved plan replays exactly."""
import json

import numpy as np
import onnx
import pytest

import graphs
from onnxhmf.api import make_plan, optimize, optimize_file
from onnxhmf.cli import main
from onnxhmf.errors import OnnxHmfError
from onnxhmf.executor import execute
from onnxhmf.options import Options
from onnxhmf.plan import TREATMENTS, Decision, Plan, treatment_bytes
from onnxhmf.planners.common import decision
from onnxhmf.graph.index import GraphIndex
from onnxhmf.graph.sites import find_weight_groups


@pytest.fixture
def tmodel():
    return graphs.token_mlp_model(vocab=300, d=32, h=64)


@pytest.fixture
def src(tmodel, tmp_path):
    p = tmp_path / "in.onnx"
    onnx.save(tmodel, p)
    return p


@pytest.fixture
def calib_npz(tmp_path):
    p = tmp_path / "calib.npz"
    np.savez(p, **graphs.token_batches(n=64, seed=1))
    return p


def _plan(model, **kw):
    planned, cal = make_plan(model, Options.from_kwargs(**kw))
    return planned.plan


def test_uniform_plan_decides_every_group_with_reasons(tmodel):
    plan = _plan(tmodel, keep=0.5, exclude=["W2"], pivot=False)  # A·B (pivoted: tests/test_pivot.py)
    names = {g.name for g in find_weight_groups(GraphIndex(tmodel))}
    assert {d.weight for d in plan.decisions} == names
    by = plan.by_weight
    assert by["W2"].treatment == "dense" and by["W2"].reason == "matched by --exclude"
    assert by["W1"].treatment == "lmf" and by["W1"].rank == 32 * 64 // 2 // (32 + 64)
    assert by["W1"].predicted_bytes == treatment_bytes("lmf", (32, 64), rank=by["W1"].rank)
    hmf = _plan(tmodel, method="hmf", keep=0.5).by_weight["W1"]
    assert hmf.treatment == "hmf" and hmf.budget == 32 * 64 // 2 and hmf.rank is None


@pytest.mark.parametrize("kw", [dict(keep=0.5), dict(method="hmf", keep=0.6), dict(method="prune", keep=0.5),
                                dict(embedding_method="hmf", keep=0.6), dict(rank=8, rank_multiple=4),
                                dict(keep=0.5, quantize="int8")])
def test_json_round_trip_and_replay_is_byte_identical(src, tmp_path, kw):
    direct = tmp_path / "direct.onnx"
    report = optimize_file(src, direct, verify=False, save_plan=tmp_path / "p.json", **kw)
    saved = json.loads((tmp_path / "p.json").read_text())
    again = Plan.from_dict(saved)
    assert again.to_dict() == saved  # nothing lost in JSON
    assert [d["treatment"] for d in saved["decisions"]] == [d.treatment for d in again.decisions]
    replayed = tmp_path / "replayed.onnx"
    optimize_file(src, replayed, verify=False, plan_file=tmp_path / "p.json")
    assert replayed.read_bytes() == direct.read_bytes()
    assert report.rewritten


def test_dry_run_plan_replays_like_the_direct_run_calibrated(src, calib_npz, tmp_path):
    """The measured planner (calibration, knapsack) and sequential bands, through the CLI."""
    for extra in ([], ["--sequential"], ["--plan", "auto", "--target-ratio", "0.5"]):
        args = ["--calib", str(calib_npz), "--keep", "0.5", "--no-verify", "-q", *extra]
        if "--plan" in extra:
            args.remove("--keep"), args.remove("0.5")
        d, p, r = tmp_path / "d.onnx", tmp_path / "p.json", tmp_path / "r.onnx"
        assert main(["optimize", str(src), str(d), "--force", *args]) == 0
        assert main(["optimize", str(src), str(tmp_path / "never.onnx"), "--dry-run", "--save-plan", str(p), *args]) == 0
        assert not (tmp_path / "never.onnx").exists()
        plan = json.loads(p.read_text())
        assert plan["planner"] in ("measured", "measured+sequential", "mixed")
        assert plan["settings"]["calibration"]["source"] == str(calib_npz)
        if "--sequential" in extra:
            assert {d["stage"] for d in plan["decisions"] if d["treatment"] != "dense"} - {None}
        assert main(["optimize", str(src), str(r), "--plan-file", str(p), "--no-verify", "-q", "--force"]) == 0
        assert r.read_bytes() == d.read_bytes(), extra


def test_a_fixed_plan_applies_exactly_what_it_says(tmodel):
    groups = {g.name: g for g in find_weight_groups(GraphIndex(tmodel))}
    plan = Plan([decision(groups["W1"], "lmf", rank=5), decision(groups["W2"], "int8w"),
                 decision(groups["E"], "dense", reason="by hand")], {"seed": 0})
    work = onnx.ModelProto()
    work.CopyFrom(tmodel)
    built = execute(work, plan)
    names = {t.name for t in built.model.graph.initializer}
    a = next(t for t in built.model.graph.initializer if t.name.startswith("W1.") and t.name.endswith("A"))
    assert 5 in tuple(a.dims) and "W1" not in names
    assert "W2.int8w" in names and "E" in names
    by = {s.weight: s for s in built.sites}
    assert by["W1"].rank == 5 and by["W1"].planned == "lmf"
    assert by["W2"].method == "int8w" and by["E"].status == "skipped" and by["E"].reason == "by hand"


@pytest.mark.parametrize("edit, match", [
    (lambda p: p["decisions"][0].update(weight="nope"), "has no weight 'nope'"),
    (lambda p: p["decisions"][0].update(shape=[3, 3]), "in the model"),
    (lambda p: p["decisions"][0].update(treatment="magic"), "unknown treatment 'magic'"),
    (lambda p: p["decisions"][0].update(treatment="lmf", rank=None, budget=None), "needs a rank"),
    (lambda p: p["decisions"][0].update(treatment="lmf", rank=10_000), "at most"),
    (lambda p: p["decisions"][0].update(colour="red"), "unknown field"),
    (lambda p: p["decisions"].append(dict(p["decisions"][0])), "twice"),
    (lambda p: p.update(format=99), "not an onnxhmf plan"),
])
def test_plan_that_does_not_fit_is_one_clear_error(src, tmp_path, capsys, edit, match):
    p = tmp_path / "p.json"
    assert main(["optimize", str(src), str(tmp_path / "x.onnx"), "--dry-run", "--save-plan", str(p), "-q"]) == 0
    capsys.readouterr()
    data = json.loads(p.read_text())
    edit(data)
    p.write_text(json.dumps(data))
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(src), str(out), "--plan-file", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxhmf: error:") and match in err and err.count("\n") == 1, err
    assert not out.exists()


def test_malformed_plan_file(src, tmp_path, capsys):
    p = tmp_path / "p.json"
    p.write_text("{not json")
    assert main(["optimize", str(src), str(tmp_path / "o.onnx"), "--plan-file", str(p)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_hand_edited_plan_is_applied(src, tmp_path):
    p = tmp_path / "p.json"
    assert main(["optimize", str(src), str(tmp_path / "x.onnx"), "--dry-run", "--save-plan", str(p), "-q"]) == 0
    data = json.loads(p.read_text())
    for d in data["decisions"]:
        if d["weight"] == "W1":
            d.update(treatment="lmf", rank=3)
    p.write_text(json.dumps(data))
    _, report = optimize(str(src), plan_file=p, verify=False)
    assert {s.weight: s.rank for s in report.rewritten}["W1"] == 3


def test_every_treatment_has_a_cost_and_a_description():
    for name, t in TREATMENTS.items():
        assert t.summary
        b = treatment_bytes(name, (64, 32), rank=4, budget=100)
        assert b > 0
    assert treatment_bytes("lmf", (64, 32), rank=4) < treatment_bytes("dense", (64, 32))
    assert treatment_bytes("int4w", (64, 32)) < treatment_bytes("int8w", (64, 32)) < treatment_bytes("dense", (64, 32))
    with pytest.raises(OnnxHmfError):
        treatment_bytes("nope", (2, 2))


def test_options_are_validated_once_with_one_message():
    for kw, match in [(dict(keep=0), "keep must be"), (dict(method="svd"), "method must be"),
                      (dict(rank=4, method="hmf"), "only for --method lmf"), (dict(seed=-1), "seed must be"),
                      (dict(damp=float("nan")), "damping"), (dict(sequential=True), "need calibration"),
                      (dict(include=["("]), "invalid regular expression")]:
        with pytest.raises(OnnxHmfError, match=match):
            Options.from_kwargs(**kw)
    with pytest.raises(TypeError, match="unknown option"):
        Options.from_kwargs(colour="red")
    o = Options.from_kwargs(keep=0.5)
    with pytest.raises(Exception):
        o.budget.keep = 0.9  # frozen


def test_site_errors_say_what_they_measure(tmodel, calib_npz):
    _, free = optimize(tmodel, keep=0.5, verify=False)
    assert {s.error_of for s in free.rewritten} == {"weight"}
    _, cal = optimize(tmodel, keep=0.5, calib=calib_npz, allocation="uniform", verify=False)
    by = {s.weight: s.error_of for s in cal.rewritten}
    assert by["W1"] == "output" and by["W2"] == "output"  # whitened by the activations
