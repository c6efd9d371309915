"""File safety: every path written (model, data file, report, saved outputs) against every
path read (model, its data files, inputs, calibration, tokenizer, token frequencies) and
against each other, through symlinks, ``.``/``..`` and hard links; only regular files are
replaced, and only with consent; two runs on one output do not both succeed; signals and
killed runs leave nothing behind.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphs
from onnxhmf.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCALE = float(os.environ.get("ONNXHMF_FUZZ_SCALE", "1"))  # more examples for a longer hunt
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict:
    """Every entry below ``folder``: name -> (kind, sha256 of regular files)."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("other", p.stat().st_mode if not p.is_fifo() else "fifo")
    return out


def one_error(code, err, needle=""):
    assert code == 2, err
    assert err.startswith("onnxhmf: error:") and err.count("\n") == 1 and needle in err, err


@pytest.fixture
def setup(tmp_path):
    """in.onnx with external data in.data, a second model, inputs, calibration, tokenizer."""
    d = tmp_path / "w"
    d.mkdir()
    onnx.save(graphs.matmul_model(32, 32, ndim=2), d / "in.onnx", save_as_external_data=True, location="in.data",
              size_threshold=0)
    onnx.save(graphs.matmul_model(32, 32, ndim=2, seed=1), d / "cand.onnx")
    np.savez(d / "feeds.npz", X=np.ones((2, 32), np.float32))
    np.savez(d / "calib.npz", X=np.ones((4, 32), np.float32))
    (d / "sub").mkdir()
    return d


# -- the examples of issue 13 ------------------------------------------------------------------

def test_report_onto_input_data_file_refused(setup, capsys):
    before = snapshot(setup)
    one_error(*cli(capsys, "optimize", setup / "in.onnx", setup / "o.onnx", "--report", setup / "in.data")[::2],
              "input's data file")
    assert snapshot(setup) == before
    onnx.load(setup / "in.onnx")  # still loads


def test_verify_save_outputs_onto_reference_data_refused(setup, capsys):
    before = snapshot(setup)
    one_error(*cli(capsys, "verify", setup / "in.onnx", "--save-outputs", setup / "in.data")[::2], "reference's data file")
    one_error(*cli(capsys, "verify", setup / "cand.onnx", setup / "in.onnx", "--report", setup / "in.data")[::2],
              "candidate's data file")
    one_error(*cli(capsys, "verify", setup / "in.onnx", setup / "cand.onnx", "--report", setup / "cand.onnx")[::2],
              "candidate model")
    assert snapshot(setup) == before


def test_output_onto_input_data_file_refused_even_with_force(setup, capsys):
    before = snapshot(setup)
    for extra in ([], ["--force"]):
        one_error(*cli(capsys, "optimize", setup / "in.onnx", setup / "in.data", *extra)[::2], "input's data file")
    assert snapshot(setup) == before


@pytest.mark.parametrize("spelling", ["plain", "dot", "dotdot", "symlink"])
def test_report_onto_output_refused(setup, capsys, spelling):
    out = setup / "o.onnx"
    report = {"plain": out, "dot": setup / "." / "o.onnx", "dotdot": setup / "sub" / ".." / "o.onnx",
              "symlink": setup / "sub" / "r.json"}[spelling]
    if spelling == "symlink":
        report.symlink_to(out)
    before = snapshot(setup)
    one_error(*cli(capsys, "optimize", setup / "in.onnx", out, "--report", report, "-q")[::2], "output model")
    assert snapshot(setup) == before


def test_report_onto_output_data_file_refused(setup, capsys):
    before = snapshot(setup)
    # in.onnx has external data, so o.onnx gets o.onnx.data
    one_error(*cli(capsys, "optimize", setup / "in.onnx", setup / "o.onnx", "--report", setup / "o.onnx.data")[::2],
              "external data file")
    assert snapshot(setup) == before


def test_unrelated_data_file_kept_without_force(setup, capsys):
    (setup / "o.onnx.data").write_bytes(b"precious")
    before = snapshot(setup)
    one_error(*cli(capsys, "optimize", setup / "in.onnx", setup / "o.onnx", "-q")[::2], "exists; pass --force")
    one_error(*cli(capsys, "optimize", setup / "cand.onnx", setup / "o.onnx", "--save-external-data", "-q")[::2],
              "exists; pass --force")
    assert snapshot(setup) == before
    code, _, err = cli(capsys, "optimize", setup / "in.onnx", setup / "o.onnx", "-q", "--force", "--min-cosine", "0")
    assert code == 0, err
    assert (setup / "o.onnx.data").read_bytes() != b"precious"


def test_output_appearing_during_the_run_is_not_replaced(setup, capsys, monkeypatch):
    """Exclusive creation: a run whose OUT appeared meanwhile (another run) fails, the other's file stays."""
    import onnxhmf.io as io

    real = io.OutputStage.commit

    def racing(self):
        (self.out.parent / self.out.name).write_bytes(b"the other run's model")
        return real(self)

    monkeypatch.setattr(io.OutputStage, "commit", racing)
    code, _, err = cli(capsys, "optimize", setup / "cand.onnx", setup / "o.onnx", "-q", "--min-cosine", "0")
    one_error(code, err, "appeared while this run was working")
    assert (setup / "o.onnx").read_bytes() == b"the other run's model"
    assert not [n for n in os.listdir(setup) if n.endswith(".onnxhmf-tmp")]


@pytest.mark.slow
def test_two_concurrent_runs_on_one_output(setup):
    """Two real processes write one OUT at once: exactly one succeeds, the other says why."""
    args = [sys.executable, "-m", "onnxhmf.cli", "optimize", str(setup / "cand.onnx"), str(setup / "o.onnx"), "-q",
            "--min-cosine", "0"]
    code = "import sys; from onnxhmf.cli import main; sys.exit(main(sys.argv[1:]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, *args[3:]], stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(r for r, _ in results) == [0, 2], results
    err = next(e for r, e in results if r == 2)
    assert "exists" in err or "appeared" in err
    onnx.checker.check_model(str(setup / "o.onnx"))


@pytest.mark.parametrize("target", ["fifo", "device", "link_to_fifo", "link_to_device"])
def test_special_files_never_replaced(setup, capsys, target):
    out = setup / "o.onnx"
    if target in ("fifo", "link_to_fifo"):
        fifo = setup / "pipe"
        os.mkfifo(fifo)
        if target == "fifo":
            fifo.rename(out)
        else:
            out.symlink_to(fifo)
    else:
        out.symlink_to("/dev/null")
        if target == "device" and os.geteuid() == 0:
            out.unlink()
            os.mknod(out, 0o600 | 0o020000, os.makedev(1, 3))  # a character device, like /dev/null
    before = snapshot(setup)
    for extra in (["--force"], []):
        one_error(*cli(capsys, "optimize", setup / "cand.onnx", out, *extra)[::2], "only regular files are replaced")
    for opt in ("--report",):
        one_error(*cli(capsys, "optimize", setup / "cand.onnx", setup / "o2.onnx", opt, out)[::2], "only regular files")
    one_error(*cli(capsys, "verify", setup / "cand.onnx", "--save-outputs", out)[::2], "only regular files")
    assert snapshot(setup) == before


@pytest.mark.parametrize("option", ["model", "--inputs", "--calib", "--tokenizer", "--token-freq"])
def test_fifo_inputs_refused_without_blocking(setup, capsys, option):
    fifo = setup / "pipe.npz"
    os.mkfifo(fifo)
    args = {"model": [fifo, setup / "o.onnx"],
            "--inputs": [setup / "cand.onnx", setup / "o.onnx", "--inputs", fifo],
            "--calib": [setup / "cand.onnx", setup / "o.onnx", "--calib", fifo],
            "--tokenizer": [setup / "cand.onnx", setup / "o.onnx", "--calib", setup / "calib.npz", "--tokenizer", fifo],
            "--token-freq": [setup / "cand.onnx", setup / "o.onnx", "--token-freq", fifo]}[option]
    code, _, err = cli(capsys, "optimize", *args)
    one_error(code, err, "FIFO")
    assert not (setup / "o.onnx").exists()


def test_report_replaced_atomically_when_named(setup, capsys):
    report = setup / "r.json"
    report.write_text("old")
    code, _, err = cli(capsys, "optimize", setup / "cand.onnx", setup / "o.onnx", "-q", "--report", report, "--min-cosine", "0")
    assert code == 0, err
    assert json.loads(report.read_text())["output_path"].endswith("o.onnx")


def test_long_output_name_accepted(setup, capsys):
    name = "o" * 241 + ".onnx"  # 246 characters: legal; the stage folder used to add 22
    code, _, err = cli(capsys, "optimize", setup / "cand.onnx", setup / name, "-q", "--min-cosine", "0")
    assert code == 0, err
    onnx.checker.check_model(str(setup / name))


# -- signals and killed runs ---------------------------------------------------------------------

SLOW_PASS = ("import sys, time; from onnxhmf.passes.factorize import FactorizePass as F; real = F._apply_lmf; n = []\n"
             "def slow(self, *a):\n"
             "    n.append(1)\n"
             "    if len(n) == 2: print('FACTORIZING', file=sys.stderr, flush=True); time.sleep(30)\n"
             "    return real(self, *a)\n"
             "F._apply_lmf = slow\n"
             "from onnxhmf.cli import main; sys.exit(main(sys.argv[1:]))")


def _default_signals():
    """The child's SIGTERM/SIGHUP at their defaults: a test run under nohup inherits SIGHUP
    ignored, which the tool keeps (it then finishes the run)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _start_slow_run(tmp_path, d, h):
    """An external-data MLP in tmp_path, its snapshot, and a CLI run of it held mid-factorization."""
    p = tmp_path / "in.onnx"
    onnx.save(graphs.mlp_model(d, h), p, save_as_external_data=True, location="in.data", size_threshold=0)
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PASS, "optimize", str(p), str(tmp_path / "o.onnx"),
                             "--save-external-data", "--keep", "0.75"], stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
                            preexec_fn=_default_signals)
    assert proc.stderr.readline().strip() == "FACTORIZING"
    return p, before, proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.slow)])
def test_sigterm_and_sighup_clean_the_stage(tmp_path, sig):
    p, before, proc = _start_slow_run(tmp_path, 256, 512)
    stage = [n for n in os.listdir(tmp_path) if n.endswith(".onnxhmf-tmp")]
    assert stage and os.listdir(tmp_path / stage[0])  # the stage holds the spill file mid-run
    proc.send_signal(sig)
    err = proc.stderr.read()
    assert proc.wait(timeout=20) == 128 + sig
    assert err == f"onnxhmf: error: interrupted by {signal.Signals(sig).name}; no output written\n"
    assert snapshot(tmp_path) == before


SLOW_QUANTIZER = ("import sys, time, onnxruntime.quantization as Q; real = Q.quantize_dynamic\n"
                  "def slow(*a, **k):\n"
                  "    print('QUANTIZING', file=sys.stderr, flush=True); time.sleep(30)\n"
                  "    return real(*a, **k)\n"
                  "Q.quantize_dynamic = slow\n"
                  "from onnxhmf.cli import main; sys.exit(main(sys.argv[1:]))")


def test_sigterm_inside_a_step_that_wraps_its_errors(tmp_path):
    """The int8 step turns its quantizer's exceptions into "int8 quantization failed: ...";
    an interrupt must not become one of them: exit 128 + SIGTERM, the interrupt's own line."""
    p = tmp_path / "in.onnx"
    onnx.save(graphs.mlp_model(64, 128), p)
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_QUANTIZER, "optimize", str(p), str(tmp_path / "o.onnx"),
                             "--quantize", "int8"], stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
                            preexec_fn=_default_signals)
    assert proc.stderr.readline().strip() == "QUANTIZING"
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert err == "onnxhmf: error: interrupted by SIGTERM; no output written\n"
    assert snapshot(tmp_path) == before


def test_stale_stage_of_killed_run_removed_by_next_run(tmp_path, capsys):
    p, before, proc = _start_slow_run(tmp_path, 64, 192)
    proc.kill()
    proc.wait(timeout=20)
    stale = [n for n in os.listdir(tmp_path) if n.endswith(".onnxhmf-tmp")]
    assert stale  # kill -9 cannot clean up
    # a live run's stage is never touched
    live = tmp_path / f".{os.getppid()}.keep.onnxhmf-tmp"
    live.mkdir()
    code, _, err = cli(capsys, "optimize", p, tmp_path / "o.onnx", "-q", "--min-cosine", "0")
    assert code == 0, err
    left = sorted(n for n in os.listdir(tmp_path) if n.endswith(".onnxhmf-tmp"))
    assert left == [live.name]
    live.rmdir()
    assert set(snapshot(tmp_path)) == set(before) | {"o.onnx", "o.onnx.data"}


# -- the property: paths x commands --------------------------------------------------------------

READS = ["model", "model_data", "cand", "feeds", "calib", "tokenizer", "token_freq"]
WRITES = {"optimize": ["out", "report"], "verify": ["save", "report"]}
SPELLINGS = ["plain", "dot", "dotdot", "symlink", "hardlink", "relative"]


def spelled(setup: Path, target: Path, how: str, tag: str) -> Path:
    if how == "dot":
        return target.parent / "." / target.name
    if how == "dotdot":
        return target.parent / "sub" / ".." / target.name
    if how == "symlink":
        link = setup / "sub" / f"link-{tag}"
        link.symlink_to(target)
        return link
    if how == "hardlink":
        link = setup / "sub" / f"hard-{tag}"
        os.link(target, link)
        return link
    if how == "relative":
        return Path(os.path.relpath(target))
    return target


@settings(max_examples=int(60 * SCALE), deadline=None, suppress_health_check=list(HealthCheck))
@given(command=st.sampled_from(["optimize", "verify"]), data=st.data())
def test_property_no_write_onto_a_read_path(tmp_path_factory, command, data):
    """Any written path spelled as any read path (or the other written path) is refused with one
    line, and no file changes."""
    setup = tmp_path_factory.mktemp("p")
    onnx.save(graphs.matmul_model(32, 32, ndim=2), setup / "in.onnx", save_as_external_data=True, location="in.data",
              size_threshold=0)
    onnx.save(graphs.matmul_model(32, 32, ndim=2, seed=1), setup / "cand.onnx")
    np.savez(setup / "feeds.npz", X=np.ones((2, 32), np.float32))
    np.savez(setup / "calib.npz", X=np.ones((4, 32), np.float32))
    (setup / "tok.json").write_text("{}")
    np.savez(setup / "freq.npz", ids=np.arange(10))
    (setup / "sub").mkdir()
    files = {"model": setup / "in.onnx", "model_data": setup / "in.data", "cand": setup / "cand.onnx",
             "feeds": setup / "feeds.npz", "calib": setup / "calib.npz", "tokenizer": setup / "tok.json",
             "token_freq": setup / "freq.npz"}
    role = data.draw(st.sampled_from(WRITES[command]), label="write")
    reads = [r for r in READS if r not in (("cand",) if command == "optimize" else ("calib", "token_freq"))]  # what each reads
    clash = data.draw(st.sampled_from(reads + ["other_write"]), label="onto")
    how = data.draw(st.sampled_from(SPELLINGS), label="spelling")
    other = {"out": setup / "o.onnx", "report": setup / "r.json", "save": setup / "g.npz"}
    paths = dict(other)
    if clash == "other_write":
        partner = next(r for r in WRITES[command] if r != role)
        if how == "hardlink":  # a hard link needs an existing file
            paths[partner].write_bytes(b"x")
        target = paths[partner]
    else:
        target = files[clash]
    before = snapshot(setup)
    cwd = os.getcwd()
    os.chdir(setup)
    try:
        paths[role] = spelled(setup, target, how, role)
        before = snapshot(setup)
        if command == "optimize":
            args = ["optimize", files["model"], paths["out"], "--report", paths["report"], "--inputs", files["feeds"],
                    "--calib", files["calib"], "--tokenizer", files["tokenizer"], "--token-freq", files["token_freq"], "--force"]
        else:
            args = ["verify", files["model"], files["cand"], "--inputs", files["feeds"], "--tokenizer", files["tokenizer"],
                    "--save-outputs", paths["save"], "--report", paths["report"]]
        import io as _io
        from contextlib import redirect_stderr, redirect_stdout

        err, out = _io.StringIO(), _io.StringIO()
        with redirect_stderr(err), redirect_stdout(out):
            code = main([str(a) for a in args])
    finally:
        os.chdir(cwd)
    err = err.getvalue()
    assert code == 2 and err.startswith("onnxhmf: error:") and err.count("\n") == 1, (role, clash, how, err)
    assert snapshot(setup) == before, (role, clash, how)
