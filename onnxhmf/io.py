"""Loading models defensively and saving them atomically.

Loading checks everything that would otherwise fail late or obscurely: a missing or empty file,
bytes that are not an ONNX model, external data that is missing, short, or outside the model's
folder. Saving writes a temp file beside the target and renames it, so a failure or Ctrl-C
never leaves a partial output, and the input file is never opened for writing.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import OnnxHmfError
from .external import TensorStore, needs_external_data, write_model

__all__ = ["load_model", "save_model", "max_ir_version_for_onnxruntime", "model_file_bytes", "OutputStage",
           "external_data_paths", "check_model_path", "write_text_atomic"]

MIN_OPSET = 7  # Gemm/MatMul broadcasting semantics the rewrites rely on


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
    newest = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and not MIN_OPSET <= op.version <= newest:
            raise OnnxHmfError(f"{str(p)!r}: unsupported opset ai.onnx {op.version} (supported: {MIN_OPSET} to {newest})")
    _check_external_data(model, p.parent)
    return model


def load_model(path: str | os.PathLike, *, check: bool = True, lazy: bool = False) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise OnnxHmfError with one clear line.

    ``lazy``: leave external tensors as references (read them with :class:`TensorStore`).
    """
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
        check_model_path(p, what=repr(str(p)) + ": model")
        model = _parse(p)
    if lazy:
        return model
    try:
        external_data_helper.load_external_data_for_model(model, str(p.parent))
    except Exception as e:  # pragma: no cover - _check_external_data catches the usual cases
        raise OnnxHmfError(f"{str(p)!r}: cannot load external data: {e}") from None
    return model


def check_model_path(p: str | os.PathLike, *, what: str = "model", full: bool = False) -> None:
    """onnx.checker by path: works for models over 2 GB (external data is not loaded)."""
    try:
        onnx.checker.check_model(str(p), full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxHmfError(f"{what} fails onnx.checker: {first}") from None


def external_data_paths(path: str | os.PathLike) -> list[Path]:
    """The external-data files a model file references (resolved), if it parses at all."""
    p = Path(path)
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except Exception:
        return []
    locs = {external_data_helper.ExternalDataInfo(t).location for t in _external_tensors(model)}
    return [(p.parent / loc).resolve() for loc in sorted(locs)]


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


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_data_location(location: str) -> str:
    """A data-file name for --save-external-data: a plain file name (it sits next to the output)."""
    loc = Path(location)
    if not location or loc.is_absolute() or len(loc.parts) != 1 or location in (".", ".."):
        raise OnnxHmfError(f"--save-external-data {location!r}: give a file name, not a path (the data file sits next to the output)")
    return location


def check_output_path(out: str | os.PathLike, *, force: bool = False, inputs: tuple = (), data_location: str | None = None) -> None:
    """Raise OnnxHmfError if ``out`` cannot or must not be written (checked before any work).

    ``data_location``: the output's external-data file name, which must be neither an input
    model nor a data file an input references.
    """
    out = Path(out)
    for src in map(Path, inputs):
        if _same(src, out):
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
    if data_location is not None:
        data = parent / check_data_location(data_location)
        if _same(data, out):
            raise OnnxHmfError(f"external data file {str(data)!r} would be the output model itself")
        for src in map(Path, inputs):
            if _same(src, data):
                raise OnnxHmfError(f"external data file {str(data)!r} is the input model; refusing to overwrite it")
            for used in external_data_paths(src):
                if _same(used, data):
                    raise OnnxHmfError(
                        f"external data file {str(data)!r} is the input's data file; refusing to overwrite it "
                        "(choose another name with --save-external-data NAME)"
                    )
        if data.is_dir():
            raise OnnxHmfError(f"external data file {str(data)!r} is a directory")


class OutputStage:
    """A hidden temp folder beside the output, where the model (and data file) are written and
    checked before being renamed into place. Removed on exit, whatever happened.
    """

    def __init__(self, out: str | os.PathLike, *, force: bool = False, inputs: tuple = (), data_location: str | None = None):
        self.out = Path(out)
        if data_location is None and any(external_data_paths(src) for src in inputs if Path(src).is_file()):
            # the output will get external data too: vet the default name before any work
            check_output_path(self.out, force=force, inputs=inputs, data_location=f"{self.out.name}.data")
        check_output_path(self.out, force=force, inputs=inputs, data_location=data_location)
        self.inputs = tuple(map(Path, inputs))
        self.force = force
        self.data_location = data_location
        parent = self.out.parent if str(self.out.parent) else Path(".")
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".onnxhmf-tmp", dir=parent))
        except OSError as e:
            raise OnnxHmfError(f"cannot write to {str(parent)!r}: {e.strerror or e}") from None
        self.model_path = self.dir / self.out.name
        self.written: list[str] = []

    def __enter__(self) -> "OutputStage":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def write(self, model: onnx.ModelProto, store: TensorStore | None = None, *, external: bool | None = None,
              threshold: int = 1024, limit: int | None = None) -> int:
        """Write the staged files; ``external`` None = only if the model would pass the 2 GB limit."""
        if external is None:
            external = needs_external_data(model, **({} if limit is None else {"limit": limit}))
        location = None
        if external:
            location = self.data_location or f"{self.out.name}.data"
            check_output_path(self.out, force=self.force, inputs=self.inputs, data_location=location)
        self.data_location = location
        try:
            n = write_model(model, self.model_path, store, location=location, threshold=threshold)
        except OSError as e:
            raise OnnxHmfError(f"cannot write {str(self.out)!r}: {e.strerror or e}") from None
        self.written = [self.out.name] + ([location] if location else [])
        umask = os.umask(0)
        os.umask(umask)
        for name in self.written:
            os.chmod(self.dir / name, 0o666 & ~umask)
        return n

    def commit(self) -> None:
        """Rename the data file, then the model, into place (each rename is atomic)."""
        parent = self.out.parent
        done = []
        try:
            for name in reversed(self.written):
                os.replace(self.dir / name, parent / name)
                done.append(parent / name)
        except OSError as e:
            for p in done:
                p.unlink(missing_ok=True)
            raise OnnxHmfError(f"cannot write {str(self.out)!r}: {e.strerror or e}") from None


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False, inputs: tuple = (),
    store: TensorStore | None = None, external: bool | None = None, location: str | None = None, threshold: int = 1024,
) -> int:
    """Write ``model`` to ``path`` atomically (temp folder beside it, fsync, rename).

    ``external``: save weights to a data file (``location``, default ``<name>.data``) beside the
    model; None = only when the model would pass protobuf's 2 GB limit. Returns the bytes
    written. ``inputs`` are paths (and, through them, data files) that must never be overwritten.
    """
    with OutputStage(path, force=force, inputs=inputs, data_location=location) as stage:
        n = stage.write(model, store, external=external, threshold=threshold)
        stage.commit()
    return n


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file beside it and a rename (no partial file)."""
    p = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    except OSError as e:
        raise OnnxHmfError(f"cannot write {str(p)!r}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OnnxHmfError(f"cannot write {str(p)!r}: {e.strerror or e}") from None
        raise
