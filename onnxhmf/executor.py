"""The executor: apply a Plan to a model. The only code that changes weights.

Steps, in order, each over the decisions that ask for it:

1. factorization (lmf, hmf, prune, ae and the lmf part of lmf-int8/lmf-int8w) by
   :class:`~onnxhmf.passes.factorize.FactorizePass`, which also holds the cross-weight state
   (HMF permutation folds, shared bases); with ``settings.sequential``, band by band, each band
   whitened on the model compressed so far (:func:`run_sequential`);
2. the storage autoencoder (storage-ae);
3. weight-only integers (int8w, int4w, lmf-int8w's factors: Cast·Mul, folded at load);
4. int8 through onnxruntime's quantizer (int8, lmf-int8's factors; every weight with
   ``settings.quantize == "int8"``).

:func:`execute` returns :class:`Built`: the new model, one SiteReport per decision that was
looked at, and notes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx

from .capture import capture_stats
from .progress import no_progress
from .graph.index import GraphIndex
from .graph.pertoken import dynamic_quantizers
from .graph.sites import find_weight_groups
from .passes.factorize import FactorizePass
from .plan import TREATMENTS, Plan
from .quantize import quantize_int8, weight_nodes, weight_only
from .report import SiteReport

# step 5: passes/intquant.PLANNED's keys
BLOCKED_STORES = ("int4b", "int8b", "int4b128", "int4b256", "int4b32r", "int4b64r", "int4b128r", "int4b256r", "pq4")

__all__ = ["Built", "ExecContext", "execute", "factorizer", "run_sequential", "factor_names"]


@dataclass
class ExecContext:
    """What the executor needs besides the plan: lazy weights, calibration statistics (whitened
    factorization), the calibration data itself (sequential bands), token counts, progress."""

    store: object = None
    stats: object = None
    calibration: object = None
    token_freq: np.ndarray | None = None
    progress: Callable = field(default=no_progress)
    cache: dict | None = None  # LMF factors by (weight, rank, orientation): a planner building many trials


@dataclass
class Built:
    model: onnx.ModelProto
    sites: list[SiteReport]
    notes: list[str]


def factorizer(plan: Plan, ctx: ExecContext) -> FactorizePass:
    s = plan.settings
    return FactorizePass(fold=bool(s.get("fold", True)) and not s.get("sequential"), seed=int(s.get("seed", 0)),
                         store=ctx.store, ae_options=dict(s.get("ae_options") or {}), stats=ctx.stats,
                         damp=float(s.get("damp", 0.01)), share_bases=bool(s.get("share_bases")),
                         token_freq=None if ctx.token_freq is None else np.asarray(ctx.token_freq), cache=ctx.cache)


def execute(model: onnx.ModelProto, plan: Plan, ctx: ExecContext | None = None) -> Built:
    """Apply ``plan`` to ``model`` (changed in place, and returned; the int8 step returns a new proto)."""
    ctx = ctx or ExecContext()
    notes: list[str] = []
    theirs = dynamic_quantizers(model)
    fpass = factorizer(plan, ctx)
    original = {t.name for t in model.graph.initializer}
    if plan.settings.get("sequential"):
        sites = run_sequential(model, plan, fpass, ctx)
    else:
        sites = fpass.run(model, plan.by_weight, ctx.progress)
    notes += fpass.notes
    from .passes.recurrent import apply_recurrent  # LSTM/GRU/RNN decisions

    sites += apply_recurrent(model, plan, ctx)
    storage = [d.weight for d in plan.with_treatment("storage-ae")]
    if storage:
        sites = _storage_ae(model, plan, storage, sites)
    head, shift = unsigned_forms(plan.settings)
    quant = _stored(plan, "int8w") + _stored(plan, "int4w")
    if quant:
        done = weight_only(model, factor_names(model, plan, "int8w", original), 8)
        done += weight_only(model, factor_names(model, plan, "int4w", original), 4)
        if done:
            notes.append(f"weight-only int8/int4: {len(done)} weights stored as integers + per-column scales, "
                         "rebuilt by a constant subgraph that onnxruntime folds at load (float MatMuls): disk only")
    everything = plan.settings.get("quantize") in ("int8", "int8pc")
    if everything or _stored(plan, "int8"):
        if ctx.store is not None:
            from .external import inline_external, needs_external_data
            from .errors import OnnxHmfError

            if needs_external_data(model):
                raise OnnxHmfError("--quantize needs the model in memory: not supported past 2 GB")
            inline_external(model, ctx.store)
        names = None if everything else factor_names(model, plan, "int8", original)
        per_channel = plan.settings.get("quantize") == "int8pc"
        if per_channel and plan.settings.get("smooth"):
            model = _smooth(model, names, ctx, notes, plan.settings["smooth"])
        start = len(notes)
        model, done = quantize_int8(model, names, per_channel=per_channel, notes=notes,
                                    table_bits=plan.settings.get("table_bits", 8) if everything else 8,
                                    unsigned_head=head)
        own = sum(1 for n in notes[start:] if n.startswith("int8: ") and "table '" in n)  # quantize._own_tables
        if not done and not any(s.status == "rewritten" for s in sites):
            from .errors import OnnxHmfError

            why = "; ".join(n for n in notes if n.startswith("int8:")) or "no MatMul/Gather reads a 2-D float initializer"
            raise OnnxHmfError(f"no compressible weights: nothing to quantize ({why})"[:400])
        notes.append(f"int8: {len(done) - own} weights quantized{(' besides the table above' if own == 1 else f' besides the {own} tables above') if own else ''} "
                     "(onnxruntime dynamic quantizer"
                     f"{', per-channel weight scales' if per_channel else ''}, QOperator: "
                     "MatMulInteger + DynamicQuantizeLinear, Gather + DequantizeLinear)")
        if everything:
            sites = _int8_everything(sites, set(done))
    model = _store_blocked(model, plan, ctx, notes, getattr(fpass, "row_permutations", {}))
    sites += _store_reports(plan)
    if plan.settings.get("activations") == "per-token":  # (auto: chosen on the final model, see auto_per_token)
        _per_token(model, theirs, notes, shift != "none")
    if shift == "all":
        _unsigned(model, notes)
    if plan.settings.get("kernels") == "onnxruntime":
        _onnxruntime_kernels(model, plan.settings.get("accuracy_level"), notes)
    return Built(model, sites, notes)


def unsigned_forms(settings: dict) -> tuple[bool, str]:
    """(the tied head's rows asymmetric uint8, which MatMulInteger weights to shift to uint8:
    "none", "per-token" or "all") for the plan's ``int8_weights`` (graph/unsigned.py). auto
    takes the uint8 forms only where this CPU's uint8×int8 kernel saturates
    (runtime.matmulinteger_saturates), and there only the free ones: the head (a zero point per
    row, the same kernel speed) and the weights behind per-token inputs, whose full-range
    integers overflow most; shifting every other weight as well costs glassllm 0.80 → 0.87 of the
    float latency for KL 0.00308 → 0.00305 (docs/quantization.md)."""
    how = settings.get("int8_weights", "auto")
    if how == "uint8":
        return True, "all"
    if how == "int8":
        return False, "none"
    from .runtime import matmulinteger_saturates

    return (True, "per-token") if matmulinteger_saturates() else (False, "none")


def _unsigned(model: onnx.ModelProto, notes: list[str]) -> None:
    from .graph.unsigned import unsigned_weights

    n = unsigned_weights(model)
    notes.append(f"uint8 weights: {n} MatMulInteger weights shifted by 128 to uint8 with their zero points (the same "
                 "products; onnxruntime's exact uint8×uint8 kernel instead of the int8 one, which saturates on x86 "
                 "without VNNI)" if n else "uint8 weights: no int8 MatMulInteger weight in this plan, so nothing is shifted")


def _per_token(model: onnx.ModelProto, theirs: set[str], notes: list[str], unsigned: bool = False) -> None:
    """--activations per-token: the plan's DynamicQuantizeLinears as per-row scales (graph/pertoken.py);
    ``unsigned``: their MatMulIntegers' weights shifted to uint8 (graph/unsigned.py)."""
    from .graph.pertoken import per_token_activations

    n = per_token_activations(model, theirs, unsigned=unsigned)
    notes.append(f"per-token activations: {n} int8 MatMul inputs quantized with one scale per row (standard ops"
                 f"{'; their weights as uint8' if unsigned else ''})" if n else
                 "per-token activations: no int8 MatMulInteger in this plan, so nothing is rewritten")


def auto_per_token(model: onnx.ModelProto, source: onnx.ModelProto, calibration, notes: list[str],
                   unsigned: bool = False) -> None:
    """--activations auto on the final model (in place): per-row scales for the int8 inputs that
    pay, measured against ``source`` (the input) on ``calibration`` (passes/pertoken.py). Run once,
    after planning: a planner's trial builds keep per-tensor. ``unsigned``: the rewritten inputs'
    weights shifted to uint8, in the measurements too."""
    from .external import external_tensors, needs_external_data
    from .graph.pertoken import per_token_activations
    from .passes.pertoken import choose_per_token

    theirs = dynamic_quantizers(source)
    if calibration is None or any(needs_external_data(m) or external_tensors(m) for m in (source, model)):
        notes.append("per-token activations (auto): skipped, it needs calibration data and the weights in memory")
        return
    c = choose_per_token(model, source, calibration, theirs, unsigned=unsigned)
    if not c.candidates:
        notes.append("per-token activations: no int8 MatMulInteger in this plan, so nothing is rewritten")
        return
    n = per_token_activations(model, theirs, set(c.chosen), unsigned=unsigned) if c.chosen else 0
    notes.append(f"per-token activations (auto): {n} of {c.candidates} int8 MatMul inputs quantized with one scale per "
                 f"row, chosen on calibration data (output loss {c.loss_none:.5f} per-tensor, {c.loss_chosen:.5f} with "
                 f"these, {c.loss_all:.5f} with all; standard ops{'; their weights as uint8' if unsigned and n else ''})")


def _onnxruntime_kernels(model: onnx.ModelProto, accuracy: int | None, notes: list[str]) -> None:
    """--kernels onnxruntime: blocked DQ → MatMul written as MatMulNBits (graph/nbits.py)."""
    from .graph.nbits import AUTO_ACCURACY, to_matmulnbits

    n = to_matmulnbits(model, accuracy)
    level = (f"accuracy level {accuracy}" if accuracy is not None else
             "accuracy level " + ", ".join(f"{v} for {b}-bit" for b, v in AUTO_ACCURACY.items()))
    notes.append(f"onnxruntime kernels: {n} MatMuls written as com.microsoft.MatMulNBits ({level}); the model runs "
                 "on onnxruntime only" if n else
                 "onnxruntime kernels: no blocked integer MatMul in this plan, so nothing is written as MatMulNBits")


def _smooth(model: onnx.ModelProto, names, ctx: ExecContext, notes: list[str], how="cheap") -> onnx.ModelProto:
    """SmoothQuant before per-channel int8 (passes/smooth.py) on the MatMuls about to be quantized;
    ``how`` (--smooth): which sites with no free fold get a Mul node (cheap, all; free: none)."""
    from .errors import OnnxHmfError
    from .passes.smooth import smooth_for_int8

    if ctx.calibration is None:
        raise OnnxHmfError("--smooth needs calibration data (--calib)")
    nodes = {"free": "none", "all": "all"}.get(how, "cheap")
    model, res = smooth_for_int8(model, ctx.calibration, weights=None if names is None else set(names), nodes=nodes)
    folded = [n for n in res.notes if "folded by" in n]
    kinds = {}
    for n in folded:
        k = n.split("folded by ")[1].split(",")[0]
        kinds[k] = kinds.get(k, 0) + 1
    notes.append(f"smooth: {len(folded)} sites smoothed before int8 (1/s folded: "
                 + ", ".join(f"{v} by {k}" for k, v in sorted(kinds.items())) + f"; float outputs within "
                 f"{res.float_error:.1e} of the input's)")
    notes += res.notes
    return model


def _store_blocked(model: onnx.ModelProto, plan: Plan, ctx: ExecContext, notes: list[str],
                   rows: dict | None = None) -> onnx.ModelProto:
    """5. blocked int4/int8 (int4b, int8b; passes/intquant.py): DequantizeLinear(block_size) →
    MatMul, integer at run time; the opset is raised to 21 only where a MatMul needs it.
    ``rows``: {weight: permutation} of rows a fold in step 1 applied (apply_planned fits W[perm])."""
    blocked = {d.weight: d.treatment for d in plan.decisions if d.spec.store in BLOCKED_STORES}
    if not blocked:
        return model
    from .graph.index import default_opset
    from .passes.intquant import apply_planned

    before = default_opset(model)
    fitted = ctx.cache.setdefault("blocked fits", {}) if ctx.cache is not None else None
    model = apply_planned(model, blocked, ctx.stats.grams if ctx.stats is not None else {}, fitted, rows)
    notes.append(f"blocked int4/int8: {len(blocked)} weights as DequantizeLinear(block_size) → MatMul or gathered "
                 "integer rows (integer at run time)" + (f"; opset {before} -> {default_opset(model)}"
                                                          if default_opset(model) != before else ""))
    return model


def _int8_everything(sites: list[SiteReport], done: set[str]) -> list[SiteReport]:
    """With ``quantize == "int8"``: the weights kept dense but quantized are int8 sites, and
    low-rank sites whose factors were quantized say so."""
    out = []
    for s in sites:
        if s.status == "skipped" and s.weight in done:
            s = SiteReport(weight=s.weight, ops=s.ops, nodes=s.nodes, shape=s.shape, params_before=s.params_before,
                           status="rewritten", method="int8", params_after=s.params_before,
                           detail=TREATMENTS["int8"].summary, planned="int8")
        elif s.status == "rewritten" and any(d.startswith(s.weight + ".") for d in done):
            s.detail = (s.detail + "; " if s.detail else "") + "int8 factors"
        out.append(s)
    return out


def _stored(plan: Plan, store: str) -> list:
    return plan.stored_as(store)


def factor_names(model: onnx.ModelProto, plan: Plan, store: str, original: set[str]) -> list[str]:
    """Initializers to store as ``store`` (int8: those the dynamic quantizer takes; int8w/int4w:
    any): the weights of decisions with that treatment and, for lmf-``store``, the factors
    (new initializers named after the weight)."""
    used = weight_nodes(model) if store == "int8" else {t.name: [] for t in model.graph.initializer}
    names = [d.weight for d in plan.decisions if d.treatment == store]
    for d in plan.decisions:
        if d.treatment == "lmf-" + store:
            names += [w for w in used if w.startswith(d.weight + ".") and w not in original]
    return names


def _store_reports(plan: Plan) -> list[SiteReport]:
    """Reports for the decisions stored as integers without factorization (int8, int8w, int4w)."""
    return [SiteReport(weight=d.weight, ops=d.ops, nodes=list(d.nodes), shape=tuple(d.shape),
                       params_before=d.shape[0] * d.shape[1], status="rewritten", method=d.treatment,
                       params_after=d.shape[0] * d.shape[1], detail=d.spec.summary)
            for d in plan.decisions if d.spec.factor is None and d.spec.store in ("int8", "int8w", "int4w", *BLOCKED_STORES)]


def _storage_ae(model, plan: Plan, names: list[str], sites: list[SiteReport]) -> list[SiteReport]:
    """Run the storage autoencoder on exactly ``names``; its reports replace the factorizer's
    for those weights."""
    from .passes.storage_ae import StorageAEPass

    from .passes.storage_ae import storage_groups

    cfg = dict(plan.settings.get("storage_ae") or {})
    index = GraphIndex(model)
    _, skipped = storage_groups(index, list(cfg.get("include", [])), int(cfg.get("min_group", 2)))
    cfg["include"] = [f"^{re.escape(n)}$" for n in names]  # the plan decides, the regexes only explain
    ssites = StorageAEPass(seed=int(plan.settings.get("seed", 0)), **cfg).run(model)
    for n, why in skipped.items():
        ref = index.const(n)
        dims = tuple(ref.dims) if ref is not None else ()
        ssites.append(SiteReport(weight=n, ops="storage", nodes=[], shape=dims, params_before=int(np.prod(dims)) if dims else 0,
                                 status="skipped", reason=why))
    done = {s.weight for s in sites if s.status == "rewritten"}
    ssites = [s for s in ssites if s.weight not in done]
    taken = {s.weight for s in ssites}
    return [s for s in sites if s.weight not in taken] + ssites


def run_sequential(model: onnx.ModelProto, plan: Plan, fpass: FactorizePass, ctx: ExecContext) -> list[SiteReport]:
    """Band by band (``Decision.stage``), each band's statistics captured on the model
    compressed so far, with the cross term against the original model's activations
    (sequential least squares); then the decisions without a band, for the report."""
    from .passes.calibrated import calibration_targets

    original = onnx.ModelProto()
    original.CopyFrom(model)
    groups = {g.name: g for g in find_weight_groups(GraphIndex(model))}
    by_weight = plan.by_weight
    bands = sorted({d.stage for d in plan.decisions if d.stage is not None})
    sites: list[SiteReport] = []
    for b in ctx.progress(bands, "sequential bands"):
        names = [n for n, d in by_weight.items() if d.stage == b]
        acts, idx = calibration_targets([groups[n] for n in names])
        changed = any(s.status == "rewritten" for s in sites)  # else X_c = X_o: plain whitening
        fpass.stats = capture_stats(model, ctx.calibration, acts, idx, reference=original if changed else None)
        sites += fpass.run(model, {n: by_weight[n] for n in names})
    sites += fpass.run(model, {n: d for n, d in by_weight.items() if d.stage is None})
    order = {name: i for i, name in enumerate(groups)}
    return sorted(sites, key=lambda s: order.get(s.weight, len(order)))
