"""The CLI end to end on synthetic models, and every bad input: one line, exit code, nothing written."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import external_data_helper

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
    code, stdout, err = cli(capsys, "optimize", tied, out, "--keep", "0.5", "--report", rep, "-q")
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
    r = subprocess.run([sys.executable, "-m", "onnxhmf.cli", "optimize", str(tied), str(out), "--rank", "8"],
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


def write_external(tmp_path, location="w.bin"):
    m = graphs.matmul_model(64, 64, ndim=2)
    p = tmp_path / "ext.onnx"
    onnx.save(m, p, save_as_external_data=True, location=location, size_threshold=0)
    return p


def truncated(tmp_path, tied):
    p = tmp_path / "trunc.onnx"
    data = tied.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def put(path, data):
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


BAD_INPUTS = {
    "missing": (lambda tmp, tied: tmp / "nope.onnx", "no such file"),
    "directory": (lambda tmp, tied: tmp, "directory"),
    "empty": (lambda tmp, tied: put(tmp / "e.onnx", b""), "empty file"),
    "random": (lambda tmp, tied: put(tmp / "r.onnx", np.random.default_rng(0).bytes(5000)), "not"),
    "text": (lambda tmp, tied: put(tmp / "t.onnx", "hello world\n"), "not"),
    "truncated": (truncated, "not"),
    "not_a_model": (lambda tmp, tied: put(tmp / "tp.onnx", onnx.numpy_helper.from_array(np.ones(3, np.float32)).SerializeToString()), "not"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(case, tied, tmp_path, capsys):
    make, needle = BAD_INPUTS[case]
    src = make(tmp_path, tied)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, stdout, err = cli(capsys, "optimize", src, out_dir / "o.onnx")
    assert code == 2
    assert err.startswith("onnxhmf: error:") and err.count("\n") == 1 and needle in err, err
    assert listing(out_dir) == []


def test_missing_and_short_external_data(tmp_path, capsys):
    p = write_external(tmp_path)
    (tmp_path / "w.bin").unlink()
    code, _, err = cli(capsys, "optimize", p, tmp_path / "o.onnx")
    assert code == 2 and "external data file" in err and "missing" in err and err.count("\n") == 1
    p = write_external(tmp_path)
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[:100])
    code, _, err = cli(capsys, "optimize", p, tmp_path / "o.onnx")
    assert code == 2 and "too short" in err
    assert not (tmp_path / "o.onnx").exists()


def test_external_data_path_escaping_folder_is_refused(tmp_path, capsys):
    p = write_external(tmp_path)
    m = onnx.load(p, load_external_data=False)
    for t in m.graph.initializer:
        if external_data_helper.uses_external_data(t):
            for e in t.external_data:
                if e.key == "location":
                    e.value = "../../etc/passwd"
    onnx.save(m, p)
    code, _, err = cli(capsys, "optimize", p, tmp_path / "o.onnx")
    assert code == 2 and "outside the model's folder" in err


def test_external_data_input_works(tmp_path, capsys):
    p = write_external(tmp_path)
    code, _, err = cli(capsys, "optimize", p, tmp_path / "o.onnx", "--rank", "4", "-q", "--min-cosine", "0")
    assert code == 0, err
    assert (tmp_path / "w.bin").exists()  # the input's data file is untouched


def test_no_compressible_weights(tmp_path, capsys):
    p = tmp_path / "i.onnx"
    onnx.save(graphs.int_weight_model(), p)
    code, _, err = cli(capsys, "optimize", p, tmp_path / "o.onnx")
    assert code == 2 and "no compressible weights" in err and "INT64" in err


def test_output_paths(tied, tmp_path, capsys):
    code, _, err = cli(capsys, "optimize", tied, tmp_path / "missing" / "o.onnx")
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, "optimize", tied, tied)
    assert code == 2 and "is the input" in err
    code, _, err = cli(capsys, "optimize", tied, tied, "--force")
    assert code == 2 and "is the input" in err
    (tmp_path / "exists.onnx").write_text("x")
    code, _, err = cli(capsys, "optimize", tied, tmp_path / "exists.onnx")
    assert code == 2 and "--force" in err
    assert (tmp_path / "exists.onnx").read_text() == "x"


def test_unwritable_output_folder(tied, tmp_path, capsys):
    if os.geteuid() == 0:  # root ignores permission bits; /proc refuses new files for everyone
        target, needle = "/proc/o.onnx", "cannot write"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target, needle = ro / "o.onnx", "not writable"
    code, _, err = cli(capsys, "optimize", tied, target, "-q")
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not os.path.exists(target)


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


def test_failed_write_leaves_no_temp_file(tied, tmp_path, monkeypatch):
    import onnxhmf.io as io
    from onnxhmf import OnnxHmfError, optimize_file

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", boom)
    with pytest.raises(OnnxHmfError, match="No space left"):
        optimize_file(tied, tmp_path / "o.onnx", rank=4, min_cosine=0.0)
    assert listing(tmp_path) == ["in.onnx"]


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
                       "--token-freq", ids, "--report", rep, "-q", "--min-cosine", "0")
    assert code == 0, err
    site = json.loads(rep.read_text())["sites"][0]
    assert site["method"] == "hmf" and site["params_after"] <= 0.5 * site["params_before"]
