"""Resource caps inside the mixed planner's one search (memory.py: bytes once loaded;
latency.py: predicted seconds).

A cap ``c`` gives each option a resource ``c.resource(planner, name, o)`` and a share ``c.share``
that the chosen options may use together. The knapsack keeps its byte budget and minimises

    Σ loss + Σ_c μ_c · Σ resource_c / share_c,

the multipliers μ_c ≥ 0 found by bisection on a log scale, cap by cap, again while an earlier cap
is broken by a later one (a Lagrangian relaxation of the extra constraints). The choice it returns
fits every strict cap, or the error names the cap that no plan within the byte budget fits; a cap
that is not ``strict`` (the default planner's memory rule) gives way where nothing fits it. A strict
cap with ``near(used)`` true for the least it can be given (over by less than its prediction can
tell: memory.MemoryCap.slack) takes that plan, for the caller to measure.
"""
from __future__ import annotations

from ..errors import OnnxHmfError
from ..factorize.allocate import Option, allocate

__all__ = ["capped_allocate", "capped_floor", "fits"]

_TOL = 1e-9


def capped_allocate(planner, names: list[str], budget: int, caps: list) -> list[Option]:
    """One option per weight of ``names`` within ``budget`` bytes and every cap's share."""
    sites = [planner.options[n] for n in names]
    use = [[[c.resource(planner, n, o) / max(c.share, 1e-30) for o in s] for n, s in zip(names, sites)] for c in caps]

    def pick(mus: list[float]):
        wrapped = [[Option(o.cost, o.error + sum(mu * u[j][i] for mu, u in zip(mus, use)), i) for i, o in enumerate(s)]
                   for j, s in enumerate(sites)]
        idx = [w.tag for w in allocate(wrapped, budget)]
        return [s[i] for s, i in zip(sites, idx)], [sum(u[j][i] for j, i in enumerate(idx)) for u in use]

    mus = [0.0] * len(caps)
    given_up: set[int] = set()  # soft caps that no plan within the budget fits
    near: set[int] = set()  # strict caps over by less than their prediction can tell: the least-using plan
    best, used = pick(mus)
    for _ in range(3):
        broken = [k for k, u in enumerate(used) if u > 1 + _TOL and k not in given_up | near]
        if not broken:
            return best
        for k in broken:
            lo, hi = mus[k], max(2 * mus[k], 1e-6)
            while True:
                mus[k] = hi
                p, u = pick(mus)
                if u[k] <= 1 + _TOL:
                    break
                if hi > 1e9:
                    if caps[k].strict and not (hasattr(caps[k], "near") and caps[k].near(u[k])):
                        raise OnnxHmfError(caps[k].infeasible(u[k]))
                    (near if caps[k].strict else given_up).add(k)
                    break
                lo, hi = hi, 10 * hi
            if k in given_up:
                mus[k] = 0.0
                continue
            if k in near:
                continue
            for _ in range(20):  # to a few percent of μ
                if lo > 0 and hi / lo < 1.05:
                    break
                mid = (lo * hi) ** 0.5 if lo > 0 else hi / 10
                mus[k] = mid
                if pick(mus)[1][k] <= 1 + _TOL:
                    hi = mid
                else:
                    lo = mid
            mus[k] = hi
        best, used = pick(mus)
    broken = [k for k, u in enumerate(used) if u > 1 + _TOL and k not in given_up | near]
    if broken and caps[broken[0]].strict:
        raise OnnxHmfError(caps[broken[0]].infeasible(used[broken[0]]))
    return best


def fits(planner, choice: dict, caps: list) -> bool:
    """Whether ``choice`` ({weight: Option}) keeps within every cap's share (with a cap's fixed
    costs of the families it uses: MemoryCap.extra)."""
    return all(sum(c.resource(planner, n, o) for n, o in choice.items())
               + (c.extra(planner, choice) if hasattr(c, "extra") else 0) <= c.share for c in caps)


def capped_floor(planner, caps: list) -> int:
    """A lower bound on the bytes of a choice within the caps: for each cap, the fewest bytes
    whose resource fits its share (the knapsack with the roles swapped); the largest."""
    names = list(planner.options)
    plain = sum(min(o.cost for o in planner.options[n]) for n in names)
    out = plain
    for c in caps:
        scale = 1_000_000
        sites = [[Option(int(c.resource(planner, n, o) / max(c.share, 1e-30) * scale), float(o.cost), o)
                  for o in planner.options[n]] for n in names]
        try:
            out = max(out, int(sum(x.tag.cost for x in allocate(sites, scale))))
        except ValueError:
            pass  # nothing fits: capped_allocate says so
    return out
