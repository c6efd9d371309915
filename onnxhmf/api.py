"""The Python API: ``optimize`` (model in, model + report out), ``optimize_file`` and ``make_plan``.

Data flows one way: options → model → sites → (calibration statistics) → planner → Plan →
executor → verification → report → write.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .errors import OnnxHmfError, VerificationError
from .executor import ExecContext, execute
from .graph.index import count_params, vocab_sizes
from .io import OutputStage, check_model_path, load_model, max_ir_version_for_onnxruntime, model_file_bytes, named_reads
from .options import DEFAULT_KEEP, DEFAULT_MIN_COSINE, Options
from .plan import Plan
from .progress import no_progress
from .report import Report

__all__ = ["optimize", "optimize_file", "make_plan", "count_params", "DEFAULT_KEEP", "DEFAULT_MIN_COSINE"]


@dataclass
class _Input:
    """The model being optimized: ``work`` (a copy, or loaded lazily from ``path``)."""

    work: onnx.ModelProto
    src: object  # the given proto, or the path (what the reference run reads)
    path: str | None
    store: object  # TensorStore for lazy external weights, or None
    had_external: bool
    bytes_before: int


def _open(model, stage: OutputStage | None) -> _Input:
    from .external import TensorStore, external_tensors

    if isinstance(model, onnx.ModelProto):
        work = onnx.ModelProto()
        work.CopyFrom(model)
        return _Input(work, model, None, None, False, model.ByteSize())
    work = load_model(model, lazy=True)
    store = TensorStore(Path(model).parent, spill_dir=None if stage is None else stage.dir)
    return _Input(work, str(model), str(model), store, bool(external_tensors(work)), model_file_bytes(model))


def _inline_for_calibration(inp: _Input, options: Options, plan_file_needs: bool = False) -> None:
    """Calibration runs the proto in onnxruntime and the storage AE reads weights from it: both
    need every weight inline (no lazy reads, no spilled factors)."""
    from .external import inline_external, needs_external_data

    needs = options.calibration.given or options.methods.storage_ae or options.budget.fidelity is not None
    if inp.store is None or not (needs or plan_file_needs):
        return
    if inp.had_external:
        if needs_external_data(inp.work):
            raise OnnxHmfError("calibration (--calib, the default fidelity target) and the storage autoencoder need the "
                               "model in memory: not supported past 2 GB; give --keep or --rank for a data-free plan")
        inline_external(inp.work, inp.store)
    inp.store.spill_dir = None


def _token_freq(work: onnx.ModelProto, options: Options):
    tf = options.calibration.token_freq
    if isinstance(tf, (str, os.PathLike)):  # counted for the largest embedding table
        from .frequency import token_counts

        rows = max(vocab_sizes(work) or {0})
        if rows == 0:
            raise OnnxHmfError("--token-freq given, but the model has no embedding table")
        return token_counts(tf, rows, options.calibration.tokenizer)
    return None if tf is None else np.asarray(tf)


def make_plan(work: onnx.ModelProto, options: Options, *, bytes_before: int | None = None, progress=no_progress,
              model_path: str | None = None):
    """The plan for ``work`` (planning measures on the data where it must; nothing is written).
    Returns (Planned, Calibrated or None): the plan, the model a measuring planner already
    built, and the calibration data the executor needs. ``model_path``: where the model's
    folder is (the default planner looks there for a tokenizer)."""
    from .planners.common import Planned

    bytes_before = work.ByteSize() if bytes_before is None else bytes_before
    if options.plan_file is not None:
        from .planners.replay import load_plan, recapture

        plan = load_plan(options.plan_file, work)
        # output forms, chosen on the command line too
        output_forms = ("kernels", "accuracy_level", "activations", "int8_weights", "compact_names", "float16_biases")
        plan.settings.update({k: v for k, v in options.settings().items() if k in output_forms})
        planned, cal = Planned(plan), recapture(work, plan, options.calibration.calib, progress, model_path)
    elif options.budget.fidelity is not None:
        from .planners.auto import auto_plan

        res = auto_plan(work, model_path, options, src_bytes=bytes_before, finish=finish_model, progress=progress)
        planned, cal = res.planned, res.calibrated
    elif options.budget.plan is not None:
        from .planners.mixed import mixed_plan

        planned, cal = mixed_plan(work, options, src_bytes=bytes_before, finish=finish_model, progress=progress)
    elif options.calibration.given:
        from .planners.measured import measured_plan

        planned, cal = measured_plan(work, options, progress)
    else:
        from .planners.uniform import uniform_plan

        planned, cal = Planned(uniform_plan(work, options)), None
    if options.plan_file is None and options.budget.plan is None and options.budget.fidelity is None \
            and planned.built is None:
        from .passes.recurrent import recurrent_decisions  # LSTM/GRU/RNN W and R

        planned.plan.decisions += recurrent_decisions(work, options)
    planned.plan.bytes_before = bytes_before
    planned.plan.params_before = count_params(work)
    if planned.plan.settings.get("quantize") in ("int8", "int8pc"):
        from .planners.common import predict_int8

        predict_int8(work, planned.plan)
    if planned.plan.settings.get("kernels") == "onnxruntime":
        from .planners.common import predict_padded

        predict_padded(work, planned.plan)
    return planned, cal


def optimize(model: onnx.ModelProto | str | os.PathLike, *, progress=None, dry_run: bool = False,
             _stage: OutputStage | None = None, _save: tuple[bool | None, int] = (None, 1024), **kwargs):
    """Plan and apply the compression of the model's MatMul/Gemm weights and Gather tables.

    Keyword options are those of :class:`onnxhmf.options.Options` (``method``, ``keep``,
    ``calib``, ``plan``, ``plan_file``, ...; see ``onnxhmf optimize --help`` for their meaning).
    Returns (the optimized model — a new proto, a given one is not modified — and a Report);
    with ``dry_run``, (None, the Plan). Verification failures are recorded in
    ``report.passed``/``report.failures``, not raised: the caller decides.

    A model given by path is read lazily: external weights stay on disk and are memory-mapped
    one at a time. (``_stage``/``_save`` are for :func:`optimize_file`: new factors are spilled
    to the stage folder and the model is written, checked and verified there, by path.)
    """
    t0 = time.perf_counter()
    try:
        options = Options.from_kwargs(**kwargs)
    except TypeError as e:
        raise OnnxHmfError(str(e)) from None
    progress = progress or no_progress
    inp = _open(model, _stage)
    report = Report(input_path=inp.path, bytes_before=inp.bytes_before)
    token_freq = _token_freq(inp.work, options)
    _inline_for_calibration(inp, options, _plan_file_needs_inline(options))
    report.params_before = count_params(inp.work)
    vocab = vocab_sizes(inp.work)
    verify = options.verification.verify and not dry_run
    early = verify and options.budget.fidelity is None  # fail fast on inputs the model cannot run
    feeds, ref = _reference(inp, options, report) if early else (None, None)
    t = time.perf_counter()
    planned, cal = make_plan(inp.work, options, bytes_before=inp.bytes_before, progress=progress, model_path=inp.path)
    plan = planned.plan
    report.timings["plan_s"] = time.perf_counter() - t
    if dry_run:
        return None, plan
    judge = planned.judge
    if verify and not early:  # the default planner verifies on a held-out batch of the data it found
        feeds, ref = _reference(inp, options, report, judge.calibration.batches[0] if judge else None)
    t = time.perf_counter()
    built = planned.built or execute(inp.work, plan, ExecContext(
        store=inp.store, stats=cal.stats if cal else None, calibration=cal.fit if cal else None,
        token_freq=token_freq, progress=progress))
    if plan.settings.get("activations") == "auto":
        from .executor import auto_per_token, unsigned_forms

        auto_per_token(built.model, inp.work, cal.fit if cal else None, built.notes,
                       unsigned_forms(plan.settings)[1] != "none")
    report.timings["execute_s"] = time.perf_counter() - t
    work = built.model
    _fill_report(report, plan, built)
    finish_model(work, plan.settings, report)
    if plan.settings.get("compact_names"):
        from .graph.names import compact_names

        before = work.ByteSize()
        n = compact_names(work)
        report.notes.append(f"compact names: {n} intermediate tensors renamed, node names dropped "
                            f"({before - work.ByteSize():,} B fewer)")
    report.params_after = count_params(work)
    pruned = [s for s in report.rewritten if s.method == "prune"]
    if pruned:
        report.nonzero_after = report.params_after - sum(s.params_before - s.params_after for s in pruned)
    cand = _write(work, inp, report, _stage, _save)
    if feeds is not None:
        _verify(inp.src, cand, feeds, ref, vocab, options, report, judge)
    report.timings["total_s"] = time.perf_counter() - t0
    return work, report


def _plan_file_needs_inline(options: Options) -> bool:
    """Whether the plan file asks for what needs every weight inline: calibration statistics
    (onnxruntime runs the proto) or the storage autoencoder (it reads the weights)."""
    if options.plan_file is None:
        return False
    try:
        with open(options.plan_file, encoding="utf-8") as f:
            settings = json.load(f).get("settings") or {}
        return bool(settings.get("calibration") or settings.get("storage_ae"))
    except (OSError, ValueError, AttributeError):
        return False  # load_plan says what is wrong


def _reference(inp: _Input, options: Options, report: Report, held_batch=None):
    """Verification feeds (``--inputs``, else a held-out calibration batch of the default
    planner, else generated from the signature) and the input model's outputs on them."""
    from .verify import make_inputs, named_feeds, run_onnxruntime

    feeds = named_feeds(inp.work, options.verification, seed=options.methods.seed)
    if feeds is None:
        feeds = dict(held_batch) if held_batch is not None else make_inputs(inp.work, seed=options.methods.seed)
    t = time.perf_counter()
    ref = run_onnxruntime(inp.src, feeds, prepack=False)
    report.timings["reference_run_s"] = time.perf_counter() - t
    return feeds, ref


def _note_saturation(report: Report, model: onnx.ModelProto) -> None:
    """Where the output has MatMulInteger and this CPU's kernel saturates (runtime.
    matmulinteger_saturates), the notes say that its fidelity was measured so, and differs on
    other CPUs: a plan made here and served on a VNNI or ARM CPU computes those products exactly."""
    from .graph.unsigned import signed_weights
    from .runtime import matmulinteger_saturates

    n = signed_weights(model)  # control-flow bodies too; uint8 weights (--int8-weights) run exactly
    if n and matmulinteger_saturates():
        report.notes.append(f"{n} MatMulInteger nodes with int8 weights: onnxruntime on this CPU (x86 without VNNI) adds their uint8×int8 "
                            "products in pairs in a saturating int16, so the fidelity here is of that arithmetic; "
                            "CPUs with VNNI and ARM compute them exactly, and the numbers there differ "
                            "(--int8-weights uint8 runs them exactly here too, a little slower)")


def _fill_report(report: Report, plan: Plan, built) -> None:
    report.settings = dict(plan.settings)
    report.plan_summary = {"planner": plan.planner, **{k: v for k, v in plan.summary.items() if k not in ("notes", "timings")}}
    report.sites = built.sites
    report.notes.extend(plan.summary.get("notes", []))
    report.notes.extend(built.notes)
    _note_saturation(report, built.model)
    report.timings.update(plan.summary.get("timings", {}))
    if "calibration" in plan.summary:
        report.settings["calibration"] = {**(plan.settings.get("calibration") or {}), **plan.summary["calibration"]}
    report.plan = plan.summary.get("plan_auto")
    report.planned = plan.to_dict()
    if not report.rewritten and not (plan.settings.get("quantize") or plan.planner == "mixed"):
        reasons = sorted({s.reason for s in report.sites}) or ["the graph has no MatMul/Gemm/Gather with a constant 2-D weight"]
        from .graph.quantized import all_quantized_message

        raise OnnxHmfError("no compressible weights: " + (all_quantized_message(report.sites) or "; ".join(reasons)[:300]))


def _write(work: onnx.ModelProto, inp: _Input, report: Report, stage: OutputStage | None, save) -> object:
    """Check (and, with a stage, write) the result; what the verification run reads."""
    from .external import inline_external

    if stage is None:
        if inp.store is not None:
            inline_external(work, inp.store)
        try:
            onnx.checker.check_model(work)
        except onnx.checker.ValidationError as e:  # a bug in a rewrite, never the user's fault
            raise OnnxHmfError(f"internal error: rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from None
        report.bytes_after = work.ByteSize()
        return work
    external, threshold = save
    if external is None and inp.had_external:  # keep the input's layout: no whole-model copy in memory
        external = True
    t = time.perf_counter()
    report.bytes_after = stage.write(work, inp.store, external=external, threshold=threshold)
    report.timings["write_s"] = time.perf_counter() - t
    inp.store.close()
    if stage.data_location and external is None:
        report.notes.append(f"saved with external data ({stage.data_location}): the model would pass protobuf's 2 GB limit")
    _check_written(stage.model_path, inp.path)
    return stage.model_path


def _verify(src, cand, feeds, ref, vocab, options: Options, report: Report, judge=None) -> None:
    """The written model against the input: every output on ``feeds`` (tolerances, cosine,
    top-1), per-output minimums, and with the default planner the fidelity verdict on all its
    held-out calibration batches (the metric that fits each output)."""
    from .verify import check_outputs, compare_outputs, criterion_text, run_onnxruntime

    v = options.verification
    t = time.perf_counter()
    out = run_onnxruntime(cand, feeds, prepack=False)
    report.timings["verify_run_s"] = time.perf_counter() - t
    report.outputs = compare_outputs(ref, out, vocab)
    report.failures = check_outputs(ref, out, report.outputs, atol=v.atol, rtol=v.rtol,
                                    min_cosine=None if judge is not None else v.min_cosine,
                                    min_top1=None if judge is not None else v.min_top1)  # (the judge scores logits itself)
    nonfinite = {k: int(np.count_nonzero(~np.isfinite(r))) for k, r in ref.items()
                 if np.issubdtype(r.dtype, np.floating) and r.size}
    dead = [k for k, n in nonfinite.items() if n == ref[k].size]
    for k, n in nonfinite.items():
        if 0 < n < ref[k].size:
            report.notes.append(f"the input model's own output {k} is NaN or Inf in {n:,} of {ref[k].size:,} values "
                                "on the verification inputs: compared where it is finite")
    if dead and report.failures:  # say why, rather than "mean cosine 0.00000"
        report.failures = [f"{k}: the input model's own output is NaN or Inf everywhere on these inputs (a NaN/Inf "
                           "constant in the model, or an overflow): nothing to compare against" for k in dead] + \
                          [f for f in report.failures if f.split(":")[0] not in dead]
    if judge is not None:
        res = judge.score(cand)
        report.fidelity = {"samples": judge.calibration.samples, "source": judge.calibration.source,
                           "outputs": {n: {"kind": o.kind, "value": o.value, "minimum": res.minimums.get(n),
                                           "counted": n in res.counted, "describe": o.describe()}
                                       for n, o in res.outputs.items()}}
        report.failures += res.failures
    elif v.minimums:
        for s in report.outputs:
            want = v.minimums.get(s.name, v.minimums.get(""))
            if want is not None and s.mean_cosine is not None and s.mean_cosine < want:
                report.failures.append(f"{s.name}: mean cosine {s.mean_cosine:.5f} < --min-cosine {s.name}:{want}")
    report.verified = True
    report.passed = not report.failures
    report.settings.update({"inputs": {k: list(x.shape) for k, x in feeds.items()}, "atol": v.atol or {},
                            "rtol": v.rtol or {}, "min_cosine": v.min_cosine,
                            **({} if judge is not None else {"min_top1": v.min_top1, "criterion": criterion_text(
                                v.atol, v.rtol, v.min_cosine, v.min_top1)})})
    if v.measure:
        report.runtime = _runtime(src, cand, feeds)


def _runtime(src, cand, feeds) -> dict:
    """Resident memory (fresh processes) and interleaved latency of the input (a path, or the
    given proto) and the output."""
    import tempfile

    from .runtime import latency_ratios, resident_memory

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxhmf-measure-") as d:
        if isinstance(src, onnx.ModelProto):  # a proto given in memory
            path = Path(d) / "input.onnx"
            onnx.save_model(src, path)
            src = path
        out = cand
        if not isinstance(out, (str, os.PathLike)):
            out = Path(d) / "output.onnx"
            onnx.save_model(cand, out)
        before, after = resident_memory(src, feeds), resident_memory(out, feeds)
        ratio = latency_ratios([src, out], feeds)[1]
    return {"memory_before": before, "memory_after": after, "latency_ratio": round(ratio, 3),
            "threads": 1, "measure_s": round(time.perf_counter() - t, 2)}


def _check_written(path: Path, input_path: str | None) -> None:
    """onnx.checker with strict shape inference, by path (no 2 GB limit, weights not loaded).

    Strict inference is waived only when the input model itself fails it.
    """
    what = "internal error: rewritten model"
    try:
        check_model_path(path, what=what, full=True)
    except OnnxHmfError:
        try:
            check_model_path(input_path, full=True)
        except OnnxHmfError:
            check_model_path(path, what=what)
            return
        raise


def finish_model(model: onnx.ModelProto, settings: dict, report: Report | None = None) -> None:
    """What every built model gets before it is measured or written: --float16-biases
    (graph/half.py; a planner's trial builds get it too, so their fidelity counts it), then the
    metadata."""
    if settings.get("float16_biases"):
        from .graph.half import float16_biases

        float16_biases(model)
        # (a planner's built model had them already: count what the written one holds)
        n = report and sum(t.data_type == onnx.TensorProto.FLOAT16 and t.name.endswith(".f16") for t in model.graph.initializer)
        if n:
            report.notes.append(f"float16 biases: {n} bias and normalization vectors stored as float16, Cast at load "
                                "(disk only: the loaded model is float32)")
    finish_metadata(model, settings, report)


def finish_metadata(model: onnx.ModelProto, settings: dict, report: Report | None = None) -> None:
    """Record what onnxhmf did (the plan's settings); keep the IR version unless onnxruntime
    could not read it."""
    entry = {"version": __version__, **{k: v for k, v in settings.items() if v not in (None, [], {})}}
    for prop in model.metadata_props:
        if prop.key == "onnxhmf":
            prop.value = json.dumps(entry)
            break
    else:
        model.metadata_props.add(key="onnxhmf", value=json.dumps(entry))
    limit = max_ir_version_for_onnxruntime()
    if model.ir_version > limit:
        if report is not None:
            report.notes.append(f"IR version {model.ir_version} lowered to {limit}, the most the installed onnxruntime reads")
        model.ir_version = limit


def optimize_file(input_path: str | os.PathLike, output_path: str | os.PathLike, *, force: bool = False,
                  force_on_failure: bool = False, save_external_data: bool | str | None = None,
                  external_data_size_threshold: int = 1024, save_plan: str | os.PathLike | None = None, **kwargs) -> Report:
    """Optimize ``input_path`` and write ``output_path`` atomically.

    ``save_external_data``: True (or a file name) stores tensors of at least
    ``external_data_size_threshold`` bytes in a data file next to the output (default name
    ``<output name>.data``); None does so when the input has external data or the output
    would pass protobuf's 2 GB limit. ``save_plan``: also write the plan as JSON.
    The model and data file are written to a temp folder beside the output, checked and
    verified there, then renamed into place; nothing is left behind on failure or Ctrl-C.

    Raises VerificationError (and writes nothing) when verification fails, unless
    ``force_on_failure``. ``force`` allows replacing an existing output (never the input).
    """
    location = save_external_data if isinstance(save_external_data, str) and save_external_data else None
    external = None if save_external_data is None else True
    reads = named_reads(**{k: kwargs.get(k) for k in ("inputs", "calib", "tokenizer", "token_freq", "plan_file")})
    with OutputStage(output_path, force=force, inputs=(input_path,), data_location=location, reads=reads) as stage:
        model, report = optimize(input_path, _stage=stage, _save=(external, external_data_size_threshold), **kwargs)
        report.output_path = str(output_path)
        if report.verified and not report.passed and not force_on_failure:
            raise VerificationError("verification failed, no output written: " + "; ".join(report.failures), report=report)
        stage.commit()
        if save_plan is not None:
            Plan.from_dict(report.planned).save(save_plan)
        if stage.data_location:
            report.notes.append(f"weights saved to {stage.data_location} next to the output")
    return report
