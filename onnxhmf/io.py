"""Loading models defensively and saving them atomically.

Loading checks everything that would otherwise fail late or obscurely: a missing or empty file,
bytes that are not an ONNX model, external data that is missing, short, or outside the model's
folder. Saving writes a temp file beside the target and renames it, so a failure or Ctrl-C
never leaves a partial output, and the input file is never opened for writing.
"""
from __future__ import annotations

import errno
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
           "external_data_paths", "check_model_path", "check_paths", "write_text_atomic",
           "write_atomic", "place_file", "signals_as_errors", "Interrupted", "remove_stale_stages"]

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


def check_data_location(location: str) -> str:
    """A data-file name for --save-external-data: a plain file name (it sits next to the output)."""
    loc = Path(location)
    if not location or loc.is_absolute() or len(loc.parts) != 1 or location in (".", ".."):
        raise OnnxHmfError(f"--save-external-data {location!r}: give a file name, not a path (the data file sits next to the output)")
    return location


def check_output_path(out: str | os.PathLike, *, force: bool = False, inputs: tuple = (), data_location: str | None = None,
                      reads: tuple = ()) -> None:
    """Raise OnnxHmfError if ``out`` cannot or must not be written (checked before any work).

    ``inputs``: model files read (with their data files); ``reads``: other (label, path) pairs
    read. ``data_location``: the output's external-data file name. Both the model and its data
    file are replaced only with ``force`` (see :func:`check_paths`).
    """
    out = Path(out)
    writes = [("output model", out, force)]
    if data_location is not None:
        parent = out.parent if str(out.parent) else Path(".")
        writes.append(("external data file", parent / check_data_location(data_location), force))
    check_paths(reads, writes, models=[("input model", src) for src in inputs])


class OutputStage:
    """A hidden temp folder beside the output, where the model (and data file) are written and
    checked before being renamed into place. Removed on exit, whatever happened (SIGTERM and
    SIGHUP included); stale ones of killed runs are removed when the next stage is made.
    """

    def __init__(self, out: str | os.PathLike, *, force: bool = False, inputs: tuple = (), data_location: str | None = None,
                 reads: tuple = ()):
        self.out = Path(out)
        self.reads = tuple(reads)
        if data_location is None and any(external_data_paths(src) for src in inputs if Path(src).is_file()):
            # the output will get external data too: vet the default name before any work
            check_output_path(self.out, force=force, inputs=inputs, data_location=f"{self.out.name}.data", reads=self.reads)
        check_output_path(self.out, force=force, inputs=inputs, data_location=data_location, reads=self.reads)
        self.inputs = tuple(map(Path, inputs))
        self.force = force
        self.data_location = data_location
        parent = self.out.parent if str(self.out.parent) else Path(".")
        remove_stale_stages(parent)
        try:  # the folder's name does not grow with the output's: any legal output name fits
            self.dir = Path(tempfile.mkdtemp(prefix=f".{os.getpid()}.", suffix=TMP_SUFFIX, dir=parent))
        except OSError as e:
            raise OnnxHmfError(f"cannot write to {str(parent)!r}: {e.strerror or e}") from None
        self.model_path = self.dir / self.out.name
        self.written: list[str] = []
        self._signals = signals_as_errors()

    def __enter__(self) -> "OutputStage":
        self._signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.cleanup()
        finally:
            self._signals.__exit__(*exc)

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
            check_output_path(self.out, force=self.force, inputs=self.inputs, data_location=location, reads=self.reads)
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
        """Move the data file, then the model, into place (each atomically; without --force
        each fails rather than replace a file that appeared meanwhile)."""
        parent = self.out.parent if str(self.out.parent) else Path(".")
        done = []
        try:
            for name in reversed(self.written):
                place_file(self.dir / name, parent / name, replace=self.force)
                done.append(parent / name)
        except (OSError, OnnxHmfError) as e:
            for p in done:
                p.unlink(missing_ok=True)
            if isinstance(e, OnnxHmfError):
                raise
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


# ------------------------------------------------------------------ paths read and written

def _kind(st: os.stat_result) -> str:
    import stat as _st

    for test, name in ((_st.S_ISFIFO, "a FIFO"), (_st.S_ISCHR, "a character device"), (_st.S_ISBLK, "a block device"),
                       (_st.S_ISSOCK, "a socket"), (_st.S_ISDIR, "a directory")):
        if test(st.st_mode):
            return name
    return "regular" if _st.S_ISREG(st.st_mode) else "not a regular file"


def _identity(p: Path) -> tuple:
    """What ``p`` names once symlinks, ``.`` and ``..`` are resolved: (device, inode) when it
    exists, else its resolved path (a file to be created)."""
    try:
        st = os.stat(p)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(p))


def check_paths(reads, writes, *, models=()) -> None:
    """The one check of every path a command reads against every path it writes.

    ``reads``: (label, path) pairs (None paths are ignored); ``models``: (label, path) pairs of
    model files, read together with every external-data file they reference. ``writes``:
    (label, path, consent) triples; ``consent`` allows replacing an existing regular file.
    Paths are compared by what they name (symlinks, ``.``/``..`` and hard links resolved).
    Refused with OnnxHmfError: a write onto anything read or onto another write; a read or
    write that is a FIFO, device or socket (directly or through a symlink); a write onto a
    directory or, without consent, onto an existing file; a folder that is missing or
    read-only; a ``*.npz`` written into a calibration folder that is read.
    """
    read_list = [(lab, Path(p)) for lab, p in reads if p is not None]
    for lab, p in models:
        if p is None:
            continue
        read_list.append((lab, Path(p)))
        if Path(p).is_file() and not Path(p).is_fifo():  # (is_file follows symlinks; never open a FIFO)
            read_list += [(f"{lab.split()[0]}'s data file", d) for d in external_data_paths(p)]
    for lab, p in read_list:
        try:
            st = os.stat(p)
        except OSError:
            continue  # missing: the reader says so
        kind = _kind(st)
        if kind not in ("regular", "a directory"):
            raise OnnxHmfError(f"{lab} {str(p)!r} is {kind}, not a regular file; refusing to read it")
    seen_reads = [(lab, p, _identity(p)) for lab, p in read_list]
    seen_writes: list[tuple[str, Path, tuple]] = []
    for lab, p, consent in writes:
        if p is None:
            continue
        p = Path(p)
        ident = _identity(p)
        for rlab, rp, rid in seen_reads:
            if rid == ident:
                raise OnnxHmfError(f"{lab} {str(p)!r} is the {rlab} {str(rp)!r}; refusing to overwrite what is read")
            if rid[0] == "inode" and rp.is_dir() and p.suffix == ".npz" and os.path.realpath(p.parent) == os.path.realpath(rp):
                raise OnnxHmfError(f"{lab} {str(p)!r} would be read as {rlab} {str(rp)!r} (its *.npz files)")
        for wlab, wp, wid in seen_writes:
            if wid == ident:
                raise OnnxHmfError(f"{lab} {str(p)!r} would be the {wlab} itself ({str(wp)!r}); give different paths")
        seen_writes.append((lab, p, ident))
        _check_writable(lab, p, consent)


def _check_writable(label: str, p: Path, consent: bool) -> None:
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OnnxHmfError(f"{label} {str(p)!r}: {e.strerror or e}") from None
    if st is not None:
        kind = _kind(st)
        if kind == "a directory":
            raise OnnxHmfError(f"{label} {str(p)!r} is a directory")
        if kind != "regular":
            raise OnnxHmfError(f"{label} {str(p)!r} is {kind}; only regular files are replaced")
        if not consent:
            raise OnnxHmfError(f"{label} {str(p)!r} exists; pass --force to overwrite it")
    elif os.path.islink(p):
        raise OnnxHmfError(f"{label} {str(p)!r} is a dangling symlink; remove it or name another path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxHmfError(f"{label} folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OnnxHmfError(f"{label} folder {str(parent)!r} is not writable")


def place_file(src: Path, dst: Path, *, replace: bool) -> None:
    """Move the finished ``src`` to ``dst`` (same folder) atomically. Without ``replace`` the
    rename fails if ``dst`` appeared meanwhile (another run writing the same path): a hard link
    is created exclusively, then ``src`` is removed."""
    if replace:
        try:
            st = os.stat(dst)
        except OSError:
            st = None
        if st is not None and _kind(st) != "regular":
            raise OnnxHmfError(f"{str(dst)!r} is {_kind(st)}; only regular files are replaced")
        os.replace(src, dst)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise OnnxHmfError(f"{str(dst)!r} appeared while this run was working (another run writing it?); "
                           "nothing replaced, pass --force to overwrite it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # no hard links here: reserve the name
        os.close(fd)
        os.replace(src, dst)
        return
    os.unlink(src)


def write_atomic(path: str | os.PathLike, write, *, label: str = "file", replace: bool = True) -> None:
    """Write through ``write(file)`` into a temp file beside ``path``, then rename it into place
    (a regular file or nothing is replaced; interrupted writes leave nothing)."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    remove_stale_stages(parent)
    with signals_as_errors():
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.getpid()}.", suffix=TMP_SUFFIX, dir=parent)
        except OSError as e:
            raise OnnxHmfError(f"cannot write {label} {str(out)!r}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            place_file(Path(tmp), out, replace=replace)
        except OSError as e:
            raise OnnxHmfError(f"cannot write {label} {str(out)!r}: {e.strerror or e}") from None
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)


# ------------------------------------------------------------------ signals and stale stages

TMP_SUFFIX = ".onnxhmf-tmp"


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived: the run stops, its temp files are removed (exit 128 + signal).
    A BaseException, like KeyboardInterrupt: the ``except Exception`` (or ``except
    OnnxHmfError``) that wraps a step's failure into a message must not turn an interrupt into one
    (a SIGTERM during ``--quantize`` exited 2 as "int8 quantization failed")."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}; no output written")
        self.exit_code = 128 + signum


class signals_as_errors:
    """While active (main thread only), SIGTERM and SIGHUP raise :class:`Interrupted`, so every
    ``with``/``finally`` cleanup runs as for Ctrl-C. Nested uses keep the outer handlers."""

    _depth = 0

    def __enter__(self):
        import signal
        import threading

        self.saved = None
        if threading.current_thread() is not threading.main_thread() or signals_as_errors._depth:
            return self
        def raise_(signum, frame):
            raise Interrupted(signum)
        self.saved = {}
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
                self.saved[sig] = signal.signal(sig, raise_)
        signals_as_errors._depth += 1
        return self

    def __exit__(self, *exc):
        import signal

        if self.saved is None:
            return
        for sig, old in self.saved.items():
            signal.signal(sig, old)
        signals_as_errors._depth -= 1


def remove_stale_stages(folder: str | os.PathLike) -> list[str]:
    """Remove temp folders and files of onnxhmf runs in ``folder`` whose process is gone
    (killed with SIGKILL, power loss). Their names carry the owner's pid; returns the removed."""
    gone = []
    try:
        names = os.listdir(folder)
    except OSError:
        return gone
    for name in names:
        if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
            continue
        pid = name[1:].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path = Path(folder) / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            gone.append(name)
        except OSError:
            pass
    return gone


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_OPTION_OF = {"inputs": "--inputs", "calib": "--calib", "tokenizer": "--tokenizer", "token_freq": "--token-freq",
              "load_outputs": "--load-outputs", "plan_file": "--plan-file"}


def named_reads(**paths) -> tuple:
    """(label, path) read pairs from option values that are paths (others are ignored)."""
    return tuple((f"{_OPTION_OF.get(k, k)} file", Path(v)) for k, v in paths.items() if isinstance(v, (str, os.PathLike)))


def check_optimize_paths(input_model, output_model, *, report=None, save_plan=None, dry_run: bool = False,
                         force: bool = False, save_external_data=None, reads: tuple = ()) -> None:
    """Every path ``optimize`` writes (model, its data file, the report, the saved plan) against
    every path it reads (the model, its data files, ``reads``) and each other, before any work.
    ``dry_run``: only the plan is written."""
    out = Path(output_model)
    parent = out.parent if str(out.parent) else Path(".")
    if dry_run:
        check_paths(reads, [("--save-plan", save_plan, True)], models=[("input model", input_model)])
        return
    writes = [("output model", out, force)]
    if isinstance(save_external_data, str) and save_external_data:
        writes.append(("external data file", parent / check_data_location(save_external_data), force))
    elif save_external_data is not None or (Path(input_model).is_file() and external_data_paths(input_model)):
        writes.append(("external data file", parent / f"{out.name}.data", force))
    if report is not None:
        writes.append(("--report", Path(report), True))
    if save_plan is not None:
        writes.append(("--save-plan", Path(save_plan), True))
    check_paths(reads, writes, models=[("input model", input_model)])


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file beside it and a rename (no partial file;
    see :func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")), label="file")
