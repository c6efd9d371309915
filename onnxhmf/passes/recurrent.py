"""The recurrent pass: W (and, lowered to Scan, R) of ONNX LSTM/GRU/RNN ops.

Op form (default): W ``[dirs, G·H, I]`` gets one input basis shared by the directions,
X·Vᵀ in front of the op and W = U inside it (``lmf``; whitened by XᵀX with calibration data),
or dense input features plus a low-rank rest (``hmf``, see factorize/recurrent.py); R stays in
the fused kernel. ``lower=True`` (``--lower-recurrent``): the op becomes Scan with explicit
MatMuls (graph/recurrent_scan.py), the input projection of both directions is one MatMul and
each direction's h·Rᵀ another, each factorized with its decision (``hmf`` = dense gate rows,
gate_hmf); with calibration data R is whitened by the Gram of the op's Y (the states h_t,
directions pooled). Off by default: see docs/recurrent.md for its latency.

Planning: :func:`recurrent_decisions` gives one plan.Decision per W (and per R) through the
planners' own ``candidate``/``decide`` (same keep/rank rules as MatMul weights: the matrix is
W as (dirs·G·H) × I, R as (dirs·G·H) × H). Executing: :func:`apply_recurrent` runs
:class:`RecurrentPass` with those decisions. HMF is compared with plain LMF at the same budget
and the better fit is used. For a bidirectional R the lowering fits each direction at the
decision's keep (its own h), so its parameters can differ from the plan's prediction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..factorize.recurrent import GATE_NAMES, gate_errors, gate_hmf, input_hmf, shared_input_lmf, stack_inputs
from ..factorize.svd import lmf, lmf_params, rank_for_keep, round_rank
from ..factorize.whiten import weighted_lmf
from ..graph.edit import GraphEditor
from ..graph.index import ConstRef, GraphIndex, default_opset
from ..graph.recurrent import RecurrentSite, find_recurrent_sites, rewrite_input_hybrid, rewrite_input_lowrank
from ..graph.recurrent_scan import Projection, lower_to_scan, lowering_blocker, r_parts
from ..options import DEFAULT_DAMP, Selection
from ..report import SiteReport

__all__ = ["RecurrentPass", "RecurrentMatrix", "recurrent_groups", "recurrent_decisions", "apply_recurrent", "R_IN_OP"]

R_IN_OP = "R is inside the fused op: --lower-recurrent lowers it to Scan so R can be factorized (slower, docs/recurrent.md)"


@dataclass
class RecurrentMatrix:
    """W or R of one recurrent op, shaped like a graph.sites.WeightGroup for the planners."""

    ref: ConstRef
    site: RecurrentSite
    kind: str  # "W" | "R"
    lowered: bool
    skip_reason: str | None = None
    uses: list = field(default_factory=list)  # no MatMul/Gather uses: planners' method_for sees none

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def shape(self) -> tuple[int, int]:
        s = self.site
        return (s.shape[0], s.input_size if self.kind == "W" else s.hidden)

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def ops(self) -> str:
        return self.site.op.lower() + ("→scan" if self.lowered else "")

    @property
    def node_names(self) -> list[str]:
        return [self.site.node.name]


def recurrent_groups(model: onnx.ModelProto, lower: bool = False, store=None) -> list[RecurrentMatrix]:
    """W and R of every recurrent op, with why each cannot change (R: unless lowered)."""
    index = GraphIndex(model, store)
    opset = default_opset(model)
    out = []
    for site in find_recurrent_sites(index):
        blocker = lowering_blocker(site, opset) if lower else R_IN_OP
        lowered = lower and blocker is None
        out.append(RecurrentMatrix(site.W, site, "W", lowered, site.skip_reason))
        if site.R is not None:
            why = None if lowered else (blocker if blocker == R_IN_OP else f"R stays in the fused op: {blocker}")
            out.append(RecurrentMatrix(site.R, site, "R", lowered, why))
    return out


def recurrent_decisions(model: onnx.ModelProto, options) -> list:
    """One plan.Decision per recurrent W and R (options.Options: method, keep/rank, selection)."""
    from ..planners.common import candidate, decide, dense

    b, m = options.budget, options.methods
    out = []
    for g in recurrent_groups(model, m.lower_recurrent):
        why = candidate(g, options)
        if why is None and m.method not in ("lmf", "hmf"):
            why = f"method {m.method} is not implemented for recurrent ops (lmf, hmf)"
        out.append(dense(g, why) if why else decide(g, m.method, keep=b.keep, rank=b.rank, rank_multiple=b.rank_multiple))
    return out


def apply_recurrent(model: onnx.ModelProto, plan, ctx) -> list[SiteReport]:
    """The executor's recurrent step: ``plan``'s decisions for recurrent W/R applied to ``model``
    (ctx: executor.ExecContext; its calibration data whitens the fits)."""
    s = plan.settings
    rpass = RecurrentPass(lower=bool(s.get("lower_recurrent")), damp=float(s.get("damp", DEFAULT_DAMP)),
                          seed=int(s.get("seed", 0)), store=ctx.store)
    mine = {g.name for g in recurrent_groups(model, rpass.lower, ctx.store)}
    decisions = {w: d for w, d in plan.by_weight.items() if w in mine}
    if not decisions:
        return []
    if ctx.calibration is not None:
        rpass.calibrate(model, ctx.calibration)
    return rpass.run(model, decisions)


@dataclass
class RecurrentPass:
    """Rewrites recurrent ops. With ``decisions`` ({weight: plan.Decision}) given to ``run``,
    each matrix follows its decision; without, every matrix gets ``method`` at ``keep`` (or
    ``rank``), for direct use."""

    method: str = "lmf"
    keep: float | None = 0.75
    rank: int | None = None
    rank_multiple: int = 1
    selection: Selection = field(default_factory=Selection)
    lower: bool = False
    damp: float = DEFAULT_DAMP
    seed: int = 0
    store: object = None  # onnxhmf.external.TensorStore (lazy external weights)
    grams: dict[str, np.ndarray] = field(default_factory=dict)  # op input X (and Y) -> Gram

    # -- what to do with one matrix -----------------------------------------------------------
    def _own(self, name: str, m: int, n: int) -> tuple[str, int, str | None]:
        """(method, rank for lmf or parameter budget for hmf, None) or (method, 0, reason)."""
        if self.method not in ("lmf", "hmf"):
            return self.method, 0, f"method {self.method} is not implemented for recurrent ops (lmf, hmf)"
        keep = self.keep
        if keep is not None and keep >= 1.0 and self.rank is None:
            return self.method, 0, "keep 1 keeps it dense"
        if self.method == "hmf":
            budget = int(np.floor(keep * m * n + 1e-9))
            return ("hmf", budget, None) if budget // (m + n) >= 1 else ("hmf", 0, f"keep {keep:.3g} leaves rank 0")
        r = round_rank(min(self.rank, m, n), self.rank_multiple) if self.rank else rank_for_keep(m, n, keep, self.rank_multiple)
        if r < 1 or lmf_params(m, n, r) >= m * n:
            return "lmf", 0, f"rank {r} would not save parameters"
        return "lmf", r, None

    def _todo(self, name: str, m: int, n: int, part: float = 1.0) -> tuple[str, int, str | None]:
        """As :meth:`_own`, from the plan's decision when there is one. ``part``: the share of
        the decision's matrix this m×n piece is (one direction's R, or one of a GRU's R parts)."""
        if self._decisions is None:
            return self._own(name, m, n)
        d = self._decisions.get(name)
        if d is None:
            return "-", 0, "not in the plan"
        if d.treatment == "dense":
            return "dense", 0, d.reason or "kept dense by the plan"
        if d.treatment not in ("lmf", "hmf"):
            return d.treatment, 0, f"treatment {d.treatment} is not implemented for recurrent ops (lmf, hmf)"
        if d.treatment == "lmf":
            r = rank_for_keep(m, n, d.keep) if d.keep is not None and part < 1.0 else min(d.rank, m, n)
            return ("lmf", r, None) if r >= 1 and lmf_params(m, n, r) < m * n else ("lmf", 0, f"rank {r} would not save parameters")
        budget = int(d.budget * part)
        return ("hmf", budget, None) if budget // (m + n) >= 1 else ("hmf", 0, "budget leaves rank 0")

    def _selected(self, name: str, site: RecurrentSite) -> str | None:
        if self._decisions is not None:
            return None  # the planner applied the selection
        return self.selection.why_not(RecurrentMatrix(ConstRef(name, "initializer", (1, 1), 1), site, "W", False))

    # -- factorizations -----------------------------------------------------------------------
    def _lowrank(self, Wt: np.ndarray, method: str, amount: int, blocks: int, gram) -> tuple[Projection, dict]:
        """Wt (in × out) as a Projection: LMF at rank ``amount``, or for hmf the better of gate
        HMF and LMF at budget ``amount`` (errors whitened by ``gram`` when given)."""
        m, n = Wt.shape
        r = amount if method == "lmf" else min(amount // (m + n), m, n)
        W64 = Wt.astype(np.float64)
        f = lmf(W64, r, seed=self.seed) if gram is None else weighted_lmf(W64, r, gram, damp=self.damp, seed=self.seed)
        info = dict(rank=f.rank, res=f.residual_sq, tot=f.total_sq, dense=0, detail="")
        if method == "hmf":
            g = gate_hmf(Wt, amount - n, blocks, gram, damp=self.damp, seed=self.seed)  # n: the permutation
            if g is not None and g.factors.k and g.factors.residual_sq < f.residual_sq:
                hf = g.factors
                info.update(rank=hf.rank, res=hf.residual_sq, dense=hf.k, detail=f"{hf.k} dense gate rows ({g.label})")
                return Projection("hybrid", hf=hf), info
            info["detail"] = "k=0: plain low rank fits best"
        return Projection("lowrank", A=f.A, B=f.B), info

    def _op_form(self, editor: GraphEditor, index: GraphIndex, site: RecurrentSite, method: str, amount: int) -> SiteReport:
        W = index.array(site.W)
        gram = self.grams.get(site.node.input[0])
        rank = amount if method == "lmf" else min(amount // sum(stack_inputs(W).shape), site.input_size)
        basis = shared_input_lmf(W, rank, gram, damp=self.damp, seed=self.seed)
        how = "whitened by XᵀX, " if gram is not None else ""
        if method == "hmf":
            hf = input_hmf(W, amount - site.input_size, seed=self.seed)  # I int64 indices
            plain = shared_input_lmf(W, basis.rank, seed=self.seed) if gram is not None else basis
            if hf.k and hf.residual_sq < plain.factors.residual_sq:
                stored = rewrite_input_hybrid(editor, site, hf)
                return self._report(site, "rewritten", method="hmf", rank=hf.rank, params_after=stored,
                                    rel_error=hf.relative_error, dense=hf.k,
                                    detail=f"op form: {hf.k} dense input features, shared by {site.dirs} direction(s)")
        stored = rewrite_input_lowrank(editor, site, basis.V, basis.U)
        return self._report(site, "rewritten", method=method, rank=basis.rank, params_after=stored,
                            rel_error=basis.relative_error,
                            detail=f"op form: {how}X·Vᵀ in front, W = U; one basis for {site.dirs} direction(s)"
                                   + ("; k=0: plain low rank fits best" if method == "hmf" else ""))

    def _lowered(self, editor: GraphEditor, index: GraphIndex, site: RecurrentSite) -> list[SiteReport]:
        W, R = index.array(site.W), index.array(site.R)
        M = stack_inputs(W)
        method, amount, why = self._todo(site.name, *M.shape)
        why = site.skip_reason or self._selected(site.name, site) or why
        if why:
            wproj = Projection("dense", T=M)
            reps = [self._report(site, "rewritten", lowered=True, method="dense", params_after=site.params,
                                 rel_error=0.0, detail=f"lowered to Scan, kept dense: {why}")]
        else:
            wproj, info = self._lowrank(M, method, amount, site.dirs * site.gates, self.grams.get(site.node.input[0]))
            reps = [self._report(site, "rewritten", lowered=True, method=method, rank=info["rank"],
                                 params_after=wproj.params, rel_error=_rel(info), dense=info["dense"],
                                 detail="lowered to Scan: one input projection for all directions"
                                        + (f"; {info['detail']}" if info["detail"] else ""))]
        rprojs, infos, sens, rmethod = self._r_projections(site, R)
        lower_to_scan(editor, index, site, wproj, rprojs)
        return reps + [self._r_report(site, R, rprojs, infos, sens, rmethod)]

    def _r_projections(self, site: RecurrentSite, R: np.ndarray):
        hgram = self.grams.get(site.node.output[0]) if site.node.output else None
        rprojs, infos, sens, method = [], [], np.zeros(site.gates), "dense"
        for d in range(site.dirs):
            parts = []
            for j, T in enumerate(r_parts(site, R[d])):
                method, amt, why = self._todo(site.R.name, *T.shape, part=T.size / R.size)
                if why is None and self._selected(site.R.name, site) is None:
                    g = hgram if j == 0 else None  # GRU with linear_before_reset 0: R_h reads r⊙h, not h
                    p, info = self._lowrank(T, method, amt, T.shape[1] // site.hidden, g)
                    info["whitened"] = g is not None
                    infos.append(info)
                    if T.shape[1] == site.gates * site.hidden:
                        sens += gate_errors(T, info["rank"], site.gates, g, damp=self.damp)
                else:
                    p = Projection("dense", T=T)
                parts.append(p)
            rprojs.append(parts)
        return rprojs, infos, sens, method

    def _r_report(self, site, R, rprojs, infos, sens, method) -> SiteReport:
        base = dict(weight=site.R.name, ops=f"{site.op.lower()}→scan", nodes=[site.node.name],
                    shape=(site.shape[0], site.hidden), params_before=int(R.size), status="rewritten")
        if not infos:
            return SiteReport(**base, method="dense", params_after=int(R.size), rel_error=0.0,
                              detail="lowered to Scan, kept dense in the body (plan, keep or selection)")
        share = ", ".join(f"{g} {s / site.dirs:.0%}" for g, s in zip(GATE_NAMES[site.op], sens)) if sens.any() else ""
        detail = ("h·Rᵀ per direction in the Scan body" + (", whitened by the Gram of Y (h_t)" if infos[0]["whitened"] else "")
                  + (f"; rank-r error by gate: {share}" if share else "") + "".join(f"; {i['detail']}" for i in infos[:1] if i["detail"]))
        return SiteReport(**base, method=method, rank=max(i["rank"] for i in infos), dense=sum(i["dense"] for i in infos),
                          params_after=sum(p.params for ps in rprojs for p in ps),
                          rel_error=_rel({"res": sum(i["res"] for i in infos), "tot": sum(i["tot"] for i in infos)}),
                          detail=detail)

    def _report(self, site: RecurrentSite, status: str, lowered: bool = False, **kw) -> SiteReport:
        return SiteReport(weight=site.name, ops=site.op.lower() + ("→scan" if lowered else ""), nodes=[site.node.name],
                          shape=site.shape, params_before=site.params, status=status, **kw)

    def calibrate(self, model: onnx.ModelProto, calib) -> None:
        """Grams of every recurrent op's input X (and, lowering, of its Y) over ``calib``."""
        from ..capture import capture_stats

        sites = [s for s in find_recurrent_sites(GraphIndex(model, self.store)) if s.skip_reason is None]
        xs = [s.node.input[0] for s in sites]
        if self.lower:  # Y: the hidden states h_t that multiply R (directions pooled)
            xs += [s.node.output[0] for s in sites if s.node.output and s.node.output[0]]
        if xs:
            self.grams = dict(capture_stats(model, calib, xs).grams)

    # -- the pass -----------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto, decisions: dict | None = None) -> list[SiteReport]:
        """Rewrite every recurrent site of ``model`` in place; one SiteReport per W and per R."""
        self._decisions = decisions
        index = GraphIndex(model, self.store)
        editor = GraphEditor(model, self.store)
        opset = default_opset(model)
        reports = []
        for site in find_recurrent_sites(index):
            if self.lower and lowering_blocker(site, opset) is None and (
                    self._wanted(site.name, site, site.shape) or self._wanted(site.R.name, site, (site.shape[0], site.hidden))):
                reports += self._lowered(editor, index, site)
                continue
            method, amount, why = self._todo(site.name, site.input_size, site.shape[0])
            why = site.skip_reason or self._selected(site.name, site) or why
            if why is not None:
                reports.append(self._report(site, "skipped", reason=why))
            else:
                reports.append(self._op_form(editor, index, site, method, amount))
            if site.R is not None:
                reason = lowering_blocker(site, opset) if self.lower else None
                reports.append(SiteReport(weight=site.R.name, ops=site.op.lower(), nodes=[site.node.name],
                                          shape=(site.shape[0], site.hidden), params_before=int(np.prod(site.R.dims)),
                                          status="skipped", reason=f"R stays in the fused op: {reason}" if reason else R_IN_OP))
        editor.commit()
        return reports

    def _wanted(self, name: str, site: RecurrentSite, shape) -> bool:
        """Whether to lower this site: always when asked, unless a plan leaves it out."""
        return self._decisions is None or name in self._decisions


def _rel(info: dict) -> float:
    return float(np.sqrt(info["res"] / info["tot"])) if info["tot"] > 0 else 0.0
