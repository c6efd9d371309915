"""``--plan auto``: per weight, dense fp32, int8, whitened LMF or LMF with int8 factors, under
one byte budget (or the smallest plan meeting a held-out fidelity).

Candidates of a weight group of shape m×n (bytes; loss = Σ_outputs (1 − mean cosine) when
only that group is changed, as in calibrated.measure_sensitivities):

* dense: 4·m·n, loss 0.
* int8: m·n + c (c = quantize.INT8_OVERHEAD), loss *measured* by feeding the weight the
  quantizer stores, dequantized (quantize.int8_weight). The probe does not see the run-time
  uint8 quantization of the activations that MatMulInteger adds, so int8 is predicted a bit
  optimistic; the assembled model is measured, not predicted.
* LMF rank r: 4·r·(m+n), loss from measure_sensitivities (measured at two ranks, interpolated).
* LMF rank r, int8 factors: r·(m+n) + 2c, loss L_lmf(r) + δ, δ = max(0, measured loss of the
  int8 factors at the probe rank − L_lmf at that rank) (quantization noise of the factors,
  taken as independent of r).

The multiple-choice knapsack (factorize/allocate.py) picks one option per group minimising
Σ loss under B − F bytes, F = the file's other bytes (graph, weights that are not candidates).
The plan is then assembled on a copy (FactorizePass with per-group keeps, then the int8
quantizer on exactly the chosen weights and factors) and measured on held-out calibration
batches: file bytes and fidelity. If the file overshoots the target, the budget is lowered by
the overshoot and the plan redone (at most 3 times).
``--target-fidelity``: bisection over the byte budget for the smallest assembled plan whose
held-out fidelity meets the target.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..calibration import Calibration, load_calibration
from ..capture import capture_stats
from ..errors import OnnxHmfError
from ..factorize.allocate import Option, allocate
from ..factorize.svd import rank_for_keep
from ..graph.index import GraphIndex
from ..graph.rewrite import factor_orientation
from ..graph.sites import find_weight_groups
from ..quantize import INT8_OVERHEAD, int8_bytes, int8_weight, quantize_int8, weight_nodes
from .calibrated import (_merged, _session, calibration_targets, candidate_groups, fidelity, measure_sensitivities,
                         output_loss, reference_outputs)
from .factorize import FactorizePass

__all__ = ["Planner", "plan_and_assemble", "LMF_OVERHEAD"]

LMF_OVERHEAD = 300  # bytes an LMF rewrite adds besides its factors (names, nodes, value infos)
PROBE_KEEP = 0.5  # where LMF with int8 factors is measured


@dataclass
class Planner:
    fpass: FactorizePass
    options: dict[str, list[Option]]
    shapes: dict[str, tuple[int, int]]
    fixed: int  # bytes outside the candidate groups
    held: Calibration
    refs: list
    all_groups: list[str]
    rows: list[dict] = field(default_factory=list)
    choice: dict[str, Option] = field(default_factory=dict)

    # -- the plan -------------------------------------------------------------------------
    def allocate(self, budget: int) -> dict[str, Option]:
        names = list(self.options)
        picked = allocate([self.options[n] for n in names], max(int(budget) - self.fixed, 0))
        return dict(zip(names, picked))

    def floor(self) -> int:
        return self.fixed + sum(min(o.params for o in opts) for opts in self.options.values())

    def ceiling(self) -> int:
        return self.fixed + sum(max(o.params for o in opts) for opts in self.options.values())

    def keeps(self, choice: dict[str, Option]) -> dict[str, float]:
        k = {n: 1.0 for n in self.all_groups}
        k.update({n: float(o.tag[1]) for n, o in choice.items() if o.tag[0] in ("lmf", "lmf-int8")})
        return k

    def quantized(self, model: onnx.ModelProto, choice: dict[str, Option]) -> list[str]:
        """Initializer names to quantize in the factorized ``model``: the int8 groups' weights
        and the factors of the lmf-int8 groups (initializers named after the group)."""
        used = weight_nodes(model)
        names = [n for n, o in choice.items() if o.tag[0] == "int8"]
        for n, o in choice.items():
            if o.tag[0] == "lmf-int8":
                names += [w for w in used if w.startswith(n + ".")]
        return names

    def assemble(self, model: onnx.ModelProto, choice: dict[str, Option]) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        saved = self.fpass.keeps
        self.fpass.keeps = self.keeps(choice)
        try:
            self.fpass.run(m)
        finally:
            self.fpass.keeps = saved
        q, _ = quantize_int8(m, self.quantized(m, choice))
        return q

    def measure(self, model: onnx.ModelProto) -> tuple[float, float]:
        """(held-out fidelity, held-out loss Σ_outputs (1 − mean cosine))."""
        fid = fidelity(model, self.refs, self.held)
        sess = _session(model)
        names = [o.name for o in model.graph.output]
        loss = 0.0
        for feeds, ref in zip(self.held.batches, self.refs):
            mask = feeds.get(self.held.mask) if self.held.mask else None
            loss += output_loss(ref, sess.run(names, feeds), mask)
        return fid, loss / max(len(self.held.batches), 1)


def _options(work, fpass, groups, fit, progress) -> dict[str, list[Option]]:
    """Per group: dense, int8, LMF and LMF-int8 options in bytes (see the module docstring)."""
    sens = measure_sensitivities(work, fpass, groups, fit, progress=progress)
    index = GraphIndex(work)
    uses = weight_nodes(work)
    probe = onnx.ModelProto()
    probe.CopyFrom(work)
    have = {i.name for i in probe.graph.input}
    for g in groups:
        if g.name in sens and g.name not in have:
            probe.graph.input.append(onnx.helper.make_tensor_value_info(g.name, g.ref.data_type, list(g.shape)))
    sess = _session(probe)
    names = [o.name for o in work.graph.output]
    data = _merged(fit, 256)
    refs = [sess.run(names, feeds) for feeds in data.batches]

    def loss_with(name: str, W: np.ndarray) -> float:
        tot = 0.0
        for feeds, ref in zip(data.batches, refs):
            mask = feeds.get(data.mask) if data.mask else None
            tot += output_loss(ref, sess.run(names, {**feeds, name: W}), mask)
        return tot / len(data.batches)

    out: dict[str, list[Option]] = {}
    for g in progress([g for g in groups if g.name in sens]):
        if g.ref.data_type != onnx.TensorProto.FLOAT:
            continue
        m, n = g.shape
        T = index.array(g.ref)
        opts = [Option(4 * m * n, 0.0, ("dense", 1.0))]
        lmf = [o for o in sens[g.name] if o.tag < 1.0]
        opts += [Option(4 * o.params + LMF_OVERHEAD, o.error, ("lmf", o.tag)) for o in lmf]
        # int8 only where every use is a MatMul's B or a Gather's table (the quantizer takes those)
        direct = len(uses.get(g.name, [])) == len(g.uses) and all(u.kind in ("matmul", "gather") for u in g.uses)
        gather = any(u.kind == "gather" for u in g.uses)
        if direct:
            opts.append(Option(int8_bytes(m * n), loss_with(g.name, int8_weight(T, table=gather)), ("int8", 1.0)))
        if direct and not gather and lmf:
            transposed = factor_orientation(g)
            r = rank_for_keep(m, n, PROBE_KEEP, fpass.rank_multiple)
            if 1 <= r and r * (m + n) < m * n:
                f, _ = fpass._lmf(g, fpass._weight(g, transposed), r, transposed)
                Wq = int8_weight(f.A) @ int8_weight(f.B)
                Wq = (Wq.T if transposed else Wq).astype(np.float32)
                Wr = (f.A @ f.B)
                Wr = (Wr.T if transposed else Wr).astype(np.float32)
                delta = max(0.0, loss_with(g.name, Wq) - loss_with(g.name, Wr))
                opts += [Option(o.params + 2 * INT8_OVERHEAD + LMF_OVERHEAD, o.error + delta, ("lmf-int8", o.tag))
                         for o in lmf]
        out[g.name] = opts
    return out


def plan_and_assemble(work: onnx.ModelProto, fpass: FactorizePass, report, calib, tokenizer, samples, seq_len, batch,
                      plan: dict, *, src_bytes: int, progress=lambda it: it) -> "Planner":
    """Measure, choose and check a plan; leave ``fpass`` set up to factorize it (keeps, stats).
    Returns the Planner with ``choice`` set: the caller factorizes ``work`` with ``fpass`` and
    then quantizes ``planner.quantized(work, planner.choice)``."""
    t0 = time.perf_counter()
    cal = calib if isinstance(calib, Calibration) else load_calibration(
        calib, work, tokenizer=tokenizer, samples=samples, seq_len=seq_len, batch_size=batch)
    fit, held = cal.split(0.25)
    all_groups = find_weight_groups(GraphIndex(work))
    groups = candidate_groups(fpass, all_groups)
    acts, idx = calibration_targets(groups)
    fpass.stats = capture_stats(work, fit, acts, idx, progress=progress)
    options = _options(work, fpass, groups, fit, progress)
    if not options:
        raise OnnxHmfError("--plan auto: no weight to plan (no float MatMul/Gather weights selected)")
    fixed = int(src_bytes) - sum(opts[0].params for opts in options.values())
    planner = Planner(fpass, options, {g.name: g.shape for g in groups}, fixed, held, reference_outputs(work, held),
                      [g.name for g in all_groups])
    report.timings["plan_measure_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    tried = []

    def trial(budget: int):
        choice = planner.allocate(budget)
        model = planner.assemble(work, choice)
        size = model.ByteSize()
        fid, loss = planner.measure(model)
        tried.append({"budget": int(budget), "bytes": size, "fidelity": round(fid, 5)})
        return choice, size, fid, loss

    floor, ceiling = planner.floor(), planner.ceiling()
    if plan.get("target_fidelity") is None:
        target = plan["target_size"] if plan.get("target_size") else int(plan["target_ratio"] * src_bytes)
        if target < floor:
            raise OnnxHmfError(f"--plan auto: target {target:,} B is below the smallest plan ({floor:,} B: every weight "
                               "at its cheapest option)")
        budget = target
        for _ in range(4):
            choice, size, fid, loss = trial(budget)
            if size <= target:
                break
            budget -= size - target  # the overhead estimate was short: spend that much less
        else:
            raise OnnxHmfError(f"--plan auto: could not fit {target:,} B (last plan {size:,} B)")
    else:
        goal = plan["target_fidelity"]
        lo, hi = floor, ceiling
        best = trial(hi)
        if best[2] < goal:
            raise OnnxHmfError(f"--plan auto: even the largest plan gives held-out fidelity {best[2]:.4f} < {goal}")
        for _ in range(8):
            mid = (lo + hi) // 2
            res = trial(mid)
            if res[2] >= goal:
                hi, best = mid, res
            else:
                lo = mid
            if hi - lo < 0.01 * ceiling:
                break
        choice, size, fid, loss = best
        target = None
    planner.choice = choice
    fpass.keeps = planner.keeps(choice)
    predicted = sum(o.error for o in choice.values())
    rows = []
    for name, o in choice.items():
        kind, keep = o.tag
        m, n = planner.shapes[name]
        r = rank_for_keep(m, n, keep, fpass.rank_multiple) if kind.startswith("lmf") else None
        rows.append({"weight": name, "treatment": kind + (f" r={r}" if r else ""), "bytes": int(o.params),
                     "dense_bytes": 4 * m * n, "predicted_loss": round(float(o.error), 6)})
    planner.rows = rows
    info = {"target_size": target, "target_fidelity": plan.get("target_fidelity"), "fixed_bytes": fixed,
            "planned_bytes": fixed + sum(o.params for o in choice.values()), "bytes": size,
            "predicted_loss": round(predicted, 6), "heldout_loss": round(loss, 6), "heldout_fidelity": round(fid, 5),
            "heldout_samples": held.samples, "fit_samples": fit.samples, "trials": tried, "sites": rows}
    report.settings["plan_result"] = info
    report.timings["plan_search_s"] = time.perf_counter() - t
    counts = {}
    for o in choice.values():
        counts[o.tag[0]] = counts.get(o.tag[0], 0) + 1
    report.notes.append(
        f"plan auto: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}; planned {info['planned_bytes']:,} B, "
        f"assembled {size:,} B; loss predicted {predicted:.4f}, measured {loss:.4f} (held-out fidelity {fid:.4f} on "
        f"{held.samples} samples)")
    return planner


def format_plan(info: dict) -> str:
    """The plan as a table: weight, treatment, bytes (and dense bytes), predicted loss."""
    lines = [f"{'weight':60s} {'treatment':14s} {'bytes':>10s} {'dense':>10s} {'pred. loss':>10s}"]
    for r in info["sites"]:
        lines.append(f"{r['weight'][:60]:60s} {r['treatment']:14s} {r['bytes']:>10,} {r['dense_bytes']:>10,} "
                     f"{r['predicted_loss']:>10.5f}")
    lines.append(f"total: planned {info['planned_bytes']:,} B (fixed {info['fixed_bytes']:,} B), file {info['bytes']:,} B; "
                 f"loss predicted {info['predicted_loss']:.4f}, measured {info['heldout_loss']:.4f}; "
                 f"held-out fidelity {info['heldout_fidelity']:.4f}")
    return "\n".join(lines)
