"""The Plan: one decision per weight group, plus the settings that produced it.

Every planner (``onnxhmf/planners/``) returns a Plan and the executor (``executor.py``) applies
one, so a plan printed by ``--dry-run``, saved by ``--save-plan`` and replayed by
``--plan-file`` is the same object the run itself used.

A :class:`Decision` names the weight, its treatment (:data:`TREATMENTS`), the treatment's
amount (``rank`` for low-rank treatments, a parameter ``budget`` for hmf/prune/ae, both
resolved by the planner), why (``reason``), and what it predicts (bytes, loss) and measured.
Predicted bytes come from one cost model, :func:`treatment_bytes`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

from .errors import OnnxHmfError
from .factorize.codebook import pq_bytes
from .factorize.quant import blocked_bytes, scale_bits_for

__all__ = ["Treatment", "TREATMENTS", "Decision", "Plan", "treatment_bytes", "LMF_OVERHEAD", "INT8_OVERHEAD",
           "INT4_OVERHEAD", "PLAN_FORMAT"]

PLAN_FORMAT = 1

# bytes a rewrite adds besides its values (names, nodes, value infos, scales' own names);
# measured on MiniLM's and glassllm's sites
LMF_OVERHEAD = 300  # an LMF rewrite: two factor initializers and one more MatMul
INT8_OVERHEAD = 400  # one quantized tensor: scale and zero point initializers and the extra nodes
INT4_OVERHEAD = 400  # the int4 unpacking subgraph's nodes and constants
ROT_OVERHEAD = 300  # a rotated int4 weight: its share of the rotated input's nodes (and of the 1 kB ±1 matrix, b = 32)
PQ_OVERHEAD = 2700  # a product-quantized table's names, offsets and nodes (MiniLM's word table, int8 codebooks: 2,635 B)
PIVOT_INT8_OVERHEAD = 1250  # more quantizer nodes for a pivoted pair with int8 factors (one fit; see treatment_bytes)
TIED_INT8_OVERHEAD = 550  # a tied table's int8 head: DynamicQuantizeLinear, MatMulInteger, unpacking (tests' tied model)
PIVOT_OVERHEAD = 350  # a pivoted LMF site's nodes and names beyond A·B's LMF_OVERHEAD (tests' models: 300-450)


@dataclass(frozen=True)
class Treatment:
    """``factor``: what the factorization step does (None: the weight keeps its values);
    ``store``: how the result is stored afterwards (None: float)."""

    name: str
    factor: str | None
    store: str | None
    summary: str


TREATMENTS: dict[str, Treatment] = {t.name: t for t in (
    Treatment("dense", None, None, "kept as it is"),
    Treatment("lmf", "lmf", None, "truncated SVD (whitened with calibration): A·B at rank r"),
    Treatment("hmf", "hmf", None, "hybrid: dense rows/columns + low rank, within a parameter budget"),
    Treatment("prune", "prune", None, "magnitude pruning, stored dense with zeros (the baseline)"),
    Treatment("ae", "ae", None, "embedding autoencoder: codes + decoder, within a parameter budget"),
    Treatment("storage-ae", None, "storage-ae", "rebuilt from codes and a decoder shared across layers"),
    Treatment("int8", None, "int8", "int8 weight, MatMulInteger / Gather + DequantizeLinear"),
    Treatment("int8w", None, "int8w", "weight-only int8 + per-column scales (Cast·Mul, folded at load: disk only)"),
    Treatment("int4w", None, "int4w", "weight-only int4 + per-column scales (folded at load: disk only)"),
    Treatment("lmf-int8", "lmf", "int8", "LMF with int8 factors (MatMulInteger)"),
    Treatment("lmf-int8w", "lmf", "int8w", "LMF with weight-only int8 factors (disk only)"),
    Treatment("int4b", None, "int4b", "blocked int4 (block 32, GPTQ): DequantizeLinear(block_size) → MatMul, "
              "fused to MatMulNBits; tables: gathered int4 rows (integer at run time; opset 21 for MatMuls)"),
    Treatment("int8b", None, "int8b", "blocked int8 (block 128): DequantizeLinear(block_size) → MatMul "
              "(integer at run time; opset 21 for MatMuls)"),
    Treatment("int4b128", None, "int4b128", "blocked int4 (block 128, GPTQ): DequantizeLinear(block_size) → MatMul, "
              "fused to MatMulNBits (integer at run time; opset 21)"),
    Treatment("int4b256", None, "int4b256", "blocked int4 (block 256, GPTQ): DequantizeLinear(block_size) → MatMul, "
              "fused to MatMulNBits (integer at run time; opset 21)"),
    *(Treatment(f"int4b{b}r", None, f"int4b{b}r", f"blocked int4 (block {b}, GPTQ) of the weight rotated by a block "
                "Hadamard (32) on its input side, the input rotated at run time (Reshape, MatMul): "
                "DequantizeLinear(block_size) → MatMul, fused to MatMulNBits (integer at run time; opset 21)")
      for b in (32, 64, 128, 256)),
    Treatment("pq4", None, "pq4", "product-quantized table: a uint8 code per 4 values into 256-centroid int8 "
              "codebooks with a scale per subspace (2 bits a value; the codebooks folded to float at load), rebuilt "
              "after the Gather (Gather, Cast, Add, Gather, Reshape; opset kept)"),
)}


def treatment_bytes(treatment: str, shape: tuple[int, int], *, rank: int | None = None, budget: int | None = None,
                    itemsize: int = 4, pivot: bool = False, index: int = 0, tied: bool = False,
                    table: bool = False) -> int:
    """Predicted file bytes of one weight under ``treatment`` (the one cost model). ``pivot``: the
    low-rank result is stored pivoted (factorize/pivot.py): r(m+n−r) values and ``index`` int32
    index-map entries instead of A·B's r(m+n). ``tied``: an m×n tied table, whose int8 rows carry
    one scale each and whose head is a MatMulInteger (quantize._own_tables). ``table``: read by a
    Gather, where blocked int4 keeps float32 scales (MatMuls store them in 8 bits: PLANNED)."""
    m, n = shape
    r = rank or 0
    if pivot and TREATMENTS.get(treatment) is not None and TREATMENTS[treatment].factor == "lmf":
        values, extra = r * (m + n - r), 4 * index + PIVOT_OVERHEAD
        if treatment == "lmf":
            return int(itemsize * values + extra + LMF_OVERHEAD)
        scales = 4 * n if treatment == "lmf-int8w" else 0  # r + (n − r) column scales
        # the quantizer's nodes for the pivoted pair (two MatMulIntegers, their casts and scales): one
        # fit, on the tied test model (tests/test_plan.py), of ~2 kB
        return int(values + extra + 2 * INT8_OVERHEAD + LMF_OVERHEAD + scales + PIVOT_INT8_OVERHEAD)
    sb = 32 if table else 8  # the int4 options' scale storage (passes/intquant.PLANNED; quant.scale_bits_for)
    cost = {
        "dense": lambda: itemsize * m * n,
        "lmf": lambda: itemsize * r * (m + n) + LMF_OVERHEAD,
        "hmf": lambda: itemsize * (budget or 0),  # at most
        "ae": lambda: itemsize * (budget or 0),  # at most
        "prune": lambda: itemsize * m * n,  # stored dense with zeros
        "storage-ae": lambda: itemsize * (budget or 0),
        "int8": lambda: m * n + INT8_OVERHEAD + (5 * m + TIED_INT8_OVERHEAD if tied else 0),  # a scale (and zero point: uint8 rows) per row
        "int8w": lambda: m * n + 4 * n + INT8_OVERHEAD,
        "int4w": lambda: m * n // 2 + 4 * n + INT8_OVERHEAD + INT4_OVERHEAD,
        "lmf-int8": lambda: r * (m + n) + 2 * INT8_OVERHEAD + LMF_OVERHEAD,
        "lmf-int8w": lambda: r * (m + n) + 2 * INT8_OVERHEAD + LMF_OVERHEAD + 4 * n + 4 * r,
        # blocks along m (tables: along n, ≈ the same)
        "int4b": lambda: blocked_bytes(m, n, 4, 32, False, scale_bits_for(m, 32, sb)) + INT8_OVERHEAD,
        "int8b": lambda: blocked_bytes(m, n, 8, 128) + INT8_OVERHEAD,
        "int4b128": lambda: blocked_bytes(m, n, 4, 128, False, scale_bits_for(m, 128, sb)) + INT8_OVERHEAD,
        "int4b256": lambda: blocked_bytes(m, n, 4, 256, False, scale_bits_for(m, 256, sb)) + INT8_OVERHEAD,
        **{f"int4b{b}r": (lambda b=b: blocked_bytes(m, n, 4, b, False, scale_bits_for(m, b, 8)) + INT8_OVERHEAD + ROT_OVERHEAD)
           for b in (32, 64, 128, 256)},
        "pq4": lambda: pq_bytes(m, n, 4, 256, 1) + PQ_OVERHEAD,  # a table: m rows of n values
    }
    if treatment not in cost:
        raise OnnxHmfError(f"unknown treatment {treatment!r} (known: {', '.join(TREATMENTS)})")
    return int(cost[treatment]())


@dataclass
class Decision:
    weight: str
    treatment: str
    shape: tuple[int, int]
    ops: str = ""
    nodes: list[str] = field(default_factory=list)
    rank: int | None = None  # low-rank treatments
    budget: int | None = None  # hmf, prune, ae: at most this many parameters
    pivot: bool = False  # low-rank storage pivoted (W_p, C: factorize/pivot.py) instead of A·B; hmf: a pivoted rest
    index: int = 0  # pivoted lmf: int32 index-map entries (0 when the permutation folds)
    keep: float | None = None  # the fraction the planner asked for
    stage: int | None = None  # sequential calibration: the band this weight is fitted in
    reason: str = ""  # why this treatment (for "dense": why it is not compressed)
    itemsize: int = 4
    predicted_bytes: int | None = None
    predicted_loss: float | None = None
    measured_loss: float | None = None

    @property
    def spec(self) -> Treatment:
        return TREATMENTS[self.treatment]

    @property
    def changes(self) -> bool:
        return self.treatment != "dense"

    @property
    def dense_bytes(self) -> int:
        return self.itemsize * self.shape[0] * self.shape[1]

    def predict(self) -> "Decision":
        self.predicted_bytes = treatment_bytes(self.treatment, self.shape, rank=self.rank, budget=self.budget,
                                               itemsize=self.itemsize, pivot=self.pivot, index=self.index,
                                               table="gather" in self.ops)
        return self

    @property
    def params_after(self) -> int:
        """Stored elements (an upper bound for hmf, prune and ae; pruning stores zeros too, so
        its count is the non-zeros)."""
        m, n = self.shape
        if self.spec.factor == "lmf":
            return self.rank * (m + n - self.rank) + self.index if self.pivot else self.rank * (m + n)
        if self.spec.factor in ("hmf", "prune", "ae") or (self.treatment == "storage-ae" and self.budget):
            return self.budget
        return m * n

    @property
    def amount(self) -> str:
        if self.rank:
            return f"r={self.rank}"
        if self.budget:
            return f"budget {self.budget:,}"
        return ""


@dataclass
class Plan:
    """Decisions (one per weight group the planner looked at), the settings the executor needs
    to reproduce the run (seed, damping, folding, calibration source, ...), the planner's name
    and what it measured (``summary``: calibration, search trials, fidelity)."""

    decisions: list[Decision] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    planner: str = "uniform"
    summary: dict = field(default_factory=dict)
    bytes_before: int | None = None
    params_before: int | None = None

    def __post_init__(self):
        self.settings = _jsonable(self.settings)

    @property
    def by_weight(self) -> dict[str, Decision]:
        return {d.weight: d for d in self.decisions}

    def with_treatment(self, *names: str) -> list[Decision]:
        return [d for d in self.decisions if d.treatment in names]

    def stored_as(self, store: str) -> list[Decision]:
        return [d for d in self.decisions if d.spec.store == store]

    @property
    def exact(self) -> bool:
        """True when every predicted size is exact (no hmf/prune/ae upper bounds)."""
        return not any(d.spec.factor in ("hmf", "prune", "ae") for d in self.decisions)

    @property
    def params_after(self) -> int | None:
        if self.params_before is None:
            return None
        return self.params_before - sum(d.shape[0] * d.shape[1] - d.params_after for d in self.decisions)

    @property
    def predicted_bytes(self) -> int | None:
        if self.bytes_before is None:
            return None
        return self.bytes_before - sum(d.dense_bytes - (d.predicted_bytes or d.dense_bytes) for d in self.decisions)

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return _jsonable({"format": PLAN_FORMAT, "planner": self.planner, "settings": self.settings,
                          "bytes_before": self.bytes_before, "params_before": self.params_before, "summary": self.summary,
                          "decisions": [asdict(d) for d in self.decisions]})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT or not isinstance(d.get("decisions"), list):
            raise OnnxHmfError(f"not an onnxhmf plan (format {PLAN_FORMAT}): expected an object with 'format' and 'decisions'")
        known = {f.name for f in fields(Decision)}
        out = []
        for i, row in enumerate(d["decisions"]):
            if not isinstance(row, dict) or not {"weight", "treatment", "shape"} <= set(row):
                raise OnnxHmfError(f"plan decision {i}: needs 'weight', 'treatment' and 'shape'")
            extra = set(row) - known
            if extra:
                raise OnnxHmfError(f"plan decision {i} ({row['weight']}): unknown field(s) {', '.join(sorted(extra))}")
            if row["treatment"] not in TREATMENTS:
                raise OnnxHmfError(f"plan decision {i} ({row['weight']}): unknown treatment {row['treatment']!r} "
                                   f"(known: {', '.join(TREATMENTS)})")
            dec = Decision(**{**row, "shape": tuple(row["shape"])})
            _check_amount(dec, i)
            out.append(dec)
        settings = d.get("settings") or {}
        if not isinstance(settings, dict):
            raise OnnxHmfError("plan 'settings' must be an object")
        return cls(out, settings, str(d.get("planner", "file")), d.get("summary") or {}, d.get("bytes_before"),
                   d.get("params_before"))

    def save(self, path: str | os.PathLike) -> None:
        from .io import write_text_atomic

        write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise OnnxHmfError(f"cannot read plan {path}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise OnnxHmfError(f"plan {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    # -- console ---------------------------------------------------------------------------
    def format(self) -> str:
        from .report import _table

        from .report import display_name

        rows = [(d.ops, display_name(d.weight, d.nodes), f"{d.shape[0]}x{d.shape[1]}", d.treatment, d.amount,
                 f"{d.dense_bytes:,} -> {'' if d.spec.factor not in ('hmf', 'prune', 'ae') else '≤ '}"
                 f"{d.predicted_bytes:,}" if d.predicted_bytes is not None else "-",
                 "-" if d.predicted_loss is None else f"{d.predicted_loss:.5f}", d.reason)
                for d in self.decisions if d.changes]
        lines = [f"plan ({self.planner}):"]
        if rows:
            lines += _table(("op", "weight", "shape", "treatment", "amount", "bytes", "pred. loss", "why"), rows)
        else:
            lines.append("no weight would be changed")
        kept = [d for d in self.decisions if not d.changes]
        if kept:
            lines.append(f"kept dense: {len(kept)} weight(s):")
            lines += [f"  {d.weight} ({d.ops}, {d.shape[0]}x{d.shape[1]}): {d.reason}" for d in kept]
        after = self.predicted_bytes
        le = "" if self.exact else "≤ "
        if self.params_before:
            pa = self.params_after
            lines.append(f"params: {self.params_before:,} -> {le}{pa:,} ({pa / self.params_before:.3f}x, predicted)")
        if after is not None and self.bytes_before:
            lines.append(f"file: {self.bytes_before:,} -> {le}~{after:,} bytes ({after / self.bytes_before:.3f}x, predicted)")
        return "\n".join(lines)


def _check_amount(d: Decision, i: int) -> None:
    f = d.spec.factor
    if f == "lmf" and not (isinstance(d.rank, int) and d.rank >= 1):
        raise OnnxHmfError(f"plan decision {i} ({d.weight}): treatment {d.treatment} needs a rank ≥ 1")
    if f in ("hmf", "prune", "ae") and not (isinstance(d.budget, int) and d.budget >= 1):
        raise OnnxHmfError(f"plan decision {i} ({d.weight}): treatment {d.treatment} needs a parameter budget ≥ 1")
    if len(d.shape) != 2 or not all(isinstance(x, int) and x > 0 for x in d.shape):
        raise OnnxHmfError(f"plan decision {i} ({d.weight}): shape must be two positive integers")


def _jsonable(v):
    """The value as JSON would give it back (tuples as lists, non-finite floats as strings),
    so that a plan made in this run and one loaded from its file are equal."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalars
        return v.item()
    return v
