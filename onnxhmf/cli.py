"""Command line: a thin shell over :mod:`onnxhmf.api`.

Every error is one line on stderr: exit 2 for bad input or options, 1 for failed verification.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .api import DEFAULT_KEEP, DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1, optimize_file
from .errors import OnnxHmfError, VerificationError
from .io import check_optimize_paths, check_paths, named_reads, write_atomic
from .plan import plan_optimize
from .verify import parse_input_shapes, parse_tolerances, verify_models
from .bench import bench_models
from .inspect import inspect_model


def _progress(quiet: bool):
    def wrap(items):
        items = list(items)
        if quiet or not items or not sys.stderr.isatty():
            return items
        return _bar(items)

    def _bar(items):
        with click.progressbar(items, label="working", file=sys.stderr, show_pos=True) as bar:
            yield from bar

    return wrap


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="onnxhmf")
def cli():
    """Make exported ONNX language models smaller and faster, offline."""


@cli.command()
@click.argument("input_model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("output_model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(["lmf", "hmf", "prune"]), default="lmf", show_default=True,
              help="Linear sites: lmf = truncated SVD, hmf = hybrid dense + low rank, prune = magnitude pruning (baseline).")
@click.option("--embedding-method", type=click.Choice(["svd", "hmf", "prune", "skip", "ae"]), default=None,
              help="Embedding tables (Gather): default follows --method (lmf -> svd); ae = trained autoencoder.")
@click.option("--ae-decoder", type=click.Choice(["linear", "nonlinear"]), default=None, help="AE: decoder [default: linear].")
@click.option("--ae-activation", type=click.Choice(["relu", "leakyrelu", "tanh"]), default=None,
              help="AE: nonlinear decoder's activation [default: relu].")
@click.option("--ae-hidden", type=click.IntRange(min=1), default=None, help="AE: nonlinear decoder's hidden width [default: 2k].")
@click.option("--ae-init", type=click.Choice(["svd", "random"]), default=None, help="AE: initialisation [default: svd].")
@click.option("--ae-epochs", type=click.IntRange(min=0), default=None, help="AE: training epochs [default: 30].")
@click.option("--ae-batch-size", type=click.IntRange(min=1), default=None, help="AE: rows per batch [default: 32].")
@click.option("--ae-lr", type=click.FloatRange(0, min_open=True), default=None, help="AE: Adam learning rate [default: 1e-3].")
@click.option("--ae-loss-weights", default=None, metavar="WCOS,WMAG",
              help="AE: weights of the direction and |error|^alpha terms [default: 0.1995,0.0025].")
@click.option("--storage-ae-include", multiple=True, metavar="REGEX",
              help="Storage AE: weights (by name) to rebuild from codes and a decoder shared per shape and role (repeatable).")
@click.option("--storage-ae-keep", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.25, show_default=True,
              help="Storage AE: fraction of each group's parameters kept (codes, norms, decoder).")
@click.option("--storage-ae-epochs", type=click.IntRange(min=0), default=None, help="Storage AE: training epochs [default: 60].")
@click.option("--token-freq", type=click.Path(path_type=Path), default=None,
              help="Token frequencies for embedding HMF: an .npz of token ids, or a text file with --tokenizer.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="tokenizer.json for --token-freq text.")
@click.option("--no-fold", is_flag=True, help="HMF: always restore column order with a Gather instead of folding it into consumers.")
@click.option("--keep", type=click.FloatRange(0, 1, min_open=True), default=None,
              help=f"Fraction of each rewritten weight's parameters to keep [default: {DEFAULT_KEEP}].")
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Fixed rank for every site (instead of --keep).")
@click.option("--rank-multiple", type=click.IntRange(min=1), default=1, show_default=True,
              help="Round ranks down to a multiple of this (e.g. 8 or 16 for SIMD-friendly shapes).")
@click.option("--include", multiple=True, metavar="REGEX", help="Only sites whose weight or node name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Skip sites whose weight or node name matches (repeatable).")
@click.option("--min-params", type=click.IntRange(min=0), default=0, show_default=True, help="Skip weights with fewer parameters.")
@click.option("--inputs", "inputs_npz", type=click.Path(path_type=Path), default=None,
              help="Verification inputs: an .npz keyed by input name.")
@click.option("--input-shapes", multiple=True, metavar="NAME:D0,D1,...",
              help="Bind an input's shape for generated inputs, e.g. input_ids:1,128 (repeatable).")
@click.option("--atol", multiple=True, metavar="[OUT:]VAL", help="Absolute tolerance, for all outputs or one (repeatable).")
@click.option("--rtol", multiple=True, metavar="[OUT:]VAL", help="Relative tolerance, for all outputs or one (repeatable).")
@click.option("--min-cosine", type=click.FloatRange(-1, 1), default=DEFAULT_MIN_COSINE, show_default=True,
              help="Fail if any float output's mean cosine to the original is below this.")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=DEFAULT_MIN_TOP1, show_default=True,
              help="Fail if a logits-like output's top-1 agreement with the original is below this.")
@click.option("--no-verify", is_flag=True, help="Skip verification with onnxruntime.")
@click.option("--force", is_flag=True, help="Overwrite an existing output, and write it even if verification fails.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration data: an .npz of input feeds, a folder of .npz files, or a text file (with --tokenizer). "
                   "Makes every factorization data-aware (whitened by the layer's activations).")
@click.option("--calib-samples", type=click.IntRange(min=2), default=256, show_default=True, help="Calibration rows (sentences or windows) to use.")
@click.option("--calib-seq-len", type=click.IntRange(min=1), default=128, show_default=True, help="Tokens per calibration sample (text).")
@click.option("--calib-batch", type=click.IntRange(min=1), default=16, show_default=True, help="Calibration rows per onnxruntime run.")
@click.option("--allocate", "allocation", type=click.Choice(["auto", "uniform", "measured"]), default="auto", show_default=True,
              help="How --keep is spread over weights: measured = by each weight's measured end-to-end loss (default with --calib); "
                   "uniform = the same keep for every weight.")
@click.option("--min-fidelity", type=click.FloatRange(-1, 1), default=None, metavar="COSINE",
              help="With --calib: the smallest model whose outputs keep this mean cosine on held-out calibration data.")
@click.option("--sequential", is_flag=True, help="With --calib: calibrate each stage of layers on the already-compressed model.")
@click.option("--share-bases", is_flag=True,
              help="LMF weights that read the same activation (e.g. Q, K, V) share one first factor, where that "
                   "lowers the predicted error at the same size.")
@click.option("--damp", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="Whitening damping, as a fraction of the mean activation energy.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Seed for generated inputs and randomized SVD.")
@click.option("--save-external-data", "save_external_data", is_flag=False, flag_value="", default=None, metavar="[LOCATION]",
              help="Store weights in a data file next to the output (default name: <output>.data). "
                   "Done anyway when the input has external data or the output would pass protobuf's 2 GB limit.")
@click.option("--external-data-size-threshold", type=click.IntRange(min=0), default=1024, show_default=True, metavar="BYTES",
              help="With external data: tensors of at least this many bytes go to the data file.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="After factorization, store weight MatMuls (factors included) and Gather tables as int8 "
                   "(standard ops: MatMulInteger + DynamicQuantizeLinear, Gather + DequantizeLinear).")
@click.option("--plan", "plan_mode", type=click.Choice(["auto"]), default=None,
              help="With --calib: choose per weight among dense, int8, weight-only int8/int4, whitened LMF and LMF with "
                   "int8 factors under --target-size/--target-ratio, or the smallest plan meeting --target-fidelity.")
@click.option("--target-size", default=None, metavar="SIZE", help="--plan auto: file size budget, bytes or e.g. 22.8MB, 900KB.")
@click.option("--target-ratio", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="--plan auto: file size budget as a fraction of the input's.")
@click.option("--target-fidelity", type=click.FloatRange(-1, 1), default=None, metavar="COSINE",
              help="--plan auto: the smallest plan whose outputs keep this mean cosine on held-out calibration data.")
@click.option("--max-latency-ratio", type=click.FloatRange(0, min_open=True), default=None, metavar="X",
              help="--plan auto: fail unless the plan runs within X times the input's onnxruntime latency.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no tables; errors only.")
@click.option("--dry-run", is_flag=True, help="Print the plan (sites, method, rank or budget, predicted size); factorize and write nothing.")
def optimize(input_model, output_model, method, embedding_method, ae_decoder, ae_activation, ae_hidden, ae_init, ae_epochs,
             ae_batch_size, ae_lr, ae_loss_weights, storage_ae_include, storage_ae_keep, storage_ae_epochs, token_freq, tokenizer,
             no_fold, keep, rank, rank_multiple, include, exclude, min_params, inputs_npz,
             input_shapes, atol, rtol, min_cosine, min_top1, no_verify, force, report_path, calib, calib_samples, calib_seq_len, calib_batch,
             allocation, min_fidelity, sequential, share_bases, damp, seed, save_external_data, external_data_size_threshold,
             quantize, plan_mode, target_size, target_ratio, target_fidelity, max_latency_ratio, quiet, dry_run):
    """Factorize INPUT_MODEL's weights and write a smaller, verified OUTPUT_MODEL."""
    if keep is not None and rank is not None:
        raise click.UsageError("give --keep or --rank, not both")
    if rank is None and keep is None:
        keep = DEFAULT_KEEP
    if min_fidelity is not None and rank is not None:
        raise click.UsageError("--min-fidelity searches the size; give it without --rank")
    plan = None
    if plan_mode is None and (target_size or target_ratio or target_fidelity is not None or max_latency_ratio):
        raise click.UsageError("--target-size, --target-ratio, --target-fidelity and --max-latency-ratio go with --plan auto")
    if plan_mode == "auto":
        given = [x for x in (target_size, target_ratio, target_fidelity) if x is not None]
        if len(given) != 1:
            raise click.UsageError("--plan auto needs exactly one of --target-size, --target-ratio, --target-fidelity")
        if calib is None:
            raise click.UsageError("--plan auto needs --calib")
        if dry_run:
            raise click.UsageError("--plan auto measures on the data: it has no --dry-run")
        plan = {"target_size": parse_size(target_size) if target_size else None, "target_ratio": target_ratio,
                "target_fidelity": target_fidelity, "max_latency_ratio": max_latency_ratio}
    if report_path is not None and not dry_run:
        check_optimize_paths(input_model, output_model, report=report_path, force=force, save_external_data=save_external_data,
                             reads=named_reads(inputs=inputs_npz, calib=calib, tokenizer=tokenizer, token_freq=token_freq))
    kwargs = dict(
        method=method, embedding_method=embedding_method, token_freq=token_freq, tokenizer=tokenizer, fold=not no_fold,
        keep=keep, rank=rank, rank_multiple=rank_multiple, include=include, exclude=exclude, min_params=min_params,
        verify=not no_verify, inputs=inputs_npz, input_shapes=parse_input_shapes(input_shapes),
        atol=parse_tolerances(atol, "--atol"), rtol=parse_tolerances(rtol, "--rtol"), min_cosine=min_cosine,
        min_top1=min_top1, seed=seed, progress=_progress(quiet), calib=calib, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
        calib_batch=calib_batch, allocation=allocation, min_fidelity=min_fidelity, sequential=sequential, share_bases=share_bases, damp=damp,
        ae_options=_ae_options(ae_decoder, ae_activation, ae_hidden, ae_init, ae_epochs, ae_batch_size, ae_lr, ae_loss_weights),
        storage_ae=({"include": list(storage_ae_include), "keep": storage_ae_keep,
                     "options": {} if storage_ae_epochs is None else {"epochs": storage_ae_epochs}}
                    if storage_ae_include else None),
        quantize=quantize, plan=plan,
    )
    if dry_run:  # nothing is written, --report included
        click.echo(plan_optimize(input_model, **kwargs).format())
        if calib is not None:
            click.echo("note: with --calib the ranks are allocated from measurements on the data; this is the uniform "
                       "plan (--allocate uniform)")
        return
    try:
        report = optimize_file(input_model, output_model, force=force, force_on_failure=force,
                               save_external_data=save_external_data,
                               external_data_size_threshold=external_data_size_threshold, **kwargs)
    except VerificationError as e:
        if e.report is not None and not quiet:
            click.echo(e.report.format())
        if e.report is not None and report_path is not None:
            _write_text(report_path, e.report.to_json())
        raise
    if not quiet:
        click.echo(report.format())
        click.echo(f"wrote {output_model}")
    if report_path is not None:
        _write_text(report_path, report.to_json())


def parse_size(text: str) -> int:
    """Bytes from '22800000', '22.8MB', '900KB', '1.5GB' (decimal units; MiB/KiB binary)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b?|b)?\s*", str(text), re.I)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 22800000, 22.8MB, 900KB)", param_hint="--target-size")
    unit = (m.group(2) or "b").lower().rstrip("b") or "b"
    mult = {"b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024, "mi": 1024**2, "gi": 1024**3}[unit]
    size = int(float(m.group(1)) * mult)
    if size <= 0:
        raise click.BadParameter("must be positive", param_hint="--target-size")
    return size


def _ae_options(decoder, activation, hidden, init, epochs, batch_size, lr, loss_weights) -> dict:
    opts = dict(decoder=decoder, activation=activation, hidden=hidden, init=init, epochs=epochs, batch_size=batch_size, lr=lr)
    if loss_weights is not None:
        try:
            w_cos, w_mag = (float(v) for v in loss_weights.split(","))
        except ValueError:
            raise click.UsageError(f"--ae-loss-weights wants two numbers WCOS,WMAG, got {loss_weights!r}") from None
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
def verify(models, inputs_npz, input_shapes, calib, tokenizer, atol, rtol, check_error_stat, error_quantile, min_cosine,
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
        check_error_stat=stats or "elementwise", quantile=error_quantile, top_k=top_k, seed=seed, min_top1=min_top1)
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench(models, warmup, iterations, threads, input_shapes, seed, as_json):
    """Size, parameters and CPU latency of MODELS side by side, with ratios to the first."""
    result = bench_models(list(models), warmup=warmup, iterations=iterations, threads=threads,
                          input_shapes=parse_input_shapes(input_shapes), seed=seed)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.format())


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write((text + "\n").encode()), label="report")


def main(argv=None) -> int:
    """Entry point: run the CLI, turning every failure into one line on stderr."""
    try:
        # make_context + invoke rather than cli.main: click's main echoes a bare newline to
        # stderr on Ctrl-C before its Abort, which would break "one line per error".
        args = sys.argv[1:] if argv is None else list(argv)
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
    except OnnxHmfError as e:
        click.echo(f"onnxhmf: error: {e}", err=True)
        return e.exit_code
    except OSError as e:
        click.echo(f"onnxhmf: error: {e.filename or ''}: {e.strerror or e}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("onnxhmf: interrupted; no output written", err=True)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
