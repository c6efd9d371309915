"""What optimize would do, without doing it: per site the method, rank or budget, and the
predicted parameters and bytes (``optimize --dry-run``, and the size line of ``inspect``).

For LMF the prediction is exact: rank r stores r·(m+n) parameters. For HMF and pruning the
plan is a parameter budget ⌊keep·m·n⌋; the rewrite stores at most that many (HMF picks its
split only when it factorizes), so the prediction is an upper bound. (One exception for LMF: a
tall table whose numerical rank is below the planned rank gets that lower rank, see
svd._gram_svd, and so fewer parameters than predicted.)
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import onnx

from .api import count_params
from .errors import OnnxHmfError
from .graph.index import FLOAT_TYPES, GraphIndex
from .graph.sites import WeightGroup, find_weight_groups
from .passes.factorize import FactorizePass
from .passes.select import SiteSelection
from .factorize.svd import lmf_params

__all__ = ["SitePlan", "Plan", "plan_groups", "plan_optimize"]


@dataclass
class SitePlan:
    weight: str
    ops: str
    nodes: list[str]
    shape: tuple[int, int]
    params: int
    itemsize: int
    status: str  # "planned" | "skipped"
    method: str = "-"
    rank: int = 0  # lmf
    budget: int = 0  # hmf / prune: at most this many parameters
    params_after: int | None = None  # exact for lmf, an upper bound for hmf and prune
    reason: str = ""


@dataclass
class Plan:
    sites: list[SitePlan] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int | None = None
    bytes_after: int | None = None
    exact: bool = True  # False when some prediction is an upper bound (hmf, prune)
    settings: dict = field(default_factory=dict)

    @property
    def planned(self) -> list[SitePlan]:
        return [s for s in self.sites if s.status == "planned"]

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        from .report import _table

        rows = [(s.ops, s.weight, f"{s.shape[0]}x{s.shape[1]}", s.method,
                 str(s.rank) if s.method == "lmf" else f"budget {s.budget:,}",
                 f"{s.params:,} -> {'' if s.method == 'lmf' else '≤ '}{s.params_after:,}")
                for s in self.planned]
        lines = _table(("op", "weight", "shape", "method", "rank", "params"), rows) if rows else ["no site would be rewritten"]
        skipped = [s for s in self.sites if s.status != "planned"]
        if skipped:
            lines.append(f"skipped {len(skipped)} site(s):")
            lines += [f"  {s.weight} ({s.ops}, {s.shape[0]}x{s.shape[1]}): {s.reason}" for s in skipped]
        le = "" if self.exact else "≤ "
        ratio = self.params_after / self.params_before if self.params_before else 1.0
        lines.append(f"params: {self.params_before:,} -> {le}{self.params_after:,} ({ratio:.3f}x, predicted)")
        if self.bytes_before is not None and self.bytes_after is not None:
            lines.append(f"file:   {self.bytes_before:,} -> {le}~{self.bytes_after:,} bytes "
                         f"({self.bytes_after / self.bytes_before:.3f}x, predicted)")
        return "\n".join(lines)


def _site(group: WeightGroup, **kw) -> SitePlan:
    itemsize = np.dtype(FLOAT_TYPES.get(group.ref.data_type, np.float32)).itemsize
    return SitePlan(weight=group.name, ops=group.ops, nodes=group.node_names, shape=group.shape,
                    params=group.params, itemsize=itemsize, **kw)


def plan_groups(model: onnx.ModelProto, fpass: FactorizePass, groups: Iterable[WeightGroup] | None = None,
                bytes_before: int | None = None) -> Plan:
    """The plan ``fpass.run`` would follow on ``model`` (nothing is factorized or changed)."""
    groups = find_weight_groups(GraphIndex(model)) if groups is None else list(groups)
    plan = Plan(params_before=count_params(model), bytes_before=bytes_before)
    saved = saved_bytes = 0
    for group in groups:
        method = fpass.method_for(group)
        reason = group.skip_reason or fpass.selection.why_not(group)
        amount = 0
        if reason is None:
            amount, reason = fpass.plan(group, method)
        if reason is not None:
            plan.sites.append(_site(group, status="skipped", method=method, reason=reason))
            continue
        m, n = group.shape
        if method == "lmf":
            site = _site(group, status="planned", method=method, rank=amount, params_after=lmf_params(m, n, amount))
        else:
            site = _site(group, status="planned", method=method, budget=amount, params_after=amount)
            plan.exact = False
        plan.sites.append(site)
        saved += site.params - site.params_after
        if method != "prune":  # pruning stores the tensor dense, with zeros: the file does not shrink
            saved_bytes += (site.params - site.params_after) * site.itemsize
    plan.params_after = plan.params_before - saved
    if bytes_before is not None:
        plan.bytes_after = bytes_before - saved_bytes
    return plan


def plan_optimize(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    method: str = "lmf",
    embedding_method: str | None = None,
    keep: float | None = 0.75,
    rank: int | None = None,
    rank_multiple: int = 1,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    min_params: int = 0,
    quantize: str | None = None,
    lower_recurrent: bool = False,
    **_ignored,
) -> Plan:
    """``optimize``'s plan for the same options (options that do not change the plan, such as
    verification settings or token frequencies, are accepted and ignored)."""
    from .io import load_model, model_file_bytes

    bytes_before = None
    if not isinstance(model, onnx.ModelProto):
        bytes_before = model_file_bytes(model)
        model = load_model(model)
    else:
        bytes_before = model.ByteSize()
    try:
        fpass = FactorizePass(method=method, embedding_method=embedding_method, keep=keep, rank=rank,
                              rank_multiple=rank_multiple, selection=SiteSelection(list(include), list(exclude), min_params))
    except ValueError as e:
        raise OnnxHmfError(str(e)) from None
    plan = plan_groups(model, fpass, bytes_before=bytes_before)
    _plan_recurrent(model, fpass, plan, lower_recurrent)
    plan.settings = {"method": method, "embedding_method": embedding_method, "keep": keep if rank is None else None,
                     "rank": rank, "rank_multiple": rank_multiple, "include": list(include), "exclude": list(exclude),
                     "min_params": min_params, "quantize": quantize}
    if quantize == "int8" and plan.bytes_after is not None:
        _int8_bytes(model, plan)
    return plan


def _plan_recurrent(model: onnx.ModelProto, fpass: FactorizePass, plan: Plan, lower: bool) -> None:
    """Add the recurrent ops' W and R (passes/recurrent.py) to ``plan``."""
    from .passes.recurrent import recurrent_plan

    for kw in recurrent_plan(model, fpass, lower):
        site = SitePlan(**kw)
        plan.sites.append(site)
        if site.status == "planned":
            plan.exact = plan.exact and site.method == "lmf"
            plan.params_after -= site.params - site.params_after
            if plan.bytes_after is not None:
                plan.bytes_after -= (site.params - site.params_after) * site.itemsize


def _int8_overhead(name: str) -> int:
    """Bytes a quantized tensor adds besides its values (scale, zero point, nodes, names): a fit
    to 0.5 kB for a one-letter name, 1.1 kB on glassllm, 2.3 kB on MiniLM (node names grow too)."""
    return 440 + 41 * len(name)


def _int8_bytes(model: onnx.ModelProto, plan: Plan) -> None:
    """Predicted file bytes after ``--quantize int8``: each float32 weight the quantizer takes
    (a MatMul's B or a Gather's table, factors included) goes from 4 bytes per value to 1, plus
    _int8_overhead for its scale, zero point, nodes and names. The factors of a table
    that something else also reads (a tied head) stay float (quantize_int8 leaves them)."""
    from .quantize import weight_nodes

    takes = weight_nodes(model)
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    by_name = {s.weight: s for s in plan.sites}
    values = overhead = 0
    for name, nodes in takes.items():
        site = by_name.get(name)
        if site is not None and site.status == "planned":
            if site.method != "lmf" or len(nodes) < readers.get(name, 0):
                continue  # hmf/prune rewrites, tied factors: not predicted to shrink
            values, overhead = values + site.params_after, overhead + 2 * _int8_overhead(name + ".lmf_A")
        else:
            dims = next(t.dims for t in model.graph.initializer if t.name == name)
            values, overhead = values + int(np.prod(dims)), overhead + _int8_overhead(name)
    plan.bytes_after -= 3 * values - overhead
