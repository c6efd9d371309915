"""Calibration data: batches of model feeds from an .npz, a folder of .npz files, or text.

* ``.npz``: arrays keyed by graph input name, batch on axis 0 (one file may hold many rows).
* a folder: every ``*.npz`` in it, in name order.
* text (any other file) with ``tokenizer`` (a Hugging Face tokenizer.json, read with the
  ``tokenizers`` library). Models with an attention-mask input get one sentence per sample,
  padded to the longest in its batch (the mask marks the padding, which calibration then
  skips); models without one get consecutive windows of ``seq_len`` tokens of the running text.

Batches are read lazily and the first ``samples`` rows are kept (feeds are small next to
the activations they produce).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from .errors import OnnxHmfError
from .graph.index import GraphIndex, gather_rows

__all__ = ["Calibration", "load_calibration", "load_tokenizer", "input_roles"]

_ONNX_TO_NP = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}


@dataclass
class Calibration:
    """Batches of feeds; ``mask`` names the input whose zeros mark padding (or None).

    ``group``: consecutive batches that belong together (2 for a KV-cache decoder: a first step
    with an empty past, then the cached step fed its presents); split() keeps groups whole.
    """

    batches: list[dict[str, np.ndarray]]
    mask: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    group: int = 1

    @property
    def samples(self) -> int:
        return sum(next(iter(b.values())).shape[0] for b in self.batches) if self.batches else 0

    @property
    def tokens(self) -> int:
        if self.mask:
            return int(sum(int(np.sum(b[self.mask] != 0)) for b in self.batches))
        return int(sum(int(np.prod(next(iter(b.values())).shape[:2])) for b in self.batches))

    def split(self, holdout: float) -> tuple["Calibration", "Calibration"]:
        """(fit, held-out): the last ``holdout`` fraction of batches (at least one) held out."""
        g = max(1, self.group)
        if len(self.batches) < 2 * g:
            raise OnnxHmfError(f"calibration data has {len(self.batches)} batch(es); need at least {2 * g} to hold some out "
                               "(give more samples or a smaller batch)")
        n = len(self.batches) // g
        k = g * min(n - 1, max(1, int(round(n * holdout))))
        return (Calibration(self.batches[:-k], self.mask, self.source, group=g),
                Calibration(self.batches[-k:], self.mask, self.source, group=g))


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face tokenizer.json (the ``tokenizers`` library), padding and truncation off;
    one clear error when the package or the file is not usable."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OnnxHmfError("reading text needs the `tokenizers` package: pip install tokenizers") from None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises its own exception types
        raise OnnxHmfError(f"--tokenizer {str(path)!r}: cannot load as a tokenizer.json ({str(e)[:120]})") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def input_roles(model: onnx.ModelProto) -> dict[str, str]:
    """Graph inputs (not initializers) by role: ids, mask, type, position, or other."""
    init = {t.name for t in model.graph.initializer}
    roles = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        low = vi.name.lower()
        if "mask" in low:
            roles[vi.name] = "mask"
        elif "token_type" in low or "segment" in low:
            roles[vi.name] = "type"
        elif "position" in low:
            roles[vi.name] = "position"
        elif "ids" in low or "input" in low or "token" in low:
            roles[vi.name] = "ids"
        else:
            roles[vi.name] = "other"
    return roles


def _dtype(model: onnx.ModelProto, name: str):
    for vi in model.graph.input:
        if vi.name == name:
            t = vi.type.tensor_type.elem_type
            if t in _ONNX_TO_NP:
                return _ONNX_TO_NP[t]
            return onnx.helper.tensor_dtype_to_np_dtype(t)
    raise KeyError(name)


def _npz_rows(path: Path, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise OnnxHmfError(f"--calib {str(path)!r}: not a readable .npz ({e})") from None
    with data:
        missing = [n for n in names if n not in data.files]
        if missing:
            raise OnnxHmfError(f"--calib {str(path)!r} lacks input(s) {missing}; it has {sorted(data.files)}")
        try:
            arrays = {n: data[n] for n in names}
        except ValueError as e:  # object arrays: numpy refuses to unpickle them (as it should)
            raise OnnxHmfError(f"--calib {str(path)!r}: holds pickled (object) arrays, which are not loaded for safety "
                               f"({str(e).splitlines()[0][:80]}); save plain numeric arrays with numpy.savez") from None
        except Exception as e:
            raise OnnxHmfError(f"--calib {str(path)!r}: not a readable .npz ({str(e).splitlines()[0][:120]})") from None
    rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    if len(rows) != 1 or 0 in rows:
        raise OnnxHmfError(f"--calib {str(path)!r}: inputs need the same non-empty batch axis, got "
                           f"{ {n: a.shape for n, a in arrays.items()} }")
    yield arrays


def _sentences(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        for s in re.split(r"(?<=[.!?;:])\s+", para):
            if len(s.split()) >= 3:
                out.append(s)
    return out


def _text_feeds(path: Path, model: onnx.ModelProto, tokenizer, samples: int, seq_len: int,
                batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    if tokenizer is None:
        raise OnnxHmfError("--calib with a text file needs --tokenizer tokenizer.json (or give an .npz of feeds)")
    tok = load_tokenizer(tokenizer)
    roles = input_roles(model)
    ids_names = [n for n, r in roles.items() if r == "ids"]
    other = [n for n, r in roles.items() if r == "other"]
    if len(ids_names) != 1 or other:
        raise OnnxHmfError(f"cannot feed text to inputs {sorted(roles)}: expected one token-id input plus optional "
                           "attention mask / token types / positions; give an .npz of feeds instead")
    text = read_text_file(path)
    check_tokenizer_vocab(tok, model, ids_names[0], tokenizer)
    mask = next((n for n, r in roles.items() if r == "mask"), None)
    pad = tok.token_to_id("[PAD]") or 0

    def feeds(ids: np.ndarray, m: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for name, role in roles.items():
            if role == "ids":
                v = ids
            elif role == "mask":
                v = m
            elif role == "type":
                v = np.zeros_like(ids)
            else:  # position
                v = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
            out[name] = v.astype(_dtype(model, name))
        return out

    if mask is not None:
        sents = _sentences(text)
        done = 0
        for i in range(0, len(sents), batch_size):
            if done >= samples:
                return
            chunk = sents[i : min(i + batch_size, i + samples - done)]
            enc = [e.ids[:seq_len] for e in tok.encode_batch(chunk)]
            L = max(len(e) for e in enc)
            ids = np.full((len(enc), L), pad, np.int64)
            m = np.zeros((len(enc), L), np.int64)
            for j, e in enumerate(enc):
                ids[j, : len(e)] = e
                m[j, : len(e)] = 1
            done += len(enc)
            yield feeds(ids, m)
    else:
        flat = np.concatenate([np.asarray(e.ids, np.int64) for e in tok.encode_batch(_sentences(text) or [text])])
        n = min(samples, flat.size // seq_len)
        windows = flat[: n * seq_len].reshape(n, seq_len)
        for i in range(0, n, batch_size):
            yield feeds(windows[i : i + batch_size], np.ones_like(windows[i : i + batch_size]))


def read_text_file(path: Path) -> str:
    """The file as text, refusing binary data (NUL bytes, or mostly undecodable)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise OnnxHmfError(f"--calib {str(path)!r}: {e.strerror or e}") from None
    head = raw[: 1 << 16]
    text = raw.decode("utf-8", errors="replace")
    bad = text[: 1 << 16].count("\ufffd")
    if b"\0" in head or bad > 0.05 * max(1, len(head)):
        raise OnnxHmfError(f"--calib {str(path)!r}: binary data, not text (give a UTF-8 text file, or an .npz of feeds)")
    return text


def check_tokenizer_vocab(tok, model: onnx.ModelProto, ids_name: str, tokenizer) -> None:
    """A tokenizer whose ids pass the model's embedding table belongs to another model."""
    rows = gather_rows(GraphIndex(model), ids_name)
    size = tok.get_vocab_size(with_added_tokens=True)
    if rows is not None and size > rows:
        raise OnnxHmfError(f"--tokenizer {str(tokenizer)!r} has {size} tokens but the model's embedding table has {rows} "
                           f"rows: ids past {rows - 1} would index nothing (is it this model's tokenizer?)")


def check_batch(model: onnx.ModelProto, batch: dict[str, np.ndarray], source: str, limits: dict[str, int]) -> None:
    """Refuse a calibration batch that onnxruntime would reject (or that would poison the
    statistics), naming the input: rank or fixed dims unlike the model's, a symbolic dim with two
    sizes (ids and mask of different lengths), ids outside the table they index, NaN/Inf."""
    sizes: dict[str, tuple[str, int]] = {}
    for vi in model.graph.input:
        if vi.name not in batch:
            continue
        a = batch[vi.name]
        shape = vi.type.tensor_type.shape
        if vi.type.tensor_type.HasField("shape"):
            want = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]
            if a.ndim != len(want):
                raise OnnxHmfError(f"--calib {source!r}: input {vi.name!r} has shape {list(a.shape)}, the model wants "
                                   f"rank {len(want)} ({want})")
            for axis, (got, w) in enumerate(zip(a.shape, want)):
                if isinstance(w, int) and w > 0 and got != w:
                    raise OnnxHmfError(f"--calib {source!r}: input {vi.name!r} has {got} on axis {axis}, the model wants "
                                       f"{w} (shape {want})")
                if isinstance(w, str):
                    other = sizes.setdefault(w, (vi.name, got))
                    if other[1] != got:
                        raise OnnxHmfError(f"--calib {source!r}: inputs {other[0]!r} and {vi.name!r} disagree on "
                                           f"{w!r} ({other[1]} vs {got}); give them the same shape")
        if np.issubdtype(a.dtype, np.floating) and a.size and not np.isfinite(a).all():
            raise OnnxHmfError(f"--calib {source!r}: input {vi.name!r} has NaN or Inf values")
        rows = limits.get(vi.name)
        if rows is not None and a.size and (a.min() < -rows or a.max() >= rows):
            raise OnnxHmfError(f"--calib {source!r}: input {vi.name!r} has ids from {a.min()} to {a.max()}, but the table it "
                               f"indexes has {rows} rows (a tokenizer or data for another model?)")


def _index_limits(model: onnx.ModelProto) -> dict[str, int]:
    """{integer input: rows of the table it indexes through Gather}."""
    index = GraphIndex(model)
    out = {}
    for vi in model.graph.input:
        if vi.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            rows = gather_rows(index, vi.name)
            if rows is not None:
                out[vi.name] = rows
    return out


def load_calibration(path: str | os.PathLike, model: onnx.ModelProto, *, tokenizer: str | os.PathLike | None = None,
                     samples: int = 256, seq_len: int = 128, batch_size: int = 16) -> Calibration:
    """Read up to ``samples`` rows of feeds for ``model`` (see the module docstring)."""
    p = Path(path)
    roles = input_roles(model)
    names = list(roles)
    mask = next((n for n, r in roles.items() if r == "mask"), None)
    if samples < 1:
        raise OnnxHmfError("--calib-samples must be ≥ 1")
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise OnnxHmfError(f"--calib {str(p)!r}: folder has no .npz files")
        source = (row for f in files for row in _npz_rows(f, names))
    elif p.is_file() and p.suffix == ".npz":
        source = _npz_rows(p, names)
    elif p.is_file():
        source = _text_feeds(p, model, tokenizer, samples, seq_len, batch_size)
    else:
        raise OnnxHmfError(f"--calib {str(p)!r}: no such file or folder")
    batches, total = [], 0
    limits = _index_limits(model)
    for arrays in source:
        rows = next(iter(arrays.values())).shape[0]
        for i in range(0, rows, batch_size):
            if total >= samples:
                break
            take = min(batch_size, samples - total)
            batch = {}
            for n, a in arrays.items():
                want = _dtype(model, n)
                b = a[i : i + take]
                if b.dtype != want:
                    if np.issubdtype(want, np.integer) != np.issubdtype(b.dtype, np.integer):
                        raise OnnxHmfError(f"--calib {str(p)!r}: input {n!r} is {b.dtype}, the model wants {np.dtype(want)}")
                    b = b.astype(want)
                batch[n] = b
            check_batch(model, batch, str(p), limits)
            batches.append(batch)
            total += batch[names[0]].shape[0]
        if total >= samples:
            break
    if not batches:
        raise OnnxHmfError(f"--calib {str(p)!r}: no samples")
    return Calibration(batches, mask, str(p))
