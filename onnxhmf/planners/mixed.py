"""``--plan auto``: per weight, one of dense fp32, int8, weight-only int8 or int4, whitened LMF,
or LMF with int8 / weight-only int8 factors, under one byte budget (or the smallest plan meeting a
held-out fidelity).

Candidates of a weight group of shape m×n (bytes; loss = Σ_outputs (1 − mean cosine) when
only that group is changed, as in calibrated.measure_sensitivities):

* dense: 4·m·n, loss 0.
* int8 (MatMulInteger; Gather + DequantizeLinear for tables): m·n + c, c = quantize.INT8_OVERHEAD.
  Loss *measured* with the weight the quantizer stores (quantize.int8_weight) and, for MatMuls,
  the input switched through DynamicQuantizeLinear → DequantizeLinear in the probe graph, which
  is exactly what MatMulInteger computes (tests/test_plan.py checks it).
* int8w (weight-only: int8 + per-column scales, Cast·Mul → float MatMul): m·n + 4n + c, loss
  measured with quantize.int8w_weight. Accurate, but runs at float speed.
* int4w (the same with 4 bits, two values per byte, unpacked by BitShift/Concat): m·n/2 +
  4n + c', opset ≥ 11 and an even side. Both are folded by onnxruntime at load, tables included.
* LMF rank r: 4·r·(m+n), loss from measure_sensitivities (measured at two ranks, interpolated).
* LMF rank r with int8 (or int8w) factors: r·(m+n) + 2c, loss L_lmf(r) + δ(r), δ = max(0, measured
  loss of the quantized factors − the same with float factors), measured at the ranks of three
  keeps (DELTA_KEEPS: 0.2, 0.5 and the grid's top 0.95) and interpolated linearly in r between
  them: it grows with the rank, convexly, so the chords are upper bounds.
* Pivoted LMF (plmf, plmf-int8, plmf-int8w; not with --no-pivot): the same losses at the same
  rank, r(m+n−r) numbers plus the index maps, W_p and C quantized for their own δ(r).
* Integers at run time (passes/intquant.PLANNED): blocked asymmetric int4 (blocks 32, 128, 256; act-order GPTQ;
  with --rotate, MatMuls also blocks 32, 64, 128, 256 of the weight rotated by a 32×32 block Hadamard,
  factorize/rotate.py; on MatMuls the scales are stored in 8 bits) and
  int8 (block 128) for MatMuls and tables, and 2-bit product-quantized tables (pq4); loss measured.

The multiple-choice knapsack (factorize/allocate.py) picks one option per group minimising
Σ loss under B − F bytes, F = the file's other bytes (graph, weights that are not candidates).
The plan is then assembled on a copy (FactorizePass with per-group keeps, weight-only int8,
then the int8 quantizer on exactly the chosen weights and factors, then the metadata) and
measured on held-out calibration batches: file bytes and fidelity. If the file overshoots the
target, the budget is lowered by the overshoot (plus a growing margin) and the plan redone.
Plans of one treatment (all int8w, int8 or int4w where the weight allows) that fit are measured
too, and the lowest measured loss wins: the knapsack adds per-weight losses, the model need not.
Where the plan took low-rank forms, the knapsack without them is built and measured as well.
``--target-fidelity``: bisection over the byte budget for the smallest assembled plan whose
held-out fidelity meets the target. ``--max-latency-ratio``: the predicted latency of each
option is a cap inside the same search (latency.py), the built plan is measured and the cap
tightened by the excess; what is still too slow is planned again without whole families of
treatments (``_SLOWER_FIRST``), and fails if still slow. ``--max-memory`` (and the default
planner's rule that weights take no more memory than as float) is a cap the same way (memory.py);
the default planner then measures its plan's resident memory against the input's and, over it,
plans again without the forms that hold more at run time (``_HEAVIER_FIRST``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..capture import session
from ..errors import OnnxHmfError
from ..executor import BLOCKED_STORES, ExecContext, execute, unsigned_forms
from ..factorize.allocate import Option, allocate
from ..factorize.svd import rank_for_keep
from ..graph.index import GraphIndex, default_opset
from ..graph.pertoken import row_scale
from ..graph.qdq import site_kind
from ..graph.rewrite import factor_orientation
from ..graph.sites import find_weight_groups
from ..passes.calibrated import _merged, measure_sensitivities, output_loss, reference_outputs
from ..passes.factorize import FactorizePass
from ..passes.intquant import can_upgrade, planner_options
from ..plan import Plan, treatment_bytes
from ..progress import no_progress
from ..quantize import int4_axis, int8_weight, int8w_weight, weight_nodes
from ..verify import named_feeds
from .caps import capped_allocate, capped_floor, fits
from .common import Planned, candidate, decision, dense, pivot_costs
from .latency import LatencyCap
from .measured import Calibrated, calibration_settings, load_for_plan
from .memory import PROBED, InputMemory, MemoryCap, _mib, families_of, loaded_bytes, option_families

__all__ = ["Planner", "mixed_plan", "latency_ratio"]

# where the loss of LMF with int8 factors is measured, interpolated in rank between: δ(r) grows convexly
# with r, so the chords bound it from above, and the last probe is KEEP_GRID's top (held beyond, δ under-states)
DELTA_KEEPS = (0.2, 0.5, 0.95)
SLOW = ("int8w", "int4w", "lmf-int8w", "plmf-int8w")  # treatments that run as float MatMuls (no int8 kernels)
# Too slow for --max-latency-ratio: plan again without, in turn, weight-only integers (float
# MatMuls); factored forms (two MatMuls and their quantizers in place of one: on small matrices
# the extra kernels cost more than the smaller products save); blocked integers (MatMulNBits,
# which dequantizes per block and can trail a float MatMul at one thread); both. The first plan
# within the limit wins.
_FACTORED, _BLOCKED = (lambda k: "lmf" in k), (lambda k: k in BLOCKED_STORES and k != "pq4")
_SLOWER_FIRST = (("weight-only integers", lambda k: k in SLOW),
                 ("weight-only integers and factored forms", lambda k: k in SLOW or _FACTORED(k)),
                 ("weight-only and blocked integers", lambda k: k in SLOW or _BLOCKED(k)),
                 ("weight-only and blocked integers and factored forms", lambda k: k in SLOW or _FACTORED(k) or _BLOCKED(k)))


@dataclass
class Planner:
    options: dict[str, list[Option]]  # per weight: Option(bytes, loss, (treatment, keep))
    groups: dict  # candidate name -> WeightGroup
    all_groups: list  # every WeightGroup of the model
    settings: dict  # the plan's settings (what the executor and the metadata need)
    calibrated: Calibrated
    fixed: int  # bytes outside the candidate groups
    refs: list
    rank_multiple: int = 1
    select: object = None  # the Options (selection) the candidates came from
    finish: Callable[[onnx.ModelProto, dict], None] | None = None  # what the caller adds before writing (metadata)
    cache: dict = field(default_factory=dict)  # LMF factors shared by the trial builds (the same for a weight and rank)
    meter: Callable[[onnx.ModelProto], tuple[float, float]] | None = None  # (fidelity, loss) instead of cosines
    costs: object = None  # graph/pivot.PivotCosts: the pivoted treatments' ranks and maps (None: --no-pivot)
    caps: list = field(default_factory=list)  # planners/memory.MemoryCap, latency.LatencyCap (caps.py)

    @property
    def held(self):
        return self.calibrated.held

    # -- the plan -------------------------------------------------------------------------
    def allocate(self, budget: int) -> dict[str, Option]:
        names = list(self.options)
        left = max(int(budget) - self.fixed, 0)
        mem = next((c for c in self.caps if isinstance(c, MemoryCap) and c.excess), None)
        picked = (mem.allocate(self, names, left, self.caps) if mem is not None
                  else capped_allocate(self, names, left, self.caps) if self.caps
                  else allocate([self.options[n] for n in names], left))
        return dict(zip(names, picked))

    def floor(self) -> int:
        if self.caps:
            return self.fixed + capped_floor(self, self.caps)
        return self.fixed + sum(min(o.cost for o in opts) for opts in self.options.values())

    def ceiling(self) -> int:
        return self.fixed + sum(max(o.cost for o in opts) for opts in self.options.values())

    def plan(self, choice: dict[str, Option]) -> Plan:
        """The Plan of one knapsack choice: chosen treatments for the planned weights, dense
        (with the reason) for the others."""
        out = []
        for g in self.all_groups:
            why = candidate(g, self.select)
            o = choice.get(g.name)
            if why is not None:
                out.append(dense(g, why))
            elif o is None:
                out.append(dense(g, "not planned (not a float initializer)"))
            elif o.tag[0] == "dense":
                out.append(dense(g, "the plan keeps it dense"))
            else:
                kind, keep = o.tag
                m, n = g.shape
                if kind.startswith("plmf"):  # pivoted low-rank storage (a Decision of the lmf treatment)
                    out.append(decision(g, kind[1:], rank=self.costs.rank(g, keep, self.rank_multiple), keep=float(keep),
                                        predicted_loss=float(o.error), reason="--plan auto", pivot=True,
                                        index=self.costs.map_cost(g)))
                    continue
                rank = rank_for_keep(m, n, keep, self.rank_multiple) if kind.startswith("lmf") else None
                out.append(decision(g, kind, rank=rank, keep=float(keep), predicted_loss=float(o.error),
                                    reason="--plan auto"))
        return Plan(out, self.settings, "mixed")

    def assemble(self, model: onnx.ModelProto, choice: dict[str, Option]):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        built = execute(m, self.plan(choice), ExecContext(stats=self.calibrated.stats, cache=self.cache))
        if self.finish is not None:
            self.finish(built.model, self.settings)
        return built

    def size_of(self, model: onnx.ModelProto) -> int:
        """The bytes ``model`` is written as (--compact-names: once its names are short)."""
        if self.settings.get("compact_names"):
            from ..graph.names import compacted_bytes

            return compacted_bytes(model)
        return model.ByteSize()

    def measure(self, model: onnx.ModelProto) -> tuple[float, float]:
        """(held-out fidelity, held-out loss): fidelity = min over float outputs of the mean row
        cosine to the original (as calibrated.fidelity), loss = Σ_outputs (1 − mean cosine); or
        what ``meter`` says (the default planner: the margin over per-output minimums)."""
        if self.meter is not None:
            return self.meter(model)
        sess = session(model)
        names = [o.name for o in model.graph.output]
        sums, n = np.zeros(len(names)), 0
        for feeds, ref in zip(self.held.batches, self.refs):
            mask = feeds.get(self.held.mask) if self.held.mask else None
            out = sess.run(names, feeds)
            sums += [1.0 - output_loss([r], [c], mask) if np.issubdtype(r.dtype, np.floating) else 1.0
                     for r, c in zip(ref, out)]
            n += 1
        cos = sums / max(n, 1)
        return float(np.min(cos)), float(np.sum(1.0 - cos))


def _options(work, fpass, groups, fit, rank_multiple, progress, fitted: dict, costs=None,
             padded: bool = False, per_token: bool = False, rotate: bool = False,
             unsigned_head: bool = False) -> dict[str, list[Option]]:
    """Per group: the treatments of the module docstring that apply to it, as Options (bytes,
    loss, (treatment, keep)); ``padded``: blocked integers priced as MatMulNBits stores them;
    ``per_token``: int8 sites probed with per-row activation scales (--activations per-token);
    ``rotate``: the rotated int4 options too (--rotate); ``unsigned_head``: a tied table's int8
    rows probed as the executor will store them, asymmetric uint8 (executor.unsigned_forms)."""
    sens = measure_sensitivities(work, fpass, groups, fit, rank_multiple=rank_multiple, progress=progress, costs=costs)
    by_name = {g.name: g for g in groups}
    index = GraphIndex(work)
    uses = weight_nodes(work)
    probe = onnx.ModelProto()
    probe.CopyFrom(work)
    have = {i.name for i in probe.graph.input}
    sens = {n: o for n, o in sens.items() if not by_name[n].ref.scope}  # a body's own weights: not planned (dense)
    for g in groups:
        if g.name in sens and g.name not in have:
            probe.graph.input.append(onnx.helper.make_tensor_value_info(g.name, g.ref.data_type, list(g.shape)))
    flags = _fake_quant_inputs(probe, [g.name for g in groups if g.name in sens], per_token)
    int4 = default_opset(work) >= 11  # BitShift
    blocked, grams = can_upgrade(work), (fpass.stats.grams if fpass.stats else {})  # int4b/int8b (passes/intquant.py)
    sess = session(probe)
    names = [o.name for o in work.graph.output]
    data = _merged(fit, 256)
    off = {f: np.array(False) for f in flags.values()}
    refs = [sess.run(names, {**feeds, **off}) for feeds in data.batches]

    def loss_with(name: str, W: np.ndarray, quantized_input: bool = False) -> float:
        """Loss with ``name`` := W; ``quantized_input``: its MatMuls also see their input as the
        run-time uint8 quantization of MatMulInteger would (DynamicQuantizeLinear → Dequantize)."""
        extra = {name: W, **off}
        if quantized_input and name in flags:
            extra[flags[name]] = np.array(True)
        tot = 0.0
        for feeds, ref in zip(data.batches, refs):
            mask = feeds.get(data.mask) if data.mask else None
            tot += output_loss(ref, sess.run(names, {**feeds, **extra}), mask)
        return tot / len(data.batches)

    out: dict[str, list[Option]] = {}
    for g in progress([g for g in groups if g.name in sens], "measuring treatments"):
        if g.ref.data_type != onnx.TensorProto.FLOAT:
            continue
        m, n = g.shape
        T = index.array(g.ref)
        tied = site_kind(work, g.name) == "tied" and default_opset(work) >= 11  # quantize._own_tables
        cost = lambda kind, r=None: treatment_bytes(kind, (m, n), rank=r, tied=tied)  # noqa: E731
        opts = [Option(cost("dense"), 0.0, ("dense", 1.0))]
        lmf, plmf = _lowrank_options(costs, g, sens[g.name], rank_multiple)
        opts += [Option(cost("lmf", o.cost // (m + n)), o.error, ("lmf", o.tag)) for o in lmf]
        opts += [Option(o.cost, o.error, ("plmf", o.tag)) for o in plmf]
        direct, gather, only_gather = _int8_uses(g, len(uses.get(g.name, [])))
        if direct:
            opts.append(Option(cost("int8"), loss_with(g.name, int8_weight(T, table=gather, tied=tied, unsigned=unsigned_head),
                                                      not gather), ("int8", 1.0)))
        # integer at run time where a fused form exists (DequantizeLinear(block) → MatMul: MatMulNBits);
        # weight-only int8/int4 (rebuilt as float at load: disk only) only where none does
        fused = planner_options(work, g.name, T, grams, loss_with, Option, cost("int8") - m * n,
                                fitted.setdefault("blocked fits", {}), padded, rotate) if blocked else []
        # (a body weight's fused form stores its integers once per reading graph: both are offered)
        opts += fused + (_weight_only(g, T, loss_with, cost, int4) if not fused or site_kind(work, g.name) == "body" else [])
        if direct and (only_gather or not gather) and (lmf or plmf):
            opts += _quantized_lowrank_options(costs, fpass, g, T, lmf, plmf, gather, loss_with, rank_multiple, not fused)
        out[g.name] = opts
    return out


def _int8_uses(g, taken: int) -> tuple[bool, bool, bool]:
    """(int8 applies, some use is a Gather, every use is): int8 where every use is a MatMul's B
    or a Gather's table (the quantizer takes ``taken`` of them), or where a Gather takes the
    table and the other uses read its DequantizeLinear (a tied head)."""
    gather = any(u.kind == "gather" for u in g.uses)
    direct = all(u.kind in ("matmul", "gather") for u in g.uses) and (taken == len(g.uses) or (gather and taken > 0))
    return direct, gather, all(u.kind == "gather" for u in g.uses)


def _weight_only(g, T: np.ndarray, loss_with, cost, int4: bool) -> list[Option]:
    """Weight-only int8/int4 options (any use; the weight is rebuilt by a constant subgraph that
    onnxruntime folds at load, so the graph's own ops run in float as before)."""
    if g.ref.kind != "initializer":
        return []
    m, n = g.shape
    out = [Option(cost("int8w"), loss_with(g.name, int8w_weight(T)), ("int8w", 1.0))]
    if int4 and int4_axis((m, n)) is not None:
        out.append(Option(cost("int4w"), loss_with(g.name, int8w_weight(T, 4)), ("int4w", 1.0)))
    return out


def _fake_quant_inputs(model: onnx.ModelProto, weights: list[str], per_token: bool = False) -> dict[str, str]:
    """Give each MatMul that reads one of ``weights`` as B a switchable quantized input:
    A ← Where(flag, DequantizeLinear(DynamicQuantizeLinear(A)), A), flag a bool graph input.
    What MatMulInteger computes, (A_q − z_A)·W_q·s_A·s_W, equals DequantizeLinear(A_q)·W_q·s_W
    exactly up to float rounding, so the probe sees the int8 site's activation error too.
    ``per_token`` (--activations per-token, graph/pertoken.py): A ← round(A/s_r)·s_r with
    s_r = max_k |A_rk|/127 per row instead. Returns {weight: flag input name}; empty below
    opset 11 (no DynamicQuantizeLinear)."""
    if default_opset(model) < 11:
        return {}
    want = set(weights)
    flags: dict[str, str] = {}
    added: list[list[onnx.NodeProto]] = []
    mk = onnx.helper.make_node
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in want:
            continue
        w = node.input[1]
        flag = flags.setdefault(w, f"onnxhmf_fq_flag_{len(flags)}")
        b = f"onnxhmf_fq_{len(added)}"
        x = node.input[0]
        if per_token:  # graph/pertoken.py's row scales, then round(A/s_r)·s_r
            group = row_scale(model, x, b + "_s", b) + [
                mk("Div", [x, b + "_s"], [b + "_d"]), mk("Round", [b + "_d"], [b + "_r"]),
                mk("Mul", [b + "_r", b + "_s"], [b + "_dq"])]
        else:
            group = [mk("DynamicQuantizeLinear", [x], [b + "_q", b + "_s", b + "_z"]),
                     mk("DequantizeLinear", [b + "_q", b + "_s", b + "_z"], [b + "_dq"])]
        added.append(group + [mk("Where", [flag, b + "_dq", x], [b + "_x"])])
        node.input[0] = b + "_x"
    for flag in flags.values():
        model.graph.input.append(onnx.helper.make_tensor_value_info(flag, onnx.TensorProto.BOOL, []))
    # nodes only need to come before their consumers: put them first, after their inputs' producers
    order = list(model.graph.node)
    del model.graph.node[:]
    produced = {o: i for i, n in enumerate(order) for o in n.output}
    at: dict[int, list] = {}
    for group in added:
        at.setdefault(produced.get(group[0].input[0], -1), []).append(group)
    for group in at.get(-1, []):
        model.graph.node.extend(group)
    for i, n in enumerate(order):
        model.graph.node.append(n)
        for group in at.get(i, []):
            model.graph.node.extend(group)
    return flags


def mixed_plan(work: onnx.ModelProto, options, *, src_bytes: int, finish=None, progress=no_progress, meter=None,
               split=None, fast: bool = False, strict_latency: bool = True):
    """``--plan auto``: measure every candidate's treatments, search the byte budget (or the
    fidelity target), check latency. Returns (Planned with the winning model built, Calibrated).

    ``meter``: (held-out fidelity, loss) of a model, instead of the cosines; ``split``: (fit,
    held-out) calibration already split; ``fast``: leave out the treatments that run as float
    MatMuls (weight-only integers) from the start; ``strict_latency`` False (the default
    planner's own cap): where no smaller plan within the latency limit meets the goal, the plan
    is made without the limit from the whole menu (weight-only forms included), and a plan still
    over it after every re-plan is kept; either with a note, instead of failing."""
    t0 = time.perf_counter()
    _check_reachable(work, options.budget.plan, src_bytes)
    # latency and resident memory are measured on the inputs the user named (--inputs,
    # --input-shapes: the batch shape it will run on), else on the first held-out calibration batch
    named = named_feeds(work, options.verification, seed=options.methods.seed)
    c = load_for_plan(work, options, 0.25, progress, split=split)
    settings = {**options.settings(), "calibration": calibration_settings(options, c.fit, 0.25, [g.name for g in c.groups])}
    fpass = FactorizePass(stats=c.stats, damp=options.methods.damp, seed=options.methods.seed)
    cache: dict = {}  # fits shared by the probes and the trial builds
    costs = pivot_costs(work, find_weight_groups(GraphIndex(work)), options)
    opts = _options(work, fpass, c.groups, c.fit, options.budget.rank_multiple, progress, cache, costs,
                    padded=options.methods.kernels == "onnxruntime", per_token=options.methods.activations == "per-token",
                    rotate=options.methods.rotate, unsigned_head=unsigned_forms(settings)[0])
    if not opts:
        raise OnnxHmfError("--plan auto: no weight to plan (no float MatMul/Gather weights selected)")
    fixed = _fixed_bytes(work, opts, src_bytes, options.methods)
    every = opts  # the whole menu, for the default's fallback below
    if fast:
        opts = {n: [o for o in v if o.tag[0] not in SLOW] for n, v in opts.items()}
    planner = Planner(opts, {g.name: g for g in c.groups}, find_weight_groups(GraphIndex(work)), settings, c, fixed,
                      [] if meter is not None else reference_outputs(work, c.held), options.budget.rank_multiple,
                      options, finish, meter=meter, cache=cache, costs=costs)
    timings = {"plan_measure_s": time.perf_counter() - t0}
    t = time.perf_counter()
    feeds = dict(named) if named is not None else dict(c.held.batches[0])
    mem = (MemoryCap.measure(work, feeds, options.budget.max_memory, src_bytes, fixed, *_smallest_loaded(planner, work))
           if options.budget.max_memory is not None
           else MemoryCap.no_more_than_float(planner) if options.budget.fidelity is not None else None)
    limit = options.budget.plan.get("max_latency_ratio")
    lat = LatencyCap.measure(work, feeds, limit, planner) if limit is not None else None
    planner.caps = [cap for cap in (mem, lat) if cap is not None]
    search = _Search(planner, work, options.budget.plan, src_bytes)
    ratio_of = lambda m: latency_ratio(work, m, feeds)  # noqa: E731
    uncapped = False
    try:
        res, ratio, fast_only = _search_within_latency(search, planner, lat, ratio_of)
        nothing = lat is not None and all(o.tag[0] == "dense" for o in res.choice.values())
    except OnnxHmfError:
        if lat is None or strict_latency:
            raise
        nothing = True
    if nothing and not strict_latency:
        # the default's cap is a preference, the fidelity target is not: where no plan within it
        # meets the target, or none within it is smaller than the input, plan again without it,
        # from the whole menu (weight-only forms included), as --allow-slower does
        planner.options, planner.caps, uncapped = every, [cap for cap in planner.caps if cap is not lat], True
        res = search.run()
        ratio, fast_only = ratio_of(res.built.model), None
    if strict_latency and limit is not None and ratio > limit:
        raise OnnxHmfError(f"--plan auto: the plan runs at {ratio:.2f}x the input's latency (onnxruntime, one thread)"
                           f"{f' even without {fast_only}' if fast_only else ''}, over --max-latency-ratio {limit}")
    if mem is not None:
        res, ratio = _within_memory_cap(mem, search, res, ratio, limit, ratio_of)
    lighter = None
    if options.budget.fidelity is not None and options.budget.max_memory is None:  # the default planner
        res, ratio, lighter = _within_input_memory(search, planner, res, ratio, InputMemory.measure(work, feeds),
                                                   ratio_of if limit is not None else None)
    timings["plan_search_s"] = time.perf_counter() - t
    plan = planner.plan(res.choice)
    plan.summary["plan_auto"] = info = _summary(planner, res, search, ratio, fast_only)
    plan.summary["timings"] = timings
    plan.summary["notes"] = [_note(info, res), *_default_notes(info, ratio, limit, uncapped, fast_only, lighter)]
    if mem is not None and mem.excess:
        plan.summary["notes"].append(mem.priced())
    if mem is not None and mem.note() is not None:
        info["memory_first"], info["memory_left_out"] = mem.first, mem.left_out
        plan.summary["notes"].append(mem.note())
    return Planned(plan, res.built), c


def _fixed_bytes(work: onnx.ModelProto, opts: dict, src_bytes: int, methods) -> int:
    """The output's bytes outside the planned weights: the input's, less its planned weights'
    dense bytes, its names' saving (--compact-names) and half its biases (--float16-biases)."""
    fixed = int(src_bytes) - sum(o[0].cost for o in opts.values())
    if methods.compact_names:  # the input's own names, shortened, are bytes no weight costs
        from ..graph.names import compacted_bytes

        fixed -= work.ByteSize() - compacted_bytes(work)
    if methods.float16_biases:  # so are half the bytes of its biases (graph/half.py)
        from ..graph.half import float16_saving

        fixed -= float16_saving(work)
    return fixed


def _within_memory_cap(mem: MemoryCap, search: _Search, res: _Trial, ratio, limit, ratio_of):
    """(trial, its latency ratio) once ``mem`` is enforced (MemoryCap.enforce); a re-plan it
    makes keeps the latency limit where there is one."""
    ratios = {}

    def within_latency(alt) -> bool:
        ratios[id(alt)] = ratio_of(alt.built.model)
        return ratios[id(alt)] <= limit

    out = mem.enforce(search, res, within_latency if limit is not None else None)
    if out is not res and limit is not None:
        ratio = ratios[id(out)] if id(out) in ratios else ratio_of(out.built.model)
    return out, ratio


def _smallest_loaded(planner: Planner, work: onnx.ModelProto):
    """--max-memory's probes (MemoryCap.measure): every planned weight in its smallest loaded form
    outside memory.PROBED (where it has one), built, with the dense bytes of those weights, their
    loaded bytes in it and the families it uses; then per PROBED family the menu offers, the same
    with each weight that can take the family in its smallest loaded form of it:
    (probe, [(name, model, loaded bytes, families used)])."""
    def smallest(opts: list, n: str) -> Option:
        return min(opts, key=lambda o: (loaded_bytes(planner, n, o), o.error))

    def loaded(choice: dict) -> int:
        return sum(loaded_bytes(planner, n, o) for n, o in choice.items())

    probed = {f for f, _ in PROBED}
    base = {n: smallest([o for o in v if not option_families(planner, n, o) & probed] or v, n)
            for n, v in planner.options.items()}
    families = []
    for name, _ in PROBED:
        choice = dict(base)
        for n, v in planner.options.items():
            some = [o for o in v if name in option_families(planner, n, o)]
            if some:
                choice[n] = smallest(some, n)
        if choice != base:
            families.append((name, planner.assemble(work, choice).model, loaded(choice), families_of(planner, choice)))
    probe = (planner.assemble(work, base).model, sum(v[0].cost for v in planner.options.values()), loaded(base),
             families_of(planner, base))
    return probe, families


def _default_notes(info: dict, ratio, limit, uncapped: bool, fast_only, lighter) -> list[str]:
    """What the default planner says beside the plan (recorded in ``info`` too): its measured
    memory rule re-planned (``lighter``); the plan is over its latency preference, or is the
    --allow-slower plan (``uncapped``)."""
    notes = []
    if lighter is not None:
        info["memory_rule"] = lighter
        notes.append(lighter["note"])
    if uncapped or (limit is not None and ratio is not None and ratio > limit):
        info["note"] = (
            f"no smaller plan within the default's {limit}x latency kept the fidelity target; this one (the "
            f"--allow-slower plan: weight-only forms included) runs at {ratio:.2f}x the input's latency"
            if uncapped else f"the fastest plan found runs at {ratio:.2f}x the input's latency, over the default's "
            f"{limit}x" + (f" even without {fast_only}" if fast_only else ""))
        notes.append(info["note"])
    return notes


def _search_within_latency(search: _Search, planner: Planner, lat: LatencyCap | None, ratio_of):
    """The search under the latency cap ``lat``: the built plan measured and searched again
    (LatencyCap.enforce), then, while still over the limit, planned without whole families of
    treatments in turn (_SLOWER_FIRST). Returns (trial, measured ratio, the families left out):
    the first within the limit, else the fastest measured (planner.options left as for it)."""
    res = search.run()
    if lat is None:
        return res, None, None
    res = lat.enforce(search, res, ratio_of)
    full = planner.options
    tried = [(lat.measured, res, None, full)]
    for left_out, drop in _SLOWER_FIRST:
        if tried[-1][0] <= lat.limit:
            break
        if not any(drop(o.tag[0]) for o in res.choice.values()):
            continue
        planner.options = {n: [o for o in v if not drop(o.tag[0])] or v[:1] for n, v in full.items()}
        res = search.run()
        tried.append((ratio_of(res.built.model), res, left_out, planner.options))
    ratio, res, left_out, planner.options = tried[-1] if tried[-1][0] <= lat.limit else min(tried, key=lambda t: t[0])
    return res, ratio, left_out


# Heavier at run time than their stored bytes say (planners/memory.py, InputMemory): a factored
# site holds its intermediate product and, pivoted, the Concat and the column Gather of its
# outputs besides. Where the default's plan takes more resident memory than the input, plan again
# without, in turn, the pivoted forms, then every factored form; the first within the input's wins.
_HEAVIER_FIRST = (("pivoted low-rank forms", lambda k: k.startswith("plmf")),
                  ("low-rank forms", _FACTORED))


def _within_input_memory(search: _Search, planner: Planner, res: _Trial, ratio, rule: InputMemory, ratio_of):
    """The default's measured memory rule: ``res`` if its resident growth is within the input's
    (``rule``), else the first plan made without a family of _HEAVIER_FIRST that is, else the
    lightest measured. Returns (trial, its latency ratio, None or what the summary records);
    ``ratio_of`` (None: latency not measured) gives a re-plan's latency ratio."""
    got = rule.of(res.built.model)
    if rule.within(got):
        return res, ratio, None
    full = planner.options
    tried = [(got, res, ratio, None, full)]
    for left_out, drop in _HEAVIER_FIRST:
        if not any(drop(o.tag[0]) for o in tried[-1][1].choice.values()):
            continue
        planner.options = {n: [o for o in v if not drop(o.tag[0])] or v[:1] for n, v in full.items()}
        try:
            alt = search.run()
        except OnnxHmfError:  # no plan without them meets the goal
            continue
        tried.append((rule.of(alt.built.model), alt, ratio_of(alt.built.model) if ratio_of else ratio, left_out,
                      planner.options))
        if rule.within(tried[-1][0]):
            break
    pick = tried[-1] if rule.within(tried[-1][0]) else min(tried, key=lambda t: t[0] if t[0] is not None else float("inf"))
    mib = _mib
    first = f"the plan took {mib(got)} once loaded, over the input's {mib(rule.base)} (fixed mmap threshold)"
    if pick[3] is not None and rule.within(pick[0]):
        note = f"{first}; planned again without {pick[3]}: {mib(pick[0])}"
    elif pick[3] is not None:
        note = f"{first}; the lightest plan found, without {pick[3]}, takes {mib(pick[0])}"
    elif len(tried) == 1 and not any(d(o.tag[0]) for _, d in _HEAVIER_FIRST for o in res.choice.values()):
        note = f"{first}; it has no low-rank forms to leave out, and it is kept"
    else:
        note = f"{first}; no plan without its low-rank forms that meets the target takes less, and it is kept"
    planner.options = pick[4]
    return pick[1], pick[2], {"input": rule.base, "first": got, "memory": pick[0], "left_out": pick[3], "note": note}


def _check_reachable(work: onnx.ModelProto, goal: dict, src_bytes: int) -> None:
    """Refuse a --target-size/--target-ratio that the bytes no plan touches exceed, before any
    treatment is measured (on a conv model that is minutes): src − Σ dense bytes of every 2-D
    float weight a MatMul/Gemm/Gather reads is a lower bound of every plan's size."""
    target = goal.get("target_size") or (int(goal["target_ratio"] * src_bytes) if goal.get("target_ratio") else None)
    if not target or goal.get("target_fidelity") is not None:
        return
    seen, planned = set(), 0
    for g in find_weight_groups(GraphIndex(work)):
        if g.name not in seen and g.ref.data_type == onnx.TensorProto.FLOAT:
            seen.add(g.name)
            planned += treatment_bytes("dense", tuple(g.shape))
    fixed = int(src_bytes) - planned
    if target < fixed:
        raise OnnxHmfError(f"--plan auto: target {target:,} B is below what no plan changes: {fixed:,} B of the "
                           "input are not MatMul/Gemm/Gather weights (convs, biases, norms, the graph)")


@dataclass
class _Trial:
    choice: dict
    size: int
    fidelity: float
    loss: float
    built: object


@dataclass
class _Search:
    """The budget search of ``--plan auto`` over one Planner."""

    planner: Planner
    work: onnx.ModelProto
    goal: dict  # target_size | target_ratio | target_fidelity
    src_bytes: int
    tried: list = field(default_factory=list)
    target: int | None = None

    def trial(self, budget: int) -> _Trial:
        choice = self.planner.allocate(budget)
        return self._measure(choice, {"budget": int(budget)})

    def _measure(self, choice, row: dict) -> _Trial:
        built = self.planner.assemble(self.work, choice)
        size = self.planner.size_of(built.model)
        fid, loss = self.planner.measure(built.model)
        self.tried.append({**row, "bytes": size, "fidelity": round(fid, 5)})
        return _Trial(choice, size, fid, loss, built)

    def best_of(self, res: _Trial, target: int) -> _Trial:
        """The knapsack's plan, or a one-treatment plan (every weight int8w, int8 or int4w where
        it can be, the knapsack's choice elsewhere) that fits ``target`` and measures a lower
        held-out loss: the prediction adds per-weight losses, which the whole model need not."""
        p = self.planner
        for kind in ("int8w", "int8", "int4w"):
            alt = {n: next((o for o in p.options[n] if o.tag[0] == kind), res.choice[n]) for n in res.choice}
            if alt == res.choice or p.fixed + sum(o.cost for o in alt.values()) > 1.05 * target:
                continue  # (the estimate can be off by the overheads: only a clear miss is skipped)
            if not fits(p, alt, p.caps):
                continue
            built = p.assemble(self.work, alt)
            size = p.size_of(built.model)
            if size > target:
                continue
            fid, loss = p.measure(built.model)
            self.tried.append({"budget": None, "uniform": kind, "bytes": size, "fidelity": round(fid, 5)})
            if loss < res.loss:
                res = _Trial(alt, size, fid, loss, built)
        return self._unfactored(res, target)

    def _unfactored(self, res: _Trial, target: int) -> _Trial:
        """The knapsack again without the low-rank forms, if the plan took any: measured, it
        wins where its held-out loss is lower (low-rank losses measured one weight at a time
        under-predict what the whole model loses, docs/pivot.md)."""
        p = self.planner
        if not any(_FACTORED(o.tag[0]) for o in res.choice.values()):
            return res
        full = p.options
        p.options = {n: [o for o in v if not _FACTORED(o.tag[0])] for n, v in full.items()}
        try:
            budget = target
            for i in range(3):
                try:
                    alt = self.trial(budget)
                except ValueError:  # below the cheapest plan (the knapsack rounds costs up to its units)
                    return res
                self.tried[-1]["unfactored"] = True
                if alt.size <= target:
                    return alt if alt.loss < res.loss else res
                budget -= alt.size - target + int(0.001 * target * 2**i)
            return res
        finally:
            p.options = full

    def run(self) -> _Trial:
        if self.goal.get("target_fidelity") is None:
            return self._fit_size()
        return self._fit_fidelity()

    def _fit_size(self) -> _Trial:
        g, p = self.goal, self.planner
        target = g["target_size"] if g.get("target_size") else int(g["target_ratio"] * self.src_bytes)
        self.target = target
        if target < p.floor():
            raise OnnxHmfError(f"--plan auto: target {target:,} B is below the smallest plan ({p.floor():,} B: every "
                               "weight at its cheapest option)")
        budget = target
        for i in range(6):
            res = self.trial(budget)
            if res.size <= target:
                return self.best_of(self._spend_slack(res, budget, target), target)
            # the overhead estimate was short: spend that much less, and a growing margin more
            budget -= res.size - target + int(0.001 * target * 2**i)
        raise OnnxHmfError(f"--plan auto: could not fit {target:,} B (last plan {res.size:,} B)")

    def _spend_slack(self, res: _Trial, budget: int, target: int) -> _Trial:
        """Once more with the budget raised by what the plan left unspent, where that is more than
        0.5% of the target (the overheads' estimate was long): kept if it fits and measures a lower
        held-out loss."""
        slack = target - res.size
        if slack <= 0.005 * target:
            return res
        try:
            alt = self.trial(budget + slack)
        except ValueError:
            return res
        self.tried[-1]["slack"] = slack
        return alt if alt.size <= target and alt.loss < res.loss else res

    def _fit_fidelity(self) -> _Trial:
        goal, p = self.goal["target_fidelity"], self.planner
        lo, hi = p.floor(), p.ceiling()
        ceiling = hi
        best = self.trial(hi)
        if best.fidelity < goal:
            capped = any(getattr(cap, "cap", None) is not None for cap in p.caps)
            raise OnnxHmfError(f"--plan auto: even the largest plan{' within --max-memory' if capped else ''} gives held-out "
                               f"fidelity {best.fidelity:.4f} < {goal}" + ("; give a larger --max-memory" if capped else ""))
        for _ in range(8):
            mid = (lo + hi) // 2
            res = self.trial(mid)
            if res.fidelity >= goal:
                hi, best = mid, res
            else:
                lo = mid
            if hi - lo < 0.01 * ceiling:
                break
        return best


def _summary(planner: Planner, res: _Trial, search: _Search, ratio: float, fast_only: str | None) -> dict:
    choice = res.choice
    rows = []
    for name, o in choice.items():
        kind, keep = o.tag
        m, n = planner.groups[name].shape
        r = (planner.costs.rank(planner.groups[name], keep, planner.rank_multiple) if kind.startswith("plmf")
             else rank_for_keep(m, n, keep, planner.rank_multiple) if kind.startswith("lmf") else None)
        rows.append({"weight": name, "treatment": kind + (f" r={r}" if r else ""), "bytes": int(o.cost),
                     "dense_bytes": 4 * m * n, "predicted_loss": round(float(o.error), 6)})
    info = {"target_size": search.target, "target_fidelity": search.goal.get("target_fidelity"),
            "fixed_bytes": planner.fixed, "planned_bytes": planner.fixed + sum(o.cost for o in choice.values()),
            "bytes": res.size, "predicted_loss": round(sum(o.error for o in choice.values()), 6),
            "heldout_loss": round(res.loss, 6),
            **({"heldout_margin": round(res.fidelity, 5)} if planner.meter is not None
               else {"heldout_fidelity": round(res.fidelity, 5)}),
            "heldout_samples": planner.held.samples, "fit_samples": planner.calibrated.fit.samples,
            "latency_ratio": None if ratio is None else round(ratio, 3), "trials": search.tried, "sites": rows}
    mem = next((cap for cap in planner.caps if isinstance(cap, MemoryCap)), None)
    if mem is not None and mem.cap is not None:
        info["max_memory"], info["memory"] = mem.cap, mem.measured
        if mem.excess:
            info["memory_excess"] = dict(mem.excess)
    if fast_only:
        info["note"] = f"planned without {fast_only} to meet --max-latency-ratio"
    return info


def _note(info: dict, res: _Trial) -> str:
    counts: dict[str, int] = {}
    for o in res.choice.values():
        counts[o.tag[0]] = counts.get(o.tag[0], 0) + 1
    return (f"plan auto: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}; planned {info['planned_bytes']:,} B, "
            f"assembled {res.size:,} B; loss predicted {info['predicted_loss']:.4f}, measured {res.loss:.4f} "
            + (f"(held-out fidelity {res.fidelity:.4f} on {info['heldout_samples']} samples)" if "heldout_fidelity" in info
               else f"(held-out margin over the fidelity minimums {res.fidelity:+.4f} on {info['heldout_samples']} samples)"))


def latency_ratio(base: onnx.ModelProto, model: onnx.ModelProto, feeds: dict, repeats: int = 7) -> float:
    """Median onnxruntime latency of ``model`` over ``base`` on ``feeds`` (one intra-op thread,
    runs interleaved so that machine noise hits both alike)."""
    from ..runtime import latency_ratios

    return latency_ratios([base, model], feeds, repeats=repeats)[1]


def _lowrank_options(costs, g, sens: list[Option], rank_multiple: int) -> tuple[list[Option], list[Option]]:
    """The measured low-rank options of ``g`` as (A·B, pivoted) Options: the loss depends on the
    rank only, the storage on the form. A·B's carry cost r·(m+n) (params) and their A·B keep;
    the pivoted ones their bytes (plan.treatment_bytes) and pivoted keep. Without ``costs``
    (--no-pivot) the measurements are A·B's and there are no pivoted options."""
    m, n = g.shape
    low = [o for o in sens if o.tag < 1.0]
    if costs is None:
        return low, []
    ab, piv = [], []
    for o in low:
        r = costs.rank(g, o.tag, rank_multiple)
        pb = treatment_bytes("lmf", (m, n), rank=r, pivot=True, index=costs.map_cost(g))
        fits_ab = r * (m + n) < m * n
        if costs.stores_pivoted(g, r) and (not fits_ab or pb < treatment_bytes("lmf", (m, n), rank=r)):
            piv.append(Option(pb, o.error, o.tag))  # only where it is the smaller file
        if fits_ab:
            ab.append(Option(r * (m + n), o.error, r * (m + n) / (m * n)))
    return ab, piv


def _quantized_lowrank_options(costs, fpass, g, T: np.ndarray, lmf: list[Option], plmf: list[Option], gather: bool,
                               loss_with, rank_multiple: int, weight_only: bool) -> list[Option]:
    """lmf-int8 / plmf-int8 (A·B or W_p and C quantized; with ``weight_only``, also the -int8w forms
    of untransposed MatMul weights) beside the float options ``lmf`` / ``plmf``: loss L(r) + δ(r).

    δ(r) = max(0, loss with the quantized factors − loss with the float ones) is measured at the
    ranks of DELTA_KEEPS (one factorization each, shared by the two forms: the pivoted product is
    A·B's) and interpolated linearly in r between them, held at the ends. The quantization loss
    grows with the rank, and faster for the pivoted form, whose coefficients C carry W_p's error
    into the other n − r outputs: one probe at keep 0.5 under-stated δ at keep 0.95 by 2.7× on
    MiniLM's FFN1, and one at 0.9 held to 0.95 by 1.4× (docs/pivot.md)."""
    from ..factorize.pivot import pivot_factors

    m, n = g.shape
    transposed = factor_orientation(g)
    w8 = weight_only and not gather and not transposed  # factors as A (m×r), B (r×n): weight-only int8
    oriented = lambda W: (W.T if transposed else W).astype(np.float32)  # noqa: E731
    rank_at = (lambda k: costs.rank(g, k, rank_multiple)) if costs is not None else (  # noqa: E731
        lambda k: rank_for_keep(m, n, k, rank_multiple))
    ranks = sorted({r for r in map(rank_at, DELTA_KEEPS) if 1 <= r < min(m, n)})
    deltas: dict[str, list[float]] = {}
    for r in ranks:
        f, _ = fpass._lmf(g, T.T if transposed else T, r, transposed)
        base = loss_with(g.name, oriented(f.A @ f.B))
        probes = {}
        if lmf:
            probes["lmf-int8"] = (int8_weight(f.A, table=gather) @ int8_weight(f.B), not gather)
            if w8:
                probes["lmf-int8w"] = (int8w_weight(f.A) @ int8w_weight(f.B), False)
        if plmf:
            pf = pivot_factors(f.A, f.B, f.residual_sq, f.total_sq)
            pivoted = lambda Wp, C: np.concatenate([Wp, Wp @ C], axis=1)[:, pf.inverse]  # noqa: E731
            probes["plmf-int8"] = (pivoted(int8_weight(pf.F, table=gather), int8_weight(pf.C)), not gather)
            if w8:
                probes["plmf-int8w"] = (pivoted(int8w_weight(pf.F), int8w_weight(pf.C)), False)
        for kind, (W, quantized_input) in probes.items():
            deltas.setdefault(kind, []).append(max(0.0, loss_with(g.name, oriented(W), quantized_input) - base))
    index = costs.map_cost(g) if costs is not None else 0
    out = []
    for kind, ds in deltas.items():
        pivot = kind.startswith("plmf")
        for o in plmf if pivot else lmf:
            r = costs.rank(g, o.tag, rank_multiple) if pivot else o.cost // (m + n)
            nbytes = treatment_bytes(kind[1:] if pivot else kind, (m, n), rank=r, **({"pivot": True, "index": index} if pivot else {}))
            out.append(Option(nbytes, o.error + float(np.interp(r, ranks, ds)), (kind, o.tag)))
    return out
