"""Numerical verification with onnxruntime: generate inputs, run both models, compare outputs.

Error statistics per output, with r the reference and c the candidate (float64):
    max_abs = max |r − c|           max_rel = max |r − c| / max(|r|, tiny)
    cosine  = mean over rows (last axis) of ⟨r, c⟩ / (‖r‖·‖c‖), on the elements where r is finite
    SNR dB  = 10·log10(Σ r² / Σ (r − c)²)
    top1    = fraction of rows whose argmax agrees (logits-like outputs)
Tolerances follow Polygraphy: an element passes if |r − c| ≤ atol + rtol·|r|.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx

from .errors import OnnxHmfError
from .graph.index import GraphIndex, gather_rows
from .report import OutputStats

__all__ = [
    "parse_input_shapes",
    "named_feeds",
    "parse_tolerances",
    "make_inputs",
    "load_inputs",
    "run_onnxruntime",
    "compare_outputs",
    "check_outputs",
    "ERROR_STATS",
    "DEFAULT_BATCH",
    "DEFAULT_SEQUENCE",
    "DEFAULT_MIN_COSINE",
    "DEFAULT_MIN_TOP1",
    "GeneratedFeeds",
    "criterion_text",
]

DEFAULT_BATCH = 2  # a symbolic first axis
DEFAULT_SEQUENCE = 64  # any other symbolic axis
DEFAULT_MIN_COSINE = 0.9  # verify's default criterion when no tolerance is given (optimize's default too)
DEFAULT_MIN_TOP1 = 0.9  # top-1 agreement a logits-like output must keep by default
MAX_GENERATED_ELEMENTS = 1 << 28  # a generated input larger than this (1 GiB of float32) is refused


def parse_input_shapes(specs: list[str] | tuple[str, ...] | None) -> dict[str, list[int]]:
    """Parse Polygraphy-style ``name:1,128`` (or ``name:[1,128]``) specs."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        dims = dims.strip().strip("[]")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")] if dims else []
            if any(d < 1 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise OnnxHmfError(f"bad --input-shapes {spec!r}: expected name:d0,d1,... with positive integers "
                               "(an empty tensor verifies nothing)") from None
        if int(np.prod(shapes[name], dtype=object)) > MAX_GENERATED_ELEMENTS:
            raise OnnxHmfError(f"--input-shapes {spec!r}: {int(np.prod(shapes[name], dtype=object)):,} elements, more than "
                               f"{MAX_GENERATED_ELEMENTS:,}; give a smaller shape (or real inputs with --inputs)")
    return shapes


def parse_tolerances(specs, option: str) -> dict[str, float]:
    """Parse ``val`` or ``output:val`` tolerance specs; the key "" is the default."""
    out: dict[str, float] = {}
    for spec in specs or []:
        name, _, val = str(spec).rpartition(":")
        try:
            v = float(val)
            if not v >= 0:
                raise ValueError
        except ValueError:
            raise OnnxHmfError(f"bad {option} {spec!r}: expected a non-negative number or output:number") from None
        out[name] = v
    return out


_gather_vocab = gather_rows  # (graph/index.py)


def _dims(vi: onnx.ValueInfoProto, shapes: dict[str, list[int]]) -> tuple[list[int], list[str]]:
    """(dims to generate, names of the symbolic dims that were defaulted)."""
    if vi.name in shapes:
        return shapes[vi.name], []
    dims, guessed = [], []
    for i, d in enumerate(vi.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(d.dim_value)
        else:
            dims.append(DEFAULT_BATCH if i == 0 else DEFAULT_SEQUENCE)
            guessed.append(d.dim_param or f"axis {i}")
    return dims, guessed


class GeneratedFeeds(dict):
    """Feeds made up from the signature (:func:`make_inputs`), with how each was made, so a
    failing run can say which input may need real values and how to give them."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.how: dict[str, str] = {}
        self.guessed: dict[str, list[str]] = {}
        self.ran = False  # the reference model ran on them

    def hint(self) -> str:
        parts = []
        for name, arr in self.items():
            dims = "x".join(map(str, arr.shape)) or "scalar"
            g = self.guessed.get(name)
            extra = f"; symbolic {', '.join(g)} set by default" if g else ""
            parts.append(f"{name} {dims} {self.how.get(name, 'generated')}{extra}")
        return ("the inputs were generated (" + "; ".join(parts) + "): give real values with --inputs feeds.npz "
                "(keyed by input name), or other sizes with --input-shapes NAME:D0,D1")


def _generated(name: str, dims: list[int], dtype) -> None:
    n = int(np.prod(dims, dtype=object)) if dims else 1
    if n > MAX_GENERATED_ELEMENTS:
        raise OnnxHmfError(f"input {name!r}: generating shape {dims} means {n:,} elements; give smaller "
                           f"--input-shapes {name}:D0,D1,... or real values with --inputs feeds.npz")


def make_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None, seed: int = 0) -> GeneratedFeeds:
    """Feeds for every graph input, from its signature.

    Symbolic dims come from ``shapes`` or default to DEFAULT_BATCH (axis 0) and DEFAULT_SEQUENCE.
    Integer inputs: names containing "mask" get ones, "position" gets 0..n-1 on the last axis,
    inputs that index a Gather table get ids below the size of the gathered axis, anything else
    zeros. Inputs that cannot be made up sensibly are refused, naming the input and how to give
    it: a scalar (a sample rate, a length: a parameter, not data), positions past the table
    they index.
    """
    shapes = dict(shapes or {})
    index = GraphIndex(model)
    init = set(index.initializers)
    names = [vi.name for vi in model.graph.input if vi.name not in init]
    unknown = set(shapes) - set(names)
    if unknown:
        raise OnnxHmfError(f"--input-shapes names unknown input(s) {sorted(unknown)}; inputs are {names}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise OnnxHmfError(f"--seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    feeds = GeneratedFeeds()
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise OnnxHmfError(f"input {vi.name!r} is not a tensor; pass --inputs with values for it")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims, guessed = _dims(vi, shapes)
        _generated(vi.name, dims, dtype)
        lname = vi.name.lower()
        vocab = None if np.issubdtype(dtype, np.floating) or dtype == np.bool_ else _gather_vocab(index, vi.name)
        if not dims and tt.HasField("shape") and dtype != np.bool_ and not vocab:
            raise OnnxHmfError(f"input {vi.name!r} is a scalar ({np.dtype(dtype).name}: a parameter such as a sample rate "
                               f"or a length, whose value cannot be guessed); give it with --inputs feeds.npz "
                               f"(an array named {vi.name!r})")
        try:
            if np.issubdtype(dtype, np.floating):
                feeds[vi.name], how = rng.standard_normal(dims).astype(dtype), "random normal"
            elif dtype == np.bool_:
                feeds[vi.name], how = np.ones(dims, dtype=bool), "all true"
            elif "mask" in lname:
                feeds[vi.name], how = np.ones(dims, dtype=dtype), "ones (a mask)"
            elif "position" in lname and dims:
                if vocab is not None and dims[-1] > vocab:
                    raise OnnxHmfError(
                        f"input {vi.name!r}: positions 0..{dims[-1] - 1} would pass the {vocab} rows of the table it "
                        f"indexes; give --input-shapes {vi.name}:{','.join(map(str, dims[:-1] + [vocab]))} (and that "
                        "length for the other inputs) or real values with --inputs feeds.npz")
                feeds[vi.name] = np.broadcast_to(np.arange(dims[-1], dtype=dtype), dims).copy()
                how = f"positions 0..{dims[-1] - 1}"
            elif vocab:
                feeds[vi.name], how = rng.integers(0, vocab, size=dims).astype(dtype), f"random ids below {vocab}"
            else:
                feeds[vi.name], how = np.zeros(dims, dtype=dtype), "zeros"
        except MemoryError:
            raise OnnxHmfError(f"input {vi.name!r}: not enough memory to generate shape {dims}; give smaller "
                               f"--input-shapes or real values with --inputs feeds.npz") from None
        feeds.how[vi.name] = how
        if guessed:
            feeds.guessed[vi.name] = guessed
    return feeds


def load_inputs(path: str | os.PathLike, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Feeds from an .npz whose keys are the model's input names."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise OnnxHmfError(f"--inputs {str(p)!r}: no such file") from None
    except Exception as e:
        raise OnnxHmfError(f"--inputs {str(p)!r}: not a readable .npz ({e})") from None
    init = {t.name for t in model.graph.initializer}
    need = [vi.name for vi in model.graph.input if vi.name not in init]
    missing = [n for n in need if n not in feeds]
    if missing:
        raise OnnxHmfError(f"--inputs {str(p)!r} lacks input(s) {missing}")
    return {n: feeds[n] for n in need}


def named_feeds(model: onnx.ModelProto, verification, seed: int = 0) -> dict[str, np.ndarray] | None:
    """The inputs the user named (``--inputs`` .npz or arrays, else ``--input-shapes`` generated
    from the signature), or None where they named none: what the planners measure latency and
    resident memory on, and what verification runs on."""
    v = verification
    if isinstance(v.inputs, (str, os.PathLike)):
        return load_inputs(v.inputs, model)
    if v.inputs is not None:
        return dict(v.inputs)
    if v.input_shapes:
        return make_inputs(model, v.input_shapes, seed=seed)
    return None


def run_onnxruntime(model: onnx.ModelProto | str | os.PathLike | bytes, feeds: dict[str, np.ndarray], threads: int | None = None,
                    prepack: bool = True) -> dict[str, np.ndarray]:
    """Run on onnxruntime's CPU provider; returns {output name: array}.

    ``prepack=False`` turns off ORT's weight pre-packing, which keeps a second, packed copy of
    every MatMul weight: for a one-off verification run it only costs memory.
    """
    import onnxruntime as ort

    quiet_onnxruntime()
    so = ort.SessionOptions()
    so.log_severity_level = 4  # ORT logs a failed run at ERROR on stderr; the exception says it once
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        so.intra_op_num_threads = threads
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else (model if isinstance(model, bytes) else str(model))
    try:
        sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        outs = dict(zip(names, sess.run(names, feeds)))
    except Exception as e:
        msg = re.sub(r"\s+", " ", str(e)).strip()
        hint = f"; {feeds.hint()}" if isinstance(feeds, GeneratedFeeds) and not feeds.ran else ""
        raise OnnxHmfError(f"onnxruntime failed: {msg[:400]}{hint}") from None
    if isinstance(feeds, GeneratedFeeds):
        feeds.ran = True
    return outs


def quiet_onnxruntime() -> None:
    """Keep onnxruntime's own (coloured) log lines off stderr: errors reach the user once, as
    the one line the CLI prints."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)


def _is_logits(name: str, arr: np.ndarray, vocab_sizes: set[int]) -> bool:
    return arr.ndim >= 1 and arr.shape[-1] > 1 and ("logit" in name.lower() or arr.shape[-1] in vocab_sizes)


def _topk_overlap(r: np.ndarray, c: np.ndarray, k: int) -> float:
    """Mean over rows of |top-k(r) ∩ top-k(c)| / k (rows along the last axis)."""
    k = min(k, r.shape[-1])
    rr, cc = r.reshape(-1, r.shape[-1]), c.reshape(-1, c.shape[-1])
    tr = np.argpartition(-rr, k - 1, axis=-1)[:, :k]
    tc = np.argpartition(-cc, k - 1, axis=-1)[:, :k]
    hits = [np.intersect1d(a, b, assume_unique=True).size for a, b in zip(tr, tc)]
    return float(np.mean(hits) / k) if hits else 1.0


def paired_outputs(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray]):
    """(name, reference array, candidate array) for every reference output; one clear error for
    an output the candidate lacks or whose shape changed."""
    for name, r in ref.items():
        if name not in cand:
            raise OnnxHmfError(f"optimized model lacks output {name!r}")
        c = cand[name]
        if r.shape != c.shape:
            raise OnnxHmfError(f"output {name!r} changed shape: {r.shape} -> {c.shape}")
        yield name, r, c


def compare_outputs(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], vocab_sizes: set[int] = frozenset(),
                    *, quantile: float = 0.99, top_k: int = 5) -> list[OutputStats]:
    """Per-output error statistics of ``cand`` against ``ref`` (see the module docstring)."""
    stats = []
    for name, r, c in paired_outputs(ref, cand):
        if not np.issubdtype(r.dtype, np.floating):
            eq = float(np.mean(r == c)) if r.size else 1.0
            diff = np.abs(r.astype(np.float64) - c.astype(np.float64)) if r.size else np.zeros(1)
            stats.append(OutputStats(name, r.shape, float(diff.max()), 0.0, None, None, exact_match=eq))
            continue
        with np.errstate(all="ignore"):  # exact zeros, NaN or Inf in an output: the statistics say so, no warnings
            stats.append(_float_stats(name, r, c, vocab_sizes, quantile, top_k))
    return stats


def _float_stats(name, r, c, vocab_sizes, quantile, top_k) -> OutputStats:
    """Statistics of one float output (see the module docstring)."""
    r64, c64 = r.astype(np.float64), c.astype(np.float64)
    d = np.abs(r64 - c64)
    tiny = np.finfo(np.float64).tiny
    rel = d / np.maximum(np.abs(r64), tiny)
    if d.size:
        fa, fr = d.ravel(), rel.ravel()
        max_abs, max_rel = float(fa.max()), float(fr.max())
        dist = dict(mean_abs=float(fa.mean()), median_abs=float(np.median(fa)),
                    quantile_abs=float(np.quantile(fa, quantile)), mean_rel=float(fr.mean()),
                    median_rel=float(np.median(fr)), quantile_rel=float(np.quantile(fr, quantile)))
    else:
        max_abs = max_rel = 0.0
        dist = dict(mean_abs=0.0, median_abs=0.0, quantile_abs=0.0, mean_rel=0.0, median_rel=0.0, quantile_rel=0.0)
    rows_r = r64.reshape(-1, r64.shape[-1]) if r64.ndim else r64.reshape(1, 1)
    rows_c = c64.reshape(rows_r.shape)
    # compared where the reference is finite (where the input's own output is NaN or Inf there is
    # nothing to be alike to: a NaN in one row of a tied table makes one logit column NaN)
    keep = np.isfinite(rows_r)
    rows_r, rows_c = np.where(keep, rows_r, 0.0), np.where(keep, rows_c, 0.0)
    nr, nc = np.linalg.norm(rows_r, axis=1), np.linalg.norm(rows_c, axis=1)
    both = (nr > 0) & (nc > 0)
    cos = np.where(both, np.sum(rows_r * rows_c, axis=1) / np.where(both, nr * nc, 1.0), (nr == nc).astype(float))
    noise = float(np.sum(d**2))
    signal = float(np.sum(r64**2))
    snr = float("inf") if noise == 0 else (10 * np.log10(signal / noise) if signal > 0 else float("-inf"))
    top1 = topk = None
    if _is_logits(name, r, vocab_sizes) and r.size:
        finite = np.isfinite(r64)
        top1 = float(np.mean(np.argmax(np.where(finite, r64, -np.inf), -1) == np.argmax(np.where(finite, c64, -np.inf), -1)))
        topk = _topk_overlap(r64, c64, top_k)
    cos = np.where(np.isfinite(cos), cos, 0.0)  # NaN or Inf where the reference is finite: nothing alike
    some = keep.any(axis=1)
    mean_cos = float(np.mean(cos[some])) if some.any() else float("nan") if cos.size else 1.0
    return OutputStats(name, r.shape, max_abs, max_rel, mean_cos, snr,
                       top1=top1, quantile=quantile, topk=topk, k=min(top_k, r.shape[-1]) if topk is not None else None,
                       **dist)


ERROR_STATS = ("elementwise", "max", "mean", "median", "quantile")


def check_outputs(
    ref: dict[str, np.ndarray],
    cand: dict[str, np.ndarray],
    stats: list[OutputStats],
    *,
    atol: dict[str, float] | None = None,
    rtol: dict[str, float] | None = None,
    min_cosine: float | None = None,
    check_error_stat: str | dict[str, str] = "elementwise",
    min_top1: float | None = DEFAULT_MIN_TOP1,
) -> list[str]:
    """Failures, one string per broken tolerance (empty when everything passes).

    Always checked: every output keeps its dtype, and no element is NaN/Inf where the
    reference's is finite. ``min_top1``: the least top-1 agreement of logits-like outputs
    (None: not checked). A NaN statistic never passes a bound.

    ``check_error_stat`` (one for all outputs, or {output or "": stat}) picks what atol/rtol
    bound. "elementwise": every element must satisfy |r − c| ≤ atol + rtol·|r|. "max", "mean",
    "median", "quantile": that statistic of the abs error must be ≤ atol, or that of the rel error
    ≤ rtol (as in Polygraphy, either suffices when both are given; a missing one does not count).
    """
    check_thresholds(min_cosine, min_top1)
    atol, rtol = atol or {}, rtol or {}
    stat_of = check_error_stat if isinstance(check_error_stat, dict) else {"": check_error_stat}
    stat_of = {k: "elementwise" if v == "elemwise" else v for k, v in stat_of.items()}  # Polygraphy's spelling
    for opt, tol in (("--atol", atol), ("--rtol", rtol), ("--check-error-stat", stat_of)):
        unknown = set(tol) - {""} - set(ref)
        if unknown:
            raise OnnxHmfError(f"{opt} names unknown output(s) {sorted(unknown)}; outputs are {list(ref)}")
    for v in stat_of.values():
        if v not in ERROR_STATS:
            raise OnnxHmfError(f"--check-error-stat {v!r}: expected one of {', '.join(ERROR_STATS)}")
    failures = []
    for s in stats:
        failures += _always_checked(s.name, ref[s.name], cand[s.name])
        a = atol.get(s.name, atol.get(""))
        r = rtol.get(s.name, rtol.get(""))
        stat = stat_of.get(s.name, stat_of.get("", "elementwise"))
        if (a is not None or r is not None) and stat == "elementwise":
            x, y = ref[s.name].astype(np.float64), cand[s.name].astype(np.float64)
            with np.errstate(all="ignore"):
                excess = np.abs(x - y) - ((a or 0.0) + (r or 0.0) * np.abs(x))
            same = (x == y) | (np.isnan(x) & np.isnan(y))  # equal infinities, NaN where the reference has NaN
            bad = int(np.count_nonzero(~(excess <= 0) & ~same))
            if bad:
                failures.append(f"{s.name}: {bad}/{x.size} elements outside atol={a or 0} rtol={r or 0} (max abs {s.max_abs:.3g})")
        elif a is not None or r is not None:
            va = s.error_stat(stat, "abs") if s.mean_abs is not None or stat == "max" else s.max_abs
            vr = s.error_stat(stat, "rel") if s.mean_rel is not None or stat == "max" else s.max_rel
            ok_a = a is not None and va is not None and va <= a
            ok_r = r is not None and vr is not None and vr <= r
            if not (ok_a or ok_r):
                label = f"p{100 * s.quantile:g}" if stat == "quantile" and s.quantile is not None else stat
                parts = ([f"{label} abs error {va:.3g} > atol {a}"] if a is not None else []) + (
                    [f"{label} rel error {vr:.3g} > rtol {r}"] if r is not None else [])
                failures.append(f"{s.name}: " + " and ".join(parts))
        if min_cosine is not None and s.mean_cosine is not None and not s.mean_cosine >= min_cosine:
            failures.append(f"{s.name}: mean cosine {s.mean_cosine:.5f} < --min-cosine {min_cosine}")
        if min_top1 is not None and s.top1 is not None and not s.top1 >= min_top1:
            failures.append(f"{s.name}: top-1 agreement {s.top1:.4f} < --min-top1 {min_top1}")
    return failures


def check_thresholds(min_cosine: float | None, min_top1: float | None) -> None:
    """--min-cosine in [-1, 1], --min-top1 in [0, 1] (NaN refused: it would fail everything)."""
    for opt, v, lo in (("--min-cosine", min_cosine, -1.0), ("--min-top1", min_top1, 0.0)):
        if v is not None and not (isinstance(v, (int, float)) and lo <= v <= 1.0):
            raise OnnxHmfError(f"{opt} must be a number in [{lo:g}, 1], got {v!r}")


def _always_checked(name: str, r: np.ndarray, c: np.ndarray) -> list[str]:
    """dtype kept; NaN/Inf only where the reference has them."""
    out = []
    if r.dtype != c.dtype:
        out.append(f"{name}: dtype changed {r.dtype} -> {c.dtype}")
    if np.issubdtype(r.dtype, np.floating) or np.issubdtype(c.dtype, np.floating):
        rf, cf = np.isfinite(r), np.isfinite(c)
        bad = int(np.count_nonzero(rf & ~cf))
        if bad:
            out.append(f"{name}: {bad}/{r.size} elements NaN or Inf where the reference is finite")
    return out


def criterion_text(atol, rtol, min_cosine, min_top1, check_error_stat="elementwise") -> str:
    """The pass criterion in words (printed with every verification)."""
    parts = []
    if atol or rtol:
        stat = check_error_stat if isinstance(check_error_stat, str) else "per output"
        parts.append(f"{stat} atol {atol or {}} rtol {rtol or {}}".replace("{'': ", "{").replace("{}", "0"))
    if min_cosine is not None:
        parts.append(f"mean cosine >= {min_cosine}")
    if min_top1 is not None:
        parts.append(f"top-1 agreement >= {min_top1} (logits-like outputs)")
    parts.append("same dtypes, no NaN/Inf where the reference is finite")
    return "; ".join(parts)


# ------------------------------------------------------------------------ verify REF CAND

RUNTIMES = ("ort", "reference")
CALIB_MAX_BATCH = 8
CALIB_MAX_SEQUENCE = 128
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def run_reference(model: onnx.ModelProto | str | os.PathLike, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run with onnx.reference.ReferenceEvaluator (pure numpy, slow, independent of onnxruntime)."""
    from onnx.reference import ReferenceEvaluator

    if not isinstance(model, onnx.ModelProto):
        from .io import load_model

        model = load_model(model, check=False)
    try:
        sess = ReferenceEvaluator(model)
        outs = sess.run(None, feeds)
    except Exception as e:
        msg = re.sub(r"\s+", " ", str(e)).strip()
        raise OnnxHmfError(f"onnx.reference failed: {type(e).__name__}: {msg[:400]}") from None
    return {o.name: np.asarray(v) for o, v in zip(model.graph.output, outs)}


def run_runtime(runtime: str, model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if runtime == "ort":
        return run_onnxruntime(model, feeds)
    if runtime == "reference":
        return run_reference(model, feeds)
    raise OnnxHmfError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")


def calib_inputs(model: onnx.ModelProto, text: str | os.PathLike, tokenizer: str | os.PathLike | None,
                 shapes: dict[str, list[int]] | None = None, seed: int = 0, samples: int | None = None
                 ) -> dict[str, np.ndarray]:
    """Feeds for a text model from the first sentences of ``text`` (titles — fewer than three
    words — and blank lines skipped), tokenized with ``tokenizer``.

    input_ids (padded with 0 to the longest sentence, at most CALIB_MAX_SEQUENCE tokens; batch =
    ``samples`` sentences, default at most CALIB_MAX_BATCH), attention_mask (1 on tokens, 0 on
    padding) and token_type_ids (0). ``shapes["input_ids"] = [B, S]`` fixes the batch and the
    (padded) length. Other inputs are generated as by make_inputs.
    """
    from .calibration import _sentences

    if tokenizer is None:
        raise OnnxHmfError("--calib needs --tokenizer tokenizer.json")
    from .calibration import load_tokenizer

    p = Path(text)
    if not p.is_file():
        raise OnnxHmfError(f"--calib {str(p)!r}: no such file")
    tok = load_tokenizer(tokenizer)
    names = {vi.name: vi for vi in model.graph.input}
    if "input_ids" not in names:
        raise OnnxHmfError(f"--calib needs a model with an input_ids input; inputs are {list(names)}")
    shapes = dict(shapes or {})
    fixed = shapes.get("input_ids")
    if fixed is not None and len(fixed) != 2:
        raise OnnxHmfError("--input-shapes input_ids must be batch,sequence with --calib")
    from .calibration import check_tokenizer_vocab, read_text_file

    check_tokenizer_vocab(tok, model, "input_ids", tokenizer)
    lines = _sentences(read_text_file(p))
    if not lines:
        raise OnnxHmfError(f"--calib {str(p)!r}: no sentence of three words or more")
    if samples is not None and samples < 1:
        raise OnnxHmfError(f"--calib-samples must be ≥ 1, got {samples}")
    batch = fixed[0] if fixed else (samples if samples is not None else min(len(lines), CALIB_MAX_BATCH))
    lines = (lines * (batch // len(lines) + 1))[:batch]
    encs = [e.ids for e in tok.encode_batch(lines)]
    seq = fixed[1] if fixed else min(max(len(e) for e in encs), CALIB_MAX_SEQUENCE)
    ids = np.zeros((batch, seq), np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for i, e in enumerate(encs):
        e = e[:seq]
        ids[i, : len(e)] = e
        mask[i, : len(e)] = 1
    text_feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    for n in _TEXT_INPUTS:
        if n in names:
            shapes[n] = [batch, seq]
    feeds = make_inputs(model, shapes, seed=seed)
    for n in _TEXT_INPUTS:
        if n in feeds:
            feeds[n] = text_feeds[n].astype(feeds[n].dtype)
    return feeds


def save_golden(path: str | os.PathLike, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    """Write inputs and outputs to one .npz (keys "input/NAME" and "output/NAME"), atomically."""
    from .io import write_atomic

    arrays = {f"input/{k}": v for k, v in feeds.items()} | {f"output/{k}": v for k, v in outputs.items()}
    write_atomic(path, lambda f: np.savez(f, **arrays), label="--save-outputs")


def load_golden(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, outputs) saved by save_golden."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise OnnxHmfError(f"--load-outputs {str(p)!r}: no such file") from None
    except Exception as e:
        raise OnnxHmfError(f"--load-outputs {str(p)!r}: not a readable .npz ({e})") from None
    feeds = {k[len("input/"):]: v for k, v in arrays.items() if k.startswith("input/")}
    outs = {k[len("output/"):]: v for k, v in arrays.items() if k.startswith("output/")}
    if not outs:
        raise OnnxHmfError(f"--load-outputs {str(p)!r} holds no outputs (expected keys output/NAME, from --save-outputs)")
    return feeds, outs


def _verify_feeds(sig, inputs, golden_feeds, calib, tokenizer, input_shapes, seed, samples=None) -> dict[str, np.ndarray]:
    """``inputs`` (.npz or dict), else the saved golden inputs, else text, else generated."""
    if isinstance(inputs, (str, os.PathLike)):
        return load_inputs(inputs, sig)
    if inputs is not None:
        return dict(inputs)
    if golden_feeds:
        return golden_feeds
    if calib is not None:
        return calib_inputs(sig, calib, tokenizer, input_shapes, seed=seed, samples=samples)
    return make_inputs(sig, input_shapes, seed=seed)


def _check_verify_options(ref, load_outputs, runtimes, quantile, top_k, min_cosine, min_top1) -> None:
    check_thresholds(min_cosine, min_top1)
    if not 0.0 < quantile < 1.0:
        raise OnnxHmfError(f"--error-quantile must be in (0, 1), got {quantile}")
    if top_k < 1:
        raise OnnxHmfError(f"--top-k must be ≥ 1, got {top_k}")
    for rt in runtimes:
        if rt not in RUNTIMES:
            raise OnnxHmfError(f"unknown runtime {rt!r}; expected one of {', '.join(RUNTIMES)}")
    if ref is None and load_outputs is None:
        raise OnnxHmfError("give a reference model, or --load-outputs")
    if ref is not None and load_outputs is not None:
        raise OnnxHmfError("--load-outputs replaces the reference model: give only the candidate")


def verify_models(
    ref: str | os.PathLike | None,
    cand: str | os.PathLike | None,
    *,
    inputs: str | os.PathLike | dict[str, np.ndarray] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    calib: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    load_outputs: str | os.PathLike | None = None,
    save_outputs: str | os.PathLike | None = None,
    runtimes: tuple[str, ...] = ("ort",),
    atol: dict[str, float] | None = None,
    rtol: dict[str, float] | None = None,
    min_cosine: float | None = None,
    check_error_stat: str | dict[str, str] = "elementwise",
    quantile: float = 0.99,
    top_k: int = 5,
    seed: int = 0,
    min_top1: float | None = None,
    calib_samples: int | None = None,
):
    """Run ``ref`` (onnxruntime; or take its outputs from ``load_outputs``) and ``cand`` (on
    each of ``runtimes``) on the same inputs and compare every output.

    Inputs: ``inputs`` (.npz or dict), else the inputs stored with ``load_outputs``, else text
    (``calib`` + ``tokenizer``), else generated from the signature (``input_shapes``, ``seed``).
    ``save_outputs`` writes the inputs and the reference outputs (with no ``cand``: only that).
    Returns a VerifyReport; ``report.passed`` is False when a tolerance is missed. With no
    criterion given (``atol``, ``rtol``, ``min_cosine``, ``min_top1``) the default is mean cosine
    ≥ DEFAULT_MIN_COSINE and top-1 agreement ≥ DEFAULT_MIN_TOP1 for logits-like outputs; the
    report states the criterion used.
    """
    from .io import load_model
    from .report import VerifyReport

    _check_verify_options(ref, load_outputs, runtimes, quantile, top_k, min_cosine, min_top1)
    if not atol and not rtol and min_cosine is None and min_top1 is None:
        min_cosine, min_top1 = DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1
    report = VerifyReport(reference=str(ref) if ref is not None else f"{load_outputs} (saved outputs)",
                          candidate=None if cand is None else str(cand), runtimes=list(runtimes))
    golden_feeds, golden_outs = load_golden(load_outputs) if load_outputs is not None else ({}, None)
    ref_model = load_model(ref) if ref is not None else None
    cand_model = load_model(cand) if cand is not None else None
    sig = ref_model if ref_model is not None else cand_model
    if sig is None:
        raise OnnxHmfError("nothing to run: give a model")
    feeds = _verify_feeds(sig, inputs, golden_feeds, calib, tokenizer, input_shapes, seed, calib_samples)
    report.inputs = {k: list(v.shape) for k, v in feeds.items()}
    if golden_outs is not None:
        ref_outs = golden_outs
    else:
        ref_outs = run_onnxruntime(ref, feeds)
    if save_outputs is not None:
        save_golden(save_outputs, feeds, ref_outs)
        report.saved = str(save_outputs)
    if cand_model is None:
        return report
    from .graph.index import vocab_sizes

    vocab = set().union(*(vocab_sizes(m) for m in (ref_model, cand_model) if m is not None))
    cand_names = [o.name for o in cand_model.graph.output]
    missing = [n for n in ref_outs if n not in cand_names]
    if missing:
        raise OnnxHmfError(f"candidate lacks output(s) {missing}; its outputs are {cand_names}")
    del ref_model, cand_model, sig  # the runtimes load the files themselves: no second copy of the weights
    for rt in runtimes:
        outs = run_runtime(rt, cand, feeds)
        stats = compare_outputs(ref_outs, outs, vocab, quantile=quantile, top_k=top_k)
        report.results[rt] = stats
        fails = check_outputs(ref_outs, outs, stats, atol=atol, rtol=rtol, min_cosine=min_cosine,
                              check_error_stat=check_error_stat, min_top1=min_top1)
        report.failures += [f"[{rt}] {f}" for f in fails] if len(runtimes) > 1 else fails
    report.passed = not report.failures
    report.settings = {"atol": atol or {}, "rtol": rtol or {}, "min_cosine": min_cosine, "min_top1": min_top1,
                       "check_error_stat": check_error_stat, "quantile": quantile, "top_k": top_k,
                       "criterion": criterion_text(atol, rtol, min_cosine, min_top1, check_error_stat)}
    return report
