"""LatencyCap.enforce (planners/latency.py) on a scripted search: what it does with the measured ratio."""
from types import SimpleNamespace

from onnxhmf.factorize.allocate import Option
from onnxhmf.planners.latency import LatencyCap


class _Search:
    """A search whose plan depends only on the cap's share: more share, a slower and more
    faithful plan. ``ratios`` maps a plan's fidelity to its measured latency ratio."""

    def __init__(self, cap, ratios):
        self.cap, self.ratios, self.runs = cap, ratios, 0
        group = SimpleNamespace(shape=(4, 4))
        self.planner = SimpleNamespace(groups={"w": group}, rank_multiple=1, costs=None)

    def run(self):
        self.runs += 1
        fast = self.cap.share < 0.6
        o = Option(8, 0.0, ("int8" if fast else "dense", 1.0))
        fidelity = 0.75 if fast else 0.999
        return SimpleNamespace(choice={"w": o}, fidelity=fidelity, built=SimpleNamespace(model=fidelity))


def _cap(share):
    # the input: 1 s a run, of which the weight's MatMul takes 0.8 s; int8 runs it at half the time
    return LatencyCap(limit=0.8, total=1.0, weights={"w": (0.8, 1, 4)}, share=share,
                      factors={(1, 4, 4): {"int8": 0.5, "r0": 1}})


def test_a_pessimistic_plan_gets_its_slack_back():
    cap = _cap(0.42)  # the int8 plan uses 0.4 s of it: the cap binds
    search = _Search(cap, {0.75: 0.56, 0.999: 0.78})
    res = cap.enforce(search, search.run(), lambda fid: search.ratios[fid])
    assert res.fidelity == 0.999 and cap.measured == 0.78 and cap.share > 0.6


def test_the_slack_is_not_taken_where_the_relaxed_plan_is_too_slow():
    cap = _cap(0.42)
    search = _Search(cap, {0.75: 0.56, 0.999: 0.83})
    res = cap.enforce(search, search.run(), lambda fid: search.ratios[fid])
    assert res.fidelity == 0.75 and cap.measured == 0.56 and cap.share == 0.42


def test_no_relaxing_when_the_cap_did_not_bind_or_the_plan_is_near_the_limit():
    cap = _cap(5.0)  # the share is far above what the plan uses
    search = _Search(cap, {0.999: 0.5})
    cap.enforce(search, search.run(), lambda fid: search.ratios[fid])
    assert search.runs == 1
    cap = _cap(0.42)
    search = _Search(cap, {0.75: 0.79, 0.999: 0.78})
    res = cap.enforce(search, search.run(), lambda fid: search.ratios[fid])
    assert search.runs == 1 and res.fidelity == 0.75


def test_over_the_limit_the_share_is_lowered():
    cap = _cap(0.85)
    search = _Search(cap, {0.75: 0.56, 0.999: 0.95})
    res = cap.enforce(search, search.run(), lambda fid: search.ratios[fid])
    assert res.fidelity == 0.75 and cap.share < 0.6 and cap.measured == 0.56 and search.runs == 3
