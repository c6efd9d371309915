"""The Python API: ``optimize`` (model in, model + report out) and ``optimize_file``."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from . import __version__
from .errors import OnnxHmfError, VerificationError
from .graph.index import GraphIndex
from .external import TensorStore, external_tensors, inline_external, needs_external_data
from .io import OutputStage, check_model_path, named_reads, load_model, max_ir_version_for_onnxruntime, model_file_bytes
from .calibration import Calibration, load_calibration
from .capture import capture_stats
from .graph.sites import find_weight_groups
from .passes.calibrated import (
    calibration_targets,
    candidate_groups,
    fidelity,
    measure_sensitivities,
    plan_keeps,
    reference_outputs,
    site_levels,
)
from .passes.factorize import FactorizePass
from .passes.select import SiteSelection
from .passes.storage_ae import StorageAEPass
from .factorize.whiten import DEFAULT_DAMP
from .frequency import token_counts
from .quantize import quantize_int8
from .report import Report
from .verify import DEFAULT_MIN_TOP1, check_outputs, check_thresholds, compare_outputs, criterion_text, load_inputs, make_inputs, run_onnxruntime

__all__ = ["optimize", "optimize_file", "count_params", "DEFAULT_KEEP", "DEFAULT_MIN_COSINE", "DEFAULT_MIN_TOP1"]

DEFAULT_KEEP = 0.75
DEFAULT_MIN_COSINE = 0.9


def count_params(model: onnx.ModelProto) -> int:
    """Elements in all initializers and Constant tensors of the main graph."""
    n = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            n += sum(int(np.prod(a.t.dims)) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return n


def _vocab_sizes(model: onnx.ModelProto) -> set[int]:
    index = GraphIndex(model)
    sizes = set()
    for node in model.graph.node:
        if node.op_type == "Gather":
            ref = index.const(node.input[0])
            if ref is not None and len(ref.dims) == 2 and ref.dims[0] >= 100:
                sizes.add(ref.dims[0])
    return sizes


def optimize(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    method: str = "lmf",
    embedding_method: str | None = None,
    keep: float | None = DEFAULT_KEEP,
    rank: int | None = None,
    token_freq: np.ndarray | str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    fold: bool = True,
    rank_multiple: int = 1,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    min_params: int = 0,
    verify: bool = True,
    inputs: dict[str, np.ndarray] | str | os.PathLike | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    atol: dict[str, float] | None = None,
    rtol: dict[str, float] | None = None,
    min_cosine: float | None = DEFAULT_MIN_COSINE,
    min_top1: float | None = DEFAULT_MIN_TOP1,
    seed: int = 0,
    ae_options: dict | None = None,
    storage_ae: dict | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    calib: str | os.PathLike | Calibration | None = None,
    calib_samples: int = 256,
    calib_seq_len: int = 128,
    calib_batch: int = 16,
    allocation: str = "auto",
    min_fidelity: float | None = None,
    sequential: bool = False,
    share_bases: bool = False,
    damp: float = DEFAULT_DAMP,
    quantize: str | None = None,
    plan: dict | None = None,
    _stage: OutputStage | None = None,
    _save: tuple[bool | None, int] = (None, 1024),
) -> tuple[onnx.ModelProto, Report]:
    """Factorize the model's constant MatMul/Gemm weights and Gather tables.

    ``method``: "lmf" (truncated SVD), "hmf" (hybrid) or "prune" (magnitude pruning, the
    baseline); ``embedding_method`` overrides it for Gather tables ("svd", "hmf", "prune",
    "skip"). ``token_freq``: per-token counts for the largest embedding table (HMF keeps the
    frequent tokens' rows dense); or a path: an .npz of token ids, or text with ``tokenizer``.
    ``fold``: fold HMF output permutations into consumers. ``ae_options``: EmbeddingAEConfig
    fields for ``embedding_method="ae"``. ``storage_ae``: StorageAEPass fields (``include``,
    ``keep``, ``options``): those weights get a shared storage autoencoder instead.

    Calibration (``calib``: an .npz of feeds, a folder of them, or text with ``tokenizer``)
    makes every factorization data-aware (whitened by the Gram matrix of the activations each
    weight multiplies; embedding rows weighted by token frequency). ``allocation``: "measured"
    (the default with calibration) spends the global budget keep·Σ m·n where the measured
    end-to-end loss is lowest; "uniform" gives every weight the same keep. ``min_fidelity``:
    the smallest keep whose model reaches this cosine on held-out calibration batches.
    ``sequential``: calibrate each stage of sites on the already-compressed model.
    ``share_bases``: LMF weights that read the same activation (Q, K, V) share one first
    factor where that lowers the predicted error at the same parameter count.

    Returns the optimized model (a new proto; a given proto is not modified) and a Report.
    Verification failures are recorded in ``report.passed``/``report.failures``, not raised:
    the caller decides (the CLI refuses to write the output).

    A model given by path is read lazily: external weights stay on disk and are memory-mapped
    one at a time. (``_stage``/``_save`` are for :func:`optimize_file`: new factors are spilled
    to the stage folder and the model is written, checked and verified there, by path.)
    """
    t0 = time.perf_counter()
    report = Report()
    store, had_external = None, False
    if isinstance(model, onnx.ModelProto):
        src = model
        work = onnx.ModelProto()
        work.CopyFrom(model)
    else:
        report.input_path = str(model)
        src = None
        work = load_model(model, lazy=True)
        had_external = bool(external_tensors(work))
        store = TensorStore(Path(model).parent, spill_dir=None if _stage is None else _stage.dir)
        report.bytes_before = model_file_bytes(model)
    freq_given = token_freq is not None
    if isinstance(token_freq, (str, os.PathLike)):  # counted for the largest embedding table
        rows = max(_vocab_sizes(work) or {0})
        if rows == 0:
            raise OnnxHmfError("--token-freq given, but the model has no embedding table")
        token_freq = token_counts(token_freq, rows, tokenizer)
    if quantize not in (None, "int8"):
        raise OnnxHmfError(f"quantize must be int8 or None, got {quantize!r}")
    check_thresholds(min_cosine, min_top1)
    if plan is not None:
        if calib is None:
            raise OnnxHmfError("--plan auto needs calibration data (--calib)")
        if quantize is not None:
            raise OnnxHmfError("--plan auto chooses int8 per weight itself: give it without --quantize")
        if min_fidelity is not None or sequential or rank is not None or storage_ae:
            raise OnnxHmfError("--plan auto chooses the ranks itself: it does not combine with --min-fidelity, --sequential, "
                               "--rank or the storage autoencoder")
    if allocation not in ("auto", "uniform", "measured"):
        raise OnnxHmfError(f"allocation must be auto, uniform or measured, got {allocation!r}")
    if calib is None and (allocation == "measured" or min_fidelity is not None or sequential):
        raise OnnxHmfError("--allocate measured, --min-fidelity and --sequential need calibration data (--calib)")
    if rank is not None and (min_fidelity is not None or allocation == "measured"):
        raise OnnxHmfError("--min-fidelity and --allocate measured choose the ranks; they do not combine with --rank")
    try:
        spass = StorageAEPass(seed=seed, **storage_ae) if storage_ae else None
        taken = sorted(spass.names(work)) if spass else []
        selection = SiteSelection(list(include), list(exclude) + [f"^{re.escape(n)}$" for n in taken], min_params)
        fpass = FactorizePass(
            method=method,
            embedding_method=embedding_method,
            keep=keep,
            rank=rank,
            rank_multiple=rank_multiple,
            selection=selection,
            token_freq=None if token_freq is None else np.asarray(token_freq),
            fold=fold and not sequential,
            seed=seed,
            store=store,
            ae_options=dict(ae_options or {}),
            damp=damp,
            share_bases=share_bases,
        )
    except (ValueError, TypeError) as e:
        raise OnnxHmfError(str(e)) from None
    if store is not None and (calib is not None or spass is not None):
        # calibration runs the proto in onnxruntime and the storage AE reads weights from it:
        # both need every weight inline (no lazy reads, no spilled factors)
        if had_external:
            if needs_external_data(work):
                raise OnnxHmfError("--calib and the storage autoencoder need the model in memory: not supported past 2 GB")
            inline_external(work, store)
        store.spill_dir = None
    report.settings = {
        "method": method,
        "embedding_method": embedding_method,
        "token_freq": freq_given,
        "fold": fold,
        "keep": keep if rank is None else None,
        "rank": rank,
        "rank_multiple": rank_multiple,
        "include": list(include),
        "exclude": list(exclude),
        "min_params": min_params,
        "seed": seed,
        **({"ae_options": dict(ae_options)} if ae_options else {}),
        **({"storage_ae": {k: v for k, v in storage_ae.items()}} if storage_ae else {}),
        "allocation": allocation if calib is not None else None,
        "sequential": sequential or None,
        "share_bases": share_bases or None,
        "min_fidelity": min_fidelity,
        "quantize": quantize,
        "plan": {k: v for k, v in plan.items() if v is not None} if plan else None,
    }
    report.params_before = count_params(work)
    if report.bytes_before is None:
        report.bytes_before = (src or work).ByteSize()

    feeds = ref = None
    if verify:
        if isinstance(inputs, (str, os.PathLike)):
            feeds = load_inputs(inputs, work)
        elif inputs is not None:
            feeds = dict(inputs)
        else:
            feeds = make_inputs(work, input_shapes, seed=seed)
        vocab = _vocab_sizes(work)
        t = time.perf_counter()
        ref = run_onnxruntime(report.input_path or src, feeds, prepack=False)
        report.timings["reference_run_s"] = time.perf_counter() - t

    progress = progress or (lambda it: it)
    cal = None
    qweights, planner = None, None  # None: every weight MatMul/Gather when --quantize int8
    if plan is not None:
        from .passes.mixed import plan_and_assemble

        planner = plan_and_assemble(work, fpass, report, calib, tokenizer, calib_samples, calib_seq_len, calib_batch,
                                     plan, src_bytes=report.bytes_before, progress=progress,
                                     finish=lambda m: _finish_metadata(m, report, notes=False))
    elif calib is not None:
        keep, cal = _calibrate(work, fpass, report, calib, tokenizer, calib_samples, calib_seq_len, calib_batch,
                          allocation, min_fidelity, keep, rank, progress)
    t = time.perf_counter()
    fpass.notes.clear()
    if sequential:
        report.sites = _run_sequential(work, fpass, cal, progress)
    else:
        report.sites = fpass.run(work, progress)
    report.notes.extend(fpass.notes)
    if spass is not None:  # its reports replace the other pass's for the weights it took or skipped
        ssites = spass.run(work)
        done = {s.weight for s in report.sites if s.status == "rewritten"}
        ssites = [s for s in ssites if s.weight not in done]
        names = {s.weight for s in ssites}
        report.sites = [s for s in report.sites if s.weight not in names and s.weight not in taken] + ssites
    report.timings["factorize_s"] = time.perf_counter() - t
    if planner is not None:
        wonly = planner.store_weight_only(work, planner.choice)
        if wonly:
            report.notes.append(f"weight-only int8/int4: {len(wonly)} weights stored as integers + per-column scales, "
                                "rebuilt by a constant subgraph that onnxruntime folds at load (float MatMuls)")
        qweights = planner.quantized(work, planner.choice)
    if quantize == "int8" or qweights:
        t = time.perf_counter()
        if store is not None:
            if needs_external_data(work):
                raise OnnxHmfError("--quantize needs the model in memory: not supported past 2 GB")
            inline_external(work, store)
        work, done = quantize_int8(work, None if quantize == "int8" and plan is None else qweights, notes=report.notes)
        if not done and not report.rewritten:
            why = "; ".join(n for n in report.notes if n.startswith("int8:")) or "no MatMul/Gather reads a 2-D float initializer"
            raise OnnxHmfError(f"no compressible weights: nothing to quantize ({why})"[:400])
        report.notes.append(f"int8: {len(done)} weights quantized (onnxruntime dynamic quantizer, QOperator: "
                            "MatMulInteger + DynamicQuantizeLinear, Gather + DequantizeLinear)")
        report.timings["quantize_s"] = time.perf_counter() - t
    if not report.rewritten and not (quantize or planner is not None):
        reasons = sorted({s.reason for s in report.sites}) or ["the graph has no MatMul/Gemm/Gather with a constant 2-D weight"]
        raise OnnxHmfError("no compressible weights: " + "; ".join(reasons)[:300])

    _finish_metadata(work, report)
    report.params_after = count_params(work)
    pruned = [s for s in report.rewritten if s.method == "prune"]
    if pruned:
        report.nonzero_after = report.params_after - sum(s.params_before - s.params_after for s in pruned)
    if _stage is None:
        if store is not None:
            inline_external(work, store)
        try:
            onnx.checker.check_model(work)
        except onnx.checker.ValidationError as e:  # a bug in a rewrite, never the user's fault
            raise OnnxHmfError(f"internal error: rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from None
        report.bytes_after = work.ByteSize()
        cand_src = work
    else:  # write into the stage folder, then check and verify by path (works past 2 GB)
        external, threshold = _save
        if external is None and had_external:  # keep the input's layout: no whole-model copy in memory
            external = True
        t = time.perf_counter()
        report.bytes_after = _stage.write(work, store, external=external, threshold=threshold)
        report.timings["write_s"] = time.perf_counter() - t
        store.close()
        if _stage.data_location and external is None:
            report.notes.append(f"saved with external data ({_stage.data_location}): the model would pass protobuf's 2 GB limit")
        _check_written(_stage.model_path, report.input_path)
        cand_src = _stage.model_path

    if verify:
        t = time.perf_counter()
        cand = run_onnxruntime(cand_src, feeds, prepack=False)
        report.timings["verify_run_s"] = time.perf_counter() - t
        report.outputs = compare_outputs(ref, cand, vocab)
        report.failures = check_outputs(ref, cand, report.outputs, atol=atol, rtol=rtol, min_cosine=min_cosine,
                                        min_top1=min_top1)
        report.verified = True
        report.passed = not report.failures
        report.settings.update(
            {
                "inputs": {k: list(v.shape) for k, v in feeds.items()},
                "atol": atol or {},
                "rtol": rtol or {},
                "min_cosine": min_cosine,
                "min_top1": min_top1,
                "criterion": criterion_text(atol, rtol, min_cosine, min_top1),
            }
        )
    report.timings["total_s"] = time.perf_counter() - t0
    return work, report


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
def _calibrate(work, fpass, report, calib, tokenizer, samples, seq_len, batch, allocation, min_fidelity, keep, rank,
               progress) -> tuple[float | None, Calibration]:
    """Capture statistics into ``fpass``; plan per-group keeps (measured allocation, or the
    smallest keep meeting ``min_fidelity``). Returns (the keep used, the fitting data)."""
    t = time.perf_counter()
    cal = calib if isinstance(calib, Calibration) else load_calibration(
        calib, work, tokenizer=tokenizer, samples=samples, seq_len=seq_len, batch_size=batch)
    held = None
    if min_fidelity is not None:
        cal, held = cal.split(0.25)
    groups = candidate_groups(fpass, find_weight_groups(GraphIndex(work)))
    acts, idx = calibration_targets(groups)
    fpass.stats = capture_stats(work, cal, acts, idx, progress=progress)
    report.timings["calibration_s"] = time.perf_counter() - t
    info = {"source": cal.source, "samples": cal.samples, "tokens": cal.tokens, "activations": len(acts),
            "gram_bytes": int(sum(g.nbytes for g in fpass.stats.grams.values()))}
    measured = allocation == "measured" or (allocation == "auto" and rank is None)
    if measured and rank is None and groups:
        t = time.perf_counter()
        sens = measure_sensitivities(work, fpass, groups, cal, progress=progress)
        shapes = {g.name: g.shape for g in groups}
        report.timings["sensitivity_s"] = time.perf_counter() - t
        if min_fidelity is not None:
            t = time.perf_counter()
            keep, reached, tried = _search_keep(work, fpass, sens, shapes, held, min_fidelity)
            report.timings["fidelity_search_s"] = time.perf_counter() - t
            info.update({"min_fidelity": min_fidelity, "keep_found": keep, "heldout_fidelity": reached,
                         "heldout_samples": held.samples, "search": tried})
            report.notes.append(f"--min-fidelity {min_fidelity}: keep {keep:.3f} of the compressible parameters reaches "
                                f"cosine {reached:.4f} on {held.samples} held-out calibration samples")
        fpass.keeps = plan_keeps(sens, shapes, keep)
        info["allocation"] = "measured"
        info["dense_by_allocation"] = sorted(n for n, k in fpass.keeps.items() if k >= 1.0)
    else:
        info["allocation"] = "uniform"
    report.settings["calibration"] = info
    return keep, cal


def _search_keep(work, fpass, sens, shapes, held, target) -> tuple[float, float, list]:
    """Bisection on the global keep for the smallest model whose held-out fidelity ≥ target."""
    refs = reference_outputs(work, held)

    def trial(k: float) -> float:
        m = onnx.ModelProto()
        m.CopyFrom(work)
        saved = fpass.keeps
        fpass.keeps = plan_keeps(sens, shapes, k)
        try:
            fpass.run(m)
        finally:
            fpass.keeps = saved
        return fidelity(m, refs, held)

    lo, hi, best = 0.0, 1.0, 1.0
    tried = []
    for _ in range(7):
        mid = (lo + hi) / 2
        f = trial(mid)
        tried.append([round(mid, 4), round(f, 5)])
        if f >= target:
            hi, best = mid, f
        else:
            lo = mid
    if hi >= 1.0:
        raise OnnxHmfError(f"no compressed model reaches --min-fidelity {target} on held-out calibration data "
                           f"(best tried: keep {tried[-1][0]} gives {tried[-1][1]})")
    return hi, best, tried


SEQUENTIAL_STAGES = 8  # at most this many calibration passes (each runs the model twice)


def _run_sequential(work, fpass, cal, progress, stages: int = SEQUENTIAL_STAGES):
    """Stage by stage, each stage calibrated on the model compressed so far, with the cross
    term against the original model's activations (sequential least squares). The site levels
    (site_levels) are cut into at most ``stages`` consecutive bands: one band is one pass over
    the calibration data."""
    original = onnx.ModelProto()
    original.CopyFrom(work)
    groups = find_weight_groups(GraphIndex(work))
    todo = candidate_groups(fpass, groups)
    levels = site_levels(work, todo)
    distinct = sorted(set(levels.values()))
    per = max(1, -(-len(distinct) // stages))
    band = {lvl: i // per for i, lvl in enumerate(distinct)}
    sites = []
    for b in progress(sorted(set(band.values()))):
        stage = [g for g in todo if band[levels[g.name]] == b]
        acts, idx = calibration_targets(stage)
        changed = any(s.status == "rewritten" for s in sites)  # else X_c = X_o: plain whitening
        fpass.stats = capture_stats(work, cal, acts, idx, reference=original if changed else None)
        fpass.only = {g.name for g in stage}
        sites += fpass.run(work)
    fpass.only = {g.name for g in groups} - {g.name for g in todo}
    sites += fpass.run(work)  # the skipped ones, for the report
    fpass.only = None
    order = {g.name: i for i, g in enumerate(groups)}
    return sorted(sites, key=lambda s: order.get(s.weight, len(order)))


def _finish_metadata(model: onnx.ModelProto, report: Report, *, notes: bool = True) -> None:
    """Record what onnxhmf did; keep IR version unless onnxruntime could not read it."""
    entry = {"version": __version__, **{k: v for k, v in report.settings.items() if v not in (None, [], {})}}
    for prop in model.metadata_props:
        if prop.key == "onnxhmf":
            prop.value = json.dumps(entry)
            break
    else:
        model.metadata_props.add(key="onnxhmf", value=json.dumps(entry))
    limit = max_ir_version_for_onnxruntime()
    if model.ir_version > limit:
        if notes:
            report.notes.append(f"IR version {model.ir_version} lowered to {limit}, the most the installed onnxruntime reads")
        model.ir_version = limit


def optimize_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    force: bool = False,
    force_on_failure: bool = False,
    save_external_data: bool | str | None = None,
    external_data_size_threshold: int = 1024,
    **kwargs,
) -> Report:
    """Optimize ``input_path`` and write ``output_path`` atomically.

    ``save_external_data``: True (or a file name) stores tensors of at least
    ``external_data_size_threshold`` bytes in a data file next to the output (default name
    ``<output name>.data``); None does so when the input has external data or the output
    would pass protobuf's 2 GB limit.
    The model and data file are written to a temp folder beside the output, checked and
    verified there, then renamed into place; nothing is left behind on failure or Ctrl-C.

    Raises VerificationError (and writes nothing) when verification fails, unless
    ``force_on_failure``. ``force`` allows replacing an existing output (never the input).
    """
    location = save_external_data if isinstance(save_external_data, str) and save_external_data else None
    external = None if save_external_data is None else True
    reads = named_reads(**{k: kwargs.get(k) for k in ("inputs", "calib", "tokenizer", "token_freq")})
    with OutputStage(output_path, force=force, inputs=(input_path,), data_location=location, reads=reads) as stage:
        model, report = optimize(input_path, _stage=stage, _save=(external, external_data_size_threshold), **kwargs)
        report.output_path = str(output_path)
        if report.verified and not report.passed and not force_on_failure:
            raise VerificationError("verification failed, no output written: " + "; ".join(report.failures), report=report)
        stage.commit()
        if stage.data_location:
            report.notes.append(f"weights saved to {stage.data_location} next to the output")
    return report
