"""Command line: a thin shell over :mod:`onnxhmf.api`.

Every error is one line on stderr: exit 2 for bad input or options, 1 for failed verification.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .api import DEFAULT_KEEP, DEFAULT_MIN_COSINE, optimize_file
from .errors import OnnxHmfError, VerificationError
from .io import check_output_path
from .verify import parse_input_shapes, parse_tolerances


def _progress(quiet: bool):
    def wrap(items):
        items = list(items)
        if quiet or not items or not sys.stderr.isatty():
            return items
        return _bar(items)

    def _bar(items):
        with click.progressbar(items, label="factorizing", file=sys.stderr, show_pos=True) as bar:
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
@click.option("--embedding-method", type=click.Choice(["svd", "hmf", "prune", "skip"]), default=None,
              help="Embedding tables (Gather): default follows --method (lmf -> svd).")
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
@click.option("--no-verify", is_flag=True, help="Skip verification with onnxruntime.")
@click.option("--force", is_flag=True, help="Overwrite an existing output, and write it even if verification fails.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for generated inputs and randomized SVD.")
@click.option("--save-external-data", "save_external_data", is_flag=False, flag_value="", default=None, metavar="[LOCATION]",
              help="Store weights in a data file next to the output (default name: <output>.data). "
                   "Done anyway when the input has external data or the output would pass protobuf's 2 GB limit.")
@click.option("--external-data-size-threshold", type=click.IntRange(min=0), default=1024, show_default=True, metavar="BYTES",
              help="With external data: tensors of at least this many bytes go to the data file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no tables; errors only.")
def optimize(input_model, output_model, method, embedding_method, token_freq, tokenizer, no_fold, keep, rank, rank_multiple, include, exclude, min_params, inputs_npz,
             input_shapes, atol, rtol, min_cosine, no_verify, force, report_path, seed, save_external_data,
             external_data_size_threshold, quiet):
    """Factorize INPUT_MODEL's weights and write a smaller, verified OUTPUT_MODEL."""
    if keep is not None and rank is not None:
        raise click.UsageError("give --keep or --rank, not both")
    if rank is None and keep is None:
        keep = DEFAULT_KEEP
    if report_path is not None:
        check_output_path(report_path, force=True, inputs=(input_model,))
    kwargs = dict(
        method=method, embedding_method=embedding_method, token_freq=token_freq, tokenizer=tokenizer, fold=not no_fold,
        keep=keep, rank=rank, rank_multiple=rank_multiple, include=include, exclude=exclude, min_params=min_params,
        verify=not no_verify, inputs=inputs_npz, input_shapes=parse_input_shapes(input_shapes),
        atol=parse_tolerances(atol, "--atol"), rtol=parse_tolerances(rtol, "--rtol"), min_cosine=min_cosine,
        seed=seed, progress=_progress(quiet),
    )
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


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text + "\n")
    except OSError as e:
        raise OnnxHmfError(f"cannot write report {str(path)!r}: {e.strerror or e}") from None


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
