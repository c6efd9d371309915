"""What every planner shares: one decision for one weight group at a keep or rank."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..factorize.svd import breakeven_rank, lmf_params, rank_for_keep, round_rank
from ..graph.index import FLOAT_TYPES
from ..graph.sites import WeightGroup
from ..plan import Decision, Plan

__all__ = ["Planned", "decision", "decide", "dense"]


@dataclass
class Planned:
    """A planner's result: the plan, and the model it already built and measured (or None).
    ``built``: (model after the executor, site reports, notes), before metadata."""

    plan: Plan
    built: tuple | None = None
    judge: object = None  # the default planner: fidelity.FidelityJudge on its held-out calibration batches


def decision(group: WeightGroup, treatment: str, **kw) -> Decision:
    itemsize = np.dtype(FLOAT_TYPES.get(group.ref.data_type, np.float32)).itemsize
    return Decision(weight=group.name, treatment=treatment, shape=tuple(group.shape), ops=group.ops,
                    nodes=list(group.node_names), itemsize=itemsize, **kw).predict()


def dense(group: WeightGroup, reason: str) -> Decision:
    return decision(group, "dense", reason=reason)


def pivot_costs(model: onnx.ModelProto, groups: list[WeightGroup], options):
    """The pivoted-storage costs of ``groups`` (graph/pivot.PivotCosts), or None with --no-pivot."""
    if not options.methods.pivot:
        return None
    from ..graph.index import GraphIndex
    from ..graph.pivot import PivotCosts

    return PivotCosts(GraphIndex(model), groups, fold=options.methods.fold and not options.methods.sequential)


def decide(group: WeightGroup, method: str, *, keep: float | None, rank: int | None = None, rank_multiple: int = 1,
           dense_reason: str | None = None, costs=None) -> Decision:
    """The decision for ``method`` at ``keep`` (or a fixed ``rank`` for lmf): the rank or the
    parameter budget ⌊keep·m·n⌋, or dense with the reason it would not pay.

    ``dense_reason``: why a keep ≥ 1 keeps it dense (the caller's wording)."""
    m, n = group.shape
    if method == "skip":
        return dense(group, "--embedding-method skip")
    if keep is not None and keep >= 1.0 and rank is None:
        return dense(group, dense_reason or "--keep 1 keeps every weight dense")
    if method == "lmf" and costs is not None:
        r = round_rank(min(rank, min(m, n)), rank_multiple) if rank is not None else costs.rank(group, keep, rank_multiple)
        if r >= 1 and costs.stores_pivoted(group, r):
            if costs.cost(group, r) >= m * n:
                return dense(group, f"rank {r} would not save parameters (pivoted, with its index map)")
            return decision(group, "lmf", rank=r, keep=keep, pivot=True, index=costs.map_cost(group))
        rank = r if rank is not None else None
    if method == "lmf":
        limit = breakeven_rank(m, n)
        r = round_rank(min(rank, min(m, n)), rank_multiple) if rank is not None else rank_for_keep(m, n, keep, rank_multiple)
        if r < 1:
            return dense(group, f"keep {keep:.3g} leaves rank 0 (break-even rank {limit})")
        if lmf_params(m, n, r) >= m * n:
            return dense(group, f"rank {r} would not save parameters (break-even rank {limit})")
        return decision(group, "lmf", rank=r, keep=keep)
    budget = int(np.floor(keep * m * n + 1e-9))
    if budget >= m * n:
        return dense(group, f"keep {keep:.3g} saves nothing")
    if budget < 1:
        return dense(group, f"keep {keep:.3g} leaves nothing")
    pivot = (costs is not None and costs.pivot and method == "hmf" and not any(u.kind == "gather" for u in group.uses)
             and len({u.transposed for u in group.uses}) == 1)  # HMF with a pivoted remainder
    return decision(group, method, budget=budget, keep=keep, pivot=pivot)


def candidate(group: WeightGroup, options) -> str | None:
    """Why the planners leave ``group`` alone (None: it is a candidate)."""
    return group.skip_reason or options.selection.why_not(group) or (
        "--embedding-method skip" if options.methods.method_for(group) == "skip" else None)


def model_bytes(model: onnx.ModelProto) -> int:
    return model.ByteSize()


def predict_padded(model: onnx.ModelProto, plan: Plan) -> None:
    """Predicted bytes under ``--kernels onnxruntime``: a blocked MatMul weight is stored as
    MatMulNBits stores it, K rounded up to whole blocks (graph/nbits.py), which the cost
    model's ``treatment_bytes`` does not count: the planned treatment's own padded price
    (passes/intquant.IntTreatment.nbytes) less its unpadded one is added."""
    from ..graph.qdq import site_kind
    from ..passes.intquant import PLANNED

    for d in plan.decisions:
        t = PLANNED.get(d.treatment)
        if t is None or d.predicted_bytes is None or site_kind(model, d.weight) != "matmul":
            continue
        d.predicted_bytes += t.nbytes(d.shape, padded=True) - t.nbytes(d.shape)


def predict_int8(model: onnx.ModelProto, plan: Plan) -> None:
    """Predicted bytes under ``--quantize int8``: every float weight the quantizer takes (a
    MatMul's B or a Gather's table, factors included) is stored as int8, at the cost model's
    int8 price (with ``table_bits`` 4, a kept table at the int4 rows' price); the factors of a
    table that something else also reads (a tied head) stay float (quantize_int8 leaves them),
    unless the table is tied and shares its rows with the head."""
    from ..factorize.quant import blocked_bytes
    from ..plan import INT4_OVERHEAD, TIED_INT8_OVERHEAD, treatment_bytes
    from ..graph.index import default_opset
    from ..graph.qdq import site_kind
    from ..quantize import weight_nodes

    takes = weight_nodes(model)
    four = plan.settings.get("table_bits") == 4
    tied = lambda w: default_opset(model) >= 11 and site_kind(model, w) == "tied"  # noqa: E731 (quantize._own_tables)
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    for d in plan.decisions:
        nodes = takes.get(d.weight)
        if nodes is None:
            continue
        if d.treatment == "dense" and four and site_kind(model, d.weight) in ("table", "tied"):
            V, D = d.shape  # quantize._own_tables: int4 rows, block 32 (one per row if tied or 32 ∤ D)
            block = D if tied(d.weight) or D % 32 else 32
            d.predicted_bytes = blocked_bytes(D, V, 4, block) + INT4_OVERHEAD + (TIED_INT8_OVERHEAD if tied(d.weight) else 0)
        elif d.treatment == "dense":
            d.predicted_bytes = treatment_bytes("int8", d.shape, tied=tied(d.weight))
        elif d.treatment == "lmf" and (len(nodes) >= readers.get(d.weight, 0) or d.pivot or tied(d.weight)):
            # (a pivoted tied table is quantized once: its head reads W_p directly, no Transpose;
            # a tied factor's int8 rows are shared by its Gather and its head)
            d.predicted_bytes = treatment_bytes("lmf-int8", d.shape, rank=d.rank, pivot=d.pivot, index=d.index)
