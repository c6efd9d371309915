"""Numerical verification with onnxruntime: generate inputs, run both models, compare outputs.

Error statistics per output, with r the reference and c the candidate (float64):
    max_abs = max |r − c|           max_rel = max |r − c| / max(|r|, tiny)
    cosine  = mean over rows (last axis) of ⟨r, c⟩ / (‖r‖·‖c‖)
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
from .graph.index import GraphIndex
from .report import OutputStats

__all__ = [
    "parse_input_shapes",
    "parse_tolerances",
    "make_inputs",
    "load_inputs",
    "run_onnxruntime",
    "compare_outputs",
    "check_outputs",
    "DEFAULT_BATCH",
    "DEFAULT_SEQUENCE",
]

DEFAULT_BATCH = 2  # a symbolic first axis
DEFAULT_SEQUENCE = 64  # any other symbolic axis
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}


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
            if any(d < 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise OnnxHmfError(f"bad --input-shapes {spec!r}: expected name:d0,d1,... with non-negative integers") from None
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


def _gather_vocab(index: GraphIndex, name: str, depth: int = 0) -> int | None:
    """Smallest row count of a constant table that ``name`` indexes through Gather."""
    if depth > 6:
        return None
    best = None
    for node in index.consumers.get(name, []):
        rows = None
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
            ref = index.const(node.input[0])
            if ref is not None and ref.dims:
                rows = ref.dims[0]
        elif node.op_type in _PASS_THROUGH and node.input[0] == name:
            rows = _gather_vocab(index, node.output[0], depth + 1)
        if rows is not None:
            best = rows if best is None else min(best, rows)
    return best


def _dims(vi: onnx.ValueInfoProto, shapes: dict[str, list[int]]) -> list[int]:
    if vi.name in shapes:
        return shapes[vi.name]
    dims = []
    for i, d in enumerate(vi.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(d.dim_value)
        else:
            dims.append(DEFAULT_BATCH if i == 0 else DEFAULT_SEQUENCE)
    return dims


def make_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for every graph input, from its signature.

    Symbolic dims come from ``shapes`` or default to DEFAULT_BATCH (axis 0) and DEFAULT_SEQUENCE.
    Integer inputs: names containing "mask" get ones, "position" gets 0..n-1 on the last axis,
    inputs that index a Gather table get ids below its row count, anything else zeros.
    """
    shapes = dict(shapes or {})
    index = GraphIndex(model)
    init = set(index.initializers)
    names = [vi.name for vi in model.graph.input if vi.name not in init]
    unknown = set(shapes) - set(names)
    if unknown:
        raise OnnxHmfError(f"--input-shapes names unknown input(s) {sorted(unknown)}; inputs are {names}")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise OnnxHmfError(f"input {vi.name!r} is not a tensor; pass --inputs with values for it")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims = _dims(vi, shapes)
        lname = vi.name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = np.ones(dims, dtype=bool)
        elif "mask" in lname:
            feeds[vi.name] = np.ones(dims, dtype=dtype)
        elif "position" in lname and dims:
            feeds[vi.name] = np.broadcast_to(np.arange(dims[-1], dtype=dtype), dims).copy()
        else:
            vocab = _gather_vocab(index, vi.name)
            feeds[vi.name] = (rng.integers(0, vocab, size=dims) if vocab else np.zeros(dims)).astype(dtype)
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


def run_onnxruntime(model: onnx.ModelProto | str | os.PathLike | bytes, feeds: dict[str, np.ndarray], threads: int | None = None,
                    prepack: bool = True) -> dict[str, np.ndarray]:
    """Run on onnxruntime's CPU provider; returns {output name: array}.

    ``prepack=False`` turns off ORT's weight pre-packing, which keeps a second, packed copy of
    every MatMul weight: for a one-off verification run it only costs memory.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        so.intra_op_num_threads = threads
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else (model if isinstance(model, bytes) else str(model))
    try:
        sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))
    except Exception as e:
        msg = re.sub(r"\s+", " ", str(e)).strip()
        raise OnnxHmfError(f"onnxruntime failed: {msg[:400]}") from None


def _is_logits(name: str, arr: np.ndarray, vocab_sizes: set[int]) -> bool:
    return arr.ndim >= 1 and arr.shape[-1] > 1 and ("logit" in name.lower() or arr.shape[-1] in vocab_sizes)


def compare_outputs(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], vocab_sizes: set[int] = frozenset()) -> list[OutputStats]:
    stats = []
    for name, r in ref.items():
        if name not in cand:
            raise OnnxHmfError(f"optimized model lacks output {name!r}")
        c = cand[name]
        if r.shape != c.shape:
            raise OnnxHmfError(f"output {name!r} changed shape: {r.shape} -> {c.shape}")
        if not np.issubdtype(r.dtype, np.floating):
            eq = float(np.mean(r == c)) if r.size else 1.0
            diff = np.abs(r.astype(np.float64) - c.astype(np.float64)) if r.size else np.zeros(1)
            stats.append(OutputStats(name, r.shape, float(diff.max()), 0.0, None, None, exact_match=eq))
            continue
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
        d = np.abs(r64 - c64)
        tiny = np.finfo(np.float64).tiny
        max_abs = float(d.max()) if d.size else 0.0
        max_rel = float((d / np.maximum(np.abs(r64), tiny)).max()) if d.size else 0.0
        rows_r = r64.reshape(-1, r64.shape[-1]) if r64.ndim else r64.reshape(1, 1)
        rows_c = c64.reshape(rows_r.shape)
        nr, nc = np.linalg.norm(rows_r, axis=1), np.linalg.norm(rows_c, axis=1)
        both = (nr > 0) & (nc > 0)
        cos = np.where(both, np.sum(rows_r * rows_c, axis=1) / np.where(both, nr * nc, 1.0), (nr == nc).astype(float))
        noise = float(np.sum(d**2))
        signal = float(np.sum(r64**2))
        snr = float("inf") if noise == 0 else (10 * np.log10(signal / noise) if signal > 0 else float("-inf"))
        top1 = None
        if _is_logits(name, r, vocab_sizes):
            top1 = float(np.mean(np.argmax(r64, -1) == np.argmax(c64, -1)))
        stats.append(OutputStats(name, r.shape, max_abs, max_rel, float(np.mean(cos)), snr, top1=top1))
    return stats


def check_outputs(
    ref: dict[str, np.ndarray],
    cand: dict[str, np.ndarray],
    stats: list[OutputStats],
    *,
    atol: dict[str, float] | None = None,
    rtol: dict[str, float] | None = None,
    min_cosine: float | None = None,
) -> list[str]:
    """Failures, one string per broken tolerance (empty when everything passes)."""
    atol, rtol = atol or {}, rtol or {}
    for opt, tol in (("--atol", atol), ("--rtol", rtol)):
        unknown = set(tol) - {""} - set(ref)
        if unknown:
            raise OnnxHmfError(f"{opt} names unknown output(s) {sorted(unknown)}; outputs are {list(ref)}")
    failures = []
    for s in stats:
        a = atol.get(s.name, atol.get(""))
        r = rtol.get(s.name, rtol.get(""))
        if a is not None or r is not None:
            x, y = ref[s.name].astype(np.float64), cand[s.name].astype(np.float64)
            excess = np.abs(x - y) - ((a or 0.0) + (r or 0.0) * np.abs(x))
            bad = int(np.count_nonzero(excess > 0))
            if bad:
                failures.append(f"{s.name}: {bad}/{x.size} elements outside atol={a or 0} rtol={r or 0} (max abs {s.max_abs:.3g})")
        if min_cosine is not None and s.mean_cosine is not None and s.mean_cosine < min_cosine:
            failures.append(f"{s.name}: mean cosine {s.mean_cosine:.5f} < --min-cosine {min_cosine}")
    return failures
