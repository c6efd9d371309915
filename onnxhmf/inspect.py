"""``onnxhmf inspect``: what in a model is compressible, and how low its ranks could go.

One row per weight group (graph/sites.py): op, weight, shape, params, share of the model's
parameters, uses (a tied group has several), the ranks holding 90% and 99% of the spectral
energy (factorize/spectrum.py, singular values only), and the break-even rank. Below the rows,
the size an LMF ``optimize --keep F`` would reach (plan.py, exact for LMF).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .graph.index import count_params
from .factorize.spectrum import energy_rank, singular_values
from .factorize.svd import breakeven_rank
from .graph.index import GraphIndex
from .graph.sites import find_weight_groups
from .io import load_model, model_file_bytes
from .options import Options
from .plan import Plan
from .planners.uniform import uniform_plan

__all__ = ["SiteInfo", "Inspection", "inspect_model", "HUGE_SHORT_SIDE", "HUGE_ELEMENTS"]

# Above either limit the spectrum is skipped unless asked for (full_spectrum=True).
HUGE_SHORT_SIDE = 4096
HUGE_ELEMENTS = 50_000_000
ENERGY_SHARES = (0.90, 0.99)


@dataclass
class SiteInfo:
    weight: str
    ops: str
    nodes: list[str]
    shape: tuple[int, int]
    dtype: str
    params: int
    share: float  # params / the model's parameters
    uses: int  # nodes reading the weight; > 1 is a tied/shared group
    rank90: int | None
    rank99: int | None
    breakeven_rank: int
    skipped: str = ""  # why optimize would leave it alone
    spectrum_note: str = ""  # why rank90/rank99 are missing


@dataclass
class Inspection:
    path: str | None
    params: int
    bytes: int
    sites: list[SiteInfo] = field(default_factory=list)
    keep: float = 0.75
    plan: Plan | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = None if self.plan is None else {
            "keep": self.keep, "method": "lmf",
            "params_before": self.plan.params_before, "params_after": self.plan.params_after,
            "bytes_before": self.plan.bytes_before, "bytes_after": self.plan.predicted_bytes,
            "sites_rewritten": sum(d.changes for d in self.plan.decisions),
        }
        return d

    def format(self) -> str:
        from .report import _table

        ok = [s for s in self.sites if not s.skipped]
        rows = [(s.ops, s.weight, f"{s.shape[0]}x{s.shape[1]}", f"{s.params:,}", f"{100 * s.share:.1f}%",
                 str(s.uses) if s.uses < 2 else f"{s.uses} tied", _r(s.rank90), _r(s.rank99), str(s.breakeven_rank))
                for s in ok]
        lines = _table(("op", "weight", "shape", "params", "share", "uses", "r90", "r99", "break-even"), rows) if rows else [
            "no compressible sites"]
        notes = sorted({s.spectrum_note for s in ok if s.spectrum_note})
        lines += [f"note: {n}" for n in notes]
        skipped = [s for s in self.sites if s.skipped]
        if skipped:
            lines.append(f"skipped {len(skipped)} site(s):")
            lines += [f"  {s.weight} ({s.ops}, {s.shape[0]}x{s.shape[1]}): {s.skipped}" for s in skipped]
        total = sum(s.params for s in ok)
        lines.append(f"model: {self.params:,} params, {self.bytes:,} bytes; compressible sites hold {total:,} "
                     f"({100 * total / max(self.params, 1):.1f}%)")
        if self.plan is not None:
            p = self.plan
            lines.append(
                f"at --keep {self.keep} (lmf): {sum(d.changes for d in p.decisions)} site(s) rewritten, params "
                f"{p.params_before:,} -> {p.params_after:,} ({p.params_after / max(p.params_before, 1):.3f}x), file "
                f"~{p.predicted_bytes:,} bytes ({p.predicted_bytes / max(p.bytes_before, 1):.3f}x)")
        return "\n".join(lines)


def _r(v):
    return "-" if v is None else str(v)


def inspect_model(model: onnx.ModelProto | str | os.PathLike, *, keep: float = 0.75,
                  full_spectrum: bool = False) -> Inspection:
    """Inspect ``model`` (a path or a proto). Spectra of weights over HUGE_SHORT_SIDE on the
    short side or HUGE_ELEMENTS elements are skipped unless ``full_spectrum``."""
    t0 = time.perf_counter()
    path = None
    if isinstance(model, onnx.ModelProto):
        nbytes = model.ByteSize()
    else:
        path = str(model)
        nbytes = model_file_bytes(model)
        model = load_model(model)
    index = GraphIndex(model)
    groups = find_weight_groups(index)
    total = count_params(model)
    out = Inspection(path=path, params=total, bytes=nbytes, keep=keep)
    for g in groups:
        m, n = g.shape
        info = SiteInfo(weight=g.name, ops=g.ops, nodes=g.node_names, shape=(m, n),
                        dtype=onnx.TensorProto.DataType.Name(g.ref.data_type).lower(), params=g.params,
                        share=g.params / max(total, 1), uses=len(g.uses), rank90=None, rank99=None,
                        breakeven_rank=breakeven_rank(m, n), skipped=g.skip_reason or "")
        if not g.skip_reason:
            if not full_spectrum and (min(m, n) > HUGE_SHORT_SIDE or m * n > HUGE_ELEMENTS):
                info.spectrum_note = (f"spectrum skipped for weights over {HUGE_SHORT_SIDE} on the short side or "
                                      f"{HUGE_ELEMENTS:,} elements; pass --full-spectrum")
            else:
                s = singular_values(index.array(g.ref))
                info.rank90, info.rank99 = (energy_rank(s, q) for q in ENERGY_SHARES)
        out.sites.append(info)
    out.plan = uniform_plan(model, Options.from_kwargs(keep=keep), groups)
    out.plan.bytes_before, out.plan.params_before = nbytes, total
    out.seconds = time.perf_counter() - t0
    if not math.isfinite(out.seconds):  # pragma: no cover
        out.seconds = 0.0
    return out
