"""Budget allocation across sites: a multiple-choice knapsack.

Each site i offers options j with a parameter cost p_ij and a measured error e_ij (e.g. the
end-to-end output error when only that site is compressed that way; dense is the option
with e = 0 and p = m·n). Assuming errors add (true to first order for small, independent
perturbations), the best plan under a budget P is

    min Σ_i e_{i,j(i)}   subject to   Σ_i p_{i,j(i)} ≤ P,

solved exactly by dynamic programming over the budget in ``resolution`` units. Costs are
rounded *up* to units, so a plan within the unit budget is within P; the rounding slack is
then spent greedily on the upgrades that lower the error most.

Pure numpy: nothing here knows about ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["Option", "allocate"]


@dataclass(frozen=True)
class Option:
    cost: int  # what the budget counts, in the caller's unit (parameters or bytes)
    error: float
    tag: Any = None  # what the caller needs to apply it (a rank, a method, ...)


def allocate(sites: Sequence[Sequence[Option]], budget: int, resolution: int = 4000) -> list[Option]:
    """One option per site, minimising the summed error with Σ cost ≤ ``budget``.

    Raises ValueError if even the cheapest options do not fit.
    """
    sites = [list(s) for s in sites]
    if any(not s for s in sites):
        raise ValueError("every site needs at least one option")
    floor = sum(min(o.cost for o in s) for s in sites)
    if floor > budget:
        raise ValueError(f"budget {budget} is below the smallest possible total {floor}")
    unit = max(1, -(-int(budget) // resolution))
    U = int(budget) // unit
    INF = np.inf
    dp = np.full(U + 1, INF)
    dp[0] = 0.0
    picks = []
    for opts in sites:
        new = np.full(U + 1, INF)
        arg = np.full(U + 1, -1, dtype=np.int32)
        for j, o in enumerate(opts):
            c = -(-int(o.cost) // unit)
            if c > U:
                continue
            cand = np.full(U + 1, INF)
            cand[c:] = dp[: U + 1 - c] + o.error
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        picks.append(arg)
    u = int(np.argmin(dp))
    if not np.isfinite(dp[u]):
        raise ValueError(f"no plan fits budget {budget}")
    chosen = [None] * len(sites)
    for i in range(len(sites) - 1, -1, -1):
        j = int(picks[i][u])
        chosen[i] = sites[i][j]
        u -= -(-int(chosen[i].cost) // unit)
    # spend the rounding slack: best error drop per extra parameter, while it fits
    left = int(budget) - sum(o.cost for o in chosen)
    while True:
        best = None
        for i, opts in enumerate(sites):
            for o in opts:
                extra = o.cost - chosen[i].cost
                gain = chosen[i].error - o.error
                if gain > 0 and extra <= left and (best is None or gain > best[0]):
                    best = (gain, i, o)
        if best is None:
            break
        _, i, o = best
        left -= o.cost - chosen[i].cost
        chosen[i] = o
    return chosen
