"""What ``optimize`` was asked to do, as a few frozen groups, each validated once.

* :class:`Selection`: which weights may change (regexes, a size floor).
* :class:`Budget`: how much to keep (uniform keep or rank) and the targets of the searching
  planners (``min_fidelity``, ``--plan auto``'s size/fidelity/latency targets).
* :class:`Methods`: how weights are factorized (method, embedding method, folding, whitening
  damping, shared bases, sequential fitting, the autoencoders, int8).
* :class:`CalibrationOptions`: where calibration data comes from.
* :class:`VerificationOptions`: how the result is checked.

``Options.from_kwargs`` builds them from ``optimize``'s keyword arguments; every rule that
involves more than one option is checked in :meth:`Options.validate`, nowhere else.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .errors import OnnxHmfError

__all__ = ["Selection", "Budget", "Methods", "CalibrationOptions", "VerificationOptions", "Options",
           "METHODS", "EMBEDDING_METHODS", "DEFAULT_KEEP", "DEFAULT_MIN_COSINE", "DEFAULT_DAMP"]

METHODS = ("lmf", "hmf", "prune")
EMBEDDING_METHODS = ("svd", "hmf", "prune", "skip", "ae")
INT8_WEIGHTS = ("auto", "int8", "uint8")  # how MatMulInteger weights are stored (graph/unsigned.py, executor.unsigned_forms)
DEFAULT_KEEP = 0.75
DEFAULT_MIN_COSINE = 0.9
DEFAULT_DAMP = 0.01  # whitening damping, a fraction of the mean activation energy (factorize/whiten.py)


def _fail(msg: str):
    raise OnnxHmfError(msg)


@dataclass(frozen=True)
class Selection:
    """Which weight groups may change: regexes on weight or node names, and a size floor."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_params: int = 0

    def __post_init__(self):
        try:
            object.__setattr__(self, "_inc", [re.compile(p) for p in self.include])
            object.__setattr__(self, "_exc", [re.compile(p) for p in self.exclude])
        except re.error as e:
            _fail(f"invalid regular expression {e.pattern!r}: {e}")
        if self.min_params < 0:
            _fail(f"min params must be ≥ 0, got {self.min_params}")

    def why_not(self, group) -> str | None:
        names = [group.name, *group.node_names]
        if self._inc and not any(p.search(n) for p in self._inc for n in names):
            return "not matched by --include"
        if any(p.search(n) for p in self._exc for n in names):
            return "matched by --exclude"
        if group.params < self.min_params:
            return f"{group.params} params < --min-params {self.min_params}"
        return None


def _check_targets(plan: dict) -> None:
    """--plan auto's targets as numbers in range (a NaN would compare false everywhere)."""
    import math

    ranges = {"target_size": (1, math.inf), "target_ratio": (0, 1), "target_fidelity": (-1, 1), "max_latency_ratio": (0, math.inf)}
    for key, (lo, hi) in ranges.items():
        v = plan.get(key)
        if v is not None and not (isinstance(v, (int, float)) and lo <= v <= hi and (key != "target_ratio" or v > 0)):
            _fail(f"--{key.replace('_', '-')} must be a number in [{lo}, {hi}], got {v!r}")


@dataclass(frozen=True)
class Budget:
    keep: float | None = DEFAULT_KEEP
    rank: int | None = None
    rank_multiple: int = 1
    allocation: str = "auto"  # with calibration: auto (= measured unless --rank), measured, uniform
    min_fidelity: float | None = None
    plan: dict | None = None  # --plan auto: target_size, target_ratio, target_fidelity, max_latency_ratio
    fidelity: float | None = None  # the default planner: the smallest model keeping this fidelity (planners/auto.py)
    allow_slower: bool = False  # the default planner: the smallest plan even where it runs slower than the input
    max_memory: int | None = None  # the default planner and --plan auto: resident bytes of the loaded model (planners/memory.py)

    def __post_init__(self):
        if self.rank is None and self.keep is None and self.fidelity is None:
            _fail("give keep or rank")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            _fail(f"keep must be in (0, 1], got {self.keep}")
        if self.rank is not None and self.rank < 1:
            _fail(f"rank must be ≥ 1, got {self.rank}")
        if self.rank_multiple < 1:
            _fail(f"rank multiple must be ≥ 1, got {self.rank_multiple}")
        if self.allocation not in ("auto", "uniform", "measured"):
            _fail(f"allocation must be auto, uniform or measured, got {self.allocation!r}")
        if self.fidelity is not None and not 0.0 < self.fidelity <= 1.0:
            _fail(f"--fidelity must be in (0, 1], got {self.fidelity}")
        if self.plan:
            _check_targets(self.plan)
        if self.max_memory is not None and not (isinstance(self.max_memory, int) and self.max_memory > 0):
            _fail(f"--max-memory must be a positive number of bytes, got {self.max_memory!r}")


@dataclass(frozen=True)
class Methods:
    method: str = "lmf"
    embedding_method: str | None = None
    fold: bool = True
    damp: float = DEFAULT_DAMP
    share_bases: bool = False
    sequential: bool = False
    seed: int = 0
    ae_options: dict = field(default_factory=dict)  # EmbeddingAEConfig fields
    storage_ae: dict | None = None  # StorageAEPass fields: include, keep, options
    quantize: str | None = None  # int8 (per-tensor weights) | int8pc (per-channel weights)
    smooth: str | None = None  # int8pc: SmoothQuant first (passes/smooth.py; needs calibration data): cheap | all | free
    table_bits: int = 8  # --quantize: Gather tables as 8-bit (the quantizer's) or 4-bit rows (graph/qdq.blocked_table)
    lower_recurrent: bool = False  # LSTM/GRU/RNN lowered to Scan so R is factorized too (passes/recurrent.py)
    pivot: bool = True  # low-rank results stored pivoted (W_p, C: r(m+n−r)); False keeps A·B (--no-pivot)
    kernels: str = "standard"  # onnxruntime: blocked integer MatMuls written as com.microsoft.MatMulNBits (graph/nbits.py)
    accuracy_level: int | None = None  # with kernels onnxruntime: MatMulNBits' accuracy_level (None: by bits, nbits.AUTO_ACCURACY)
    activations: str = "per-tensor"  # per-token: the int8 MatMulIntegers' inputs get one scale per row (graph/pertoken.py)
    int8_weights: str = "auto"  # uint8: MatMulInteger weights stored unsigned (graph/unsigned.py); auto: where this CPU saturates
    rotate: bool = False  # --plan auto also offers int4 of weights rotated on their input side (factorize/rotate.py)
    compact_names: bool = False  # intermediate tensors renamed short, node names dropped (graph/names.py)
    float16_biases: bool = False  # biases and normalization vectors stored as float16, Cast at load (graph/half.py)

    def __post_init__(self):
        if self.method not in METHODS:
            _fail(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.embedding_method is not None and self.embedding_method not in EMBEDDING_METHODS:
            _fail(f"embedding method must be one of {', '.join(EMBEDDING_METHODS)}, got {self.embedding_method!r}")
        if self.quantize not in (None, "int8", "int8pc"):
            _fail(f"quantize must be int8, int8pc or None, got {self.quantize!r}")
        if self.smooth not in (None, "cheap", "all", "free"):
            _fail(f"smooth must be cheap, all, free or None, got {self.smooth!r}")
        if self.smooth and self.quantize != "int8pc":
            _fail("--smooth goes with --quantize int8pc")
        if self.table_bits not in (4, 8):
            _fail(f"table bits must be 4 or 8, got {self.table_bits!r}")
        if self.table_bits != 8 and self.quantize is None:
            _fail("--table-bits goes with --quantize")
        if self.kernels not in ("standard", "onnxruntime"):
            _fail(f"kernels must be standard or onnxruntime, got {self.kernels!r}")
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            _fail(f"accuracy level must be 0, 1, 2, 3 or 4, got {self.accuracy_level!r}")
        if self.accuracy_level is not None and self.kernels != "onnxruntime":
            _fail("--accuracy-level goes with --kernels onnxruntime")
        if self.activations not in ("per-tensor", "per-token", "auto"):
            _fail(f"activations must be per-tensor, per-token or auto, got {self.activations!r}")
        if self.int8_weights not in INT8_WEIGHTS:
            _fail(f"int8 weights must be {', '.join(INT8_WEIGHTS[:-1])} or {INT8_WEIGHTS[-1]}, got {self.int8_weights!r}")
        from .factorize.whiten import check_damp

        try:
            check_damp(self.damp)
        except ValueError as e:
            _fail(str(e))
        if self.embedding_method == "ae":
            from .factorize.autoencoder import EmbeddingAEConfig

            try:
                EmbeddingAEConfig(rank=1, **self.ae_options)
            except (TypeError, ValueError) as e:
                _fail(f"bad AE option: {e}")

    def method_for(self, group) -> str:
        """The method for one group: Gather tables follow ``embedding_method`` (svd = lmf)."""
        if any(u.kind == "gather" for u in group.uses):
            m = self.embedding_method or ("svd" if self.method == "lmf" else self.method)
            return "lmf" if m == "svd" else m
        return self.method


@dataclass(frozen=True)
class CalibrationOptions:
    calib: object = None  # a path (npz, folder, text) or a calibration.Calibration
    tokenizer: str | None = None
    samples: int = 256
    seq_len: int = 128
    batch: int = 16
    token_freq: object = None  # per-token counts, or a path (.npz of ids, or text with tokenizer)

    @property
    def given(self) -> bool:
        return self.calib is not None


@dataclass(frozen=True)
class VerificationOptions:
    verify: bool = True
    inputs: object = None  # dict of arrays or an .npz path
    input_shapes: dict | None = None
    atol: dict | None = None
    rtol: dict | None = None
    min_cosine: float | None = DEFAULT_MIN_COSINE
    min_top1: float | None = 0.9  # top-1 agreement of logits-like outputs on the verification feeds (verify.DEFAULT_MIN_TOP1)
    measure: bool = False  # also measure resident memory and latency of input and output (the result table)
    outputs: tuple[str, ...] = ()  # the outputs whose fidelity counts (default: every float output but caches)
    minimums: dict | None = None  # per-output minimum fidelity {output or "": value} (--min-cosine OUT:V)

    def __post_init__(self):
        from .verify import check_thresholds

        check_thresholds(self.min_cosine, self.min_top1)


_GROUPS = {
    "selection": (Selection, {"include", "exclude", "min_params"}),
    "budget": (Budget, {"keep", "rank", "rank_multiple", "allocation", "min_fidelity", "plan", "fidelity",
                        "allow_slower", "max_memory"}),
    "methods": (Methods, {"method", "embedding_method", "fold", "damp", "share_bases", "sequential", "seed",
                          "ae_options", "storage_ae", "quantize", "smooth", "table_bits", "lower_recurrent",
                          "pivot", "kernels", "accuracy_level", "activations", "int8_weights", "rotate", "compact_names",
                          "float16_biases"}),
    "calibration": (CalibrationOptions, {"calib", "tokenizer", "calib_samples", "calib_seq_len", "calib_batch",
                                         "token_freq"}),
    "verification": (VerificationOptions, {"verify", "inputs", "input_shapes", "atol", "rtol", "min_cosine", "min_top1", "measure",
                                           "outputs", "minimums"}),
}
_RENAMED = {"calib_samples": "samples", "calib_seq_len": "seq_len", "calib_batch": "batch"}


@dataclass(frozen=True)
class Options:
    selection: Selection = field(default_factory=Selection)
    budget: Budget = field(default_factory=Budget)
    methods: Methods = field(default_factory=Methods)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    verification: VerificationOptions = field(default_factory=VerificationOptions)
    plan_file: str | None = None  # apply this saved plan instead of planning

    @classmethod
    def from_kwargs(cls, plan_file=None, **kw) -> "Options":
        """From ``optimize``'s keyword arguments (unknown names are an error)."""
        if kw.get("quantize") and kw.get("keep", None) is None and kw.get("rank") is None:
            kw["keep"] = 1.0  # --quantize int8 alone means int8 alone, no factorization
        known = set().union(*(names for _, names in _GROUPS.values()))
        unknown = set(kw) - known
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        parts = {}
        for key, (klass, names) in _GROUPS.items():
            args = {_RENAMED.get(k, k): kw[k] for k in names if k in kw}
            for k in ("include", "exclude", "outputs"):
                if k in args:
                    args[k] = tuple(args[k] or ())
            if "ae_options" in args:
                args["ae_options"] = dict(args["ae_options"] or {})
            parts[key] = klass(**args)
        opts = cls(**parts, plan_file=None if plan_file is None else str(plan_file))
        opts.validate()
        return opts

    def validate(self) -> None:
        """The rules between groups (each group checked its own fields already)."""
        b, m, c = self.budget, self.methods, self.calibration
        if m.seed < 0 or m.seed >= 2**32:
            _fail(f"seed must be in [0, 2^32), got {m.seed}")
        if not np.isfinite(m.damp) or m.damp < 0 or m.damp > 1e6:
            _fail(f"damping must be a finite number in [0, 1e6], got {m.damp}")
        if b.fidelity is not None and (b.rank is not None or b.plan is not None or b.min_fidelity is not None
                                       or m.quantize or m.sequential or m.storage_ae or self.plan_file is not None):
            _fail("the fidelity target is the default planner's: it does not combine with --rank, --plan, --min-fidelity, "
                  "--quantize, --sequential, --plan-file or the storage autoencoder")
        if b.max_memory is not None and b.fidelity is None and b.plan is None:
            _fail("--max-memory goes with the default fidelity target or --plan auto")
        if b.allow_slower and b.fidelity is None:
            _fail("--allow-slower goes with the default fidelity target (give no --keep, --rank or --plan)")
        if b.rank is not None and m.method != "lmf":
            _fail("--rank is only for --method lmf; use --keep")
        if m.embedding_method == "ae" and b.keep is None:
            _fail("--embedding-method ae needs --keep, not --rank")
        if b.plan is not None:
            if not c.given:
                _fail("--plan auto needs calibration data (--calib)")
            if m.quantize is not None:
                _fail("--plan auto chooses int8 per weight itself: give it without --quantize")
            if b.min_fidelity is not None or m.sequential or b.rank is not None or m.storage_ae:
                _fail("--plan auto chooses the ranks itself: it does not combine with --min-fidelity, --sequential, "
                      "--rank or the storage autoencoder")
        if m.rotate and b.plan is None and b.fidelity is None:
            _fail("--rotate goes with --plan auto or the default fidelity target (its planner offers the rotated int4)")
        if m.smooth and not c.given:
            _fail("--smooth needs calibration data (--calib)")
        if m.activations == "auto" and not c.given and b.fidelity is None:
            _fail("--activations auto needs calibration data (--calib), or the default planner's")
        if not c.given and (b.allocation == "measured" or b.min_fidelity is not None or m.sequential):
            _fail("--allocate measured, --min-fidelity and --sequential need calibration data (--calib)")
        if b.rank is not None and (b.min_fidelity is not None or b.allocation == "measured"):
            _fail("--min-fidelity and --allocate measured choose the ranks; they do not combine with --rank")
        if m.storage_ae:
            from .passes.storage_ae import StorageAEPass

            try:
                StorageAEPass(seed=m.seed, **m.storage_ae)
            except (ValueError, TypeError) as e:
                _fail(str(e))

    @property
    def measured(self) -> bool:
        """Calibrated ranks chosen by measurement (the default with calibration, unless --rank)."""
        b = self.budget
        return self.calibration.given and (b.allocation == "measured" or (b.allocation == "auto" and b.rank is None))

    def settings(self) -> dict:
        """The settings a plan records (what the executor and the metadata need)."""
        b, m, c = self.budget, self.methods, self.calibration
        return {
            "method": m.method, "embedding_method": m.embedding_method, "token_freq": c.token_freq is not None,
            "fold": m.fold, "keep": b.keep if b.rank is None else None, "rank": b.rank, "rank_multiple": b.rank_multiple,
            "include": list(self.selection.include), "exclude": list(self.selection.exclude),
            "min_params": self.selection.min_params, "seed": m.seed,
            **({"ae_options": dict(m.ae_options)} if m.ae_options else {}),
            **({"storage_ae": dict(m.storage_ae)} if m.storage_ae else {}),
            "allocation": b.allocation if c.given else None, "sequential": m.sequential or None,
            "share_bases": m.share_bases or None, "min_fidelity": b.min_fidelity, "quantize": m.quantize,
            **({"smooth": m.smooth} if m.smooth else {}),
            **({"table_bits": m.table_bits} if m.table_bits != 8 else {}),
            "plan": {k: v for k, v in b.plan.items() if v is not None} if b.plan else None,
            "damp": m.damp,
            **({"fidelity": b.fidelity, "allow_slower": b.allow_slower or None} if b.fidelity is not None else {}),
            "lower_recurrent": m.lower_recurrent or None,
            "pivot": False if not m.pivot else None,
            **({"kernels": m.kernels} if m.kernels != "standard" else {}),
            **({"accuracy_level": m.accuracy_level} if m.accuracy_level is not None else {}),
            **({"activations": m.activations} if m.activations != "per-tensor" else {}),
            **({"int8_weights": m.int8_weights} if m.int8_weights != "auto" else {}),
            **({"rotate": True} if m.rotate else {}),
            **({"compact_names": True} if m.compact_names else {}),
            **({"float16_biases": True} if m.float16_biases else {}),
        }
