"""The LMF pass: factorize each selected weight group with truncated SVD and rewrite its uses."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import onnx

from ..factorize.svd import breakeven_rank, lmf, lmf_params, rank_for_keep, round_rank
from ..graph.edit import GraphEditor
from ..graph.index import GraphIndex
from ..graph.rewrite import factor_orientation, rewrite_lowrank
from ..graph.sites import WeightGroup, find_weight_groups
from ..report import SiteReport

__all__ = ["SiteSelection", "LowRankPass"]


@dataclass
class SiteSelection:
    """Which weight groups a pass may touch: regexes on weight or node names, and a size floor."""

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    min_params: int = 0

    def __post_init__(self):
        try:
            self._inc = [re.compile(p) for p in self.include]
            self._exc = [re.compile(p) for p in self.exclude]
        except re.error as e:
            raise ValueError(f"invalid regular expression {e.pattern!r}: {e}") from None

    def why_not(self, group: WeightGroup) -> str | None:
        names = [group.name, *group.node_names]
        if self._inc and not any(p.search(n) for p in self._inc for n in names):
            return "not matched by --include"
        if any(p.search(n) for p in self._exc for n in names):
            return "matched by --exclude"
        if group.params < self.min_params:
            return f"{group.params} params < --min-params {self.min_params}"
        return None


def skipped(group: WeightGroup, reason: str) -> SiteReport:
    return SiteReport(
        weight=group.name,
        ops=group.ops,
        nodes=group.node_names,
        shape=group.shape,
        params_before=group.params,
        status="skipped",
        reason=reason,
    )


@dataclass
class LowRankPass:
    """W ≈ A·B by truncated SVD, at ``rank`` or at the rank that keeps ``keep`` of each weight."""

    keep: float | None = 0.75
    rank: int | None = None
    rank_multiple: int = 1
    selection: SiteSelection = field(default_factory=SiteSelection)
    seed: int = 0

    name = "lmf"

    def __post_init__(self):
        if self.rank is None and self.keep is None:
            raise ValueError("give keep or rank")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {self.rank}")
        if self.rank_multiple < 1:
            raise ValueError(f"rank multiple must be ≥ 1, got {self.rank_multiple}")

    def plan_rank(self, m: int, n: int) -> tuple[int, str | None]:
        """The rank for an m×n weight, or (0, reason) when factorizing would not save parameters."""
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

    def run(
        self, model: onnx.ModelProto, progress: Callable[[Iterable], Iterable] = lambda it: it
    ) -> list[SiteReport]:
        index = GraphIndex(model)
        groups = find_weight_groups(index)
        editor = GraphEditor(model)
        reports: list[SiteReport] = []
        todo: list[tuple[WeightGroup, int]] = []
        for group in groups:
            reason = group.skip_reason or self.selection.why_not(group)
            r = 0
            if reason is None:
                r, reason = self.plan_rank(*group.shape)
            if reason is not None:
                reports.append(skipped(group, reason))
            else:
                todo.append((group, r))
        for group, r in progress(todo):
            transposed = factor_orientation(group)
            W = index.array(group.ref)
            f = lmf(W.T if transposed else W, r, seed=self.seed)
            rewrite_lowrank(editor, group, f.A, f.B, transposed)
            reports.append(
                SiteReport(
                    weight=group.name,
                    ops=group.ops,
                    nodes=group.node_names,
                    shape=group.shape,
                    params_before=group.params,
                    status="rewritten",
                    method=self.name,
                    rank=f.rank,
                    params_after=f.params,
                    rel_error=f.relative_error,
                )
            )
        editor.commit()
        order = {g.name: i for i, g in enumerate(groups)}
        reports.sort(key=lambda s: order[s.weight])
        return reports
