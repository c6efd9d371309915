"""``--max-latency-ratio`` (and the default planner's cap, 1.0) inside the mixed planner's one search.

Predicted latency of a plan, one intra-op thread:

    t(plan) = t_input − Σ_w t_w + Σ_w t_w · f(w, o_w)

t_input: the input's run time on the calibration batch; t_w: the time of weight w's MatMuls in
it (onnxruntime's profiler, median over runs; a fused node counts for the MatMul whose name it
starts with); f(w, o): the time of w's MatMul under option o over its float time, measured on a
one-MatMul model with w's shape and activation rows (runtime.latency_ratios, interleaved):
MatMulInteger (int8), MatMulNBits (int4b, int8b), the float and the int8 A·B pair at the rank of
keep 0.5, scaled in proportion to the rank for the other ranks (pivoted pairs priced as A·B at
their rank); weight-only forms run as the float MatMul. The cap's share is
limit·t_input − (t_input − Σ_w t_w), and caps.py keeps Σ_w t_w·f(w, o_w) within it.

The built plan is then measured (planners/mixed.latency_ratio); over the limit, the share is
lowered by the excess and the search runs again (twice at most); at least 3% under it while the
cap bound the search, the slack is given back (twice at most) and the more faithful plan within
the limit kept. What is left over goes to the
coarse fallback in mixed.py (plan again without whole families of treatments).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..factorize.allocate import Option
from ..factorize.svd import rank_for_keep
from ..passes.intquant import PLANNED

__all__ = ["LatencyCap", "profile_weights"]

_FLOAT = ("dense", "int8w", "int4w")  # run as the float MatMul
_PAIR_FLOAT = ("lmf", "plmf", "lmf-int8w", "plmf-int8w")  # two float MatMuls
_PAIR_INT8 = ("lmf-int8", "plmf-int8")  # two MatMulIntegers


def profile_weights(model: onnx.ModelProto, feeds: dict, groups: dict, runs: int = 5) -> tuple[float, dict]:
    """(median seconds of one run, {weight: (seconds of its MatMuls, activation rows, K)}) from
    onnxruntime's profiler, one intra-op thread. Weights whose MatMuls are not found are left out."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="onnxhmf-prof-") as d:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = 1, 3
        so.enable_profiling, so.profile_file_prefix = True, os.path.join(d, "p")
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    runs_ = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][1:]
    total = float(np.median([e["dur"] for e in runs_])) * 1e-6 if runs_ else 0.0
    per_node: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(e)
    out = {}
    for name, g in groups.items():
        secs, rows, k = 0.0, 0, 0
        for node in [u.node.name for u in g.uses if u.kind in ("matmul", "gemm")]:  # (a Gather's time is the table's read)
            hits = [v for base, v in per_node.items() if node and (base == node or base.startswith(node + "/"))]
            for evs in hits:
                secs += float(np.median([e["dur"] for e in evs[1:]] or [evs[0]["dur"]])) * 1e-6
                shape = next(iter(evs[0]["args"]["input_type_shape"][0].values()), [])
                if len(shape) >= 2:
                    rows, k = int(np.prod(shape[:-1])), int(shape[-1])
        if secs > 0 and rows and k:
            out[name] = (secs, rows, k)
    return total, out


def _matmul(T: int, K: int, N: int, r: int | None = None, opset: int = 21) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = lambda a, b, n: numpy_helper.from_array((rng.standard_normal((a, b)) * 0.05).astype(np.float32), n)  # noqa: E731
    if r is None:
        nodes, inits = [helper.make_node("MatMul", ["X", "W"], ["Y"])], [w(K, N, "W")]
    else:
        nodes = [helper.make_node("MatMul", ["X", "A"], ["H"]), helper.make_node("MatMul", ["H", "B"], ["Y"])]
        inits = [w(K, r, "A"), w(r, N, "B")]
    g = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [T, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _factors(T: int, K: int, N: int) -> dict[str, float]:
    """Time of each form of one X[T,K]·W[K,N] over the float MatMul's (keep-0.5 rank for pairs)."""
    from ..passes.intquant import IntTreatment, apply_treatments
    from ..quantize import quantize_int8
    from ..runtime import latency_ratios

    r0 = max(1, int(K * N / (K + N) / 2))
    dense, pair = _matmul(T, K, N), _matmul(T, K, N, r0)
    forms = {"int8": quantize_int8(dense, ["W"])[0], "lmf": pair, "lmf-int8": quantize_int8(pair, ["A", "B"])[0]}
    for kind, t in (("int4b", IntTreatment("int4b", 4, 32, True, "rtn")), ("int8b", IntTreatment("int8b", 8, 128, True, "rtn"))):
        if K % t.block == 0 or K > t.block:
            forms[kind] = apply_treatments(dense, {"W": t})[0]
    feeds = {"X": np.random.default_rng(1).standard_normal((T, K)).astype(np.float32)}
    ratios = latency_ratios([dense, *forms.values()], feeds, repeats=5, min_seconds=0.2)
    return {"r0": r0, **dict(zip(forms, ratios[1:]))}


@dataclass
class LatencyCap:
    limit: float  # the latency ratio the plan may have
    total: float  # the input's seconds a run
    weights: dict  # {weight: (seconds of its MatMuls, rows, K)}
    share: float  # seconds the planned weights' MatMuls may take
    factors: dict = field(default_factory=dict)  # {(T, K, N): {kind: ratio, "r0": rank}}
    measured: float | None = None  # the chosen plan's measured latency ratio
    strict: bool = False  # where nothing fits, the coarse fallback of mixed.py takes over

    @classmethod
    def measure(cls, work: onnx.ModelProto, feeds: dict, limit: float, planner) -> "LatencyCap":
        total, weights = profile_weights(work, feeds, {n: planner.groups[n] for n in planner.options})
        rest = total - sum(t for t, _, _ in weights.values())
        cap = cls(limit, total, weights, limit * total - rest)
        for name, (_, T, K) in weights.items():
            m, n = planner.groups[name].shape
            key = (T, K, m * n // K)
            if key not in cap.factors:
                # (a one-MatMul model of its own: X, W and Y of this size, at most ~256 MB)
                small = 4 * (T * (K + key[2]) + K * key[2]) <= 2**28
                cap.factors[key] = _factors(*key) if small else {}
        return cap

    def resource(self, planner, name: str, o: Option) -> float:
        if name not in self.weights:
            return 0.0
        secs, T, K = self.weights[name]
        kind, keep = o.tag
        m, n = planner.groups[name].shape
        f = self.factors[(T, K, m * n // K)]
        # the rotated input of int4b*r (Reshape · H, b = PLANNED's rotate): a float MatMul of b/n
        # its weight's multiply-adds, counted for each weight that reads it (an upper bound where they share it)
        rotated = PLANNED[kind].rotate / n if kind in PLANNED else 0.0
        kind = "int4b" if kind.startswith("int4b") else kind  # (MatMulNBits int4 at any block size)
        if not f or kind in _FLOAT or kind not in (*_PAIR_FLOAT, *_PAIR_INT8, "int8", "int4b", "int8b"):
            return secs
        if kind in ("int8", "int4b", "int8b"):
            return secs * (f.get(kind, 1.0) + rotated)
        r = (planner.costs.rank(planner.groups[name], keep, planner.rank_multiple) if kind.startswith("plmf")
             else rank_for_keep(m, n, keep, planner.rank_multiple))
        return secs * f["lmf" if kind in _PAIR_FLOAT else "lmf-int8"] * r / f["r0"]

    def infeasible(self, used: float) -> str:  # (not strict: never raised)
        return f"--max-latency-ratio {self.limit}: no plan within the size budget is predicted within it"

    def enforce(self, search, res, ratio_of):
        """Measure the built plan (``ratio_of(model)``); over the limit, lower the share by the
        excess and search again (twice at most); well under it, :meth:`_relax`. Returns the last
        plan; ``measured`` its ratio."""
        for attempt in range(3):
            self.measured = ratio_of(res.built.model)
            if self.measured <= self.limit:
                return self._relax(search, res, ratio_of)
            if attempt == 2:
                return res
            self.share -= (self.measured - self.limit) * self.total + 0.01 * self.total
            res = search.run()
        return res

    def _relax(self, search, res, ratio_of, rounds: int = 2):
        """Where the prediction was pessimistic (on a loaded machine the one-MatMul timings can
        be far off) the cap bought speed with fidelity for nothing: while the plan measures at
        least 3% under the limit and the cap bound the search, give the search the measured
        slack back and keep the new plan if it is within the limit and no less faithful."""
        for _ in range(rounds):
            used = sum(self.resource(search.planner, n, o) for n, o in res.choice.items())
            if self.limit - self.measured < 0.03 * self.limit or used < 0.9 * self.share:
                return res
            share = self.share
            self.share += (self.limit - self.measured) * self.total
            trial = search.run()
            ratio = ratio_of(trial.built.model)
            if ratio > self.limit or trial.fidelity < res.fidelity:
                self.share = share
                return res
            res, self.measured = trial, ratio
        return res
