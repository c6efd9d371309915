"""The recurrent pass: W (and, lowered to Scan, R) of ONNX LSTM/GRU/RNN ops.

Op form (default): W ``[dirs, G·H, I]`` gets one input basis shared by the directions,
X·Vᵀ in front of the op and W = U inside it (``lmf``; whitened by XᵀX with calibration data),
or dense input features plus a low-rank rest (``hmf``, see factorize/recurrent.py); R stays in
the fused kernel. ``lower=True`` (``--lower-recurrent``): the op becomes Scan with explicit
MatMuls (graph/recurrent_scan.py), the input projection of both directions is one MatMul and
each direction's h·Rᵀ another, each factorized with the same method and keep (``hmf`` = dense
gate rows, gate_hmf); with calibration data R is whitened by the Gram of the op's Y (the states
h_t, directions pooled). Off by default: see docs/recurrent.md for its latency.

Same budget rules as FactorizePass: ``keep``·params per weight (or ``keeps[name]``), or
``rank`` for LMF; a weight whose factors would not save parameters stays dense. HMF is
compared with plain LMF at the same budget and the better fit is used.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..factorize.recurrent import GATE_NAMES, gate_errors, gate_hmf, input_hmf, shared_input_lmf, stack_inputs
from ..factorize.svd import lmf, lmf_params, rank_for_keep, round_rank
from ..factorize.whiten import DEFAULT_DAMP, weighted_lmf
from ..graph.edit import GraphEditor
from ..graph.index import FLOAT_TYPES, GraphIndex, default_opset
from ..graph.recurrent import RecurrentSite, find_recurrent_sites, rewrite_input_hybrid, rewrite_input_lowrank
from ..graph.recurrent_scan import Projection, lower_to_scan, lowering_blocker, r_parts
from ..report import SiteReport
from .select import SiteSelection

__all__ = ["RecurrentPass", "R_IN_OP"]

R_IN_OP = "R is inside the fused op: --lower-recurrent lowers it to Scan so R can be factorized (slower, docs/recurrent.md)"


@dataclass
class RecurrentPass:
    method: str = "lmf"
    keep: float | None = 0.75
    rank: int | None = None
    rank_multiple: int = 1
    selection: SiteSelection = field(default_factory=SiteSelection)
    lower: bool = False
    keeps: dict[str, float] | None = None
    damp: float = DEFAULT_DAMP
    seed: int = 0
    grams: dict[str, np.ndarray] = field(default_factory=dict)  # op input X -> XᵀX
    store: object = None  # onnxhmf.external.TensorStore (lazy external weights)

    # -- planning ---------------------------------------------------------------------------
    def budget(self, name: str, m: int, n: int) -> tuple[int, str | None]:
        """(rank for lmf or parameter budget for hmf, None) or (0, reason) for an m×n matrix."""
        if self.method not in ("lmf", "hmf"):
            return 0, f"method {self.method} is not implemented for recurrent ops (lmf, hmf)"
        keep = self.keeps.get(name, self.keep) if self.keeps else self.keep
        if keep is not None and keep >= 1.0 and self.rank is None:
            return 0, "keep 1 keeps it dense"
        if self.method == "hmf":
            budget = int(np.floor(keep * m * n + 1e-9))
            return (budget, None) if budget // (m + n) >= 1 else (0, f"keep {keep:.3g} leaves rank 0")
        r = round_rank(min(self.rank, m, n), self.rank_multiple) if self.rank else rank_for_keep(m, n, keep, self.rank_multiple)
        if r < 1 or lmf_params(m, n, r) >= m * n:
            return 0, f"rank {r} would not save parameters"
        return r, None

    def sites(self, model: onnx.ModelProto) -> list[RecurrentSite]:
        return find_recurrent_sites(GraphIndex(model, self.store))

    def why_not(self, site: RecurrentSite) -> str | None:
        return site.skip_reason or self.selection.why_not(site)

    # -- factorizations -----------------------------------------------------------------------
    def _lowrank(self, Wt: np.ndarray, amount: int, blocks: int, gram) -> tuple[Projection, dict]:
        """Wt (in × out) as a Projection: LMF at rank ``amount``, or for hmf the better of gate
        HMF and LMF at budget ``amount`` (errors whitened by ``gram`` when given)."""
        fit = (lambda M, r: lmf(M, r, seed=self.seed)) if gram is None else \
            (lambda M, r: weighted_lmf(M, r, gram, damp=self.damp, seed=self.seed))
        m, n = Wt.shape
        r = amount if self.method == "lmf" else min(amount // (m + n), m, n)
        f = fit(Wt.astype(np.float64), r)
        info = dict(rank=f.rank, res=f.residual_sq, tot=f.total_sq, dense=0, detail="")
        if self.method == "hmf":
            g = gate_hmf(Wt, amount - n, blocks, gram, damp=self.damp, seed=self.seed)  # n: the permutation
            if g is not None and g.factors.k and g.factors.residual_sq < f.residual_sq:
                hf = g.factors
                info.update(rank=hf.rank, res=hf.residual_sq, dense=hf.k, detail=f"{hf.k} dense gate rows ({g.label})")
                return Projection("hybrid", hf=hf), info
            info["detail"] = "k=0: plain low rank fits best"
        return Projection("lowrank", A=f.A, B=f.B), info

    def _op_form(self, editor: GraphEditor, index: GraphIndex, site: RecurrentSite, amount: int) -> SiteReport:
        W = index.array(site.W)
        gram = self.grams.get(site.node.input[0])
        basis = shared_input_lmf(W, amount if self.method == "lmf" else
                                 min(amount // sum(stack_inputs(W).shape), site.input_size), gram,
                                 damp=self.damp, seed=self.seed)
        how = "whitened by XᵀX, " if gram is not None else ""
        if self.method == "hmf":
            hf = input_hmf(W, amount - site.input_size, seed=self.seed)  # I int64 indices
            plain = shared_input_lmf(W, basis.rank, seed=self.seed) if gram is not None else basis
            if hf.k and hf.residual_sq < plain.factors.residual_sq:
                stored = rewrite_input_hybrid(editor, site, hf)
                return self._report(site, "rewritten", method="hmf", rank=hf.rank, params_after=stored,
                                    rel_error=hf.relative_error, dense=hf.k,
                                    detail=f"op form: {hf.k} dense input features, shared by {site.dirs} direction(s)")
        stored = rewrite_input_lowrank(editor, site, basis.V, basis.U)
        return self._report(site, "rewritten", method=self.method, rank=basis.rank, params_after=stored,
                            rel_error=basis.relative_error,
                            detail=f"op form: {how}X·Vᵀ in front, W = U; one basis for {site.dirs} direction(s)"
                                   + ("; k=0: plain low rank fits best" if self.method == "hmf" else ""))

    def _lowered(self, editor: GraphEditor, index: GraphIndex, site: RecurrentSite) -> list[SiteReport]:
        W, R = index.array(site.W), index.array(site.R)
        M = stack_inputs(W)
        reps = []
        amount, why = self.budget(site.name, *M.shape) if self.why_not(site) is None else (0, self.why_not(site))
        if why:
            wproj = Projection("dense", T=M)
            reps.append(self._report(site, "rewritten", lowered=True, method="dense", params_after=site.params,
                                     rel_error=0.0, detail=f"lowered to Scan, kept dense: {why}"))
        else:
            wproj, info = self._lowrank(M, amount, site.dirs * site.gates, self.grams.get(site.node.input[0]))
            reps.append(self._report(site, "rewritten", lowered=True, method=self.method, rank=info["rank"], params_after=wproj.params,
                                     rel_error=_rel(info), dense=info["dense"],
                                     detail="lowered to Scan: one input projection for all directions"
                                            + (f"; {info['detail']}" if info["detail"] else "")))
        rprojs, infos = [], []
        sens = np.zeros(site.gates)
        hgram = self.grams.get(site.node.output[0]) if site.node.output else None
        for d in range(site.dirs):
            parts = []
            for j, T in enumerate(r_parts(site, R[d])):
                amt, why_r = self.budget(site.R.name, *T.shape)
                if why_r is None and self.selection.why_not(_Named(site.R.name, site)) is None:
                    g = hgram if j == 0 else None  # GRU with linear_before_reset 0: R_h reads r⊙h, not h
                    p, info = self._lowrank(T, amt, T.shape[1] // site.hidden, g)
                    infos.append(info)
                    if T.shape[1] == site.gates * site.hidden:
                        sens += gate_errors(T, info["rank"], site.gates, g, damp=self.damp)
                else:
                    p = Projection("dense", T=T)
                parts.append(p)
            rprojs.append(parts)
        lower_to_scan(editor, index, site, wproj, rprojs)
        rrep = SiteReport(weight=site.R.name, ops=f"{site.op.lower()}→scan", nodes=[site.node.name],
                          shape=(site.dirs * site.gates * site.hidden, site.hidden), params_before=int(R.size),
                          status="rewritten", method="dense", params_after=int(R.size), rel_error=0.0,
                          detail="lowered to Scan, kept dense in the body (keep or selection)")
        if infos:
            names = GATE_NAMES[site.op]
            share = ", ".join(f"{g} {s / site.dirs:.0%}" for g, s in zip(names, sens)) if sens.any() else ""
            rrep = SiteReport(**{**rrep.__dict__, "method": self.method,
                                 "rank": max(i["rank"] for i in infos), "dense": sum(i["dense"] for i in infos),
                                 "params_after": sum(p.params for ps in rprojs for p in ps),
                                 "rel_error": _rel({"res": sum(i["res"] for i in infos), "tot": sum(i["tot"] for i in infos)}),
                                 "detail": "h·Rᵀ per direction in the Scan body"
                                           + (", whitened by the Gram of Y (h_t)" if hgram is not None else "")
                                           + (f"; rank-r error by gate: {share}" if share else "")
                                           + "".join(f"; {i['detail']}" for i in infos[:1] if i["detail"])})
        return reps + [rrep]

    def _report(self, site: RecurrentSite, status: str, lowered: bool = False, **kw) -> SiteReport:
        return SiteReport(weight=site.name, ops=site.op.lower() + ("→scan" if lowered else ""), nodes=[site.node.name], shape=site.shape,
                          params_before=site.params, status=status, **kw)

    def calibrate(self, model: onnx.ModelProto, calib) -> None:
        """Grams XᵀX of every recurrent op's input over ``calib`` (a calibration.Calibration)."""
        from ..capture import capture_stats

        sites = [s for s in self.sites(model) if self.why_not(s) is None]
        xs = [s.node.input[0] for s in sites]
        if self.lower:  # Y: the hidden states h_t that multiply R (directions pooled)
            xs += [s.node.output[0] for s in sites if s.node.output and s.node.output[0]]
        if xs:
            self.grams = dict(capture_stats(model, calib, xs).grams)

    # -- the pass -----------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto) -> list[SiteReport]:
        """Rewrite every recurrent site of ``model`` in place; one SiteReport per W (and per R)."""
        index = GraphIndex(model, self.store)
        editor = GraphEditor(model, self.store)
        opset = default_opset(model)
        reports = []
        for site in find_recurrent_sites(index):
            if self.lower and lowering_blocker(site, opset) is None and (
                    self.why_not(site) is None or self.selection.why_not(_Named(site.R.name, site)) is None):
                reports += self._lowered(editor, index, site)
                continue
            why = self.why_not(site)
            amount = 0
            if why is None:
                amount, why = self.budget(site.name, site.input_size, site.shape[0])
            if why is not None:
                reports.append(self._report(site, "skipped", reason=why))
            else:
                reports.append(self._op_form(editor, index, site, amount))
            if site.R is not None:
                reason = lowering_blocker(site, opset) if self.lower else None
                reports.append(SiteReport(weight=site.R.name, ops=site.op.lower(), nodes=[site.node.name],
                                          shape=(site.shape[0], site.hidden), params_before=int(np.prod(site.R.dims)),
                                          status="skipped", reason=f"R stays in the fused op: {reason}" if reason else R_IN_OP))
        editor.commit()
        return reports


@dataclass
class _Named:
    """A stand-in with the fields SiteSelection reads, for R."""

    name: str
    site: RecurrentSite

    @property
    def node_names(self) -> list[str]:
        return [self.site.node.name]

    @property
    def params(self) -> int:
        return int(np.prod(self.site.R.dims))


def _rel(info: dict) -> float:
    return float(np.sqrt(info["res"] / info["tot"])) if info["tot"] > 0 else 0.0


def run_recurrent(model: onnx.ModelProto, fpass, calib=None, lower: bool = False) -> list[SiteReport]:
    """The recurrent pass with ``fpass``'s (a FactorizePass) method, keep, rank, selection, damping
    and seed, whitened on ``calib`` when given: api.optimize's hook."""
    rpass = RecurrentPass(method=fpass.method, keep=fpass.keep, rank=fpass.rank, rank_multiple=fpass.rank_multiple,
                          selection=fpass.selection, lower=lower, damp=fpass.damp, seed=fpass.seed, store=fpass.store)
    if calib is not None:
        rpass.calibrate(model, calib)
    return rpass.run(model)


def recurrent_plan(model: onnx.ModelProto, fpass, lower: bool = False) -> list[dict]:
    """What ``run_recurrent`` would do, without doing it: one dict of plan.SitePlan fields per
    W and R (rank for lmf: exact params; budget for hmf: an upper bound)."""
    rpass = RecurrentPass(method=fpass.method, keep=fpass.keep, rank=fpass.rank, rank_multiple=fpass.rank_multiple,
                          selection=fpass.selection, lower=lower)
    index = GraphIndex(model)
    opset = default_opset(model)
    out = []

    def entry(name, site, m, n, reason, ops):
        base = dict(weight=name, ops=ops, nodes=[site.node.name], shape=(n, m), params=m * n,
                    itemsize=int(np.dtype(FLOAT_TYPES[site.W.data_type]).itemsize))
        amount = 0
        if reason is None:
            amount, reason = rpass.budget(name, m, n)
        if reason is not None:
            return dict(base, status="skipped", method=rpass.method, reason=reason)
        if rpass.method == "lmf":
            return dict(base, status="planned", method="lmf", rank=amount, params_after=lmf_params(m, n, amount))
        return dict(base, status="planned", method="hmf", budget=amount, params_after=amount)

    for site in find_recurrent_sites(index):
        lowered = lower and lowering_blocker(site, opset) is None
        ops = site.op.lower() + ("→scan" if lowered else "")
        out.append(entry(site.name, site, site.input_size, site.shape[0], rpass.why_not(site), ops))
        if site.R is None:
            continue
        if not lowered:
            why = f"R stays in the fused op: {lowering_blocker(site, opset)}" if lower else R_IN_OP
            out.append(dict(weight=site.R.name, ops=ops, nodes=[site.node.name], shape=(site.shape[0], site.hidden),
                            params=site.shape[0] * site.hidden, itemsize=4, status="skipped", method=rpass.method, reason=why))
            continue
        R = np.zeros(tuple(site.R.dims[1:]))  # only shapes are needed
        parts = [entry(site.R.name, site, *T.shape, rpass.selection.why_not(_Named(site.R.name, site)), ops)
                 for T in r_parts(site, R)]
        e = dict(parts[0], shape=(site.shape[0], site.hidden), params=site.shape[0] * site.hidden)
        if e["status"] == "planned":
            e["params_after"] = site.dirs * sum(p.get("params_after", p["params"]) for p in parts)
        out.append(e)
    return out
