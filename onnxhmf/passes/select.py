"""Which weight groups a pass may touch."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..graph.sites import WeightGroup

__all__ = ["SiteSelection"]


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
