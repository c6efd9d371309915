"""The default: the smallest model that keeps a fidelity target, with calibration found, not
asked for.

1. Calibration (discover.py): ``--calib``; else a tokenizer beside the model with a built-in
   text sample; else, for a causal LM, sequences sampled from the model itself; else none.
2. With data: the mixed planner (``--plan auto``) searches the byte budget for the smallest plan
   whose held-out fidelity meets every counted output's minimum, scored by the metric that fits
   the output (fidelity.py): cosine for embeddings, exp(−KL) for logits. The minimums come from
   the target F: F for embeddings, 1 − 3·(1 − F) for logits (F = 0.99: 0.97, about "perplexity
   within 3%"), or from ``--min-cosine OUT:V``. The plan is no slower than the input where the
   tool runs (latency ratio ≤ 1.0 at one thread, measured) and leaves out the weight-only (float
   at run time, disk only) treatments. The limit is a preference: where no smaller plan within
   it keeps the target, the plan is ``allow_slower``'s; where the fastest plan found still
   measures over it (noise on a plan of int8 kernels), that plan is kept; the summary says so.
   ``allow_slower`` (``--allow-slower``): the smallest plan whatever its latency, weight-only
   treatments included (for a model served on a machine other than this one).
3. Without data: a conservative data-free plan (int8 weights through onnxruntime's dynamic
   quantizer), verified on generated inputs, and the message says that ``--calib`` or
   ``--inputs`` would allow more.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import onnx

from ..errors import OnnxHmfError
from ..progress import no_progress
from .common import Planned

__all__ = ["AutoResult", "auto_plan", "minimums_for", "DEFAULT_LATENCY"]

DEFAULT_LATENCY = 1.0  # no slower than the input (latency ratio, one thread, interleaved), unless --allow-slower


@dataclass
class AutoResult:
    planned: Planned
    calibrated: object  # measured.Calibrated, or None (data-free)
    discovery: object  # discover.Discovery
    judge: object  # fidelity.FidelityJudge on the held-out batches, or None


def minimums_for(kinds: dict[str, str | None], target: float, given: dict[str, float] | None) -> dict[str, float]:
    """Per-output minimums: the user's (``{output or "": value}``), else by kind from ``target``."""
    given = dict(given or {})
    out = {}
    for name, kind in kinds.items():
        if kind is None:
            continue
        default = target if kind != "logits" else 1.0 - 3.0 * (1.0 - target)
        out[name] = given.get(name, given.get("", default))
    return out


def auto_plan(work: onnx.ModelProto, model_path, options, *, src_bytes: int, finish=None,
              progress=no_progress) -> AutoResult:
    from ..discover import discover_calibration
    from ..fidelity import FidelityJudge

    c, b = options.calibration, options.budget
    if model_path is None:
        raise OnnxHmfError("the default fidelity target needs the model as a file (its folder is searched for a tokenizer)")
    d = discover_calibration(model_path, work, calib=c.calib, tokenizer=c.tokenizer, samples=c.samples,
                             seq_len=c.seq_len, batch_size=c.batch, seed=options.methods.seed)
    if d.calibration is None:
        planned = _data_free(work, options)
        planned.plan.summary["notes"] = [d.message, *d.notes]
        return AutoResult(planned, None, d, None)
    fit, held = d.split(0.25)
    judge = FidelityJudge(work, held, kv=d.kv, logits=d.logits, vocab=d.vocab, counted=options.verification.outputs or None)
    judge.minimums = minimums_for(judge.kinds(), b.fidelity, options.verification.minimums)
    judge.score(work)  # the counted outputs exist (--outputs) before anything is measured
    plan_opts = {"target_fidelity": 0.0, "max_latency_ratio": None if b.allow_slower else DEFAULT_LATENCY}
    opts = dataclasses.replace(options, budget=dataclasses.replace(b, plan=plan_opts),
                               calibration=dataclasses.replace(c, calib=d.calibration))
    from .mixed import mixed_plan

    def meter(model):
        res = judge.score(model)
        margin = min((res.outputs[n].value - res.minimums[n] for n in res.counted), default=0.0)
        loss = sum(1.0 - res.outputs[n].value for n in res.counted)
        return margin, loss

    planned, cal = mixed_plan(work, opts, src_bytes=src_bytes, finish=finish, progress=progress, meter=meter,
                              split=(fit, held), fast=not b.allow_slower, strict_latency=False)
    p = planned.plan
    p.planner = "auto"
    p.settings["fidelity"] = b.fidelity
    p.settings["calibration"]["discovered"] = d.source
    p.summary.setdefault("notes", []).insert(0, d.message)
    p.summary["notes"][1:1] = d.notes
    planned.judge = judge
    return AutoResult(planned, cal, d, judge)


def _data_free(work: onnx.ModelProto, options) -> Planned:
    from .uniform import uniform_plan

    b, m = options.budget, options.methods
    opts = dataclasses.replace(options, budget=dataclasses.replace(b, keep=1.0, rank=None),
                               methods=dataclasses.replace(m, quantize="int8"))
    plan = uniform_plan(work, opts)
    if not any(d.reason.startswith("--quantize int8 alone") for d in plan.decisions):
        reasons = sorted({d.reason for d in plan.decisions}) or ["the graph has no MatMul/Gemm/Gather with a constant 2-D weight"]
        raise OnnxHmfError("no compressible weights: " + "; ".join(reasons)[:300])
    plan.planner = "auto (data-free)"
    plan.settings["fidelity"] = b.fidelity
    return Planned(plan)
