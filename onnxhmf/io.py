"""Loading models defensively and saving them atomically.

Loading checks everything that would otherwise fail late or obscurely: a missing or empty file,
bytes that are not an ONNX model, external data that is missing, short, or outside the model's
folder. Saving writes a temp file beside the target and renames it, so a failure or Ctrl-C
never leaves a partial output, and the input file is never opened for writing.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import OnnxHmfError

__all__ = ["load_model", "save_model", "max_ir_version_for_onnxruntime", "model_file_bytes"]

_TWO_GB = 2**31


def _external_tensors(model: onnx.ModelProto):
    return [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]


def _check_external_data(model: onnx.ModelProto, base: Path) -> None:
    base_real = base.resolve()
    for t in _external_tensors(model):
        info = external_data_helper.ExternalDataInfo(t)
        loc = Path(info.location)
        if loc.is_absolute() or ".." in loc.parts:
            raise OnnxHmfError(
                f"tensor {t.name!r} points to external data {info.location!r} outside the model's folder; refusing to read it"
            )
        path = (base_real / loc).resolve()
        if base_real not in path.parents and path != base_real:
            raise OnnxHmfError(f"tensor {t.name!r}: external data {info.location!r} escapes the model's folder")
        if not path.is_file():
            raise OnnxHmfError(f"tensor {t.name!r}: external data file {str(path)!r} is missing")
        size = path.stat().st_size
        offset = int(info.offset or 0)
        length = info.length
        if length is None:
            elem = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            n = 1
            for d in t.dims:
                n *= d
            length = n * elem
        if offset + int(length) > size:
            raise OnnxHmfError(
                f"tensor {t.name!r}: external data file {loc.name!r} is too short "
                f"({size} bytes, needs {offset + int(length)})"
            )


def _parse(p: Path) -> onnx.ModelProto:
    """Parse the model (external data not loaded) and vet its header and external-data refs."""
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise OnnxHmfError(f"{str(p)!r}: not a valid ONNX model (protobuf parse failed: {e})") from None
    except OSError as e:
        raise OnnxHmfError(f"{str(p)!r}: cannot read: {e.strerror or e}") from None
    if not model.HasField("graph") or not model.opset_import or model.ir_version == 0:
        raise OnnxHmfError(f"{str(p)!r}: not an ONNX model (no graph, opset or IR version)")
    _check_external_data(model, p.parent)
    return model


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise OnnxHmfError with one clear line."""
    p = Path(path)
    if not p.exists():
        raise OnnxHmfError(f"{str(p)!r}: no such file")
    if not p.is_file():
        raise OnnxHmfError(f"{str(p)!r}: not a regular file")
    if p.stat().st_size == 0:
        raise OnnxHmfError(f"{str(p)!r}: empty file, not an ONNX model")
    model = _parse(p)
    if check:
        # The C++ checker reads the file itself; drop our proto first so the copies never coexist.
        del model
        try:
            onnx.checker.check_model(str(p))
        except onnx.checker.ValidationError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OnnxHmfError(f"{str(p)!r}: model fails onnx.checker: {first}") from None
        model = _parse(p)
    try:
        external_data_helper.load_external_data_for_model(model, str(p.parent))
    except Exception as e:  # pragma: no cover - _check_external_data catches the usual cases
        raise OnnxHmfError(f"{str(p)!r}: cannot load external data: {e}") from None
    return model


def model_file_bytes(path: str | os.PathLike) -> int:
    """Size of a model file plus every external-data file it references."""
    p = Path(path)
    total = p.stat().st_size
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except Exception:
        return total
    seen = set()
    for t in _external_tensors(model):
        loc = external_data_helper.ExternalDataInfo(t).location
        f = p.parent / loc
        if loc not in seen and f.is_file():
            seen.add(loc)
            total += f.stat().st_size
    return total


@functools.lru_cache(maxsize=1)
def max_ir_version_for_onnxruntime() -> int:
    """Highest IR version the installed onnxruntime accepts (probed with a one-node model)."""
    import onnxruntime as ort

    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Identity", ["x"], ["y"])],
        "probe",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    for ir in range(onnx.IR_VERSION, 6, -1):
        m = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=ir)
        try:
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir
        except Exception:
            continue
    return 7


def check_output_path(out: str | os.PathLike, *, force: bool = False, inputs: tuple = ()) -> None:
    """Raise OnnxHmfError if ``out`` cannot or must not be written (checked before any work)."""
    out = Path(out)
    for src in map(Path, inputs):
        if src.exists() and out.exists() and os.path.samefile(src, out):
            raise OnnxHmfError(f"output {str(out)!r} is the input model; refusing to overwrite the input")
        if src.resolve() == out.resolve():
            raise OnnxHmfError(f"output {str(out)!r} is the input model; refusing to overwrite the input")
    if out.is_dir():
        raise OnnxHmfError(f"output {str(out)!r} is a directory")
    if out.exists() and not force:
        raise OnnxHmfError(f"output {str(out)!r} exists; pass --force to overwrite it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxHmfError(f"output folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OnnxHmfError(f"output folder {str(parent)!r} is not writable")


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False, inputs: tuple = ()
) -> int:
    """Write ``model`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    Returns the number of bytes written. ``inputs`` are paths that must never be overwritten.
    """
    out = Path(path)
    check_output_path(out, force=force, inputs=inputs)
    if model.ByteSize() >= _TWO_GB:
        raise OnnxHmfError("model is over 2 GB; saving with external data is not supported yet")
    data = model.SerializeToString()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    except OSError as e:
        raise OnnxHmfError(f"cannot write to {str(out.parent)!r}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except OSError as e:
        raise OnnxHmfError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(data)
