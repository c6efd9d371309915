"""Folder in, folder out: what to optimize and what to copy for a model folder as exporters write it.

Hugging Face optimum / transformers.js / sentence-transformers exports put one or more .onnx
files beside tokenizer and config files (or the .onnx files in an ``onnx/`` subfolder, the
tokenizer at the top). :func:`plan_folder` lists

* the .onnx files to optimize, each with a role (``model``, ``encoder``, ``decoder``,
  ``decoder_with_past``, ``decoder_merged``) and a group (an encoder-decoder pair is planned
  together; a merged decoder "covers" the decoder / decoder-with-past pair beside it);
  quantized or fp16 variants of a model that is there too (``model_quantized.onnx``,
  ``model_fp16.onnx``, ...) are skipped: their float original is optimized instead;
* the files to copy unchanged (tokenizer, vocabularies, configs, model card, license),
  never the weights of other frameworks (.safetensors, .bin, ...) nor the external-data files
  of the .onnx models (the optimized models write their own);

and checks, before any work, that writing the out folder is safe: it is not the input folder
(through symlinks and ``..``), its parent exists, nothing in it would be replaced unless
``overwrite``, only regular files would be replaced (never a symlink or a folder), no output
is a file that an input reads; copies never end in ``.data`` (the optimized models' data files). :func:`copy_folder_files` then copies atomically (temp file beside the target + rename).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OnnxHmfError
from .io import external_data_paths

__all__ = ["FolderModel", "FolderPlan", "plan_folder", "copy_folder_files", "COPY_SUFFIXES"]

COPY_SUFFIXES = {".json", ".txt", ".model", ".spm", ".vocab", ".tiktoken", ".md", ".jinja"}
COPY_NAMES = {"license", "licence", "notice", "copying", "readme"}
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".npz", ".onnx_data",
                   ".data", ".pb", ".tflite", ".mlmodel", ".ot"}
_VARIANT = re.compile(r"^(?P<base>.+?)_(quantized|int8|uint8|q4|q4f16|bnb4|fp16|int4|uint4|q8|O[1-4])$", re.I)
ROLES = (("encoder_model", "encoder"), ("decoder_model_merged", "decoder_merged"),
         ("decoder_with_past_model", "decoder_with_past"), ("decoder_model", "decoder"))


@dataclass
class FolderModel:
    src: Path
    dst: Path
    role: str  # model | encoder | decoder | decoder_with_past | decoder_merged
    group: str = ""  # "encoder-decoder" or "decoder" for files planned together; "" alone
    covered_by: str | None = None  # a decoder (pair) that the merged decoder beside it replaces


@dataclass
class FolderPlan:
    src: Path
    out: Path
    models: list[FolderModel]
    copies: list[tuple[Path, Path]]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    create_out: bool = False

    def summary(self) -> list[str]:
        lines = [f"optimize {m.src.relative_to(self.src)} -> {m.dst} ({m.role}"
                 + (f", {m.group}" if m.group else "") + (f", covered by {m.covered_by}" if m.covered_by else "") + ")"
                 for m in self.models]
        lines += [f"copy {s.relative_to(self.src)}" for s, _ in self.copies]
        lines += [f"skip {s.relative_to(self.src)}: {why}" for s, why in self.skipped]
        return lines


def _role(stem: str) -> str:
    low = stem.lower()
    for prefix, role in ROLES:
        if low.startswith(prefix):
            return role
    return "model"


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _list_models(src: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    onnx_files = sorted(p for p in src.iterdir() if p.suffix == ".onnx" and p.is_file())
    if not onnx_files and (src / "onnx").is_dir():
        onnx_files = sorted(p for p in (src / "onnx").iterdir() if p.suffix == ".onnx" and p.is_file())
    if not onnx_files:
        raise OnnxHmfError(f"{str(src)!r}: no .onnx model in the folder (nor in its onnx/ subfolder)")
    stems = {p.stem for p in onnx_files}
    keep, skipped = [], []
    for p in onnx_files:
        m = _VARIANT.match(p.stem)
        if m and m.group("base") in stems:
            skipped.append((p, f"a quantized/fp16 variant of {m.group('base')}.onnx, which is optimized instead"))
        else:
            keep.append(p)
    return keep, skipped


def _copyable(p: Path) -> str | None:
    """None if ``p`` should be copied, else why not."""
    if p.name.startswith("."):
        return "hidden file"
    if not p.is_file():
        return "not a regular file" if not p.is_dir() else "a subfolder (not copied)"
    suffix = p.suffix.lower()
    if suffix in WEIGHT_SUFFIXES:
        return "weights of another format or external data"
    if suffix in COPY_SUFFIXES or p.stem.lower() in COPY_NAMES or p.name.lower() in COPY_NAMES:
        return None
    return "not a tokenizer, config or documentation file"


def _check_dst(dst: Path, overwrite: bool, inputs: list[Path]) -> None:
    if dst.is_symlink():
        raise OnnxHmfError(f"output {str(dst)!r} is a symlink; refusing to write through it")
    if dst.exists() and not dst.is_file():
        raise OnnxHmfError(f"output {str(dst)!r} exists and is not a regular file")
    if dst.exists() and not overwrite:
        raise OnnxHmfError(f"output {str(dst)!r} exists; pass --overwrite to replace it")
    for src in inputs:
        if _same(src, dst):
            raise OnnxHmfError(f"output {str(dst)!r} is an input file ({str(src)!r}); refusing to overwrite it")


def plan_folder(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> FolderPlan:
    """What to optimize and copy from ``model_dir`` into ``out_dir``; raises OnnxHmfError if unsafe."""
    src, out = Path(model_dir), Path(out_dir)
    if not src.is_dir():
        raise OnnxHmfError(f"{str(src)!r}: not a folder")
    if _same(src, out):
        raise OnnxHmfError(f"output folder {str(out)!r} is the input folder; refusing to write into it")
    if out.exists() and not out.is_dir():
        raise OnnxHmfError(f"output {str(out)!r} exists and is not a folder")
    if out.is_symlink():
        raise OnnxHmfError(f"output folder {str(out)!r} is a symlink; give the real folder")
    parent = out.parent if str(out.parent) else Path(".")
    if not out.exists() and not parent.is_dir():
        raise OnnxHmfError(f"output folder's parent {str(parent)!r} does not exist")
    onnx_files, skipped = _list_models(src)
    roles = {p: _role(p.stem) for p in onnx_files}
    has_encoder = any(r == "encoder" for r in roles.values())
    merged = [p for p, r in roles.items() if r == "decoder_merged"]
    models = []
    for p, role in roles.items():
        group = "encoder-decoder" if has_encoder and role != "model" else ("decoder" if role.startswith("decoder") else "")
        covered = merged[0].name if merged and role in ("decoder", "decoder_with_past") else None
        models.append(FolderModel(p, out / p.relative_to(src), role, group, covered))
    data_files = {d for p in onnx_files + [s for s, _ in skipped] for d in external_data_paths(p)}
    copies = []
    for p in sorted(src.iterdir()):
        if p.suffix == ".onnx" or any(_same(p, d) for d in data_files):
            continue
        why = _copyable(p)
        if why is None:
            copies.append((p, out / p.name))
        elif not p.name.startswith(".") and p.name != "onnx":
            skipped.append((p, why))
    inputs = onnx_files + sorted(data_files) + [s for s, _ in copies]
    for m in models:
        _check_dst(m.dst, overwrite, inputs)
    for _, d in copies:  # (copies never end in .data, the suffix of the models' own data files)
        _check_dst(d, overwrite, inputs)
    return FolderPlan(src, out, models, copies, skipped, create_out=not out.exists())


def copy_folder_files(plan: FolderPlan, *, overwrite: bool = False) -> list[Path]:
    """Create the out folder if needed and copy ``plan.copies``, each atomically; returns the targets.

    The destinations are checked again (they may have changed since planning).
    """
    if plan.create_out:
        try:
            plan.out.mkdir(exist_ok=True)
        except OSError as e:
            raise OnnxHmfError(f"cannot create {str(plan.out)!r}: {e.strerror or e}") from None
    for m in plan.models:
        m.dst.parent.mkdir(parents=True, exist_ok=True)
    inputs = [m.src for m in plan.models] + [s for s, _ in plan.copies]
    done = []
    for src, dst in plan.copies:
        _check_dst(dst, overwrite, inputs)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".onnxhmf-tmp", dir=dst.parent)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except OSError as e:
            raise OnnxHmfError(f"cannot copy {str(src)!r} to {str(dst)!r}: {e.strerror or e}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        done.append(dst)
    return done
