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
Lagrangian on them). The built plan is then measured; when it is over the cap (the prediction
misses allocator slack), ``weights`` is lowered by the excess and the search runs again, at most
twice.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import OnnxHmfError
from ..factorize.allocate import Option
from ..factorize.pivot import pivoted_params
from ..factorize.svd import rank_for_keep

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


def _resident(model: onnx.ModelProto, feeds: dict, env: dict | None = None, required: bool = True) -> int | None:
    from ..runtime import resident_memory

    with tempfile.TemporaryDirectory(prefix="onnxhmf-mem-") as d:
        path = Path(d) / "m.onnx"
        onnx.save(model, path)
        got = resident_memory(path, feeds, env=env)
    if got is None and required:
        raise OnnxHmfError("--max-memory: resident memory cannot be measured here (no /proc, or onnxruntime failed)")
    return got


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**17 else f"{n:,} B"


@dataclass
class MemoryCap:
    cap: int | None  # bytes of resident memory the loaded model may take (None: the weights' share only, not measured)
    overhead: int  # the input's resident growth minus its weight bytes (runtime, activations)
    weights: int  # what the planned weights may take once loaded
    feeds: dict
    measured: int | None = None  # the chosen plan's resident growth

    @classmethod
    def measure(cls, work: onnx.ModelProto, feeds: dict, cap: int, src_bytes: int, fixed: int) -> "MemoryCap":
        """The weights' share of ``cap``: cap − (input's resident growth − its bytes) − ``fixed``
        (the bytes outside the planned weights, loaded as they are)."""
        base = _resident(work, feeds)
        overhead = max(base - int(src_bytes), 0)
        weights = cap - overhead - int(fixed)
        if weights <= 0:
            raise OnnxHmfError(f"--max-memory {_mib(cap)}: onnxruntime and the activations alone take about "
                               f"{(overhead + fixed) / 2**20:.1f} MiB for this model and input (the input takes "
                               f"{base / 2**20:.1f} MiB)")
        return cls(cap, overhead, weights, feeds)

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
        return loaded_bytes(planner, name, o)

    def infeasible(self, used: float) -> str:
        return (f"--max-memory {_mib(self.cap)}: no plan within the size budget fits; the smallest loaded one "
                f"takes about {(used * self.weights + self.overhead) / 2**20:.1f} MiB (weights + runtime and activations)")

    def enforce(self, search, res):
        """Measure the built plan; over the cap, lower the weights' share by the excess and
        search again (twice at most)."""
        if self.cap is None:
            return res
        for attempt in range(3):
            self.measured = _resident(res.built.model, self.feeds)
            if self.measured <= self.cap:
                return res
            if attempt == 2:
                break
            self.weights -= self.measured - self.cap + int(0.01 * self.cap)
            if self.weights <= 0:
                break
            res = search.run()
        raise OnnxHmfError(f"--max-memory {_mib(self.cap)}: the plan takes {self.measured / 2**20:.1f} MiB "
                           "once loaded (measured); give a larger cap or a smaller --target-size")


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
