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
* int4w (the same with 4 bits, two values per byte, unpacked by BitShift/Sub/Concat): m·n/2 +
  4n + c', opset ≥ 11 and an even side. Both are folded by onnxruntime at load, tables included.
* LMF rank r: 4·r·(m+n), loss from measure_sensitivities (measured at two ranks, interpolated).
* LMF rank r with int8 (or int8w) factors: r·(m+n) + 2c, loss L_lmf(r) + δ, δ = max(0, measured
  loss of the quantized factors at the probe rank − the same with float factors); the
  quantization noise of the factors is taken as independent of r.

The multiple-choice knapsack (factorize/allocate.py) picks one option per group minimising
Σ loss under B − F bytes, F = the file's other bytes (graph, weights that are not candidates).
The plan is then assembled on a copy (FactorizePass with per-group keeps, weight-only int8,
then the int8 quantizer on exactly the chosen weights and factors, then the metadata) and
measured on held-out calibration batches: file bytes and fidelity. If the file overshoots the
target, the budget is lowered by the overshoot (plus a growing margin) and the plan redone.
Plans of one treatment (all int8w, int8 or int4w where the weight allows) that fit are measured
too, and the lowest measured loss wins: the knapsack adds per-weight losses, the model need not.
``--target-fidelity``: bisection over the byte budget for the smallest assembled plan whose
held-out fidelity meets the target. ``--max-latency-ratio``: when the plan is too slow, plan
again without the weight-only treatments (float MatMuls), and fail if still slow.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..calibration import Calibration, load_calibration
from ..capture import capture_stats, session
from ..errors import OnnxHmfError
from ..factorize.allocate import Option, allocate
from ..factorize.svd import rank_for_keep
from ..graph.index import GraphIndex, default_opset
from ..graph.rewrite import factor_orientation
from ..graph.sites import find_weight_groups
from ..quantize import (INT8_OVERHEAD, int4_axis, int8_bytes, int8_weight, int8w_weight, quantize_int8, weight_nodes,
                        weight_only)
from .calibrated import (_merged, calibration_targets, candidate_groups, measure_sensitivities, output_loss,
                         reference_outputs)
from .factorize import FactorizePass

__all__ = ["Planner", "plan_and_assemble", "latency_ratio", "LMF_OVERHEAD"]

LMF_OVERHEAD = 300  # bytes an LMF rewrite adds besides its factors (names, nodes, value infos)
PROBE_KEEP = 0.5  # where LMF with int8 factors is measured
SLOW = ("int8w", "int4w", "lmf-int8w")  # treatments that run as float MatMuls (no int8 kernels)
INT4_OVERHEAD = 400  # the unpacking subgraph's nodes and constants


@dataclass
class Planner:
    fpass: FactorizePass
    options: dict[str, list[Option]]
    shapes: dict[str, tuple[int, int]]
    fixed: int  # bytes outside the candidate groups
    held: Calibration
    refs: list
    all_groups: list[str]
    original: set[str] = field(default_factory=set)  # the input's initializer names
    finish: Callable[[onnx.ModelProto], None] | None = None  # what the caller adds before writing (metadata)
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
        k.update({n: float(o.tag[1]) for n, o in choice.items() if o.tag[0].startswith("lmf")})
        return k

    def quantized(self, model: onnx.ModelProto, choice: dict[str, Option], kind: str = "int8") -> list[str]:
        """Initializer names to store as ``kind`` (int8: dynamic MatMulInteger, int8w: weight
        only) in the factorized ``model``: the weights of the groups given ``kind`` and the
        factors (new initializers named after the group) of those given lmf-``kind``."""
        used = weight_nodes(model) if kind == "int8" else {t.name: [] for t in model.graph.initializer}
        names = [n for n, o in choice.items() if o.tag[0] == kind]
        for n, o in choice.items():
            if o.tag[0] == "lmf-" + kind:
                names += [w for w in used if w.startswith(n + ".") and w not in self.original]
        return names

    def store_weight_only(self, model: onnx.ModelProto, choice: dict[str, Option]) -> list[str]:
        """Apply the weight-only treatments (int8w, int4w, lmf-int8w) of ``choice`` to the
        factorized ``model`` in place; the names done."""
        return (weight_only(model, self.quantized(model, choice, "int8w"), 8)
                + weight_only(model, self.quantized(model, choice, "int4w"), 4))

    def assemble(self, model: onnx.ModelProto, choice: dict[str, Option]) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        saved = self.fpass.keeps
        self.fpass.keeps = self.keeps(choice)
        try:
            self.fpass.run(m)
        finally:
            self.fpass.keeps = saved
        self.store_weight_only(m, choice)
        q, _ = quantize_int8(m, self.quantized(m, choice))
        if self.finish is not None:
            self.finish(q)
        return q

    def measure(self, model: onnx.ModelProto) -> tuple[float, float]:
        """(held-out fidelity, held-out loss): fidelity = min over float outputs of the mean row
        cosine to the original (as calibrated.fidelity), loss = Σ_outputs (1 − mean cosine)."""
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


def _options(work, fpass, groups, fit, progress) -> dict[str, list[Option]]:
    """Per group: the treatments of the module docstring that apply to it, as Options (bytes,
    loss, (treatment, keep))."""
    sens = measure_sensitivities(work, fpass, groups, fit, progress=progress)
    index = GraphIndex(work)
    uses = weight_nodes(work)
    probe = onnx.ModelProto()
    probe.CopyFrom(work)
    have = {i.name for i in probe.graph.input}
    for g in groups:
        if g.name in sens and g.name not in have:
            probe.graph.input.append(onnx.helper.make_tensor_value_info(g.name, g.ref.data_type, list(g.shape)))
    flags = _fake_quant_inputs(probe, [g.name for g in groups if g.name in sens])
    int4 = default_opset(work) >= 11  # BitShift
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
            opts.append(Option(int8_bytes(m * n), loss_with(g.name, int8_weight(T, table=gather), not gather), ("int8", 1.0)))
        only_gather = all(u.kind == "gather" for u in g.uses)
        # weight-only int8/int4: any use; the weight is rebuilt by a constant subgraph that
        # onnxruntime folds at load, so the graph's own ops run in float as before
        if g.ref.kind == "initializer":
            opts.append(Option(int8_bytes(m * n) + 4 * n, loss_with(g.name, int8w_weight(T)), ("int8w", 1.0)))
            if int4 and int4_axis((m, n)) is not None:
                opts.append(Option(int8_bytes(m * n // 2) + 4 * n + INT4_OVERHEAD, loss_with(g.name, int8w_weight(T, 4)),
                                   ("int4w", 1.0)))
        if direct and (only_gather or not gather) and lmf:
            transposed = factor_orientation(g)
            r = rank_for_keep(m, n, PROBE_KEEP, fpass.rank_multiple)
            if 1 <= r and r * (m + n) < m * n:
                f, _ = fpass._lmf(g, T.T if transposed else T, r, transposed)
                Wq = int8_weight(f.A, table=gather) @ int8_weight(f.B)
                Wq = (Wq.T if transposed else Wq).astype(np.float32)
                Wr = (f.A @ f.B)
                Wr = (Wr.T if transposed else Wr).astype(np.float32)
                base = loss_with(g.name, Wr)
                delta = max(0.0, loss_with(g.name, Wq, not gather) - base)
                opts += [Option(o.params + 2 * INT8_OVERHEAD + LMF_OVERHEAD, o.error + delta, ("lmf-int8", o.tag))
                         for o in lmf]
                if not gather and not transposed:  # factors stored as A (m×r), B (r×n): weight-only int8
                    Ww = (int8w_weight(f.A) @ int8w_weight(f.B)).astype(np.float32)
                    dw = max(0.0, loss_with(g.name, Ww) - base)
                    opts += [Option(o.params + 2 * INT8_OVERHEAD + LMF_OVERHEAD + 4 * n + 4 * round(o.params / (m + n)),
                                    o.error + dw, ("lmf-int8w", o.tag)) for o in lmf]
        out[g.name] = opts
    return out


def _fake_quant_inputs(model: onnx.ModelProto, weights: list[str]) -> dict[str, str]:
    """Give each MatMul that reads one of ``weights`` as B a switchable quantized input:
    A ← Where(flag, DequantizeLinear(DynamicQuantizeLinear(A)), A), flag a bool graph input.
    What MatMulInteger computes, (A_q − z_A)·W_q·s_A·s_W, equals DequantizeLinear(A_q)·W_q·s_W
    exactly up to float rounding, so the probe sees the int8 site's activation error too.
    Returns {weight: flag input name}; empty below opset 11 (no DynamicQuantizeLinear)."""
    if default_opset(model) < 11:
        return {}
    want = set(weights)
    flags: dict[str, str] = {}
    added = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in want:
            continue
        w = node.input[1]
        flag = flags.setdefault(w, f"onnxhmf_fq_flag_{len(flags)}")
        base = f"onnxhmf_fq_{len(added)}"
        x = node.input[0]
        added += [
            onnx.helper.make_node("DynamicQuantizeLinear", [x], [base + "_q", base + "_s", base + "_z"]),
            onnx.helper.make_node("DequantizeLinear", [base + "_q", base + "_s", base + "_z"], [base + "_dq"]),
            onnx.helper.make_node("Where", [flag, base + "_dq", x], [base + "_x"]),
        ]
        node.input[0] = base + "_x"
    for flag in flags.values():
        model.graph.input.append(onnx.helper.make_tensor_value_info(flag, onnx.TensorProto.BOOL, []))
    # nodes only need to come before their consumers: put them first, after their inputs' producers
    order = list(model.graph.node)
    del model.graph.node[:]
    produced = {o: i for i, n in enumerate(order) for o in n.output}
    at: dict[int, list] = {}
    for i in range(0, len(added), 3):
        x = added[i].input[0]
        at.setdefault(produced.get(x, -1), []).append(added[i : i + 3])
    for trio in at.get(-1, []):
        model.graph.node.extend(trio)
    for i, n in enumerate(order):
        model.graph.node.append(n)
        for trio in at.get(i, []):
            model.graph.node.extend(trio)
    return flags


def check_targets(plan: dict) -> None:
    """The plan's targets as numbers in range (a NaN would compare false everywhere)."""
    import math

    ranges = {"target_size": (1, math.inf), "target_ratio": (0, 1), "target_fidelity": (-1, 1), "max_latency_ratio": (0, math.inf)}
    for key, (lo, hi) in ranges.items():
        v = plan.get(key)
        if v is not None and not (isinstance(v, (int, float)) and lo <= v <= hi and (key != "target_ratio" or v > 0)):
            raise OnnxHmfError(f"--{key.replace('_', '-')} must be a number in [{lo}, {hi}], got {v!r}")


def plan_and_assemble(work: onnx.ModelProto, fpass: FactorizePass, report, calib, tokenizer, samples, seq_len, batch,
                      plan: dict, *, src_bytes: int, finish=None, progress=lambda it: it) -> "Planner":
    """Measure, choose and check a plan; leave ``fpass`` set up to factorize it (keeps, stats).
    Returns the Planner with ``choice`` set: the caller factorizes ``work`` with ``fpass`` and
    then quantizes ``planner.quantized(work, planner.choice)``."""
    check_targets(plan)
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
                      [g.name for g in all_groups], {t.name for t in work.graph.initializer}, finish)
    report.timings["plan_measure_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    tried = []

    def trial(budget: int):
        choice = planner.allocate(budget)
        model = planner.assemble(work, choice)
        size = model.ByteSize()
        fid, loss = planner.measure(model)
        tried.append({"budget": int(budget), "bytes": size, "fidelity": round(fid, 5)})
        return choice, size, fid, loss, model

    def best_of(res, target: int):
        """The knapsack's plan, or a one-treatment plan (every weight int8w, int8 or int4w where
        it can be, the knapsack's choice elsewhere) that fits ``target`` and measures a lower
        held-out loss: the prediction adds per-weight losses, which the whole model need not."""
        for kind in ("int8w", "int8", "int4w"):
            alt = {n: next((o for o in planner.options[n] if o.tag[0] == kind), res[0][n]) for n in res[0]}
            if alt == res[0] or planner.fixed + sum(o.params for o in alt.values()) > 1.05 * target:
                continue  # (the estimate can be off by the overheads: only a clear miss is skipped)
            model = planner.assemble(work, alt)
            size = model.ByteSize()
            if size > target:
                continue
            fid, loss = planner.measure(model)
            tried.append({"budget": None, "uniform": kind, "bytes": size, "fidelity": round(fid, 5)})
            if loss < res[3]:
                res = (alt, size, fid, loss, model)
        return res

    def search():
        floor, ceiling = planner.floor(), planner.ceiling()
        if plan.get("target_fidelity") is None:
            target = plan["target_size"] if plan.get("target_size") else int(plan["target_ratio"] * src_bytes)
            if target < floor:
                raise OnnxHmfError(f"--plan auto: target {target:,} B is below the smallest plan ({floor:,} B: every "
                                   "weight at its cheapest option)")
            budget = target
            for i in range(6):
                res = trial(budget)
                if res[1] <= target:
                    return best_of(res, target), target
                # the overhead estimate was short: spend that much less, and a growing margin more
                budget -= res[1] - target + int(0.001 * target * 2**i)
            raise OnnxHmfError(f"--plan auto: could not fit {target:,} B (last plan {res[1]:,} B)")
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
        return best, None

    (choice, size, fid, loss, model), target = search()
    ratio = latency_ratio(work, model, held)
    limit = plan.get("max_latency_ratio")
    fast_only = False
    if limit is not None and ratio > limit and any(o.tag[0] in SLOW for o in choice.values()):
        # weight-only int8 runs at float speed: plan again without it
        planner.options = {n: [o for o in opts if o.tag[0] not in SLOW] for n, opts in planner.options.items()}
        (choice, size, fid, loss, model), target = search()
        ratio, fast_only = latency_ratio(work, model, held), True
    del model
    if limit is not None and ratio > limit:
        raise OnnxHmfError(f"--plan auto: the plan runs at {ratio:.2f}x the input's latency (onnxruntime, one thread)"
                           f"{' even without weight-only int8' if fast_only else ''}, over --max-latency-ratio {limit}")
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
    report.timings["plan_search_s"] = time.perf_counter() - t
    info = {"target_size": target, "target_fidelity": plan.get("target_fidelity"), "fixed_bytes": fixed,
            "planned_bytes": fixed + sum(o.params for o in choice.values()), "bytes": size,
            "predicted_loss": round(predicted, 6), "heldout_loss": round(loss, 6), "heldout_fidelity": round(fid, 5),
            "heldout_samples": held.samples, "fit_samples": fit.samples, "latency_ratio": round(ratio, 3),
            "trials": tried, "sites": rows}
    if fast_only:
        info["note"] = "planned without weight-only int8 to meet --max-latency-ratio"
    report.plan = info
    counts = {}
    for o in choice.values():
        counts[o.tag[0]] = counts.get(o.tag[0], 0) + 1
    report.notes.append(
        f"plan auto: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}; planned {info['planned_bytes']:,} B, "
        f"assembled {size:,} B; loss predicted {predicted:.4f}, measured {loss:.4f} (held-out fidelity {fid:.4f} on "
        f"{held.samples} samples)")
    return planner


def latency_ratio(base: onnx.ModelProto, model: onnx.ModelProto, data: Calibration, repeats: int = 7) -> float:
    """Median onnxruntime latency of ``model`` over ``base`` on the first batch of ``data``
    (one intra-op thread, runs interleaved so that machine noise hits both alike)."""
    feeds = data.batches[0]
    a, b = session(base, threads=1), session(model, threads=1)
    a.run(None, feeds), b.run(None, feeds)
    ta, tb = [], []
    for _ in range(repeats):
        for sess, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            sess.run(None, feeds)
            out.append(time.perf_counter() - t)
    return float(np.median(tb) / max(np.median(ta), 1e-9))
