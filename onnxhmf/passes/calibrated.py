"""Calibrated compression: statistics, measured budget allocation, fidelity search, sequential.

* ``calibration_targets``: which activations (inputs of MatMul/Gemm uses) and index tensors
  (Gather ids) to capture for the groups a pass may rewrite.
* ``measure_sensitivities``: for every group, the end-to-end loss Σ_outputs (1 − mean cosine)
  when only that weight is replaced by its whitened rank-r approximation, measured at two
  ranks and interpolated over a grid of keeps by the site's exact whitened spectrum. One
  onnxruntime session serves all trials: the weights become overridable graph inputs (an
  initializer that is also a graph input can be fed), so a trial is one run with that weight
  fed, no rebuild.
* ``plan_keeps``: the knapsack (factorize/allocate.py) over those options for a global budget
  ``keep``·Σ m·n; groups whose options do not pay off stay dense.
* ``fidelity``: min over float outputs of the mean cosine to the reference (what
  ``--min-cosine`` checks), on held-out calibration batches.
* ``site_levels``: sites ordered by how many other sites feed them, for sequential calibration.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx

from ..calibration import Calibration
from ..capture import masked_rows, session
from ..factorize.allocate import Option, allocate
from ..factorize.svd import rank_for_keep
from ..factorize.whiten import reconstruct_rank, whitened_spectrum
from ..graph.expose import lift_initializers
from ..graph.index import GraphIndex
from ..graph.rewrite import factor_orientation
from ..graph.sites import WeightGroup
from ..progress import no_progress
from .factorize import FactorizePass  # noqa: F401 (type of ``fpass``)

__all__ = [
    "KEEP_GRID",
    "calibration_targets",
    "measure_sensitivities",
    "plan_keeps",
    "output_loss",
    "fidelity",
    "site_levels",
]

KEEP_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # candidate keeps per site
PROBE_KEEPS = (0.2, 0.5)  # where the end-to-end loss is measured


def calibration_targets(groups: list[WeightGroup]) -> tuple[list[str], dict[str, int]]:
    """(activation tensors feeding MatMul/Gemm uses, {Gather index tensor: table rows})."""
    acts, idx = [], {}
    for g in groups:
        for u in g.uses:
            if u.kind == "gather":
                idx[u.node.input[1]] = g.shape[0]
            else:
                acts.append(u.node.input[0])
    return list(dict.fromkeys(acts)), idx


def _cosines(ref: np.ndarray, cand: np.ndarray, mask) -> float:
    r = masked_rows(ref, mask).astype(np.float64)
    c = masked_rows(cand, mask).astype(np.float64)
    nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
    ok = (nr > 0) & (nc > 0)
    cos = np.where(ok, np.sum(r * c, axis=1) / np.where(ok, nr * nc, 1.0), (nr == nc).astype(float))
    return float(np.mean(cos))


def output_loss(ref: list[np.ndarray], cand: list[np.ndarray], mask=None) -> float:
    """Σ over float outputs of (1 − mean row cosine), padded rows excluded."""
    return sum(1.0 - _cosines(r, c, mask) for r, c in zip(ref, cand) if np.issubdtype(r.dtype, np.floating))


def fidelity(model: onnx.ModelProto, reference: list[list[np.ndarray]], calib: Calibration) -> float:
    """min over float outputs of the mean row cosine to ``reference`` outputs on ``calib``."""
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    sums, n = np.zeros(len(names)), 0
    for feeds, ref in zip(calib.batches, reference):
        mask = feeds.get(calib.mask) if calib.mask else None
        out = sess.run(names, feeds)
        sums += [(_cosines(r, c, mask) if np.issubdtype(r.dtype, np.floating) else 1.0) for r, c in zip(ref, out)]
        n += 1
    return float(np.min(sums / max(n, 1)))


def reference_outputs(model: onnx.ModelProto, calib: Calibration) -> list[list[np.ndarray]]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return [sess.run(names, feeds) for feeds in calib.batches]


def _merged(calib: Calibration, max_tokens: int) -> Calibration:
    """About ``max_tokens`` real tokens as one batch (one run per trial). With a mask, the rows
    are sentences of similar length around the median, so little of the batch is padding."""
    if any(np.ndim(v) == 0 for b in calib.batches for v in b.values()):  # a scalar input (a sample rate):
        return Calibration(calib.batches, calib.mask, calib.source)  # rows cannot be pooled across batches
    rows = [{k: v[i : i + 1] for k, v in b.items()} for b in calib.batches for i in range(next(iter(b.values())).shape[0])]
    if not calib.mask:
        n = max(1, max_tokens // max(1, int(np.prod(next(iter(rows[0].values())).shape[1:2]))))
        shapes = {tuple(v.shape[1:]) for r in rows[:n] for v in r.values()}
        if len(shapes) > len(rows[0]):  # ragged without a mask: keep the batches as they are
            return Calibration(calib.batches[:1], calib.mask, calib.source)
        return Calibration([{k: np.concatenate([r[k] for r in rows[:n]]) for k in rows[0]}], calib.mask, calib.source)
    lengths = np.array([int(np.sum(r[calib.mask] != 0)) for r in rows])
    order = np.argsort(lengths, kind="stable")
    mid = len(order) // 2
    pick, total, lo, hi = [], 0, mid, mid
    while total < max_tokens and (lo > 0 or hi < len(order)):  # grow a window around the median
        if hi < len(order):
            pick.append(order[hi]); total += lengths[order[hi]]; hi += 1  # noqa: E702
        if total < max_tokens and lo > 0:
            lo -= 1; pick.append(order[lo]); total += lengths[order[lo]]  # noqa: E702
    L = int(max(lengths[pick]))
    batch = {}
    for k in rows[0]:
        parts = [rows[i][k][:, :L] if rows[i][k].ndim >= 2 else rows[i][k] for i in sorted(pick)]
        batch[k] = np.concatenate(parts, axis=0)
    return Calibration([batch], calib.mask, calib.source)


def _loss_model(e: np.ndarray, probes: list[tuple[float, float]]) -> np.ndarray:
    """End-to-end loss as a power of the site's relative output error e, L = a·e^b, fitted
    through the measured (e, L) probes (b = 2, the small-perturbation slope, when the probes
    cannot fix it)."""
    pts = [(pe, pl) for pe, pl in probes if pe > 0 and pl > 0]
    if not pts:
        return np.zeros_like(e)
    if len(pts) >= 2 and abs(np.log(pts[-1][0] / pts[0][0])) > 1e-3:
        (e0, l0), (e1, l1) = pts[0], pts[-1]
        b = float(np.clip(np.log(l1 / l0) / np.log(e1 / e0), 0.5, 6.0))
    else:
        b = 2.0
    a = float(np.exp(np.mean([np.log(pl) - b * np.log(pe) for pe, pl in pts])))
    return a * np.power(e, b)


def measure_sensitivities(
    model: onnx.ModelProto,
    fpass: FactorizePass,
    groups: list[WeightGroup],
    calib: Calibration,
    *,
    grid: tuple[float, ...] = KEEP_GRID,
    probes: tuple[float, ...] = PROBE_KEEPS,
    max_tokens: int = 256,
    rank_multiple: int = 1,
    progress: Callable = no_progress,
    costs=None,
) -> dict[str, list[Option]]:
    """{group: [Option(params, loss, keep)]}, dense (keep 1, loss 0) included.

    For each group, the whitened spectrum gives the exact relative error e(r) of the layer's
    own output at every rank; the end-to-end loss is *measured* at the ``probes`` keeps (one
    onnxruntime run each with only that weight replaced) and interpolated to the ``grid`` by
    the power law of :func:`_loss_model`. ``costs`` (graph/pivot.PivotCosts): ranks and option
    sizes in the pivoted currency (r(m+n−r) + index maps where smaller than A·B).
    """
    index = GraphIndex(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {i.name for i in probe.graph.input}
    targets = [g for g in groups if g.ref.kind == "initializer"]
    lifted = set(lift_initializers(probe, [g.ref for g in targets if g.ref.scope]))  # a body's own can't be fed
    targets = [g for g in targets if not g.ref.scope or g.ref.name in lifted]  # (the rest get the uniform keep)
    for g in targets:
        if g.name not in have:
            probe.graph.input.append(onnx.helper.make_tensor_value_info(g.name, g.ref.data_type, list(g.shape)))
    sess = session(probe)
    names = [o.name for o in model.graph.output]
    data = _merged(calib, max_tokens)
    refs = [sess.run(names, feeds) for feeds in data.batches]
    out: dict[str, list[Option]] = {}
    for g in progress(targets, "measuring weights"):
        m, n = g.shape
        transposed = factor_orientation(g)
        T = index.array(g.ref)
        rows, cols, _ = fpass.sides(g, transposed)
        spec = whitened_spectrum(T.T if transposed else T, fpass.whitened(rows), fpass.whitened(cols), damp=fpass.damp)
        s2 = spec[1] ** 2
        tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])  # tail[r] = Σ_{i≥r} σ_i²
        rel = np.sqrt(tail / max(tail[0], 1e-300))

        def rank(keep: float) -> int:
            return costs.rank(g, keep, rank_multiple) if costs is not None else rank_for_keep(m, n, keep, rank_multiple)

        def cost(r: int) -> int:  # the storage currency: pivoted r(m+n−r) + maps where smaller, else A·B
            return costs.cost(g, r) if costs is not None else r * (m + n)

        measured = []
        for keep in probes:
            r = rank(keep)
            if r < 1 or cost(r) >= m * n:
                continue
            Wr = reconstruct_rank(spec, r)
            Wr = (Wr.T if transposed else Wr).astype(T.dtype)
            loss = 0.0
            for feeds, ref in zip(data.batches, refs):
                mask = feeds.get(data.mask) if data.mask else None
                loss += output_loss(ref, sess.run(names, {**feeds, g.name: Wr}), mask)
            measured.append((float(rel[r]), loss / len(data.batches)))
        opts = [Option(m * n, 0.0, 1.0)]
        ranks = sorted({rank(k) for k in grid if 1 <= rank(k) and cost(rank(k)) < m * n})
        if ranks:
            pred = _loss_model(rel[ranks], measured)
            opts += [Option(cost(r), float(p), cost(r) / (m * n)) for r, p in zip(ranks, pred)]
        out[g.name] = opts
    return out


def plan_keeps(sens: dict[str, list[Option]], shapes: dict[str, tuple[int, int]], keep: float) -> dict[str, float]:
    """Per-group keep for a global budget keep·Σ m·n over ``shapes`` (groups without measured
    options get the uniform ``keep``, and their share is set aside first)."""
    fixed = {name: keep for name in shapes if name not in sens}
    budget = int(keep * sum(m * n for m, n in shapes.values()))
    budget -= sum(int(keep * shapes[n][0] * shapes[n][1]) for n in fixed)
    names = [n for n in shapes if n in sens]
    floor = sum(min(o.cost for o in sens[n]) for n in names)  # a tiny keep (a --min-fidelity search) gets the cheapest plan
    choice = allocate([sens[n] for n in names], max(budget, floor, 0))
    return {**fixed, **{n: float(o.tag) for n, o in zip(names, choice)}}


def site_levels(model: onnx.ModelProto, groups: list[WeightGroup]) -> dict[str, int]:
    """Level of each group: 1 + the largest level among groups upstream of its activations
    (Gather-only groups are level 0). Groups of one level do not feed each other."""
    index = GraphIndex(model)
    node_group = {id(u.node): g.name for g in groups for u in g.uses if u.kind != "gather"}
    memo: dict[str, int] = {}

    def depth(tensor: str) -> int:  # the largest level among target nodes that produce ``tensor``
        if tensor in memo:
            return memo[tensor]
        memo[tensor] = 0
        stack, best, seen = [tensor], 0, set()
        while stack:
            t = stack.pop()
            node = index.producer.get(t)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if id(node) in node_group:
                best = max(best, level(node_group[id(node)]))
                continue
            stack.extend(i for i in node.input if i)
        memo[tensor] = best
        return best

    levels: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in levels:
            g = next(x for x in groups if x.name == name)
            ins = [u.node.input[0] for u in g.uses if u.kind != "gather"]
            levels[name] = 1 + max((depth(i) for i in ins), default=-1) if ins else 0
        return levels[name]

    return {g.name: level(g.name) for g in groups}
