"""The uniform planner: every candidate weight gets the same keep (or rank), by its method.

Data-free, or whitened when the executor is given calibration statistics (``--allocate
uniform``, or ``--rank`` with ``--calib``). Weights the storage autoencoder takes are planned
as ``storage-ae``.
"""
from __future__ import annotations

import onnx

from ..graph.index import GraphIndex
from ..graph.sites import WeightGroup, find_weight_groups
from ..plan import Decision, Plan
from .common import candidate, decide, dense

__all__ = ["uniform_plan", "decisions_for", "storage_decisions"]


def decisions_for(groups: list[WeightGroup], options, keeps: dict[str, float] | None = None,
                  dense_reason: str | None = None, taken: set[str] = frozenset()) -> list[Decision]:
    """One decision per group: dense with the reason where it is no candidate, else its
    method at the group's keep (``keeps``, falling back to the uniform keep) or the fixed rank."""
    b, m = options.budget, options.methods
    out = []
    for g in groups:
        if g.name in taken:
            continue
        why = candidate(g, options)
        if why is not None:
            out.append(dense(g, why))
            continue
        keep = b.keep if keeps is None or g.name not in keeps else keeps[g.name]
        rank = b.rank if keeps is None or g.name not in keeps else None
        why_dense = dense_reason if keeps is not None and g.name in keeps else (
            "--quantize int8 alone: int8, no factorization" if m.quantize and keep is not None and keep >= 1 else None)
        out.append(decide(g, m.method_for(g), keep=keep, rank=rank, rank_multiple=b.rank_multiple, dense_reason=why_dense))
    return out


def storage_decisions(model: onnx.ModelProto, options) -> tuple[list[Decision], list[str]]:
    """(storage-ae decisions for the weights the storage autoencoder takes, notes on the others)."""
    cfg = options.methods.storage_ae
    if not cfg:
        return [], []
    from ..passes.storage_ae import storage_groups

    index = GraphIndex(model)
    groups, skipped = storage_groups(index, list(cfg.get("include", [])), int(cfg.get("min_group", 2)))
    out = []
    for names in groups.values():
        for n in names:
            dims = tuple(index.const(n).dims)
            out.append(Decision(weight=n, treatment="storage-ae", shape=dims, ops="storage",
                                keep=float(cfg.get("keep", 0.25)), reason="--storage-ae-include"))
    return out, [f"storage AE: {n} not taken: {why}" for n, why in skipped.items()]


def uniform_plan(model: onnx.ModelProto, options, groups: list[WeightGroup] | None = None) -> Plan:
    groups = find_weight_groups(GraphIndex(model)) if groups is None else groups
    storage, notes = storage_decisions(model, options)
    taken = {d.weight for d in storage}
    plan = Plan(decisions_for(groups, options, taken=taken) + storage, options.settings(), "uniform")
    if notes:
        plan.summary["notes"] = notes
    return plan
