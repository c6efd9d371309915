"""The factorization pass: pick each weight group's method and budget, factorize, rewrite.

Methods for linear sites (MatMul/Gemm weights): ``lmf`` (truncated SVD), ``hmf`` (hybrid:
dense columns or rows plus a low-rank rest), ``prune`` (magnitude pruning, stored dense
with zeros, the baseline). Embedding tables (groups with a Gather use) follow the same
method unless ``embedding_method`` says otherwise (``svd`` = lmf, ``hmf``, ``prune``,
``skip``). The budget is ``keep``·m·n parameters per group, index maps included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx

from ..factorize.hmf import hmf, hmf_fixed
from ..factorize.prune import magnitude_prune
from ..factorize.svd import breakeven_rank, lmf, lmf_params, rank_for_keep, round_rank
from ..graph.edit import GraphEditor
from ..graph.fold import apply_vector_permutations, plan_fold
from ..graph.hybrid import rewrite_dense, rewrite_embedding_hybrid, rewrite_hybrid
from ..graph.index import GraphIndex
from ..graph.rewrite import factor_orientation, rewrite_lowrank
from ..graph.sites import WeightGroup, find_weight_groups
from ..report import SiteReport
from .select import SiteSelection

__all__ = ["FactorizePass", "METHODS", "EMBEDDING_METHODS"]

METHODS = ("lmf", "hmf", "prune")
EMBEDDING_METHODS = ("svd", "hmf", "prune", "skip")


def _report(group: WeightGroup, **kw) -> SiteReport:
    return SiteReport(weight=group.name, ops=group.ops, nodes=group.node_names, shape=group.shape,
                      params_before=group.params, **kw)


@dataclass
class FactorizePass:
    method: str = "lmf"
    embedding_method: str | None = None
    keep: float | None = 0.75
    rank: int | None = None
    rank_multiple: int = 1
    selection: SiteSelection = field(default_factory=SiteSelection)
    token_freq: np.ndarray | None = None  # per-token counts for the largest embedding table
    fold: bool = True
    seed: int = 0
    store: object = None  # onnxhmf.external.TensorStore: lazy weights, factors spilled to disk

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.embedding_method is not None and self.embedding_method not in EMBEDDING_METHODS:
            raise ValueError(f"embedding method must be one of {', '.join(EMBEDDING_METHODS)}, got {self.embedding_method!r}")
        if self.rank is None and self.keep is None:
            raise ValueError("give keep or rank")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {self.rank}")
        if self.rank is not None and self.method != "lmf":
            raise ValueError("--rank is only for --method lmf; use --keep")
        if self.rank_multiple < 1:
            raise ValueError(f"rank multiple must be ≥ 1, got {self.rank_multiple}")

    def method_for(self, group: WeightGroup) -> str:
        if any(u.kind == "gather" for u in group.uses):
            m = self.embedding_method or ("svd" if self.method == "lmf" else self.method)
            return "lmf" if m == "svd" else m
        return self.method

    # -- planning -------------------------------------------------------------------------
    def plan(self, group: WeightGroup, method: str) -> tuple[int, str | None]:
        """(rank for lmf, or parameter budget otherwise), or (0, reason to skip)."""
        m, n = group.shape
        if method == "skip":
            return 0, "--embedding-method skip"
        if method == "lmf":
            limit = breakeven_rank(m, n)
            if self.rank is not None:
                r = round_rank(min(self.rank, min(m, n)), self.rank_multiple)
            else:
                r = rank_for_keep(m, n, self.keep, self.rank_multiple)
            if r < 1:
                return 0, f"keep {self.keep} leaves rank 0 (break-even rank {limit})"
            if lmf_params(m, n, r) >= m * n:
                return 0, f"rank {r} would not save parameters (break-even rank {limit})"
            return r, None
        budget = int(np.floor(self.keep * m * n + 1e-9))
        if budget >= m * n:
            return 0, f"keep {self.keep} saves nothing"
        if budget < 1:
            return 0, f"keep {self.keep} leaves nothing"
        return budget, None

    # -- the pass -------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto, progress: Callable[[Iterable], Iterable] = lambda it: it) -> list[SiteReport]:
        index = GraphIndex(model, self.store)
        groups = find_weight_groups(index)
        self._index, self._editor = index, GraphEditor(model, self.store)
        self._by_node = {id(u.node): g for g in groups for u in g.uses}
        self._pending: dict[str, np.ndarray] = {}  # group name -> row permutation to apply
        self._done: set[str] = set()
        reports: list[SiteReport] = []
        todo = []
        for group in groups:
            method = self.method_for(group)
            reason = group.skip_reason or self.selection.why_not(group)
            plan = 0
            if reason is None:
                plan, reason = self.plan(group, method)
            if reason is not None:
                reports.append(_report(group, status="skipped", reason=reason))
            else:
                todo.append((group, method, plan))
        self._todo = {g.name for g, _, _ in todo}
        for group, method, plan in progress(todo):
            rep = getattr(self, f"_apply_{method}")(group, plan)
            reports.append(rep)
            if rep.status == "rewritten":
                self._done.add(group.name)
        for name, perm in self._pending.items():  # folded into a weight we did not otherwise touch
            if name not in self._done:
                group = next(g for g in groups if g.name == name)
                rewrite_dense(self._editor, group, index.array(group.ref)[perm])
        self._editor.commit()
        order = {g.name: i for i, g in enumerate(groups)}
        reports.sort(key=lambda s: order[s.weight])
        return reports

    def _weight(self, group: WeightGroup, transposed: bool) -> np.ndarray:
        W = self._index.array(group.ref)
        W = W.T if transposed else W
        perm = self._pending.get(group.name)
        return W[perm] if perm is not None else W

    def _apply_lmf(self, group: WeightGroup, r: int) -> SiteReport:
        transposed = factor_orientation(group)
        f = lmf(self._weight(group, transposed), r, seed=self.seed)
        rewrite_lowrank(self._editor, group, f.A, f.B, transposed)
        return _report(group, status="rewritten", method="lmf", rank=f.rank, params_after=f.params,
                       rel_error=f.relative_error)

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
        W = self._weight(group, transposed)
        m, n = W.shape
        room = budget - max(m, n)  # reserve room for an index map
        hf = hmf(W, room, seed=self.seed) if room > 0 else None
        fallback = self._lmf_instead(group, W, budget, hf, transposed)
        if fallback is not None:
            return fallback
        folded = self._fold(group, hf, transposed) if hf.axis == 1 and self.fold else set()
        stored = rewrite_hybrid(self._editor, group, hf, transposed, folded)
        where = "cols" if hf.axis == 1 else "rows"
        perm = "folded" if folded else ("gather" if hf.axis == 1 else "input gathers")
        return _report(group, status="rewritten", method="hmf", rank=hf.rank, params_after=stored,
                       rel_error=hf.relative_error, dense=hf.k, detail=f"{hf.k} dense {where}, perm {perm}")

    def _lmf_instead(self, group: WeightGroup, W: np.ndarray, budget: int, hf, transposed: bool,
                     freq: np.ndarray | None = None) -> SiteReport | None:
        """Rewrite with plain LMF (or skip) when the hybrid ``hf`` is absent or loses; else None."""
        plain = self._plain_if_better(W, budget, hf, freq)
        if plain is None and hf is None:
            return _report(group, status="skipped", reason=f"budget {budget} too small for HMF or LMF")
        if plain is None:
            return None
        rewrite_lowrank(self._editor, group, plain.A, plain.B, transposed)
        return _report(group, status="rewritten", method="hmf", rank=plain.rank, params_after=plain.params,
                       rel_error=plain.relative_error, detail="k=0: plain low rank fits best")

    def _plain_if_better(self, W: np.ndarray, budget: int, hf, freq: np.ndarray | None = None):
        """LMF at the whole budget (no index maps to pay for), if it beats the hybrid ``hf`` (or
        there is none); None when LMF does not fit or loses.

        Compared by Frobenius error, or by frequency-weighted error when ``freq`` is given.
        """
        m, n = W.shape
        r = budget // (m + n)
        if r < 1:
            return None
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
        V, d = E.shape
        head = any(u.kind != "gather" for u in group.uses)
        overhead = V * (2 if head else 1) + d + 64  # slot map, inverse map, zero rows
        freq = self.token_freq if self.token_freq is not None and len(self.token_freq) == V else None
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
