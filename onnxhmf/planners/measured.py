"""Calibrated planning: statistics, measured per-weight keeps, the ``--min-fidelity`` search,
sequential bands.

* :func:`load_for_plan`: the calibration data and the statistics the executor whitens with,
  captured for the candidate weights on the fitting share (the same capture a replayed plan
  makes, from the plan's ``settings.calibration``).
* :func:`measured_plan`: each weight's end-to-end loss measured at two ranks and interpolated
  (passes/calibrated.py), a knapsack over the global budget ``keep``·Σ m·n; with
  ``min_fidelity``, bisection on ``keep`` for the smallest model meeting it on the held-out
  quarter (each trial is built by the executor; the winner is handed on). With ``--sequential``
  the decisions get their fitting band (``Decision.stage``).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..calibration import Calibration, load_calibration
from ..capture import capture_stats
from ..errors import OnnxHmfError
from ..executor import ExecContext, execute, factorizer
from ..graph.index import GraphIndex
from ..graph.sites import WeightGroup, find_weight_groups
from ..passes.calibrated import calibration_targets, fidelity, measure_sensitivities, plan_keeps, reference_outputs, site_levels
from ..plan import Plan
from ..progress import no_progress
from .common import Planned, candidate
from .uniform import decisions_for, storage_decisions

__all__ = ["Calibrated", "load_for_plan", "measured_plan", "SEQUENTIAL_STAGES", "calibration_settings", "capture_for"]

SEQUENTIAL_STAGES = 8  # at most this many calibration passes (each runs the model twice)
DENSE_BY_ALLOCATION = "the measured allocation keeps it dense"


@dataclass
class Calibrated:
    fit: Calibration  # what the statistics were captured on
    held: Calibration | None  # held out for a fidelity search (None: nothing held out)
    stats: object
    groups: list[WeightGroup]  # the candidates the statistics cover


def calibration_settings(options, cal: Calibration, held_out: float, targets: list[str]) -> dict:
    """What a replay needs to capture the same statistics."""
    c = options.calibration
    source = c.calib if not isinstance(c.calib, Calibration) else None
    return {"source": None if source is None else str(source), "tokenizer": None if c.tokenizer is None else str(c.tokenizer),
            "samples": c.samples, "seq_len": c.seq_len, "batch": c.batch, "held_out": held_out, "targets": targets,
            "label": cal.source}


def capture_for(model: onnx.ModelProto, cal: Calibration, groups: list[WeightGroup], progress=no_progress):
    acts, idx = calibration_targets(groups)
    return capture_stats(model, cal, acts, idx, progress=progress), acts


def load_calibration_data(model: onnx.ModelProto, options) -> Calibration:
    c = options.calibration
    if isinstance(c.calib, Calibration):
        return c.calib
    return load_calibration(c.calib, model, tokenizer=c.tokenizer, samples=c.samples, seq_len=c.seq_len, batch_size=c.batch)


def load_for_plan(model: onnx.ModelProto, options, held_out: float, progress=no_progress, split=None) -> Calibrated:
    """``split``: (fit, held-out) given already (the default planner's discovered data)."""
    if split is not None:
        cal, held = split
    else:
        cal = load_calibration_data(model, options)
        held = None
        if held_out:
            cal, held = cal.split(held_out)
    groups = [g for g in find_weight_groups(GraphIndex(model)) if candidate(g, options) is None]
    stats, _ = capture_for(model, cal, groups, progress)
    return Calibrated(cal, held, stats, groups)


def _summary(cal: Calibration, stats, acts: int) -> dict:
    return {"source": cal.source, "samples": cal.samples, "tokens": cal.tokens, "activations": acts,
            "gram_bytes": int(sum(g.nbytes for g in stats.grams.values()))}


def measured_plan(model: onnx.ModelProto, options, progress=no_progress) -> Planned:
    """The calibrated plan: measured allocation (default), uniform, or the min-fidelity search."""
    b, m = options.budget, options.methods
    held_out = 0.25 if b.min_fidelity is not None else 0.0
    c = load_for_plan(model, options, held_out, progress)
    all_groups = find_weight_groups(GraphIndex(model))
    storage, snotes = storage_decisions(model, options)
    taken = {d.weight for d in storage}
    settings = {**options.settings(), "calibration": calibration_settings(options, c.fit, held_out, [g.name for g in c.groups])}
    info = _summary(c.fit, c.stats, len(calibration_targets(c.groups)[0]))
    plan = Plan(decisions_for(all_groups, options, taken=taken) + storage, settings, "uniform")
    built = None
    if options.measured and c.groups:
        plan.planner = "measured"
        ctx = ExecContext(stats=c.stats)
        fpass = factorizer(plan, ctx)
        sens = measure_sensitivities(model, fpass, c.groups, c.fit, rank_multiple=b.rank_multiple, progress=progress)
        shapes = {g.name: g.shape for g in c.groups}
        keep = b.keep
        if b.min_fidelity is not None:
            plan.planner = "min-fidelity"
            keep, reached, tried, built = _search_keep(model, plan, options, sens, shapes, c, taken)
            info.update({"min_fidelity": b.min_fidelity, "keep_found": keep, "heldout_fidelity": reached,
                         "heldout_samples": c.held.samples, "search": tried})
            plan.summary.setdefault("notes", []).append(
                f"--min-fidelity {b.min_fidelity}: keep {keep:.3f} of the compressible parameters reaches cosine "
                f"{reached:.4f} on {c.held.samples} held-out calibration samples")
        keeps = plan_keeps(sens, shapes, keep)
        plan.decisions = decisions_for(all_groups, options, keeps, DENSE_BY_ALLOCATION, taken) + storage
        _predicted_losses(plan, sens)
        info["allocation"] = "measured"
        info["dense_by_allocation"] = sorted(n for n, k in keeps.items() if k >= 1.0)
    else:
        info["allocation"] = "uniform"
    if m.sequential:
        plan.planner += "+sequential"
        _assign_bands(model, plan, c.groups)
        built = None  # the search's trials were not fitted band by band
    plan.summary["calibration"] = info
    if snotes:
        plan.summary.setdefault("notes", []).extend(snotes)
    return Planned(plan, built), c


def _predicted_losses(plan: Plan, sens: dict) -> None:
    for d in plan.decisions:
        opts = sens.get(d.weight)
        if not opts:
            continue
        keep = 1.0 if d.treatment == "dense" else d.keep
        hit = [o for o in opts if keep is not None and abs(float(o.tag) - keep) < 1e-9]
        if hit:
            d.predicted_loss = float(hit[0].error)


def _search_keep(model, plan: Plan, options, sens, shapes, c: Calibrated, taken) -> tuple:
    """Bisection on the global keep for the smallest model whose held-out fidelity ≥ target;
    (keep, fidelity, trials, the winner as built by the executor)."""
    target = options.budget.min_fidelity
    refs = reference_outputs(model, c.held)
    groups = find_weight_groups(GraphIndex(model))
    cache: dict = {}  # LMF factors shared by the trials

    def trial(k: float):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        p = Plan(decisions_for(groups, options, plan_keeps(sens, shapes, k), DENSE_BY_ALLOCATION, taken),
                 plan.settings, plan.planner)
        built = execute(m, p, ExecContext(stats=c.stats, cache=cache))
        return fidelity(built.model, refs, c.held), built

    lo, hi, best, best_built = 0.0, 1.0, 1.0, None
    tried = []
    for _ in range(7):
        mid = (lo + hi) / 2
        f, built = trial(mid)
        tried.append([round(mid, 4), round(f, 5)])
        if f >= target:
            hi, best, best_built = mid, f, built
        else:
            lo = mid
    if hi >= 1.0:
        raise OnnxHmfError(f"no compressed model reaches --min-fidelity {target} on held-out calibration data "
                           f"(best tried: keep {tried[-1][0]} gives {tried[-1][1]})")
    return hi, best, tried, best_built if not taken else None


def _assign_bands(model: onnx.ModelProto, plan: Plan, groups: list[WeightGroup], stages: int = SEQUENTIAL_STAGES) -> None:
    """Cut the candidates' levels (site_levels) into at most ``stages`` consecutive bands."""
    levels = site_levels(model, groups)
    distinct = sorted(set(levels.values()))
    per = max(1, -(-len(distinct) // stages))
    band = {lvl: i // per for i, lvl in enumerate(distinct)}
    for d in plan.decisions:
        if d.weight in levels:
            d.stage = band[levels[d.weight]]
