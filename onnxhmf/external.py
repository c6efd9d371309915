"""External data: read weights lazily, spill new weights to disk, write the output's data file.

A model loaded with ``load_external_data=False`` keeps each big tensor as a reference
(location, offset, length) into a data file next to the model. :class:`TensorStore` resolves
those references: :meth:`TensorStore.array` returns a read-only ``numpy.memmap`` of just that
tensor, so only the weight being factorized is paged in. New factors above a threshold are
appended to a *spill* file (a temp file in the output's staging folder) and kept in the proto
as external references too, so the proto itself stays small whatever the model's size.

:func:`write_model` writes the final model: either one self-contained file (every reference
read back into the proto; only under the 2 GB protobuf limit) or the model plus one data file
whose tensors start at aligned offsets (64 KiB for big tensors, so onnxruntime can memory-map
them). Bytes are copied between files in chunks, never materialised all at once.
"""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from .errors import OnnxHmfError

__all__ = ["TensorStore", "PROTO_LIMIT", "needs_external_data", "write_model", "external_tensors", "inline_external"]

PROTO_LIMIT = 2**31 - 1  # protobuf refuses to serialize a message of 2 GB or more
_CHUNK = 16 << 20
_BIG_ALIGN = 1 << 16  # tensors of 1 MiB and more start at a 64 KiB boundary (mmap granularity)
_SMALL_ALIGN = 64
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor (initializers, Constant attributes, subgraphs) that references external data."""
    return [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]


def _ext(t: onnx.TensorProto) -> tuple[str, int, int | None]:
    info = external_data_helper.ExternalDataInfo(t)
    length = None if info.length is None else int(info.length)
    return info.location, int(info.offset or 0), length


def _nbytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _set_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for f in _DATA_FIELDS:
        t.ClearField(f)
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


class TensorStore:
    """Resolves external-data references of one model; optionally spills new tensors to disk.

    ``base_dir``: the folder external locations are relative to (the input model's folder;
    locations were vetted by :func:`onnxhmf.io.load_model`). ``spill_dir``: where new tensors of
    ``spill_threshold`` bytes or more go (None: keep them in the proto).
    """

    def __init__(self, base_dir: str | os.PathLike | None, spill_dir: str | os.PathLike | None = None,
                 spill_threshold: int = 1 << 16):
        self.base_dir = None if base_dir is None else Path(base_dir)
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.spill_threshold = spill_threshold
        self.spill_location = f".onnxhmf-spill-{secrets.token_hex(6)}.bin"
        self._spill = None
        self._spill_size = 0
        self.memmaps = 0  # arrays served as memmaps (for tests and the report)

    # -- reading ----------------------------------------------------------------------------
    def path(self, location: str) -> Path:
        if location == self.spill_location and self.spill_dir is not None:
            return self.spill_dir / location
        if self.base_dir is None:
            raise OnnxHmfError(f"external data {location!r} referenced, but the model was not loaded from a file")
        return self.base_dir / location

    def array(self, t: onnx.TensorProto) -> np.ndarray:
        """The tensor's value: a read-only memmap for external data, else decoded from the proto."""
        if not external_data_helper.uses_external_data(t):
            return numpy_helper.to_array(t)
        location, offset, length = _ext(t)
        dims = tuple(int(d) for d in t.dims)
        need = _nbytes(t)
        if length is not None and length < need:
            raise OnnxHmfError(f"tensor {t.name!r}: external data length {length} < {need} bytes for shape {dims}")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        path = self.path(location)
        if self._spill is not None and location == self.spill_location:
            self._spill.flush()
        if need == 0 or dtype.kind not in "fiub" or t.data_type == onnx.TensorProto.BFLOAT16:
            # odd types (bf16, 4-bit, strings...): decode a copy through onnx
            copy = onnx.TensorProto()
            copy.CopyFrom(t)
            del copy.external_data[:]
            copy.data_location = onnx.TensorProto.DEFAULT
            copy.raw_data = self.read_bytes(t)
            return numpy_helper.to_array(copy)
        self.memmaps += 1
        return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=offset, shape=dims)

    def read_bytes(self, t: onnx.TensorProto) -> bytes:
        location, offset, length = _ext(t)
        length = _nbytes(t) if length is None else length
        if self._spill is not None and location == self.spill_location:
            self._spill.flush()
        with open(self.path(location), "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise OnnxHmfError(f"tensor {t.name!r}: external data file {location!r} is too short")
        return data

    def copy_to(self, t: onnx.TensorProto, dst) -> int:
        """Append the tensor's external bytes to the unbuffered file ``dst``; bytes copied.

        The kernel copies them (copy_file_range) where it can, so no buffer passes through
        this process; otherwise they are copied in chunks.
        """
        location, offset, length = _ext(t)
        length = _nbytes(t) if length is None else length
        if self._spill is not None and location == self.spill_location:
            self._spill.flush()
        with open(self.path(location), "rb") as f:
            left = length
            if hasattr(os, "copy_file_range"):
                try:
                    while left:
                        n = os.copy_file_range(f.fileno(), dst.fileno(), left, offset + length - left)
                        if n == 0:
                            raise OnnxHmfError(f"tensor {t.name!r}: external data file {location!r} is too short")
                        left -= n
                    return length
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                        raise
            f.seek(offset + length - left)
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise OnnxHmfError(f"tensor {t.name!r}: external data file {location!r} is too short")
                _write_all(dst, chunk)
                left -= len(chunk)
        return length

    # -- spilling ---------------------------------------------------------------------------
    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        """A TensorProto for ``array``: external in the spill file when big enough, else inline."""
        array = np.asarray(array)
        if self.spill_dir is None or array.nbytes < self.spill_threshold or array.dtype.kind not in "fiub":
            return numpy_helper.from_array(np.ascontiguousarray(array).reshape(np.shape(array)), name)  # (0-d stays 0-d)
        if self._spill is None:
            self._spill = open(self.spill_dir / self.spill_location, "wb")
        pad = -self._spill_size % _BIG_ALIGN
        self._spill.write(b"\0" * pad)
        offset = self._spill_size + pad
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        self._spill.write(memoryview(data).cast("B"))
        self._spill_size = offset + data.nbytes
        t = onnx.TensorProto()
        t.name = name
        t.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        _set_external(t, self.spill_location, offset, data.nbytes)
        return t

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None


def _write_all(f, data) -> None:
    """Write every byte to the unbuffered file ``f`` (a raw write may be short)."""
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        view = view[n:]


def external_bytes(model: onnx.ModelProto) -> int:
    return sum(_ext(t)[2] if _ext(t)[2] is not None else _nbytes(t) for t in external_tensors(model))


def needs_external_data(model: onnx.ModelProto, limit: int = PROTO_LIMIT) -> bool:
    """Whether the model, with every external tensor inlined, would reach protobuf's 2 GB limit."""
    return model.ByteSize() + external_bytes(model) >= limit


def _inline_bytes(t: onnx.TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    if t.data_type == onnx.TensorProto.STRING:
        return 0
    return _nbytes(t)


def write_model(model: onnx.ModelProto, path: str | os.PathLike, store: TensorStore | None = None, *,
                location: str | None = None, threshold: int = 1024) -> int:
    """Write ``model`` to ``path`` (and, if ``location`` is given, a data file beside it).

    The proto is edited in place: with ``location``, every external tensor and every inline
    tensor of ``threshold`` bytes or more becomes a reference into ``location``; without it,
    every external tensor is read back into the proto. Returns the bytes written in all.
    """
    path = Path(path)
    tensors = list(external_data_helper._get_all_tensors(model))
    total = 0
    if location is None:
        if external_tensors(model) and store is None:
            raise OnnxHmfError("the model references external data that cannot be resolved")
        if store is not None:
            inline_external(model, store)
        if model.ByteSize() >= PROTO_LIMIT:
            raise OnnxHmfError("model is over 2 GB; it must be saved with external data")
    else:
        with open(path.parent / location, "wb", buffering=0) as f:
            size = 0
            for t in tensors:
                ext = external_data_helper.uses_external_data(t)
                if not ext and (t.data_type == onnx.TensorProto.STRING or _inline_bytes(t) < threshold):
                    continue
                n = _nbytes(t) if ext else _inline_bytes(t)
                pad = -size % (_BIG_ALIGN if n >= (1 << 20) else _SMALL_ALIGN)
                _write_all(f, b"\0" * pad)
                size += pad
                if ext:
                    if store is None:
                        raise OnnxHmfError(f"tensor {t.name!r} references external data that cannot be resolved")
                    n = store.copy_to(t, f)
                else:
                    raw = t.raw_data if t.HasField("raw_data") else numpy_helper.from_array(numpy_helper.to_array(t)).raw_data
                    _write_all(f, raw)
                    n = len(raw)
                _set_external(t, location, size, n)
                size += n
            os.fsync(f.fileno())
        total += size
    data = model.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return total + len(data)


def inline_external(model: onnx.ModelProto, store: TensorStore) -> None:
    """Read every external tensor back into the proto (raises past the 2 GB limit)."""
    if needs_external_data(model):
        raise OnnxHmfError("model is over 2 GB; use optimize_file (or the CLI), which saves it with external data")
    for t in external_tensors(model):
        raw = store.read_bytes(t)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = raw
