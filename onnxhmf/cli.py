"""Command line: a thin shell over :mod:`onnxhmf.api`.

Every error is one line on stderr: exit 2 for bad input or options, 1 for failed verification,
3 for an internal error (``ONNXHMF_DEBUG=1`` re-raises it with its traceback).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import click
import numpy as np

from . import __version__
from .api import DEFAULT_KEEP, DEFAULT_MIN_COSINE, optimize as optimize_model, optimize_file
from .verify import DEFAULT_MIN_TOP1
from .errors import OnnxHmfError, VerificationError
from .io import Interrupted, check_optimize_paths, check_output_path, check_paths, named_reads, write_text_atomic
from .verify import parse_input_shapes, parse_tolerances, verify_models
from .bench import bench_models
from .inspect import inspect_model


def _progress(quiet: bool):
    from .progress import bar, no_progress

    return no_progress if quiet else bar


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="onnxhmf")
def cli():
    """Make exported ONNX language models smaller and faster, offline."""


class _Group:
    """One concern's options: their click declarations and how they become ``optimize`` kwargs."""

    def __init__(self, title: str, options: list, build=None):
        self.title, self.options, self.build = title, options, build or (lambda p: {})
        self.names = set()

    def attach(self, f):
        for opt in reversed(self.options):
            f = opt(f)
        return f


def _o(*decls, **attrs):
    return click.option(*decls, **attrs)


_SELECTION = _Group("Which weights", [
    _o("--include", multiple=True, metavar="REGEX", help="Only sites whose weight or node name matches (repeatable)."),
    _o("--exclude", multiple=True, metavar="REGEX", help="Skip sites whose weight or node name matches (repeatable)."),
    _o("--min-params", type=click.IntRange(min=0), default=0, show_default=True, help="Skip weights with fewer parameters."),
], lambda p: {"include": p["include"], "exclude": p["exclude"], "min_params": p["min_params"]})

_BUDGET = _Group("How much to keep", [
    _o("--fidelity", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="F",
       help="The default when no --keep, --rank, --plan, --min-fidelity, --quantize or --plan-file is given: the "
            "smallest model whose held-out fidelity is at least F (cosine for embeddings; exp(-KL) >= 1-3(1-F) for "
            "logits), calibrated on data found beside the model [default: 0.99]."),
    _o("--allow-slower", is_flag=True,
       help="With the default fidelity target: the smallest plan even if it runs slower than the input here "
            "(disk-only treatments included); for a model served on other hardware. Without it the plan is no "
            "slower than the input, measured on this machine (one thread, integer kernels only)."),
    _o("--fast", is_flag=True, hidden=True, help="Kept for scripts: no slower than the input is now the default."),
    _o("--keep", type=click.FloatRange(0, 1, min_open=True), default=None,
       help=f"Fraction of each rewritten weight's parameters to keep [default: {DEFAULT_KEEP}]; with --calib, a "
            "budget for all of them together."),
    _o("--rank", type=click.IntRange(min=1), default=None, help="Fixed rank for every site (instead of --keep)."),
    _o("--rank-multiple", type=click.IntRange(min=1), default=1, show_default=True,
       help="Round ranks down to a multiple of this (e.g. 8 or 16 for SIMD-friendly shapes)."),
    _o("--allocate", "allocation", type=click.Choice(["auto", "uniform", "measured"]), default="auto", show_default=True,
       help="How --keep is spread over weights: measured = by each weight's measured end-to-end loss (default with "
            "--calib); uniform = the same keep for every weight."),
    _o("--min-fidelity", type=click.FloatRange(-1, 1), default=None, metavar="COSINE",
       help="With --calib: the smallest model whose outputs keep this mean cosine on held-out calibration data."),
    _o("--plan", "plan_mode", type=click.Choice(["auto"]), default=None,
       help="With --calib: choose per weight among dense, int8, weight-only int8/int4, whitened LMF and LMF with "
            "int8 factors under --target-size/--target-ratio, or the smallest plan meeting --target-fidelity."),
    _o("--target-size", default=None, metavar="SIZE", help="--plan auto: file size budget, bytes or e.g. 22.8MB, 900KB."),
    _o("--target-ratio", type=click.FloatRange(0, 1, min_open=True), default=None,
       help="--plan auto: file size budget as a fraction of the input's."),
    _o("--target-fidelity", type=click.FloatRange(-1, 1), default=None, metavar="COSINE",
       help="--plan auto: the smallest plan whose outputs keep this mean cosine on held-out calibration data."),
    _o("--max-latency-ratio", type=click.FloatRange(0, min_open=True), default=None, metavar="X",
       help="--plan auto: the plan runs within X times the input's onnxruntime latency (one thread; predicted "
            "inside the search, then measured; fails if no plan does)."),
    _o("--max-memory", default=None, metavar="SIZE",
       help="With the default target or --plan auto: the loaded model's resident memory (a fresh onnxruntime "
            "process that loads and runs it) at most SIZE, e.g. 60MB; weight-only (float once loaded) forms give way."),
    _o("--plan-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
       help="Apply this saved (or hand-edited) plan exactly, instead of planning (see --save-plan)."),
], lambda p: _budget(p))

_METHODS = _Group("How weights are stored", [
    _o("--method", type=click.Choice(["lmf", "hmf", "prune"]), default="lmf", show_default=True,
       help="Linear sites: lmf = truncated SVD, hmf = hybrid dense + low rank, prune = magnitude pruning (baseline)."),
    _o("--embedding-method", type=click.Choice(["svd", "hmf", "prune", "skip", "ae"]), default=None,
       help="Embedding tables (Gather): default follows --method (lmf -> svd); ae = trained autoencoder."),
    _o("--quantize", type=click.Choice(["int8", "int8pc"]), default=None,
       help="After factorization, store weight MatMuls (factors included) and Gather tables as int8 "
            "(standard ops: MatMulInteger + DynamicQuantizeLinear, Gather + DequantizeLinear); int8pc: one weight "
            "scale per output column (onnxruntime's per_channel=True: more accurate, as fast)."),
    _o("--smooth", type=click.Choice(["cheap", "all", "free"]), is_flag=False, flag_value="cheap", default=None,
       metavar="[cheap|all|free]",
       help="With --quantize int8pc and --calib: SmoothQuant first, moving activation outliers into the weights "
            "(docs/quantization.md); exact in float. The 1/s is folded into the graph where that is free (free: "
            "only there); elsewhere one Mul node per site, where the MatMuls' outputs are at least as wide as "
            "their input (cheap, the default) or everywhere (all: more accurate, a little slower)."),
    _o("--table-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
       help="With --quantize: Gather tables as int8 (onnxruntime's quantizer; a tied table: int8 rows shared with "
            "an int8 head) or as int4 rows (block 32, clip-searched scales; a tied table: one scale per row, shared). "
            "Only the gathered rows are dequantized; the opset is unchanged."),
    _o("--no-fold", is_flag=True, help="HMF: always restore column order with a Gather instead of folding it into consumers."),
    _o("--share-bases", is_flag=True,
       help="LMF weights that read the same activation (e.g. Q, K, V) share one first factor, where that lowers the "
            "predicted error at the same size."),
    _o("--no-pivot", is_flag=True,
       help="Store low-rank results as A·B, r(m+n) numbers, instead of pivoted (r pivot columns of the product and the "
            "coefficients of the others, r(m+n−r); docs/pivot.md); ranks are then chosen in that currency."),
    _o("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Seed for generated inputs and randomized SVD."),
    _o("--lower-recurrent", is_flag=True,
       help="Lower LSTM/GRU/RNN ops to Scan with explicit MatMuls so R is factorized too (slower than the fused op "
            "unless R is compressed; docs/recurrent.md). Without it only W is rewritten, in the op."),
    _o("--kernels", type=click.Choice(["standard", "onnxruntime"]), default="standard", show_default=True,
       help="onnxruntime: write blocked int4/int8 MatMuls as onnxruntime's MatMulNBits (com.microsoft) instead of "
            "standard DequantizeLinear -> MatMul, which onnxruntime fuses into it at load. The same integers; less "
            "memory once loaded (no fusion at load, and 4-bit weights at float compute); runs on onnxruntime only "
            "(docs/quantization.md)."),
    _o("--accuracy-level", type=click.IntRange(0, 4), default=None,
       help="With --kernels onnxruntime: MatMulNBits' accuracy_level for every kernel (0 float, 4 int8 activations) "
            "[default: 0 for 4-bit weights, 4 for 8-bit]."),
    _o("--activations", type=click.Choice(["per-tensor", "per-token", "auto"]), default="per-tensor", show_default=True,
       help="How the int8 MatMulIntegers (--quantize, and int8 sites of a plan) quantize their inputs at run time: "
            "per-tensor is onnxruntime's DynamicQuantizeLinear (one scale for the whole input); per-token gives each "
            "row its own scale (a few standard elementwise ops): more accurate where a few tokens are outliers, "
            "a little slower; auto (with calibration data): per-token only for the inputs that remove most of the "
            "loss, measured (docs/quantization.md)."),
    _o("--int8-weights", type=click.Choice(["auto", "int8", "uint8"]), default="auto", show_default=True,
       help="How int8 MatMulInteger weights are stored: int8 is onnxruntime's quantizer's; uint8 shifts every one "
            "by 128 (zero point too: the same products) and a tied table's rows get their own zero points, which "
            "x86 CPUs without VNNI multiply exactly where their int8 kernel saturates, a little slower; auto: uint8 "
            "for the tied head and the per-token inputs' weights where this CPU saturates, else int8 "
            "(docs/quantization.md)."),
    _o("--rotate", is_flag=True,
       help="Planners also offer int4 of a MatMul weight rotated by a 32x32 block Hadamard on its input side, the "
            "input rotated at run time (standard ops; still fused to MatMulNBits): less loss at the same bytes, about "
            "10% slower on MiniLM (docs/quantization.md)."),
], lambda p: {"method": p["method"], "embedding_method": p["embedding_method"], "quantize": p["quantize"],
              "smooth": p["smooth"], "table_bits": int(p["table_bits"]), "fold": not p["no_fold"],
              "share_bases": p["share_bases"], "seed": p["seed"],
              "lower_recurrent": p["lower_recurrent"], "pivot": not p["no_pivot"],
              "kernels": p["kernels"], "accuracy_level": p["accuracy_level"], "activations": p["activations"],
              "int8_weights": p["int8_weights"], "rotate": p["rotate"]})

_CALIBRATION = _Group("Calibration data", [
    _o("--calib", type=click.Path(path_type=Path), default=None,
       help="Calibration data: an .npz of input feeds, a folder of .npz files, or a text file (with --tokenizer). "
            "Makes every factorization data-aware (whitened by the layer's activations)."),
    _o("--tokenizer", type=click.Path(path_type=Path), default=None, help="tokenizer.json for --calib or --token-freq text."),
    _o("--calib-samples", type=click.IntRange(min=2), default=256, show_default=True, help="Calibration rows (sentences or windows) to use."),
    _o("--calib-seq-len", type=click.IntRange(min=1), default=128, show_default=True, help="Tokens per calibration sample (text)."),
    _o("--calib-batch", type=click.IntRange(min=1), default=16, show_default=True, help="Calibration rows per onnxruntime run."),
    _o("--sequential", is_flag=True, help="With --calib: calibrate each stage of layers on the already-compressed model."),
    _o("--damp", type=click.FloatRange(min=0), default=0.01, show_default=True,
       help="Whitening damping, as a fraction of the mean activation energy."),
    _o("--token-freq", type=click.Path(path_type=Path), default=None,
       help="Token frequencies for embedding HMF: an .npz of token ids, or a text file with --tokenizer."),
], lambda p: {"calib": p["calib"], "tokenizer": p["tokenizer"], "calib_samples": p["calib_samples"],
              "calib_seq_len": p["calib_seq_len"], "calib_batch": p["calib_batch"], "sequential": p["sequential"],
              "damp": p["damp"], "token_freq": p["token_freq"]})

_VERIFY = _Group("Verification", [
    _o("--inputs", "inputs_npz", type=click.Path(path_type=Path), default=None, help="Verification inputs: an .npz keyed by input name."),
    _o("--input-shapes", multiple=True, metavar="NAME:D0,D1,...",
       help="Bind an input's shape for generated inputs, e.g. input_ids:1,128 (repeatable)."),
    _o("--atol", multiple=True, metavar="[OUT:]VAL", help="Absolute tolerance, for all outputs or one (repeatable)."),
    _o("--rtol", multiple=True, metavar="[OUT:]VAL", help="Relative tolerance, for all outputs or one (repeatable)."),
    _o("--min-cosine", multiple=True, metavar="[OUT:]C",
       help=f"Fail if a float output's fidelity is below C, for all outputs or one (repeatable) [default: "
            f"{DEFAULT_MIN_COSINE} on generated inputs; with the fidelity target, the target's minimums]."),
    _o("--min-top1", type=click.FloatRange(0, 1), default=DEFAULT_MIN_TOP1, show_default=True,
       help="Fail if a logits-like output's top-1 agreement with the original is below this (generated or --inputs feeds)."),
    _o("--outputs", multiple=True, metavar="NAME", help="The outputs whose fidelity counts (repeatable) [default: all]."),
    _o("--no-verify", is_flag=True, help="Skip verification with onnxruntime."),
    _o("--no-measure", is_flag=True, help="Skip measuring resident memory and latency for the result table."),
], lambda p: {**_min_cosine(p["min_cosine"]), "outputs": p["outputs"], "min_top1": p["min_top1"],
              "verify": not p["no_verify"], "measure": not (p["no_measure"] or p["quiet"]), "inputs": p["inputs_npz"], "input_shapes": parse_input_shapes(p["input_shapes"]),
              "atol": parse_tolerances(p["atol"], "--atol"), "rtol": parse_tolerances(p["rtol"], "--rtol")})

_OUTPUT = _Group("Output", [
    _o("--overwrite", is_flag=True, help="Replace an existing output file (never an input)."),
    _o("--write-unverified", is_flag=True, help="Write the output even if verification fails (the report says so)."),
    _o("--force", is_flag=True, help="Both --overwrite and --write-unverified."),
    _o("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the report as JSON."),
    _o("--save-plan", type=click.Path(dir_okay=False, path_type=Path), default=None,
       help="Also write the plan as JSON (with --dry-run: only the plan); replay it with --plan-file."),
    _o("--save-external-data", "save_external_data", is_flag=False, flag_value="", default=None, metavar="[LOCATION]",
       help="Store weights in a data file next to the output (default name: <output>.data). "
            "Done anyway when the input has external data or the output would pass protobuf's 2 GB limit."),
    _o("--external-data-size-threshold", type=click.IntRange(min=0), default=1024, show_default=True, metavar="BYTES",
       help="With external data: tensors of at least this many bytes go to the data file."),
    _o("--compact-names", is_flag=True,
       help="Rename intermediate tensors to short names and drop node names and doc strings (inputs, outputs, "
            "weights and metadata keep theirs): the same graph in fewer bytes (about 1% of MiniLM at 0.1x); "
            "--target-size plans count it."),
    _o("--float16-biases", is_flag=True,
       help="Store biases and LayerNorm scales as float16 on disk, rebuilt by a Cast that onnxruntime folds at load "
            "(the loaded model stays float32; relative error at most 2^-11); --target-size plans count it."),
    _o("-q", "--quiet", is_flag=True, help="No progress bar and no tables; errors only."),
    _o("--dry-run", is_flag=True, help="Print the plan (per weight: treatment, rank or budget, predicted size); with "
                                       "--calib or --plan auto it measures on the data; write nothing (but --save-plan)."),
], lambda p: {"compact_names": p["compact_names"], "float16_biases": p["float16_biases"]})

_AUTOENCODERS = _Group("Autoencoders (specialist)", [
    _o("--ae-decoder", type=click.Choice(["linear", "nonlinear"]), default=None, help="AE: decoder [default: linear]."),
    _o("--ae-activation", type=click.Choice(["relu", "leakyrelu", "tanh"]), default=None,
       help="AE: nonlinear decoder's activation [default: relu]."),
    _o("--ae-hidden", type=click.IntRange(min=1), default=None, help="AE: nonlinear decoder's hidden width [default: 2k]."),
    _o("--ae-init", type=click.Choice(["svd", "random"]), default=None, help="AE: initialisation [default: svd]."),
    _o("--ae-epochs", type=click.IntRange(min=0), default=None, help="AE: training epochs [default: 30]."),
    _o("--ae-batch-size", type=click.IntRange(min=1), default=None, help="AE: rows per batch [default: 32]."),
    _o("--ae-lr", type=click.FloatRange(0, min_open=True), default=None, help="AE: Adam learning rate [default: 1e-3]."),
    _o("--ae-loss-weights", default=None, metavar="WCOS,WMAG",
       help="AE: weights of the direction and |error|^alpha terms [default: 0.1995,0.0025]."),
    _o("--storage-ae-include", multiple=True, metavar="REGEX",
       help="Storage AE: weights (by name) to rebuild from codes and a decoder shared per shape and role (repeatable)."),
    _o("--storage-ae-keep", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.25, show_default=True,
       help="Storage AE: fraction of each group's parameters kept (codes, norms, decoder)."),
    _o("--storage-ae-epochs", type=click.IntRange(min=0), default=None, help="Storage AE: training epochs [default: 60]."),
], lambda p: {"ae_options": _ae_options(p), "storage_ae": _storage_ae(p)})

OPTIMIZE_GROUPS = (_BUDGET, _METHODS, _CALIBRATION, _SELECTION, _VERIFY, _OUTPUT, _AUTOENCODERS)


class _GroupedCommand(click.Command):
    """``--help`` lists the options by group, specialist ones last."""

    def format_options(self, ctx, formatter):
        by_name = {p.name: p for p in self.get_params(ctx)}
        for group in OPTIMIZE_GROUPS:
            rows = [by_name[n].get_help_record(ctx) for n in group.names if n in by_name]
            with formatter.section(group.title):
                formatter.write_dl([r for r in rows if r])
        rest = [p.get_help_record(ctx) for p in self.get_params(ctx)
                if isinstance(p, click.Option) and not any(p.name in g.names for g in OPTIMIZE_GROUPS)]
        with formatter.section("Other"):
            formatter.write_dl([r for r in rest if r])


def _grouped(f):
    for group in reversed(OPTIMIZE_GROUPS):
        before = {p.name for p in getattr(f, "__click_params__", [])}
        f = group.attach(f)
        group.names = [p.name for p in reversed(f.__click_params__) if p.name not in before]
    return f


@cli.command(cls=_GroupedCommand)
@click.argument("input_model", type=click.Path(path_type=Path))
@click.argument("output_model", type=click.Path(path_type=Path))
@_grouped
def optimize(input_model, output_model, **p):
    """Compress INPUT_MODEL's weights and write a smaller, verified OUTPUT_MODEL.

    INPUT_MODEL may be a folder as exporters write it (model.onnx, or encoder/decoder files, with
    tokenizer.json and config.json): then OUTPUT_MODEL is a folder too, with every model optimized
    and the tokenizer and config files copied.
    """
    kwargs = {}
    for group in OPTIMIZE_GROUPS:
        kwargs.update(group.build(p))
    kwargs["progress"] = _progress(p["quiet"])
    if input_model.is_dir():
        return _optimize_folder(input_model, output_model, p, kwargs)
    if p["report_path"] is not None or p["save_plan"] is not None:
        check_optimize_paths(input_model, output_model, report=p["report_path"], save_plan=p["save_plan"], dry_run=p["dry_run"],
                             force=p["force"] or p["overwrite"], save_external_data=p["save_external_data"],
                             reads=named_reads(inputs=p["inputs_npz"], calib=p["calib"], tokenizer=p["tokenizer"],
                                               token_freq=p["token_freq"], plan_file=p["plan_file"]))
    if p["dry_run"]:  # nothing is written but the plan
        _, plan = optimize_model(input_model, dry_run=True, **kwargs)
        click.echo(plan.format())
        if p["save_plan"] is not None:
            plan.save(p["save_plan"])
        return
    try:
        report = optimize_file(input_model, output_model, force=p["force"] or p["overwrite"],
                               force_on_failure=p["force"] or p["write_unverified"],
                               save_external_data=p["save_external_data"], save_plan=p["save_plan"],
                               external_data_size_threshold=p["external_data_size_threshold"], **kwargs)
    except VerificationError as e:
        if e.report is not None and not p["quiet"]:
            click.echo(e.report.format())
            click.echo(next_command(input_model, output_model, p))
        if e.report is not None and p["report_path"] is not None:
            _write_text(p["report_path"], e.report.to_json())
        raise
    if not p["quiet"]:
        click.echo(report.format())
        click.echo(f"wrote {output_model}")
    if p["report_path"] is not None:
        _write_text(p["report_path"], report.to_json())


def _min_cosine(specs) -> dict:
    """``--min-cosine 0.95 --min-cosine logits:0.9`` → the global minimum and per-output ones."""
    found: dict[str, float] = {}
    for spec in specs:
        name, _, val = str(spec).rpartition(":")
        try:
            v = float(val)
            if not -1.0 <= v <= 1.0:
                raise ValueError
        except ValueError:
            raise click.BadParameter(f"{spec!r}: expected a number in [-1, 1] or OUTPUT:number", param_hint="--min-cosine")
        found[name] = v
    named = {k: v for k, v in found.items() if k}
    return {"min_cosine": found.get("", DEFAULT_MIN_COSINE), "minimums": ({**named, **({"": found[""]} if "" in found else {})}
                                                                        if found else None)}


_EXPLICIT = ("keep", "rank", "plan_mode", "min_fidelity", "quantize", "plan_file", "method", "embedding_method",
             "storage_ae_include", "allocation", "sequential", "share_bases", "target_size", "target_ratio",
             "target_fidelity", "max_latency_ratio")


def _default_mode(p: dict) -> bool:
    """No option says how much to keep or how: the default fidelity target applies."""
    ctx = click.get_current_context()
    given = [n for n in _EXPLICIT if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]
    return not given


def _budget(p: dict) -> dict:
    if _default_mode(p):
        if p["fast"] and p["allow_slower"]:
            raise click.UsageError("--fast and --allow-slower contradict each other (no slower than the input is the "
                                   "default)")
        return {"fidelity": 0.99 if p["fidelity"] is None else p["fidelity"], "allow_slower": p["allow_slower"],
                "keep": None, "rank": None, "max_memory": _max_memory(p)}
    if p["fidelity"] is not None or p["fast"] or p["allow_slower"]:
        raise click.UsageError("--fidelity, --allow-slower and --fast are the default planner's: give them without "
                               "--keep, --rank, --plan, --method or --quantize")
    keep, rank = p["keep"], p["rank"]
    if keep is not None and rank is not None:
        raise click.UsageError("give --keep or --rank, not both")
    if rank is None and keep is None:
        keep = 1.0 if p["quantize"] else DEFAULT_KEEP  # --quantize int8 alone means int8 alone
    if p["min_fidelity"] is not None and rank is not None:
        raise click.UsageError("--min-fidelity searches the size; give it without --rank")
    targets = (p["target_size"], p["target_ratio"], p["target_fidelity"])
    plan = None
    if p["plan_mode"] is None and (any(t is not None for t in targets) or p["max_latency_ratio"]):
        raise click.UsageError("--target-size, --target-ratio, --target-fidelity and --max-latency-ratio go with --plan auto")
    if p["plan_mode"] == "auto":
        if sum(t is not None for t in targets) != 1:
            raise click.UsageError("--plan auto needs exactly one of --target-size, --target-ratio, --target-fidelity")
        if p["calib"] is None:
            raise click.UsageError("--plan auto needs --calib")
        plan = {"target_size": parse_size(p["target_size"]) if p["target_size"] else None, "target_ratio": p["target_ratio"],
                "target_fidelity": p["target_fidelity"], "max_latency_ratio": p["max_latency_ratio"]}
    if p["max_memory"] is not None and p["plan_mode"] != "auto":
        raise click.UsageError("--max-memory goes with the default fidelity target or --plan auto")
    if p["plan_file"] is not None and p["plan_mode"] is not None:
        raise click.UsageError("--plan-file applies a saved plan: give it without --plan auto")
    return {"keep": keep, "rank": rank, "rank_multiple": p["rank_multiple"], "allocation": p["allocation"],
            "min_fidelity": p["min_fidelity"], "plan": plan, "plan_file": p["plan_file"], "max_memory": _max_memory(p)}


def _max_memory(p: dict) -> int | None:
    return None if p["max_memory"] is None else parse_size(p["max_memory"], "--max-memory")


def _optimize_folder(src: Path, out: Path, p: dict, kwargs: dict) -> None:
    """Every model of an exporter's folder, then the tokenizer/config files. A new out folder is
    built beside it under a temporary name and renamed into place only when every model passed."""
    import shutil
    import tempfile

    from .folder import copy_folder_files, plan_folder

    if p["report_path"] or p["save_plan"] or p["dry_run"] or p["plan_file"]:
        raise click.UsageError("a folder input takes no --report, --save-plan, --plan-file or --dry-run (give one model)")
    overwrite = p["force"] or p["overwrite"]
    plan = plan_folder(src, out, overwrite=overwrite)
    if not plan.models:
        raise OnnxHmfError(f"{str(src)!r} is a folder with no .onnx model (nor an onnx/ subfolder with one)")
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".onnxhmf-tmp", dir=out.parent)) if plan.create_out else None
    try:
        target = plan if stage is None else plan_folder(src, stage / "out", overwrite=False)
        for m in target.models:
            m.dst.parent.mkdir(parents=True, exist_ok=True)
            if not p["quiet"]:
                click.echo(f"== {m.src} ({m.role})")
            report = optimize_file(m.src, m.dst, force=overwrite, force_on_failure=p["force"] or p["write_unverified"],
                                   save_external_data=p["save_external_data"],
                                   external_data_size_threshold=p["external_data_size_threshold"], **kwargs)
            if not p["quiet"]:
                click.echo(report.format())
        copy_folder_files(target, overwrite=overwrite)
        if stage is not None:
            os.replace(stage / "out", out)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    if not p["quiet"]:
        click.echo(f"wrote {out}: {len(plan.models)} model(s), {len(plan.copies)} file(s) copied")


def next_command(input_model, output_model, p: dict) -> str:
    """What to try after a failed verification: calibration data and a fidelity target."""
    calib = ["--calib", str(p["calib"])] if p["calib"] else ["--calib", "TEXT.txt"]
    tok = p["tokenizer"]
    if tok is None:
        near = [d / "tokenizer.json" for d in (Path(input_model).parent, Path(input_model).parent.parent)]
        tok = next((t for t in near if t.is_file()), "tokenizer.json")
    if not p["calib"] or str(p["calib"]).endswith(".txt"):
        calib += ["--tokenizer", str(tok)]
    keep = p["keep"] or DEFAULT_KEEP
    more = f"a larger --keep (now {keep}), or " if p["plan_mode"] is None else ""
    return (f"try {more}a fidelity target on calibration data:\n  onnxhmf optimize {input_model} {output_model} "
            + " ".join(calib) + " --plan auto --target-fidelity 0.99")


def _storage_ae(p: dict) -> dict | None:
    if not p["storage_ae_include"]:
        return None
    return {"include": list(p["storage_ae_include"]), "keep": p["storage_ae_keep"],
            "options": {} if p["storage_ae_epochs"] is None else {"epochs": p["storage_ae_epochs"]}}


def parse_size(text: str, hint: str = "--target-size") -> int:
    """Bytes from '22800000', '22.8MB', '900KB', '1.5GB' (decimal units; MiB/KiB binary)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b?|b)?\s*", str(text), re.I)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 22800000, 22.8MB, 900KB)", param_hint=hint)
    unit = (m.group(2) or "b").lower().rstrip("b") or "b"
    mult = {"b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024, "mi": 1024**2, "gi": 1024**3}[unit]
    size = int(float(m.group(1)) * mult)
    if size <= 0:
        raise click.BadParameter("must be positive", param_hint=hint)
    return size


def _ae_options(p: dict) -> dict:
    opts = {k: p[f"ae_{k}"] for k in ("decoder", "activation", "hidden", "init", "epochs", "batch_size", "lr")}
    if p["ae_loss_weights"] is not None:
        try:
            w_cos, w_mag = (float(v) for v in p["ae_loss_weights"].split(","))
        except ValueError:
            raise click.UsageError(f"--ae-loss-weights wants two numbers WCOS,WMAG, got {p['ae_loss_weights']!r}") from None
        if not (np.isfinite(w_cos) and np.isfinite(w_mag)):
            raise click.UsageError("--ae-loss-weights must be finite numbers")
        opts.update(w_cos=w_cos, w_mag=w_mag)
    return {k: v for k, v in opts.items() if v is not None}


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--keep", type=click.FloatRange(0, 1, min_open=True), default=DEFAULT_KEEP, show_default=True,
              help="Report the size `optimize --keep F` (lmf) would reach.")
@click.option("--full-spectrum", is_flag=True,
              help="Also compute spectra of huge weights (short side > 4096 or > 50M elements).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect(model, keep, full_spectrum, as_json):
    """List MODEL's compressible sites with their spectral ranks and the size at --keep."""
    result = inspect_model(model, keep=keep, full_spectrum=full_spectrum)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.format())


@cli.command()
@click.argument("models", nargs=-1, required=True, metavar="REF [CAND]", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--inputs", "inputs_npz", type=click.Path(path_type=Path), default=None, help="Inputs: an .npz keyed by input name.")
@click.option("--input-shapes", multiple=True, metavar="NAME:D0,D1,...", help="Bind an input's shape for generated inputs (repeatable).")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help="Text file: inputs from its first lines (needs --tokenizer).")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="tokenizer.json for --calib.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=None,
              help="With --calib: how many sentences (titles and blank lines skipped) [default: up to 8].")
@click.option("--atol", multiple=True, metavar="[OUT:]VAL", help="Absolute tolerance, for all outputs or one (repeatable).")
@click.option("--rtol", multiple=True, metavar="[OUT:]VAL", help="Relative tolerance, for all outputs or one (repeatable).")
@click.option("--check-error-stat", multiple=True, metavar="[OUT:]STAT",
              help="What --atol/--rtol bound: elementwise (default), max, mean, median or quantile (repeatable, per output).")
@click.option("--error-quantile", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.99, show_default=True,
              help="The quantile reported and checked by --check-error-stat quantile.")
@click.option("--min-cosine", type=click.FloatRange(-1, 1), default=None, help="Fail if an output's mean cosine is below this.")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None,
              help="Fail if a logits-like output's top-1 agreement is below this. With no criterion given: "
                   "mean cosine >= 0.9 and top-1 >= 0.9.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="k for top-k agreement of logits-like outputs.")
@click.option("--runtime", "runtimes", multiple=True, type=click.Choice(["ort", "reference"]),
              help="Run CAND on onnxruntime (ort, default) and/or onnx.reference (repeatable).")
@click.option("--save-outputs", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save the inputs and REF's outputs to an .npz (golden outputs).")
@click.option("--load-outputs", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Compare CAND with golden outputs saved by --save-outputs instead of running REF.")
@click.option("--report", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the result as JSON.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Seed for generated inputs.")
def verify(models, inputs_npz, input_shapes, calib, tokenizer, calib_samples, atol, rtol, check_error_stat, error_quantile, min_cosine,
           min_top1, top_k, runtimes, save_outputs, load_outputs, json_path, seed):
    """Compare CAND's outputs with REF's on the same inputs; exit 1 when a tolerance is missed.

    \b
    onnxhmf verify REF CAND                         compare
    onnxhmf verify REF --save-outputs golden.npz    save inputs and REF's outputs
    onnxhmf verify CAND --load-outputs golden.npz   compare with them instead of running REF
    """
    if len(models) > 2:
        raise click.UsageError("give REF and CAND (two models at most)")
    if load_outputs is not None:
        if len(models) != 1:
            raise click.UsageError("with --load-outputs give only CAND")
        ref, cand = None, models[0]
    elif len(models) == 1:
        if save_outputs is None:
            raise click.UsageError("give REF and CAND, or one model with --save-outputs or --load-outputs")
        ref, cand = models[0], None
    else:
        ref, cand = models
    check_paths(named_reads(inputs=inputs_npz, calib=calib, tokenizer=tokenizer, load_outputs=load_outputs),
                [("--save-outputs", save_outputs, True), ("--report", json_path, True)],
                models=[(("reference" if i == 0 and ref is not None else "candidate") + " model", m) for i, m in enumerate(models)])
    stats = {}
    for spec in check_error_stat:
        name, _, val = spec.rpartition(":")
        stats[name] = val
    report = verify_models(
        ref, cand, inputs=inputs_npz, input_shapes=parse_input_shapes(input_shapes), calib=calib, tokenizer=tokenizer,
        load_outputs=load_outputs, save_outputs=save_outputs, runtimes=tuple(runtimes) or ("ort",),
        atol=parse_tolerances(atol, "--atol"), rtol=parse_tolerances(rtol, "--rtol"), min_cosine=min_cosine,
        check_error_stat=stats or "elementwise", quantile=error_quantile, top_k=top_k, seed=seed,
        calib_samples=calib_samples, min_top1=min_top1)
    click.echo(report.format())
    if json_path is not None:
        _write_text(json_path, report.to_json())
    if report.passed is False:
        raise VerificationError("verification failed: " + "; ".join(report.failures))


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs of each model first.")
@click.option("--iterations", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs of each model.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads [default: ort's].")
@click.option("--input-shapes", multiple=True, metavar="NAME:D0,D1,...", help="Bind an input's shape for generated inputs (repeatable).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Seed for generated inputs.")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure resident memory: a fresh process per model loads it and runs it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench(models, warmup, iterations, threads, input_shapes, seed, memory, as_json):
    """Size, parameters, resident memory and CPU latency of MODELS side by side, with ratios to the first."""
    result = bench_models(list(models), warmup=warmup, iterations=iterations, threads=threads,
                          input_shapes=parse_input_shapes(input_shapes), seed=seed, memory=memory)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.format())


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text + "\n")


_SHAPE = re.compile(r"^[^\s/\\]+:\[?\d*(,\d+)*\]?$")


def _expand_input_shapes(args: list[str]) -> list[str]:
    """``--input-shapes a:1,128 b:1,128`` → one ``--input-shapes`` per spec (click options take
    one value): the specs that follow the flag, up to the next option or a token that is no
    NAME:D0,D1 spec."""
    out, i = [], 0
    while i < len(args):
        out.append(args[i])
        if args[i] == "--input-shapes" and i + 1 < len(args):
            out.append(args[i + 1])
            i += 2
            while i < len(args) and _SHAPE.match(args[i]) and not args[i].startswith("-") and not Path(args[i]).exists():
                out += ["--input-shapes", args[i]]
                i += 1
            continue
        i += 1
    return out


def main(argv=None) -> int:
    """Entry point: run the CLI, turning every failure into one line on stderr."""
    try:
        # make_context + invoke rather than cli.main: click's main echoes a bare newline to
        # stderr on Ctrl-C before its Abort, which would break "one line per error".
        args = _expand_input_shapes(sys.argv[1:] if argv is None else list(argv))
        with cli.make_context("onnxhmf", args) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("onnxhmf: interrupted; no output written", err=True)
        return 130
    except click.ClickException as e:
        click.echo(f"onnxhmf: error: {e.format_message()}", err=True)
        return 2
    except (OnnxHmfError, Interrupted) as e:
        click.echo(f"onnxhmf: error: {e}", err=True)
        return e.exit_code
    except OSError as e:
        click.echo(f"onnxhmf: error: {e.filename or ''}: {e.strerror or e}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("onnxhmf: interrupted; no output written", err=True)
        return 130
    except Exception as e:  # a bug of ours (or onnxruntime's): still one line, and no output written
        if os.environ.get("ONNXHMF_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        click.echo(f"onnxhmf: internal error: {type(e).__name__}: {first} (no output written; "
                   "ONNXHMF_DEBUG=1 shows the traceback)", err=True)
        return 3
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
