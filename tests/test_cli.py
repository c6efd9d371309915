"""The CLI end to end on synthetic models, and every bad input: one line, exit code, nothing written."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

import graphs
from onnxhmf.cli import main


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tied(tmp_path):
    p = tmp_path / "in.onnx"
    onnx.save(graphs.tied_model(200, 32), p)
    return p


def listing(folder):
    return sorted(os.listdir(folder))


def test_optimize_writes_verified_model_and_report(tied, tmp_path, capsys):
    before = tied.read_bytes()
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = cli(capsys, "optimize", tied, out, "--keep", "0.5", "--report", rep, "-q", "--min-top1", "0")
    assert code == 0, err
    assert tied.read_bytes() == before  # input untouched
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    data = json.loads(rep.read_text())
    assert data["passed"] is True and data["verified"] is True
    site = data["sites"][0]
    assert site["status"] == "rewritten" and site["ops"] == "gather+matmul"
    assert site["params_after"] <= 0.5 * site["params_before"]
    assert data["bytes_after"] == out.stat().st_size < data["bytes_before"]
    assert {o["name"] for o in data["outputs"]} == {"logits"}
    assert data["outputs"][0]["top1"] is not None  # logits-like output gets top-1 agreement
    assert listing(tmp_path) == ["in.onnx", "out.onnx", "r.json"]  # no temp files


def test_console_table_and_script_entry_point(tied, tmp_path):
    out = tmp_path / "out.onnx"
    r = subprocess.run([sys.executable, "-m", "onnxhmf.cli", "optimize", str(tied), str(out), "--rank", "8", "--min-top1", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "gather+matmul" in r.stdout and "verification: PASSED" in r.stdout
    assert "params: 6,432 -> 1,888" in r.stdout  # 200·32 + 32 (scale) -> 8·(200+32) + 32


def test_verification_failure_writes_nothing_unless_forced(tied, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(capsys, "optimize", tied, out, "--rank", "1", "--min-cosine", "0.999")
    assert code == 1
    assert err.count("\n") == 1 and "verification failed" in err and "mean cosine" in err
    assert not out.exists() and listing(tmp_path) == ["in.onnx"]
    code, _, err = cli(capsys, "optimize", tied, out, "--rank", "1", "--min-cosine", "0.999", "--force", "-q")
    assert code == 0 and out.exists()


def test_atol_per_output(tied, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "optimize", tied, out, "--rank", "2", "--atol", "logits:1e-6")
    assert code == 1 and "logits:" in err and "outside atol" in err
    code, _, err = cli(capsys, "optimize", tied, out, "--rank", "2", "--atol", "nope:1")
    assert code == 2 and "unknown output" in err


def test_inputs_npz_and_input_shapes(tied, tmp_path, capsys):
    npz = tmp_path / "feeds.npz"
    np.savez(npz, ids=np.array([[1, 2, 3]], dtype=np.int64))
    rep = tmp_path / "r.json"
    code, _, err = cli(capsys, "optimize", tied, tmp_path / "a.onnx", "--inputs", npz, "--report", rep, "-q")
    assert code == 0, err
    assert json.loads(rep.read_text())["outputs"][0]["shape"] == [1, 3, 200]
    code, _, err = cli(capsys, "optimize", tied, tmp_path / "b.onnx", "--input-shapes", "ids:3,7", "--report", rep, "-q")
    assert code == 0, err
    assert json.loads(rep.read_text())["outputs"][0]["shape"] == [3, 7, 200]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--keep", "0"], "--keep"),
        (["--keep", "1.5"], "--keep"),
        (["--rank", "0"], "--rank"),
        (["--keep", "0.5", "--rank", "4"], "not both"),
        (["--input-shapes", "ids"], "--input-shapes"),
        (["--input-shapes", "nope:1,2"], "unknown input"),
        (["--atol", "abc"], "--atol"),
        (["--include", "(["], "regular expression"),
        (["--inputs", "/nonexistent.npz"], "no such file"),
    ],
)
def test_invalid_options(args, needle, tied, tmp_path, capsys):
    code, _, err = cli(capsys, "optimize", tied, tmp_path / "o.onnx", *args)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.onnx").exists()


def test_token_freq_errors(tied, tmp_path, capsys):
    code, _, err = cli(capsys, "optimize", tied, tmp_path / "o.onnx", "--method", "hmf", "--token-freq", tmp_path / "no.npz")
    assert code == 2 and "no such file" in err
    bad = tmp_path / "ids.npz"
    np.savez(bad, ids=np.array([1, 2, 5000]))
    code, _, err = cli(capsys, "optimize", tied, tmp_path / "o.onnx", "--method", "hmf", "--token-freq", bad)
    assert code == 2 and "outside [0, 200)" in err
    txt = tmp_path / "t.txt"
    txt.write_text("hello")
    code, _, err = cli(capsys, "optimize", tied, tmp_path / "o.onnx", "--method", "hmf", "--token-freq", txt)
    assert code == 2 and "--tokenizer" in err
    code, _, err = cli(capsys, "optimize", tied, tmp_path / "o.onnx", "--method", "hmf", "--rank", "4")
    assert code == 2 and "only for --method lmf" in err
    assert not (tmp_path / "o.onnx").exists()


def test_hmf_with_token_freq_npz(tied, tmp_path, capsys):
    ids = tmp_path / "ids.npz"
    np.savez(ids, a=np.repeat(np.arange(10), 50), b=np.arange(200))  # tokens 0-9 are frequent
    rep = tmp_path / "r.json"
    code, _, err = cli(capsys, "optimize", tied, tmp_path / "o.onnx", "--method", "hmf", "--keep", "0.5",
                       "--token-freq", ids, "--report", rep, "-q", "--min-cosine", "0", "--min-top1", "0")
    assert code == 0, err
    site = json.loads(rep.read_text())["sites"][0]
    assert site["method"] == "hmf" and site["params_after"] <= 0.5 * site["params_before"]
