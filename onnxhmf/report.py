"""What optimize() did, as data (JSON) and as console tables."""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

__all__ = ["SiteReport", "OutputStats", "Report"]


@dataclass
class SiteReport:
    weight: str
    ops: str  # e.g. "matmul", "gather+matmul" for a tied table
    nodes: list[str]
    shape: tuple[int, int]
    params_before: int
    status: str  # "rewritten" | "skipped"
    method: str = "-"
    rank: int = 0
    params_after: int | None = None
    rel_error: float | None = None  # see error_of
    error_of: str | None = None  # "weight": ‖W − W′‖_F/‖W‖_F; "output": ‖X(W − W′)‖/‖XW‖ on calibration data
    dense: int = 0  # HMF: rows or columns kept dense
    detail: str = ""
    reason: str = ""
    planned: str | None = None  # the plan's treatment (method can differ: an hmf budget stored as plain lmf)


@dataclass
class OutputStats:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    mean_cosine: float | None
    snr_db: float | None
    top1: float | None = None  # fraction of positions whose argmax agrees (logits-like outputs)
    exact_match: float | None = None  # fraction of equal elements (integer/bool outputs)
    # error distribution (float outputs): abs = |r − c|, rel = |r − c| / max(|r|, tiny)
    mean_abs: float | None = None
    median_abs: float | None = None
    quantile_abs: float | None = None  # the ``quantile`` quantile (default p99)
    mean_rel: float | None = None
    median_rel: float | None = None
    quantile_rel: float | None = None
    quantile: float | None = None
    topk: float | None = None  # mean overlap |top-k(r) ∩ top-k(c)| / k per position (logits-like outputs)
    k: int | None = None

    def error_stat(self, stat: str, kind: str) -> float | None:
        """The ``stat`` (max|mean|median|quantile) of the ``kind`` (abs|rel) error."""
        return getattr(self, f"{stat}_{kind}")


@dataclass
class Report:
    input_path: str | None = None
    output_path: str | None = None
    settings: dict = field(default_factory=dict)
    sites: list[SiteReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0  # elements stored in the file
    nonzero_after: int | None = None  # after pruning: elements that are not pruned zeros
    bytes_before: int | None = None
    bytes_after: int | None = None
    outputs: list[OutputStats] = field(default_factory=list)
    verified: bool = False
    passed: bool | None = None
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    plan: dict | None = None  # --plan auto: per-weight treatments, predicted and measured loss, trials
    plan_summary: dict | None = None  # the planner's name and what it measured (calibration, search)
    planned: dict | None = None  # the Plan the executor applied (plan.Plan.to_dict(): --save-plan writes it)
    runtime: dict | None = None  # resident memory (before/after) and latency ratio, when measured
    fidelity: dict | None = None  # the default planner: per-output fidelity on its held-out calibration samples

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "rewritten"]

    def to_dict(self) -> dict:
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self, *, show_skipped: bool = True) -> str:
        lines = []
        rows = [
            (
                s.ops,
                display_name(s.weight, s.nodes),
                f"{s.shape[0]}x{s.shape[1]}",
                s.method,
                str(s.rank) if s.status == "rewritten" else "-",
                f"{s.params_before:,} -> {s.params_after:,}" if s.params_after is not None else f"{s.params_before:,}",
                (f"{s.rel_error:.4f}" + (" (out)" if s.error_of == "output" else "")) if s.rel_error is not None else "-",
                s.detail,
            )
            for s in self.rewritten
        ]
        if self.plan:
            prow = [(r["weight"], r["treatment"], f"{r['bytes']:,}", f"{r['dense_bytes']:,}", f"{r['predicted_loss']:.5f}")
                    for r in self.plan["sites"]]
            lines += _table(("weight", "treatment", "bytes", "dense bytes", "pred. loss"), prow)
            p = self.plan
            lines.append(f"plan: {p['planned_bytes']:,} B planned ({p['fixed_bytes']:,} B outside the planned weights), "
                         f"file {p['bytes']:,} B" + (f" for a target of {p['target_size']:,} B" if p.get("target_size") else "")
                         + f"; loss predicted {p['predicted_loss']:.4f}, measured {p['heldout_loss']:.4f}; held-out "
                         + (f"fidelity {p['heldout_fidelity']:.4f}" if "heldout_fidelity" in p else
                            f"margin over the fidelity minimums {p['heldout_margin']:+.4f}")
                         + f" on {p['heldout_samples']} samples"
                         + (f"; latency {p['latency_ratio']:.2f}x the input's" if p.get("latency_ratio") is not None else ""))
        elif rows:
            lines += _table(("op", "weight", "shape", "method", "rank", "params", "rel err", "detail"), rows)
        skipped = [s for s in self.sites if s.status != "rewritten"]
        if skipped and show_skipped and not self.plan:
            lines.append(f"skipped {len(skipped)} site(s):")
            lines += [f"  {s.weight} ({s.ops}, {s.shape[0]}x{s.shape[1]}): {s.reason}" for s in skipped]
        cal = self.settings.get("calibration")
        if cal and "tokens" in cal:  # a calibrated planner's summary (--plan auto reports its own line)
            dense = cal.get("dense_by_allocation") or []
            lines.append(f"calibration: {cal['samples']} samples, {cal['tokens']:,} tokens from {cal['source']}; "
                         f"{cal['activations']} activation Grams ({cal['gram_bytes'] / 1e6:.1f} MB); allocation "
                         f"{cal['allocation']}" + (f", {len(dense)} weight(s) kept dense" if dense else ""))
        ratio = self.params_after / self.params_before if self.params_before else 1.0
        lines.append(f"params: {self.params_before:,} -> {self.params_after:,} ({ratio:.3f}x)")
        if self.nonzero_after is not None:
            lines.append(
                f"nonzero after pruning: {self.nonzero_after:,} ({self.nonzero_after / self.params_before:.3f}x); "
                "stored dense with zeros, so the file and the run time do not shrink"
            )
        if self.bytes_before is not None and self.bytes_after is not None:
            lines.append(
                f"file:   {self.bytes_before:,} -> {self.bytes_after:,} bytes ({self.bytes_after / self.bytes_before:.3f}x)"
            )
        if self.verified:
            orows = [
                (
                    o.name,
                    "x".join(map(str, o.shape)),
                    _g(o.max_abs),
                    _g(o.max_rel),
                    _g(o.mean_cosine, ".6f"),
                    _g(o.snr_db, ".1f"),
                    _g(o.top1, ".4f") if o.top1 is not None else (_g(o.exact_match, ".4f") if o.exact_match is not None else "-"),
                )
                for o in self.outputs
            ]
            lines += _table(("output", "shape", "max abs", "max rel", "cosine", "SNR dB", "top1/eq"), orows)
            if self.settings.get("criterion"):
                lines.append(f"criterion: {self.settings['criterion']}")
            lines.append("verification: " + ("PASSED" if self.passed else "FAILED: " + "; ".join(self.failures)))
        lines += [f"note: {n}" for n in self.notes]
        lines += self.result_table()
        return "\n".join(lines)

    def result_table(self) -> list[str]:
        """Input against output: file bytes, resident memory, latency, fidelity."""
        if self.bytes_before is None or self.bytes_after is None:
            return []
        rows = [("file", f"{self.bytes_before:,} B", f"{self.bytes_after:,} B", f"{self.bytes_after / self.bytes_before:.3f}x")]
        rt = self.runtime or {}
        if rt.get("memory_before") and rt.get("memory_after") is not None:
            mb, ma = rt["memory_before"], rt["memory_after"]
            rows.append(("memory once loaded", f"{mb / 2**20:.1f} MiB", f"{ma / 2**20:.1f} MiB", f"{ma / mb:.3f}x"))
        if rt.get("latency_ratio") is not None:
            rows.append((f"latency ({rt.get('threads', 1)} thread)", "1.00", f"{rt['latency_ratio']:.2f}",
                         f"{rt['latency_ratio']:.3f}x"))
        fid = [o for o in self.outputs if o.mean_cosine is not None]
        if self.fidelity:
            counted = {n: o for n, o in self.fidelity["outputs"].items() if o["counted"]}
            for n, o in counted.items():
                rows.append((f"fidelity: {n}", "1", f"{o['describe']} (minimum {o['minimum']:.4g})", ""))
            rows.append(("", "", f"on {self.fidelity['samples']} held-out samples ({self.fidelity['source']})", ""))
        elif fid:
            worst = min(fid, key=lambda o: o.mean_cosine)
            top = [o for o in self.outputs if o.top1 is not None]
            text = f"cosine {worst.mean_cosine:.4f} ({worst.name})"
            if top:
                t = min(top, key=lambda o: o.top1)
                text += f", top-1 {t.top1:.4f} ({t.name})"
            rows.append(("fidelity", "1", text, ""))
        return ["", "result:"] + _table(("", "input", "output", "ratio"), rows)


_MACHINE_NAME = re.compile(r"^(onnx::|val_\d|_val_|\d+$|tensor_\d|const_|initializer_)")


def display_name(weight: str, nodes: list[str]) -> str:
    """The weight's name, or where the exporter gave it a machine name (``onnx::MatMul_470``,
    ``val_65``) the layer path of the first node that reads it."""
    if not nodes or not _MACHINE_NAME.match(weight):
        return weight
    path = nodes[0].strip("/")
    for suffix in ("/MatMul", "/Gemm", "/Gather"):
        if path.endswith(suffix) and len(path) > len(suffix):
            path = path[: -len(suffix)]
    return f"{path} ({weight})"


def _g(v, fmt: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, fmt)


def _table(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    return [line.rstrip() for line in out]


@dataclass
class VerifyReport:
    """What ``onnxhmf verify`` found: per runtime, per output statistics of CAND against REF."""

    reference: str
    candidate: str | None
    runtimes: list[str] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    results: dict[str, list[OutputStats]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    passed: bool | None = None  # None: nothing compared (only --save-outputs)
    saved: str | None = None
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return Report.to_dict(self)  # same cleaning of inf/nan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        lines = [f"inputs: " + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in self.inputs.items())]
        for rt, stats in self.results.items():
            lines.append(f"{self.candidate} on {rt} vs {self.reference}:")
            q = next((s.quantile for s in stats if s.quantile is not None), 0.99)
            ql = f"p{100 * q:g}"
            rows = [(o.name, "x".join(map(str, o.shape)), _g(o.max_abs), _g(o.mean_abs), _g(o.median_abs),
                     _g(o.quantile_abs), _g(o.max_rel), _g(o.mean_rel), _g(o.median_rel), _g(o.quantile_rel),
                     _g(o.mean_cosine, ".6f"), _g(o.snr_db, ".1f"),
                     _g(o.top1, ".4f") if o.top1 is not None else (_g(o.exact_match, ".4f") if o.exact_match is not None else "-"),
                     _g(o.topk, ".4f"))
                    for o in stats]
            k = next((s.k for s in stats if s.k is not None), None)
            lines += _table(("output", "shape", "max abs", "mean abs", "med abs", f"{ql} abs", "max rel", "mean rel",
                             "med rel", f"{ql} rel", "cosine", "SNR dB", "top1/eq", f"top{k or 'k'}"), rows)
        if self.saved:
            lines.append(f"saved inputs and reference outputs to {self.saved}")
        if self.passed is not None and self.settings.get("criterion"):
            lines.append(f"criterion: {self.settings['criterion']}")
        if self.passed is not None:
            lines.append("verification: " + ("PASSED" if self.passed else "FAILED: " + "; ".join(self.failures)))
        return "\n".join(lines)
