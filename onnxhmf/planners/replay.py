"""``--plan-file``: a saved (or hand-edited) plan, checked against the model, and the
calibration statistics it was made with, captured again the same way."""
from __future__ import annotations

import os

import onnx

from ..calibration import Calibration, load_calibration
from ..errors import OnnxHmfError
from ..graph.index import GraphIndex
from ..graph.sites import find_weight_groups
from ..plan import Plan
from ..progress import no_progress
from .measured import Calibrated, capture_for

__all__ = ["load_plan", "check_plan", "recapture"]


def load_plan(path: str | os.PathLike, model: onnx.ModelProto) -> Plan:
    plan = Plan.load(path)
    check_plan(plan, model)
    plan.planner = f"file ({plan.planner})"
    return plan


def check_plan(plan: Plan, model: onnx.ModelProto) -> None:
    """One clear error for a plan that does not fit the model: unknown weights, other shapes,
    a treatment the weight cannot take, a weight named twice."""
    index = GraphIndex(model)
    groups = {g.name: g for g in find_weight_groups(index)}
    from ..passes.recurrent import recurrent_groups  # LSTM/GRU/RNN W and R

    groups.update({g.name: g for g in recurrent_groups(model, bool(plan.settings.get("lower_recurrent")))})
    seen = set()
    for d in plan.decisions:
        if d.weight in seen:
            raise OnnxHmfError(f"plan names weight {d.weight!r} twice")
        seen.add(d.weight)
        g = groups.get(d.weight)
        if d.treatment == "storage-ae":
            ref = index.const(d.weight)
            if ref is None or tuple(ref.dims) != tuple(d.shape):
                raise OnnxHmfError(f"plan does not fit the model: no {d.shape[0]}x{d.shape[1]} initializer {d.weight!r}")
            continue
        if g is None:
            raise OnnxHmfError(f"plan does not fit the model: it has no weight {d.weight!r} read by a MatMul/Gemm/Gather")
        if tuple(g.shape) != tuple(d.shape):
            raise OnnxHmfError(f"plan does not fit the model: {d.weight!r} is {g.shape[0]}x{g.shape[1]} in the model, "
                               f"{d.shape[0]}x{d.shape[1]} in the plan")
        if d.changes and g.skip_reason is not None:
            raise OnnxHmfError(f"plan asks {d.treatment} for {d.weight!r}, which cannot change: {g.skip_reason}")
        m, n = g.shape
        if d.rank is not None and d.spec.factor == "lmf" and d.rank > min(m, n):
            raise OnnxHmfError(f"plan asks rank {d.rank} for {d.weight!r} ({m}x{n}): at most {min(m, n)}")
        if d.spec.factor == "ae" and not any(u.kind == "gather" for u in g.uses):
            raise OnnxHmfError(f"plan asks ae for {d.weight!r}, which no Gather reads")
    if plan.settings.get("sequential") and not plan.settings.get("calibration"):
        raise OnnxHmfError("plan is sequential but records no calibration data")


def recapture(model: onnx.ModelProto, plan: Plan, calib=None, progress=no_progress, model_path=None) -> Calibrated | None:
    """The statistics the plan was made with: its calibration source (or ``calib``, which
    overrides it), the same samples and split, the same target weights. A plan of the default
    planner finds its data again the same way (discover.py, same seed)."""
    cs = plan.settings.get("calibration")
    if not cs:
        return None
    if isinstance(calib, Calibration):
        cal = calib
    elif calib is None and cs.get("discovered") and model_path is not None:
        from ..discover import discover_calibration

        cal = discover_calibration(model_path, model, tokenizer=cs.get("tokenizer"), samples=int(cs["samples"]),
                                   seq_len=int(cs["seq_len"]), batch_size=int(cs["batch"]),
                                   seed=int(plan.settings.get("seed", 0))).calibration
        if cal is None:
            raise OnnxHmfError("the plan was calibrated on data found beside the model, which is not there now (--calib)")
    else:
        source = calib if calib is not None else cs.get("source")
        if source is None:
            raise OnnxHmfError("the plan was calibrated on data given in memory: pass it again (--calib)")
        cal = load_calibration(source, model, tokenizer=cs.get("tokenizer"), samples=int(cs["samples"]),
                               seq_len=int(cs["seq_len"]), batch_size=int(cs["batch"]))
    held = None
    if cs.get("held_out"):
        cal, held = cal.split(float(cs["held_out"]))
    groups = {g.name: g for g in find_weight_groups(GraphIndex(model))}
    targets = [groups[n] for n in cs.get("targets", []) if n in groups]
    stats, _ = capture_for(model, cal, targets, progress)
    return Calibrated(cal, held, stats, targets)
