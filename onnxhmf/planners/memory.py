"""``--max-memory``: the mixed planner's plans fit a cap on the loaded model's resident memory.

What a weight costs once onnxruntime has loaded the model (:func:`loaded_bytes`) is what its
stored form costs, except for the weight-only integers (int8w, int4w, the factors of lmf-int8w
and plmf-int8w): their ``Cast``·``Mul`` on a constant is folded at load, so they are float again,
and folding leaves more behind in the process than the float result. Measured with onnxruntime
1.32 on MiniLM (86 MiB of 2-D weights, every one weight-only; resident growth 130.7 MiB float,
167.6 MiB int8, 242 MiB int4): int8 costs about 1.43× the float weights (≈ 6 bytes a value),
int4 (unpacked through BitShift/Concat before the Mul) about 2.3× (≈ 9 bytes a value).

The cap is on what a fresh process gains by loading and running the model
(runtime.resident_memory). The part that does not depend on the plan (runtime, activations:
the input's resident growth minus its weight bytes) is measured once; the rest is the weights'
share, ``weights``.

Without ``--max-memory`` the default planner keeps the planned weights' predicted loaded bytes
within their float bytes (``no_more_than_float``, inside the search): a plan never takes more
weight memory than the input, which weight-only int4 alone would (2.3×). That counts weights
only; the run-time tensors of the forms picked can cost more than the weights save on a small
model (glassllm, 3.5 MB of weights in a 30 MiB process: every linear as a pivoted int8 low-rank
pair took 33.9 MiB against the input's 29.7, its A·B form 26.9: benchmarks/bench_memory_forms.py). So the built plan is measured
too (:class:`InputMemory`, both models alike: runtime.STEADY_MALLOC), and where it takes more
than the input the plan is made again without the heavier forms (planners/mixed.py).

The knapsack keeps the loaded bytes within ``weights`` inside the one search (caps.py: a
Lagrangian on them). The built plan is then measured, on the inputs the user named (``--inputs``,
``--input-shapes``: activations and the kernels' scratch grow with the batch) or else a held-out
calibration batch, in as many fresh processes as ``repeats`` (the largest counts: with glibc's
default allocator two processes of one model differ by up to 5%). Over the cap, what the bytes
miss is the kernels' run-time heap, not the weights: measured on MiniLM (8×128 tokens, onnxruntime
1.32, glibc defaults; the input 170 MiB), every MatMul weight as int4 MatMulNBits took 77.1 MiB,
as int8 MatMulInteger 77.7, as 8-bit MatMulNBits (accuracy 4: activations quantized at each call)
90.2, and a plan mixing them 83.7–86.8 (onnxruntime's own int4 quantizer: 78.0). So each family of
such forms (``PROBED``) is measured once, before the search: the smallest plan with every weight
that can take the family in its smallest form of it. Its growth beyond those loaded bytes and the
overhead is the family's ``excess``: heap kept of per-call temporaries, which hardly grows with
the number of weights that use the family. (The smallest plan's own 4-bit kernels have one where
that plan holds more than the input: glassllm, 36.6 MiB against 31.8.) The search prices an
excess as a fixed cost of using the family at all (:meth:`MemoryCap.allocate`: the knapsack per set of families, the share less the
set's excess; the lowest predicted loss wins). The heap of a mix is not exactly the sum of its
families', so the built plan is still measured; over the cap, it is made again without, in turn,
the kernels that quantize their activations at run time (``RUN_TIME_HEAVY``: 8-bit MatMulNBits,
then MatMulInteger too) and the heavier low-rank forms; the first within the cap wins. Only then
is ``weights`` lowered by the excess and the search run again, at most twice.
"""
from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import OnnxHmfError
from ..factorize.allocate import Option
from ..factorize.pivot import pivoted_params
from ..factorize.svd import rank_for_keep
from .caps import capped_allocate

__all__ = ["MemoryCap", "InputMemory", "loaded_bytes"]

# planners/mixed.SLOW, folded to float at load: resident bytes a value (see above)
_FLOAT_AT_LOAD = {"int8w": 6, "int4w": 9, "lmf-int8w": 6, "plmf-int8w": 6}


def loaded_bytes(planner, name: str, o: Option) -> int:
    """Bytes of weight ``name`` under option ``o`` once onnxruntime has loaded the model."""
    kind, keep = o.tag
    if kind not in _FLOAT_AT_LOAD:
        return int(o.cost)
    m, n = planner.groups[name].shape
    per = _FLOAT_AT_LOAD[kind]
    if kind in ("int8w", "int4w"):
        return per * m * n
    if kind == "lmf-int8w":
        return per * rank_for_keep(m, n, keep, planner.rank_multiple) * (m + n)
    r = planner.costs.rank(planner.groups[name], keep, planner.rank_multiple)
    return per * pivoted_params(m, n, r)


def _resident(model: onnx.ModelProto, feeds: dict, env: dict | None = None, required: bool = True,
              repeats: int = 1) -> int | None:
    """Resident growth of a fresh process running ``model`` on ``feeds``: the largest of
    ``repeats`` processes."""
    from ..runtime import resident_memory

    with tempfile.TemporaryDirectory(prefix="onnxhmf-mem-") as d:
        path = Path(d) / "m.onnx"
        onnx.save(model, path)
        runs = [resident_memory(path, feeds, env=env) for _ in range(repeats)]
    got = None if None in runs else max(runs)
    if got is None and required:
        raise OnnxHmfError("--max-memory: resident memory cannot be measured here (no /proc, or onnxruntime failed)")
    return got


def _matmul_read(group) -> bool:
    return any(u.kind != "gather" for u in group.uses)


# Families of forms whose kernels hold run-time heap that their loaded bytes do not show, each
# measured once (MemoryCap.measure: every weight that can take the family in its smallest loaded
# form of it, against the smallest plan) and, where that shows an excess, priced inside the search
# as a fixed cost of using the family at all (MemoryCap.allocate): (name, in(kind, read by a MatMul)).
FAMILIES = (
    ("4-bit MatMulNBits", lambda k, mm: mm and k.startswith("int4b")),
    ("8-bit MatMulNBits", lambda k, mm: mm and k == "int8b"),
    ("MatMulInteger", lambda k, mm: mm and k == "int8"),
    ("pivoted low-rank", lambda k, mm: k.startswith("plmf")),
    ("low-rank", lambda k, mm: "lmf" in k and not k.startswith("plmf")),
)

# The first family is the smallest plan's own (every weight in its smallest loaded form): it has no
# probe of its own, and is priced where that plan holds more beyond its bytes than the input does
# beyond its float weights (a small model: glassllm). The others are each measured by a probe.
SMALLEST_FAMILY = FAMILIES[0][0]
PROBED = FAMILIES[1:]


def option_families(planner, name: str, o: Option) -> set[str]:
    """The FAMILIES option ``o`` of weight ``name`` belongs to."""
    mm = _matmul_read(planner.groups[name])
    return {f for f, inside in FAMILIES if inside(o.tag[0], mm)}


def families_of(planner, choice: dict) -> set[str]:
    """The FAMILIES that ``choice`` ({weight: Option}) uses."""
    return set().union(*(option_families(planner, n, o) for n, o in choice.items()))


def _noise(got: int) -> int:
    return max(1 << 20, int(0.02 * got))  # two processes of one model differ by up to this


# FAMILIES left out in turn (each step also leaves out the steps before it) where a plan is over
# --max-memory: (what the note says, the families dropped).
_INT8_KERNELS = {"8-bit MatMulNBits", "MatMulInteger"}
RUN_TIME_HEAVY = (
    ("8-bit MatMulNBits weights", {"8-bit MatMulNBits"}),
    ("8-bit MatMulNBits and MatMulInteger weights", _INT8_KERNELS),
    ("int8 kernels and pivoted low-rank forms", _INT8_KERNELS | {"pivoted low-rank"}),
    ("int8 kernels and low-rank forms", _INT8_KERNELS | {"pivoted low-rank", "low-rank"}),
)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**17 else f"{n:,} B"


@dataclass
class MemoryCap:
    cap: int | None  # bytes of resident memory the loaded model may take (None: the weights' share only, not measured)
    overhead: int  # the input's resident growth minus its weight bytes (runtime, activations)
    weights: int  # what the planned weights may take once loaded
    feeds: dict
    measured: int | None = None  # the chosen plan's resident growth
    repeats: int = 2  # processes a plan is measured in (the largest counts)
    left_out: str | None = None  # the RUN_TIME_HEAVY family the plan was made without
    first: int | None = None  # the first plan's resident growth, where it was over the cap

    dense_factor: float = 1.0  # resident bytes of a float weight per stored byte (prepacked copies, heap)
    fixed: int = 0  # bytes outside the planned weights, loaded as they are
    excess: dict = field(default_factory=dict)  # FAMILIES name -> its measured run-time heap (bytes)
    slack: int = 0  # predicted bytes over the share that a prediction cannot tell from fitting (measure(): the noise)
    predicted: int | None = None  # where the least-loaded plan was predicted over the cap within the slack: its bytes
    corrected: tuple | None = None  # (the least-loaded plan's measured bytes, the re-searched plan's) where that one was kept

    @classmethod
    def measure(cls, work: onnx.ModelProto, feeds: dict, cap: int, src_bytes: int, fixed: int,
                probe=None, families=()) -> "MemoryCap":
        """The weights' share of ``cap``: cap − overhead − ``fixed`` (the bytes outside the
        planned weights, loaded as they are), where the overhead is what the plan does not
        control: runtime, activations, the kernels' heap.

        Without a probe: overhead = the input's growth − its bytes (float weights cost their
        bytes). ``probe`` = (model, dense bytes of its planned weights, their loaded bytes in it,
        the FAMILIES it uses): the plan with every weight in its smallest loaded form. Where its
        growth − loaded − fixed is the smaller overhead, it is the overhead, and the input says
        what a float weight costs once loaded: (input's growth − overhead − fixed) / its bytes
        (onnxruntime prepacks float MatMul weights; MiniLM, glibc defaults: 1.4×). Where it is
        larger, the smallest plan's kernels hold more than float weights do, and its surplus is
        the excess of its family (SMALLEST_FAMILY). ``families``: (name, model, loaded, families
        used) per PROBED family. A probe whose growth − loaded − fixed is lower still lowers the
        overhead to that (no family holds less than nothing; glassllm on 8×128 tokens: the input
        grows by 33.3 MiB for 3.3 MiB of weights, an all-int8 plan by 29.4 MiB in all), and the
        input's float weights are priced from it as above. A family's excess = its growth −
        loaded − overhead − fixed − the excess of the other families its probe uses. An excess
        under the noise (1 MiB or 2% of the growth, the larger) is not kept."""
        base = _resident(work, feeds)
        overhead, factor, excess = max(base - int(src_bytes), 0), 1.0, {}
        own, seen = None, []
        if probe is not None:
            model, dense_bytes, loaded, uses = probe
            smallest = _resident(model, feeds, required=False, repeats=cls.repeats)  # as a plan is judged
            if smallest is not None and dense_bytes > 0:
                own = max(smallest - int(loaded) - int(fixed), 0)
                for name, fmodel, floaded, fuses in families:
                    got = _resident(fmodel, feeds, required=False, repeats=cls.repeats)
                    if got is not None:
                        seen.append((name, got, got - int(floaded) - int(fixed), fuses))
        if own is not None:
            low = max(min([own, *(o for _, _, o, _ in seen)]), 0)
            if low <= overhead:
                overhead, factor = low, max(1.0, (base - low - int(fixed)) / dense_bytes)
            if SMALLEST_FAMILY in uses and own - overhead > _noise(smallest):
                excess[SMALLEST_FAMILY] = own - overhead
        weights = cap - overhead - int(fixed)
        if weights <= 0:
            raise OnnxHmfError(f"--max-memory {_mib(cap)}: onnxruntime and the activations alone take about "
                               f"{(overhead + fixed) / 2**20:.1f} MiB for this model and input (the input takes "
                               f"{base / 2**20:.1f} MiB)")
        for name, got, o, fuses in seen:
            extra = o - overhead - sum(excess.get(f, 0) for f in fuses if f != name)
            if extra > _noise(got):
                excess[name] = extra
        return cls(cap, overhead, weights, feeds, dense_factor=factor, fixed=int(fixed), excess=excess,
                   slack=_noise(cap))

    @classmethod
    def no_more_than_float(cls, planner) -> "MemoryCap":
        """The default planner's cap, predicted only (nothing measured): the planned weights take
        no more loaded bytes than they do as float (their dense option)."""
        return cls(None, 0, sum(opts[0].cost for opts in planner.options.values()), {})

    @property
    def strict(self) -> bool:
        return self.cap is not None  # the default rule gives way where no plan within the budget fits it

    @property
    def share(self) -> int:
        return self.weights

    def resource(self, planner, name: str, o: Option) -> int:
        return int(o.cost * self.dense_factor) if o.tag[0] == "dense" else loaded_bytes(planner, name, o)

    def _predicted(self, used: float, share: float | None = None) -> int:
        """Predicted resident bytes of a plan using ``used`` × ``share`` (default: the weights' share)."""
        return int(used * (self.weights if share is None else share) + self.overhead + self.fixed)

    def near(self, used: float) -> bool:
        """Whether the least-loaded plan, ``used`` × the share, is over it by no more than the
        slack: a prediction of the overhead cannot tell that from fitting (glassllm at 1.05 × int8's
        29 MiB: predicted 30.3, measured 29), so that plan is built and measured (enforce)
        instead of refused."""
        if (used - 1) * self.weights > self.slack:
            return False
        self.predicted = self._predicted(used)
        return True

    def infeasible(self, used: float) -> str:
        return (f"--max-memory {_mib(self.cap)}: no plan within the size budget fits; the smallest loaded one "
                f"takes about {self._predicted(used) / 2**20:.1f} MiB (weights + "
                "runtime and activations, predicted)")

    def extra(self, planner, choice: dict) -> int:
        """The measured run-time heap of the families ``choice`` uses (a fixed cost each)."""
        return sum(self.excess.get(f, 0) for f in families_of(planner, choice))

    def allocate(self, planner, names: list[str], budget: int, caps: list) -> list[Option]:
        """capped_allocate, with each family of ``excess`` a fixed cost: for every set of those
        families, the knapsack over the menu without the others within the weights' share less
        the set's excess; the lowest predicted loss wins (the fewest families on a tie)."""
        found = [f for f, _ in FAMILIES if f in self.excess]
        full, share, best, first_error = planner.options, self.weights, None, None
        try:
            for size in range(len(found) + 1):
                for used in itertools.combinations(found, size):
                    out = set(found) - set(used)
                    planner.options = {n: [o for o in v if not option_families(planner, n, o) & out] or v[:1]
                                       for n, v in full.items()}
                    self.weights = share - sum(self.excess[f] for f in used)
                    try:
                        picked = capped_allocate(planner, names, budget, caps) if self.weights > 0 else None
                    except (OnnxHmfError, ValueError) as e:
                        first_error = first_error or e
                        continue
                    loss = sum(o.error for o in picked) if picked is not None else None
                    if loss is not None and (best is None or loss < best[0] - 1e-12):
                        best = (loss, picked)
        finally:
            planner.options, self.weights = full, share
        if best is None:  # (the empty set has the whole share, which measure() made positive)
            raise first_error
        return best[1]

    def _of(self, model: onnx.ModelProto) -> int:
        return _resident(model, self.feeds, repeats=self.repeats)

    def enforce(self, search, res, accept=None):
        """Measure the built plan; over the cap, plan again without each RUN_TIME_HEAVY family in
        turn (only where the plan holds some), then lower the weights' share by the excess and
        search again (twice at most). ``accept(trial)``: whether a re-plan keeps the other caps
        (latency); one that does not is passed over. Leaves ``planner.options`` as for the plan
        returned. A plan that near() let through and that measures within the cap is followed by
        one more search, the share raised by what the prediction overstated (``corrected``)."""
        if self.cap is None:
            return res
        if self.predicted is not None:  # near() passed a plan: is it this one?
            self.predicted = self._predicted_of(search.planner, res.choice)
            self.predicted = self.predicted if self.predicted > self.cap else None
        self.measured = self._of(res.built.model)
        if self.measured <= self.cap:
            return self._corrected(search, res, accept) if self.predicted is not None else res
        self.first, planner = self.measured, search.planner
        full = planner.options
        for left_out, drop in RUN_TIME_HEAVY:
            if not families_of(planner, res.choice) & drop:
                continue
            planner.options = {n: [o for o in v if not option_families(planner, n, o) & drop] or v[:1]
                               for n, v in full.items()}
            try:
                alt = search.run()
            except OnnxHmfError:  # nothing without them meets the goal
                continue
            if accept is not None and not accept(alt):
                continue
            got = self._of(alt.built.model)
            if got < self.measured:
                res, self.measured, self.left_out, kept = alt, got, left_out, planner.options
            if self.measured <= self.cap:
                return res
        planner.options = kept if self.left_out else full
        for _ in range(2):
            self.weights -= self.measured - self.cap + int(0.01 * self.cap)
            if self.weights <= 0:
                break
            try:
                res = search.run()
            except OnnxHmfError:  # nothing within the size budget fits the lowered share: the line below says why
                break
            self.measured = self._of(res.built.model)
            if self.measured <= self.cap:
                return res
        raise OnnxHmfError(f"--max-memory {_mib(self.cap)}: the plan takes {self.measured / 2**20:.1f} MiB "
                           "once loaded (measured); give a larger cap or a smaller --target-size")

    def _predicted_of(self, planner, choice: dict) -> int:
        return self._predicted(sum(self.resource(planner, n, o) for n, o in choice.items())
                               + self.extra(planner, choice), 1.0)

    def _corrected(self, search, res, accept=None):
        """The least-loaded plan measured ``self.measured`` where ``self.predicted`` was
        predicted: the overhead was overstated by the difference d. Search once more with the
        weights' share raised by d; the new plan is kept where it measures within the cap, keeps
        ``accept`` and has the lower held-out loss."""
        room = self.predicted - self.measured
        if room <= 0:
            return res
        share, predicted = self.weights, self.predicted
        self.weights += room
        try:
            alt = search.run()
        except OnnxHmfError:
            alt = None
        finally:
            self.weights, self.predicted = share, predicted
        if alt is None or alt.choice == res.choice or alt.loss >= res.loss or (accept is not None and not accept(alt)):
            return res
        got = self._of(alt.built.model)
        if got > self.cap:
            return res
        self.corrected, self.measured = (self.measured, got), got
        return alt

    def priced(self) -> str:
        """What the summary says of the families priced inside the search."""
        each = ", ".join(f"{f} {_mib(b)}" for f, b in self.excess.items())
        return (f"--max-memory {_mib(self.cap)}: run-time heap beyond the weights' bytes, measured per family and "
                f"counted once where the plan uses it: {each}")

    def note(self) -> str | None:
        """What the summary says where the first plan was over the cap, or where the plan was
        predicted over it within the slack and measured."""
        if self.first is None:
            if self.predicted is None or self.measured is None:
                return None
            line = (f"--max-memory {_mib(self.cap)}: the least-loaded plan was predicted at {_mib(self.predicted)}, "
                    f"over the cap by less than two processes differ, so it was built and measured: ")
            if self.corrected is None:
                return line + _mib(self.measured)
            return line + (f"{_mib(self.corrected[0])}; searched again with the weights' share raised by the "
                           f"difference: {_mib(self.corrected[1])} (measured), at a lower held-out loss")
        how = f"planned again without {self.left_out}" if self.left_out else "the weights' share lowered"
        return (f"--max-memory {_mib(self.cap)}: the first plan took {_mib(self.first)} once loaded (measured, "
                f"largest of {self.repeats} processes); {how}: {_mib(self.measured)}")


@dataclass
class InputMemory:
    """The default planner's measured rule: the built plan's resident growth at most the input's
    (slack: 1% or 1 MiB, the larger), both measured in a fresh process with glibc's mmap threshold fixed (runtime.STEADY_MALLOC, so
    that the comparison is of what the sessions hold, not of allocator noise). ``base`` None:
    not measurable here (no /proc), and the rule is not applied."""

    feeds: dict
    base: int | None

    @classmethod
    def measure(cls, work: onnx.ModelProto, feeds: dict) -> "InputMemory":
        return cls(feeds, cls._of(work, feeds))

    @staticmethod
    def _of(model: onnx.ModelProto, feeds: dict) -> int | None:
        from ..runtime import STEADY_MALLOC

        return _resident(model, feeds, env=STEADY_MALLOC, required=False)

    def of(self, model: onnx.ModelProto) -> int | None:
        """``model``'s resident growth, measured as the input's was (None: not measurable)."""
        return self._of(model, self.feeds)

    slack: float = 0.01  # of the input's: the measurement's noise (two processes of one model: 0.3%)
    # at least this much: a session's own few MiB vary with the graph (a 26 KB tied table as a
    # low-rank pair measured 11.7 MiB against its dense input's 11.3 MiB)
    floor: int = 1 << 20

    def within(self, got: int | None) -> bool:
        return self.base is None or got is None or got <= self.base + max(self.slack * self.base, self.floor)
