"""The mixed planner's pivoted and quantized low-rank options, on a tiny token MLP
(Gather → MatMul W1 → Relu → MatMul W2, so a pivoted W1's column order folds into W2's rows):
the predicted loss of an option is what building that option measures, the quantized factors'
δ is measured per rank, and a folded permutation reaches the blocked-integer step."""
import numpy as np
import pytest

import graphs
from onnxhmf.graph.index import GraphIndex
from onnxhmf.graph.sites import find_weight_groups
from onnxhmf.options import Options
from onnxhmf.passes.calibrated import _merged, output_loss
from onnxhmf.passes.factorize import FactorizePass
from onnxhmf.planners import mixed
from onnxhmf.planners.common import pivot_costs
from onnxhmf.planners.measured import calibration_settings, load_for_plan
from onnxhmf.capture import session


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """(model, Calibrated, options) with the blocked (fused) integers left out, so the
    weight-only int8 factor forms are offered: their built model computes exactly the weight the
    probe measured (no run-time activation quantization)."""
    model = graphs.token_mlp_model(vocab=300, d=96, h=192)  # big enough that pivoted storage pays from keep 0.2
    p = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(p, **graphs.token_batches(n=128, seed=1))
    options = Options.from_kwargs(calib=str(p), plan={"target_ratio": 0.4})
    return model, load_for_plan(model, options, 0.25), options


def _planner(model, c, options, cache, no_blocked):
    groups = find_weight_groups(GraphIndex(model))
    costs = pivot_costs(model, groups, options)
    fpass = FactorizePass(stats=c.stats)
    saved = mixed.can_upgrade
    if no_blocked:
        mixed.can_upgrade = lambda m: False
    try:
        opts = mixed._options(model, fpass, c.groups, c.fit, 1, lambda it, *a: it, cache, costs)
    finally:
        mixed.can_upgrade = saved
    settings = {**options.settings(), "calibration": calibration_settings(options, c.fit, 0.25, [g.name for g in c.groups])}
    return mixed.Planner(opts, {g.name: g for g in c.groups}, groups, settings, c, 0, [], 1, options, None,
                         cache=cache, costs=costs), opts


def _fit_loss(model, built, data):
    """The planner's loss (Σ outputs 1 − mean cosine) of ``built`` against ``model`` on ``data``."""
    names = [o.name for o in model.graph.output]
    s0, s1 = session(model), session(built)
    tot = 0.0
    for feeds in data.batches:
        tot += output_loss(s0.run(names, feeds), s1.run(names, feeds), feeds.get(data.mask) if data.mask else None)
    return tot / len(data.batches)


def test_quantized_pivoted_loss_is_measured_at_each_probe_rank(planned):
    """plmf-int8w at the probe keeps (0.2 and 0.5, where the float loss is measured too): the
    predicted loss is what the built model (W1 pivoted, its order folded into W2, W_p and C as
    weight-only int8) measures on the same data; δ differs between ranks (one probe at keep 0.5
    added to every rank would make them equal)."""
    model, c, options = planned
    planner, opts = _planner(model, c, options, {}, no_blocked=True)
    data = _merged(c.fit, 256)
    w1 = opts["W1"]
    assert {"plmf-int8w", "plmf-int8", "lmf-int8w"} <= {o.tag[0] for o in w1}
    float_loss = {o.tag[1]: o.error for o in w1 if o.tag[0] == "plmf"}
    deltas = []
    for keep in mixed.DELTA_KEEPS[:2]:
        o = min((o for o in w1 if o.tag[0] == "plmf-int8w"), key=lambda o: abs(o.tag[1] - keep))
        assert abs(o.tag[1] - keep) < 0.03
        choice = {n: v[0] for n, v in opts.items()}
        choice["W1"] = o
        built = planner.assemble(model, choice)
        site = next(s for s in built.sites if s.weight == "W1")
        assert "pivoted" in site.detail and "folded" in site.detail
        assert o.error == pytest.approx(_fit_loss(model, built.model, data), rel=0.02, abs=1e-6)
        deltas.append(o.error - float_loss[o.tag[1]])
    assert abs(deltas[0] - deltas[1]) > 0.05 * max(deltas)


def test_delta_is_interpolated_in_rank_between_probes(planned):
    """Between and beyond the probe ranks the quantized options' δ (= their loss − the float
    option's at the same keep) is the linear interpolation of the probes' δ in r, held at the ends."""
    model, c, options = planned
    _, opts = _planner(model, c, options, {}, no_blocked=True)
    costs = pivot_costs(model, find_weight_groups(GraphIndex(model)), options)
    g = next(g for g in c.groups if g.name == "W1")
    ranks = sorted({costs.rank(g, k) for k in mixed.DELTA_KEEPS})
    for kind, base in (("plmf-int8w", "plmf"), ("plmf-int8", "plmf")):
        fl = {o.tag[1]: o.error for o in opts["W1"] if o.tag[0] == base}
        d = {costs.rank(g, o.tag[1]): o.error - fl[o.tag[1]] for o in opts["W1"] if o.tag[0] == kind}
        probe = [d[r] for r in ranks]
        for r, v in d.items():
            assert v == pytest.approx(np.interp(r, ranks, probe), abs=1e-12)


def test_folded_rows_reach_the_blocked_quantizer(planned):
    """W1 pivoted with its order folded into W2's rows, W2 as blocked int4 (GPTQ, fitted by the
    planner on the unpermuted W2): the build quantizes W2[perm] with the Gram permuted alike, so
    the planner's cached fits (kept for its trial builds) give the same model as fresh ones, as
    faithful as W1 pivoted with W2 dense quantized alone would suggest."""
    model, c, options = planned
    cache: dict = {}
    planner, opts = _planner(model, c, options, cache, no_blocked=False)
    data = _merged(c.held, 256)
    choice = {n: v[0] for n, v in opts.items()}
    choice["W1"] = next(o for o in opts["W1"] if o.tag[0] == "plmf" and o.tag[1] >= 0.7)
    choice["W2"] = next(o for o in opts["W2"] if o.tag[0] == "int4b")
    cached = planner.assemble(model, choice)
    assert "folded" in next(s for s in cached.sites if s.weight == "W1").detail
    fresh_planner, _ = _planner(model, c, options, {}, no_blocked=False)
    fresh = fresh_planner.assemble(model, choice)
    l_cached, l_fresh = _fit_loss(model, cached.model, data), _fit_loss(model, fresh.model, data)
    assert l_cached == pytest.approx(l_fresh, rel=1e-6, abs=1e-9)
    alone = {n: v[0] for n, v in opts.items()}
    alone["W1"], alone["W2"] = choice["W1"], next(o for o in opts["W2"] if o.tag[0] == "dense")
    l_w1 = _fit_loss(model, planner.assemble(model, alone).model, data)
    assert l_cached < l_w1 + 5 * choice["W2"].error + 0.01  # scrambled rows measured 0.38 here
