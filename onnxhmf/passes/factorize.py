"""The executor's factorization step: apply a plan's lmf/hmf/prune/ae decisions, rewrite.

Treatments for linear sites (MatMul/Gemm weights): ``lmf`` (truncated SVD at the decision's
rank), ``hmf`` (hybrid: dense columns or rows plus a low-rank rest, within the decision's
parameter budget, index maps included), ``prune`` (magnitude pruning, stored dense with zeros,
the baseline). Embedding tables (groups with a Gather use) get embedding HMF (dense rows of
frequent tokens) and ``ae`` (an autoencoder). HMF falls back to plain LMF at the same budget
where that fits better (reported as lmf). The cross-weight state lives here too: HMF column
permutations folded into the next weights, shared first factors (``share_bases``).

With calibration ``stats`` (see capture.py) the factorizations are data-aware: each side of
a weight is weighted by the Gram matrix of the activations that multiply it, and an embedding
table's rows by token frequency (whiten.py); ``stats.cross`` switches a site to the sequential
least-squares target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Iterable

import numpy as np
import onnx

from ..factorize.autoencoder import EmbeddingAEConfig, embedding_ae_rank, frequency_weights, train_embedding_ae
from ..factorize.hmf import hmf, hmf_fixed
from ..factorize.pivot import pivot_factors, pivot_hybrid, pivoted_rank_for_budget
from ..factorize.prune import magnitude_prune
from ..factorize.svd import lmf
from ..graph.autoencoder import rewrite_embedding_ae
from ..factorize.whiten import (
    DEFAULT_DAMP,
    sequential_target,
    shared_basis_lmf,
    token_weights,
    weighted_lmf,
    whitened_hmf,
    whitener,
)
from ..graph.edit import GraphEditor
from ..graph.fold import apply_vector_permutations, plan_fold
from ..graph.hybrid import rewrite_dense, rewrite_embedding_hybrid, rewrite_hybrid
from ..graph.index import GraphIndex
from ..graph.pivot import PivotCosts, rewrite_pivoted, rewrite_shared_pivoted
from ..graph.rewrite import factor_orientation, rewrite_lowrank, rewrite_shared_basis, shareable
from ..graph.quantized import quantized_summary
from ..graph.sites import WeightGroup, find_weight_groups
from ..progress import no_progress
from ..report import SiteReport

__all__ = ["FactorizePass"]


def _report(group: WeightGroup, **kw) -> SiteReport:
    return SiteReport(weight=group.name, ops=group.ops, nodes=group.node_names, shape=group.shape,
                      params_before=group.params, **kw)


@dataclass
class FactorizePass:
    """The factorization step of the executor: applies a plan's lmf/hmf/prune/ae decisions.

    Holds how weights are factorized (seed, whitening statistics and damping, folding, shared
    bases, AE options); what to do to each weight comes from the decisions given to ``run``.
    """

    fold: bool = True
    seed: int = 0
    store: object = None  # onnxhmf.external.TensorStore: lazy weights, factors spilled to disk
    ae_options: dict = field(default_factory=dict)  # EmbeddingAEConfig fields for the "ae" treatment
    stats: object | None = None  # capture.ActivationStats: data-aware factorization
    damp: float = DEFAULT_DAMP
    token_mix: float = 0.5  # share of uniform weight mixed into calibration token frequencies
    token_freq: np.ndarray | None = None  # per-token counts for the largest embedding table
    share_bases: bool = False  # LMF weights reading one activation share their first factor
    cache: dict | None = None  # (weight, rank, orientation) -> LMF factors, shared by a planner's trial builds
    notes: list[str] = field(default_factory=list, init=False, repr=False)

    # -- the pass -------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto, decisions: dict, progress: Callable = no_progress
            ) -> list[SiteReport]:
        """Apply ``decisions`` ({weight: plan.Decision}) to ``model`` in place. Groups without a
        decision are untouched and unreported; dense decisions are reported as skipped."""
        index = GraphIndex(model, self.store)
        groups = find_weight_groups(index)
        self._index, self._editor = index, GraphEditor(model, self.store)
        self._by_node = {id(u.node): g for g in groups for u in g.uses}
        self._pending: dict[str, np.ndarray] = {}  # group name -> row permutation to apply
        self._done: set[str] = set()
        reports: list[SiteReport] = []
        todo, planned = [], {}
        self._pivot = {n: bool(getattr(d, "pivot", False)) for n, d in decisions.items()}  # pivoted storage
        for group in groups:
            d = decisions.get(group.name)
            if d is None:
                continue
            factor = d.spec.factor
            if factor is None:
                if d.treatment == "dense":
                    reports.append(_report(group, status="skipped", reason=d.reason))
                continue
            todo.append((group, factor, d.rank if factor == "lmf" else d.budget))
            planned[group.name] = d.treatment
        if self.share_bases:
            todo = self._shared(todo, reports)
        self._todo = {g.name for g, _, _ in todo}
        for group, method, amount in progress(todo, "factorizing weights"):
            rep = getattr(self, f"_apply_{method}")(group, amount)
            reports.append(rep)
            if rep.status == "rewritten":
                self._done.add(group.name)
        for name, perm in self._pending.items():  # folded into a weight we did not otherwise touch
            if name not in self._done:
                group = next(g for g in groups if g.name == name)
                rewrite_dense(self._editor, group, index.array(group.ref)[perm])
        # rows a fold permuted in weights this pass did not otherwise touch: the integer steps after
        # it (executor: blocked int4/int8) must fit W[perm] with the Gram permuted alike
        self.row_permutations = {n: p for n, p in self._pending.items() if n not in self._done}
        self._pending = {}  # (sides() permutes a folded weight's Gram only during the run)
        self._editor.commit()
        by_name = {g.name: g for g in groups}
        for rep in reports:
            rep.planned = planned.get(rep.weight, rep.planned)
            if rep.status == "rewritten" and rep.error_of is None and rep.weight in by_name:
                rep.error_of = self._error_of(by_name[rep.weight], rep.method)
        self._control_flow_notes(groups, reports)
        order = {g.name: i for i, g in enumerate(groups)}
        reports.sort(key=lambda s: order[s.weight])
        return reports

    def _control_flow_notes(self, groups: list[WeightGroup], reports: list[SiteReport]) -> None:
        """Say which rewritten sites were fitted unwhitened (activations inside a body), and
        what came already quantized."""
        by_name = {g.name: g for g in groups}
        for rep in reports:
            g = by_name[rep.weight]
            if rep.status != "rewritten":
                continue
            where = _where(g)
            if where:
                rep.detail = (rep.detail + "; " if rep.detail else "") + where
            why = self._uncaptured(g)
            if why:
                rep.detail = (rep.detail + "; " if rep.detail else "") + f"not whitened: {why}"
        note = quantized_summary(groups, {r.weight for r in reports if r.status == "rewritten"})
        if note:
            self.notes.append(note)

    def _uncaptured(self, group: WeightGroup) -> str | None:
        """Why calibration has no statistics for one of the group's uses (an activation inside
        an If/Loop/Scan body), or None."""
        missing = getattr(self.stats, "uncaptured", None)
        if not missing:
            return None
        for u in group.uses:
            t = u.node.input[1] if u.kind == "gather" else u.node.input[0]
            if t in missing:
                return f"{t!r} {missing[t]}"
        return None

    def _weight(self, group: WeightGroup, transposed: bool) -> np.ndarray:
        W = self._index.array(group.ref)
        W = W.T if transposed else W
        perm = self._pending.get(group.name)
        return W[perm] if perm is not None else W

    # -- shared bases -------------------------------------------------------------------------
    def _shared(self, todo: list, reports: list[SiteReport]) -> list:
        """Rewrite sets of LMF groups that read the same activation with one shared first
        factor, where that lowers the predicted output error at the same parameters; return
        the groups left to do one by one."""
        sets: dict[str, list] = {}
        for item in todo:
            group, method, r = item
            x = shareable(group) if method == "lmf" and group.ref.kind == "initializer" else None
            if x is not None:
                sets.setdefault(x, []).append(item)
        handled = set()
        for x, items in sets.items():
            shapes = {g.shape[0] for g, _, _ in items}
            if len(items) < 2 or len(shapes) != 1:
                continue
            groups = [g for g, _, _ in items]
            m = groups[0].shape[0]
            costs = PivotCosts(self._index, list({id(g): g for g in self._by_node.values()}.values()), fold=self.fold)
            budget = sum(costs.cost(g, r) if self._pivot.get(g.name) else r * (m + g.shape[1]) for g, _, r in items)
            rank = min(budget // (m + sum(g.shape[1] for g in groups)), m)
            pivoted, rank = self._shared_pivot_rank(groups, budget, rank)
            gram = self.stats.grams.get(x) if self.stats is not None else None
            if rank < 1:
                continue
            Ws = [self._index.array(g.ref).astype(np.float64) for g in groups]
            if gram is not None and x in self.stats.cross:  # sequential: fit the least-squares targets
                Ws = [sequential_target(W, gram, self.stats.cross[x], damp=self.damp) for W in Ws]
            A, Bs, joint = shared_basis_lmf(Ws, rank, gram, damp=self.damp, seed=self.seed)
            separate = sum((weighted_lmf(W, r, gram, damp=self.damp, seed=self.seed) if gram is not None
                            else lmf(W, r, seed=self.seed)).residual_sq for (g, _, r), W in zip(items, Ws))
            what = "output" if gram is not None else "Frobenius"
            if joint.residual_sq >= separate:
                note = (f"shared basis rank {rank} for {len(groups)} weights would give {what} error "
                        f"{joint.residual_sq:.3g} vs {separate:.3g} separately: kept separate")
                self.notes.append(note)
                continue
            if pivoted:
                pf = pivot_factors(A, np.concatenate(Bs, axis=1), joint.residual_sq, joint.total_sq)
                shares = rewrite_shared_pivoted(self._editor, groups, pf, [g.shape[1] for g in groups])
            else:
                stored = rewrite_shared_basis(self._editor, groups, A, Bs)
            w = whitener(gram, self.damp) if gram is not None else None
            for i, (g, W, B) in enumerate(zip(groups, Ws, Bs)):
                D = W - A @ B
                num = float(np.sum(w.apply(D) ** 2)) if w is not None else float(np.sum(D**2))
                den = float(np.sum(w.apply(W) ** 2)) if w is not None else float(np.sum(W**2))
                params = shares[i] if pivoted else B.size + (A.size if i == 0 else 0)
                reports.append(_report(g, status="rewritten", method="lmf", rank=rank, params_after=params,
                                       rel_error=float(np.sqrt(num / den)) if den > 0 else 0.0,
                                       detail=f"shared basis with {len(groups)} weights reading {x!r} "
                                              f"({'pivoted: W_p, C' if pivoted else 'A'} {A.shape[0]}x{rank} stored once"
                                              f"{', counted here' if i == 0 else ''}); "
                                              f"{what} error {joint.residual_sq:.3g} vs {separate:.3g} separately"))
                self._done.add(g.name)
                handled.add(g.name)
            assert pivoted or stored == A.size + sum(B.size for B in Bs)
        return [item for item in todo if item[0].name not in handled]

    def _shared_pivot_rank(self, groups: list[WeightGroup], budget: int, rank: int) -> tuple[bool, int]:
        """(pivoted, rank) for a shared basis of ``groups`` in ``budget``: pivoted over the stacked
        outputs, r(m + Σn − r) + Σn (index maps), where the decisions are pivoted and that buys
        more rank than A·B's ``rank``."""
        if not all(self._pivot.get(g.name) for g in groups):
            return False, rank
        m, ns = groups[0].shape[0], sum(g.shape[1] for g in groups)
        rp = min(pivoted_rank_for_budget(m, ns, budget - ns), m)
        return (True, rp) if rp > rank and rp * rp > ns else (False, rank)

    # -- data-aware weighting ---------------------------------------------------------------
    def sides(self, group: WeightGroup, transposed: bool):
        """(rows, cols) weights of F from calibration: Gram matrices of the activations that
        multiply F (rows) or Fᵀ (cols, a tied head), token weights for Gather uses; and the
        activation whose sequential cross term applies (or None)."""
        st = self.stats
        if st is None or self._uncaptured(group):
            return None, None, None
        rows = cols = None
        acts = []
        for u in group.uses:
            if u.kind == "gather":
                c = st.counts.get(u.node.input[1])
                if c is not None:
                    w = token_weights(c, self.token_mix)
                    rows = w if rows is None else (rows + w if rows.ndim == 1 else rows + np.diag(w))
                continue
            g = st.grams.get(u.node.input[0])
            if g is None:
                continue
            if u.transposed == transposed:
                acts.append(u.node.input[0])
                rows = g if rows is None else (rows + g if rows.ndim == 2 else g + np.diag(rows))
            else:
                cols = g if cols is None else cols + g
        seq = acts[0] if len(set(acts)) == 1 and cols is None and acts[0] in st.cross else None
        perm = getattr(self, "_pending", {}).get(group.name)
        if perm is not None and rows is not None and not transposed:  # its rows were permuted by a fold upstream
            rows = rows[perm] if rows.ndim == 1 else rows[np.ix_(perm, perm)]
        return rows, cols, seq

    def _error_of(self, group: WeightGroup, method: str) -> str:
        """What a site's rel_error measures: the layer output where the fit was whitened by
        calibration activations, else the weight."""
        if method not in ("lmf", "hmf") or self.stats is None:
            return "weight"
        rows, cols, _ = self.sides(group, factor_orientation(group))
        return "output" if (rows is not None and getattr(rows, "ndim", 0) == 2) or cols is not None else "weight"

    def whitened(self, gram):
        """The Whitener of a Gram matrix (or weight vector) from ``sides``, computed once per
        array (Q, K and V read one activation: one eigendecomposition)."""
        if gram is None:
            return None
        memo = self.__dict__.setdefault("_whiteners", {})
        hit = memo.get(id(gram))
        if hit is None or hit[0] is not gram:
            hit = memo[id(gram)] = (gram, whitener(gram, self.damp))
        return hit[1]

    def _lmf(self, group: WeightGroup, W: np.ndarray, r: int, transposed: bool):
        rows, cols, seq = self.sides(group, transposed)
        if rows is None and cols is None:
            return lmf(W, r, seed=self.seed), ""
        if seq is not None:
            W = sequential_target(W, rows, self.stats.cross[seq], damp=self.damp)
        what = "sequential" if seq is not None else "whitened"
        return weighted_lmf(W, r, self.whitened(rows), self.whitened(cols), damp=self.damp, seed=self.seed), what

    def _apply_lmf(self, group: WeightGroup, r: int) -> SiteReport:
        transposed = factor_orientation(group)
        key = (group.name, r, transposed)
        cacheable = self.cache is not None and group.name not in self._pending
        if cacheable and key in self.cache:
            f, how = self.cache[key]
        else:
            f, how = self._lmf(group, self._weight(group, transposed), r, transposed)
            if cacheable:
                self.cache[key] = (f, how)
        if self._pivot.get(group.name):
            return self._apply_pivoted(group, f, how, transposed)
        rewrite_lowrank(self._editor, group, f.A, f.B, transposed)
        return _report(group, status="rewritten", method="lmf", rank=f.rank, params_after=f.params,
                       rel_error=f.relative_error, detail=f"{how}: error is of the layer output" if how else "")

    def _apply_prune(self, group: WeightGroup, budget: int) -> SiteReport:
        W = self._weight(group, False)
        p = magnitude_prune(W, budget)
        rewrite_dense(self._editor, group, p.W)
        return _report(group, status="rewritten", method="prune", params_after=p.nnz, rel_error=p.relative_error,
                       detail=f"dense with zeros; sparse CSR {p.sparse_bytes():,} B")

    def _apply_hmf(self, group: WeightGroup, budget: int) -> SiteReport:
        if any(u.kind == "gather" for u in group.uses):
            return self._apply_embedding_hmf(group, budget)
        transposed = factor_orientation(group)
        if self._pivot.get(group.name) and all(u.transposed == transposed for u in group.uses):
            return self._apply_pivoted_hmf(group, budget, transposed)
        W = self._weight(group, transposed)
        m, n = W.shape
        room = budget - max(m, n)  # reserve room for an index map
        rows, cols, seq = self.sides(group, transposed)
        gram = rows if rows is not None and rows.ndim == 2 and cols is None else None  # whitened: columns only
        if gram is not None and seq is not None:
            W = sequential_target(W, gram, self.stats.cross[seq], damp=self.damp)
        if room <= 0:
            hf = None
        elif gram is not None:
            hf = whitened_hmf(W, room, gram, damp=self.damp, seed=self.seed)
        else:
            hf = hmf(W, room, seed=self.seed)
        fallback = self._lmf_instead(group, W, budget, hf, transposed, gram=gram)
        if fallback is not None:
            return fallback
        folded = self._fold(group, hf, transposed) if hf.axis == 1 and self.fold else set()
        stored = rewrite_hybrid(self._editor, group, hf, transposed, folded)
        where = "cols" if hf.axis == 1 else "rows"
        perm = "folded" if folded else ("gather" if hf.axis == 1 else "input gathers")
        return _report(group, status="rewritten", method="hmf", rank=hf.rank, params_after=stored,
                       rel_error=hf.relative_error, dense=hf.k, detail=f"{hf.k} dense {where}, perm {perm}")

    def _lmf_instead(self, group: WeightGroup, W: np.ndarray, budget: int, hf, transposed: bool,
                     freq: np.ndarray | None = None, gram: np.ndarray | None = None) -> SiteReport | None:
        """Rewrite with plain LMF (or skip) when the hybrid ``hf`` is absent or loses; else None."""
        plain = self._plain_if_better(W, budget, hf, freq, gram)
        if plain is None and hf is None:
            return _report(group, status="skipped", reason=f"budget {budget} too small for HMF or LMF")
        if plain is None:
            return None
        rewrite_lowrank(self._editor, group, plain.A, plain.B, transposed)
        return _report(group, status="rewritten", method="lmf", rank=plain.rank, params_after=plain.params,
                       rel_error=plain.relative_error, detail="hmf budget: plain low rank (k=0) fits best")

    def _plain_if_better(self, W: np.ndarray, budget: int, hf, freq: np.ndarray | None = None,
                         gram: np.ndarray | None = None):
        """LMF at the whole budget (no index maps to pay for), if it beats the hybrid ``hf`` (or
        there is none); None when LMF does not fit or loses.

        Compared by Frobenius error, by the whitened (output) error when ``gram`` is given (both
        fits are then whitened), or by frequency-weighted error when ``freq`` is given.
        """
        m, n = W.shape
        r = budget // (m + n)
        if r < 1:
            return None
        if gram is not None:
            plain = weighted_lmf(W, min(r, m, n), gram, damp=self.damp, seed=self.seed)
        else:
            plain = lmf(W, min(r, m, n), seed=self.seed)
        if hf is None or hf.k == 0:
            return plain
        if freq is None:
            return plain if plain.residual_sq <= hf.residual_sq else None
        w = freq.astype(np.float64)[:, None]
        err = lambda Wh: float(np.sum(w * (W - Wh) ** 2))  # noqa: E731
        return plain if err(plain.A @ plain.B) <= err(hf.reconstruct()) else None

    def _fold(self, group: WeightGroup, hf, transposed: bool) -> set[int]:
        """Fold the [dense, rest] column order into consumers where possible; ids of folded uses."""
        order = np.concatenate([hf.dense_idx, hf.rest_idx])
        folded = set()
        for use in group.uses:
            if use.kind != "matmul" or use.transposed != transposed:
                continue
            plan = plan_fold(self._index, use.node.output[0], len(order))
            if plan is None:
                continue
            targets = [self._by_node.get(id(t)) for t in plan.terminals]
            if not all(self._foldable_into(g) for g in targets):
                continue
            apply_vector_permutations(self._editor, self._index, plan, order)
            for g in targets:
                self._pending[g.name] = order
            folded.add(id(use.node))
        return folded

    def _foldable_into(self, g: WeightGroup | None) -> bool:
        """A weight whose rows we may permute: one plain MatMul use, not yet rewritten."""
        return (g is not None and g.skip_reason is None and len(g.uses) == 1 and g.uses[0].kind == "matmul"
                and not g.uses[0].transposed and g.ref.kind == "initializer" and g.name not in self._done
                and g.name not in self._pending)

    def _apply_embedding_hmf(self, group: WeightGroup, budget: int) -> SiteReport:
        E = self._weight(group, False)
        if any(u.kind != "gather" and not u.transposed for u in group.uses):  # dense rows need heads reading Eᵀ
            rep = self._lmf_instead(group, E, budget, None, False)
            rep.detail = rep.detail and "hmf budget: plain low rank, a MatMul reads the table untransposed"
            return rep
        V, d = E.shape
        head = any(u.kind != "gather" for u in group.uses)
        overhead = V * (2 if head else 1) + d + 64  # slot map, inverse map, zero rows
        freq = self.token_freq if self.token_freq is not None and len(self.token_freq) == V else None
        if freq is None and self.stats is not None:
            counts = [self.stats.counts.get(u.node.input[1]) for u in group.uses if u.kind == "gather"]
            counts = [c for c in counts if c is not None and len(c) == V]
            freq = sum(counts) if counts else None
        room = budget - overhead
        if room <= 0:
            hf = None
        elif freq is None:
            hf = hmf(E, room, axis="rows", seed=self.seed)
            source = "rows chosen by low-rank residual (no token frequencies given)"
        else:
            hf = _frequency_hmf(E, room, freq)
            source = "rows of the most frequent tokens"
        fallback = self._lmf_instead(group, E, budget, hf, False, freq)
        if fallback is not None:
            return fallback
        stored = rewrite_embedding_hybrid(self._editor, group, hf)
        return _report(group, status="rewritten", method="hmf", rank=hf.rank, params_after=stored,
                       rel_error=hf.relative_error, dense=hf.k, detail=f"{hf.k} dense rows: {source}")


    def _apply_ae(self, group: WeightGroup, budget: int) -> SiteReport:
        """Embedding autoencoder (factorize/autoencoder.py): codes + decoder within the budget."""
        if group.ref.scope or any(u.scope for u in group.uses):
            return _report(group, status="skipped", reason="AE: not supported for tables in or read inside If/Loop/Scan bodies")
        E = self._weight(group, False)
        V, d = E.shape
        opts = dict(self.ae_options)
        decoder, hidden = opts.get("decoder", "linear"), opts.get("hidden")
        if any(u.kind != "gather" and not u.transposed for u in group.uses):
            return _report(group, status="skipped", reason="AE: table read untransposed by a MatMul/Gemm")
        tied_linear = decoder == "linear" and any(u.kind != "gather" for u in group.uses)
        k = embedding_ae_rank(V, d, budget - (2 if tied_linear else 0), decoder, hidden)  # 2: b's shape
        if k < 1:
            return _report(group, status="skipped", reason=f"budget {budget} too small for an AE with code width 1")
        freq = self.token_freq if self.token_freq is not None and len(self.token_freq) == V else None
        if freq is None and self.stats is not None:  # token counts of the calibration data
            counts = [self.stats.counts.get(u.node.input[1]) for u in group.uses if u.kind == "gather"]
            counts = [c for c in counts if c is not None and len(c) == V]
            freq = sum(counts) if counts else None
        cfg = EmbeddingAEConfig(rank=k, seed=self.seed, **opts)
        ae = train_embedding_ae(E, cfg, None if freq is None else frequency_weights(freq))
        stored = rewrite_embedding_ae(self._editor, self._index, group, ae)
        E_hat = ae.reconstruct().astype(np.float64)
        E64 = np.asarray(E, np.float64)  # (float32 norms overflow on a huge table)
        rel = float(np.linalg.norm(E_hat - E64) / max(np.linalg.norm(E64), 1e-30))
        h = f", h={cfg.h} {cfg.activation}" if decoder == "nonlinear" else ""
        detail = (f"AE {decoder} decoder{h}, init {cfg.init}, {cfg.epochs} epochs (best {ae.best_epoch}), "
                  f"{'frequency' if freq is not None else 'uniform'} row weights, {ae.train_s:.1f} s")
        return _report(group, status="rewritten", method="ae", rank=k, params_after=stored, rel_error=rel, detail=detail)

    # -- pivoted storage (factorize/pivot.py, graph/pivot.py) ---------------------------------
    def _apply_pivoted(self, group: WeightGroup, f, how: str, transposed: bool) -> SiteReport:
        """Store the low-rank result ``f`` (A·B) as pivot columns and coefficients."""
        pf = pivot_factors(f.A, f.B, f.residual_sq, f.total_sq)
        return self._rewrite_pivoted(group, pf, transposed, "lmf", f"{how}: error is of the layer output; " if how else "")

    def _rewrite_pivoted(self, group: WeightGroup, pf, transposed: bool, method: str, what: str) -> SiteReport:
        folded = set()
        if self.fold:
            folded = self._fold(group, SimpleNamespace(dense_idx=pf.order, rest_idx=pf.order[:0]), transposed)
        stored = rewrite_pivoted(self._editor, group, pf, transposed, folded)
        perm = "folded" if folded else "gather"
        dense = f"{pf.k} dense cols + " if pf.k else ""
        return _report(group, status="rewritten", method=method, rank=pf.rank, params_after=stored,
                       rel_error=pf.relative_error, dense=pf.k,
                       detail=f"{what}pivoted: {dense}{pf.rank} pivot cols, perm {perm}")

    def _apply_pivoted_hmf(self, group: WeightGroup, budget: int, transposed: bool) -> SiteReport:
        """HMF with a pivoted remainder: dense columns by residual (whitened with calibration)
        plus pivots and coefficients for the rest; k = 0 (pivoted LMF) is among the candidates."""
        W = self._weight(group, transposed)
        m, n = W.shape
        groups = list({id(g): g for g in self._by_node.values()}.values())
        room = budget - PivotCosts(self._index, groups, fold=self.fold).map_cost(group)
        rows, cols, seq = self.sides(group, transposed)
        gram = rows if rows is not None and rows.ndim == 2 and cols is None else None
        if gram is not None and seq is not None:
            W = sequential_target(W, gram, self.stats.cross[seq], damp=self.damp)
        if room <= 0 or pivoted_rank_for_budget(m, n, room) < 1:
            return _report(group, status="skipped", reason=f"budget {budget} too small for pivoted HMF")
        if gram is not None:
            hf = whitened_hmf(W, room, gram, damp=self.damp, seed=self.seed, pivoted=True)
        else:
            hf = hmf(W, room, axis="columns", seed=self.seed, pivoted=True)
        pf = pivot_hybrid(hf.D, hf.dense_idx, hf.rest_idx, hf.A, hf.B, hf.residual_sq, hf.total_sq)
        return self._rewrite_pivoted(group, pf, transposed, "hmf", "whitened: error is of the layer output; " if gram is not None else "")



def _where(group: WeightGroup) -> str:
    """Where a weight that involves an If/Loop/Scan body lives and is read ("" for main-graph only)."""
    scopes = list(dict.fromkeys(u.scope for u in group.uses))
    if not group.ref.scope and scopes == [""]:
        return ""
    name = lambda s: f"body {s!r}" if s else "the main graph"  # noqa: E731
    if scopes == [group.ref.scope]:
        return f"in {name(group.ref.scope)}"
    return f"read in {', '.join(name(s) for s in scopes)}; factors in {name(group.ref.scope)}"


def _frequency_hmf(E: np.ndarray, budget: int, freq: np.ndarray):
    """Dense rows for the k most frequent tokens, rank r for the rest; (k, r) minimises the
    frequency-weighted error Σ_t f_t·‖e_t − ê_t‖² within the budget (k·d + r·(V − k + d))."""
    V, d = E.shape
    order = np.argsort(-freq, kind="stable")
    w = freq.astype(np.float64) / max(freq.sum(), 1)
    best, best_err = None, np.inf
    k_max = max(0, min(V - 1, budget // d - 1))
    for k in sorted({int(x) for x in np.linspace(0, k_max, 12)}):
        r = (budget - k * d) // (V - k + d)
        if r < 1:
            continue
        hf = hmf_fixed(E, np.sort(order[:k]), min(r, d), axis=0)
        err = float(np.sum(w[:, None] * (E - hf.reconstruct()) ** 2))
        if err < best_err:
            best, best_err = hf, err
    return best  # None when no (k, r) fits
