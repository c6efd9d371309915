"""Hostile inputs: every case is one clear error line, a non-zero exit, nothing written, the
input intact and no temp files left; and inputs that are odd but valid (fp16, quantized or
bf16 weights, subgraphs, custom ops, odd names) are handled or left untouched with a reason.
"""
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
from onnx import TensorProto, external_data_helper, helper, numpy_helper

import graphs
from onnxhmf.cli import main

ROOT = Path(__file__).resolve().parents[1]


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


def refused(capsys, src, out, *args, needle, code=2):
    """Run optimize; assert one error line containing ``needle``, exit ``code``, nothing written, input intact."""
    folders = {Path(src).parent, Path(out).parent}
    before = {f: listing(f) for f in folders if f.is_dir()}
    data = Path(src).read_bytes() if Path(src).is_file() else None
    got, stdout, err = cli(capsys, "optimize", src, out, *args)
    assert got == code, err
    assert err.startswith("onnxhmf: error:") and err.count("\n") == 1 and needle in err, err
    assert {f: listing(f) for f in before} == before  # nothing written, no temp files
    if data is not None:
        assert Path(src).read_bytes() == data
    return err


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


def _mkdir(p):
    p.mkdir()
    return p


BAD_INPUTS = {
    "missing": (lambda tmp, tied: tmp / "nope.onnx", "no such file"),
    "directory": (lambda tmp, tied: _mkdir(tmp / "d"), "no .onnx model"),  # a folder is an exporter's layout
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

def test_failed_write_leaves_no_temp_file(tied, tmp_path, monkeypatch):
    import onnxhmf.io as io
    from onnxhmf import OnnxHmfError, optimize_file

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", boom)
    with pytest.raises(OnnxHmfError, match="No space left"):
        optimize_file(tied, tmp_path / "o.onnx", rank=4, min_cosine=0.0)
    assert listing(tmp_path) == ["in.onnx"]


# -- invalid models ---------------------------------------------------------------------------

def with_opset(version):
    m = graphs.matmul_model(32, 32, ndim=2)
    m.opset_import[0].version = version
    return m


def fails_checker():
    m = graphs.matmul_model(32, 32, ndim=2)
    m.graph.node[0].input[0] = "undefined"
    return m


@pytest.mark.parametrize("make,needle", [
    (fails_checker, "fails onnx.checker"),
    (lambda: with_opset(30), "unsupported opset ai.onnx 30"),
    (lambda: with_opset(6), "unsupported opset ai.onnx 6"),
])
def test_invalid_models_refused(make, needle, tmp_path, capsys):
    p = tmp_path / "in.onnx"
    onnx.save(make(), p)
    refused(capsys, p, tmp_path / "o.onnx", needle=needle)


def set_location(p, location):
    m = onnx.load(p, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, p)


@pytest.mark.parametrize("location", ["/etc/passwd", "sub/../../w.bin", "../../etc/passwd"])
def test_external_data_outside_folder_refused(location, tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    p = write_external(d)
    set_location(p, location)
    err = refused(capsys, p, d / "o.onnx", needle="external data")
    assert "outside the model's folder" in err or "escapes" in err


def test_external_data_symlink_escaping_folder_refused(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    p = write_external(d)
    (tmp_path / "w.bin").write_bytes((d / "w.bin").read_bytes())
    (d / "w.bin").unlink()
    (d / "w.bin").symlink_to(tmp_path / "w.bin")  # a relative name that resolves outside
    refused(capsys, p, d / "o.onnx", needle="escapes the model's folder")


# -- weight types -----------------------------------------------------------------------------

def test_fp16_weights_factorized_and_stored_fp16(tmp_path, capsys):
    p = tmp_path / "in.onnx"
    onnx.save(graphs.matmul_model(64, 48, dtype=np.float16, true_rank=4), p)
    rep = tmp_path / "r.json"
    code, _, err = cli(capsys, "optimize", p, tmp_path / "o.onnx", "--rank", "4", "-q", "--report", rep,
                       "--atol", "0.05")
    assert code == 0, err
    r = json.loads(rep.read_text())
    assert r["passed"] and [s["status"] for s in r["sites"]] == ["rewritten"]
    m = onnx.load(tmp_path / "o.onnx")
    assert {t.data_type for t in m.graph.initializer} == {TensorProto.FLOAT16}
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def wrapped_model(kind, with_plain=True):
    """MatMul on a weight behind DequantizeLinear (int8) or Cast (bf16), optionally then a plain fp32 MatMul."""
    m = 32
    W = graphs.matrix(m, m, seed=3)
    nodes, inits = [], []
    if kind == "dequantize":
        scale = np.float32(np.abs(W).max() / 127)
        inits += [numpy_helper.from_array(np.round(W / scale).astype(np.int8), "Wq"),
                  numpy_helper.from_array(np.array(scale, np.float32), "Wq_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["Wq", "Wq_scale"], ["Wd"], name="dq"))
    else:
        t = helper.make_tensor("Wq", TensorProto.BFLOAT16, [m, m], W.flatten().tolist())
        inits.append(t)
        nodes.append(helper.make_node("Cast", ["Wq"], ["Wd"], name="cast", to=TensorProto.FLOAT))
    nodes.append(helper.make_node("MatMul", ["X", "Wd"], ["Y0" if with_plain else "Y"], name="mm_q"))
    if with_plain:
        inits.append(numpy_helper.from_array(graphs.matrix(m, m, seed=4, true_rank=4), "W"))
        nodes.append(helper.make_node("MatMul", ["Y0", "W"], ["Y"], name="mm"))
    return graphs.model(nodes, [graphs.vi("X", ["batch", m])], [graphs.vi("Y", ["batch", m])], inits)


@pytest.mark.parametrize("kind,needle", [("dequantize", "DequantizeLinear"), ("cast", "Cast")])
def test_quantized_and_bf16_weights_left_untouched(kind, needle, tmp_path, capsys):
    p = tmp_path / "in.onnx"
    onnx.save(wrapped_model(kind, with_plain=False), p)
    refused(capsys, p, tmp_path / "o.onnx", "--rank", "4", needle=needle)  # nothing else to compress
    onnx.save(wrapped_model(kind), p)
    rep = tmp_path / "r.json"
    code, _, err = cli(capsys, "optimize", p, tmp_path / "o.onnx", "--rank", "4", "-q", "--report", rep)
    assert code == 0, err
    sites = {s["weight"]: s for s in json.loads(rep.read_text())["sites"]}
    assert sites["W"]["status"] == "rewritten"
    assert sites["Wq"]["status"] == "skipped" and needle in sites["Wq"]["reason"] and "left untouched" in sites["Wq"]["reason"]
    out = {t.name: t for t in onnx.load(tmp_path / "o.onnx").graph.initializer}
    src = {t.name: t for t in onnx.load(p).graph.initializer}
    assert out["Wq"] == src["Wq"]  # stored exactly as it was


# -- graph structure --------------------------------------------------------------------------

def loop_model(m=32):
    """W is read by a main-graph MatMul and inside a Loop body."""
    W = graphs.matrix(m, m)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_in", "W"], ["x_out"], name="body_mm"),
         helper.make_node("Identity", ["c_in"], ["c_out"], name="body_c")],
        "body",
        [graphs.vi("i", [], TensorProto.INT64), graphs.vi("c_in", [], TensorProto.BOOL), graphs.vi("x_in", ["batch", m])],
        [graphs.vi("c_out", [], TensorProto.BOOL), graphs.vi("x_out", ["batch", m])],
    )
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["Y0"], name="mm"),
        helper.make_node("Loop", ["trips", "", "Y0"], ["Y"], name="loop", body=body),
    ]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array(2, np.int64), "trips")]
    return graphs.model(nodes, [graphs.vi("X", ["batch", m])], [graphs.vi("Y", ["batch", m])], inits)


def test_weight_read_in_subgraphs_is_rewritten(tmp_path, capsys):
    """W read by a main-graph MatMul and inside a Loop body is one site, factorized once."""
    p = tmp_path / "in.onnx"
    onnx.save(loop_model(), p)
    rep = tmp_path / "r.json"
    code, _, err = cli(capsys, "optimize", p, tmp_path / "o.onnx", "--rank", "4", "--no-verify", "-q", "--report", rep)
    assert code == 0, err
    sites = json.loads(rep.read_text())["sites"]
    assert [(s["weight"], s["status"], s["ops"], len(s["nodes"])) for s in sites] == [("W", "rewritten", "matmul", 2)]
    out = onnx.load(tmp_path / "o.onnx")
    assert "W" not in {t.name for t in out.graph.initializer}
    body = next(n for n in out.graph.node if n.op_type == "Loop").attribute[0].g
    assert [n.op_type for n in body.node].count("MatMul") == 2
    onnx.save(graphs.if_model(), p)  # W in the If branch, W2 in the main graph
    code, _, err = cli(capsys, "optimize", p, tmp_path / "o.onnx", "--rank", "4", "--no-verify", "-q", "--report", rep,
                       "--force")
    assert code == 0, err
    sites = {s["weight"]: s for s in json.loads(rep.read_text())["sites"]}
    assert sites["W2"]["status"] == "rewritten" and sites["W"]["status"] == "rewritten"


def custom_model(reads_weight):
    m = graphs.matmul_model(32, 32, ndim=2, true_rank=4)
    node = helper.make_node("MyOp", ["W" if reads_weight else "Y"], ["Z"], name="custom", domain="com.example")
    m.graph.node.append(node)
    m.graph.output.append(graphs.vi("Z", ["batch", 32]))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def test_custom_domain_ops(tmp_path, capsys):
    p = tmp_path / "in.onnx"
    onnx.save(custom_model(reads_weight=True), p)
    refused(capsys, p, tmp_path / "o.onnx", "--no-verify", needle="custom-domain node 'custom'")
    refused(capsys, p, tmp_path / "o.onnx", needle="custom-domain node 'custom'")  # the default planner too
    onnx.save(custom_model(reads_weight=False), p)
    # verification needs onnxruntime, which cannot run an unknown op: one clear line
    refused(capsys, p, tmp_path / "o.onnx", "--rank", "4", needle="onnxruntime failed")
    code, _, err = cli(capsys, "optimize", p, tmp_path / "o.onnx", "--rank", "4", "--no-verify", "-q")
    assert code == 0, err
    out = onnx.load(tmp_path / "o.onnx")
    assert any(n.domain == "com.example" for n in out.graph.node)
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("com.example", 1)}


def test_graph_without_weights(tmp_path, capsys):
    p = tmp_path / "in.onnx"
    m = graphs.model([helper.make_node("Relu", ["X"], ["Y"], name="relu")], [graphs.vi("X", ["batch", 4])], [graphs.vi("Y", ["batch", 4])])
    onnx.save(m, p)
    refused(capsys, p, tmp_path / "o.onnx", needle="no compressible weights")


ODD = "we ight/ü:0"


def odd_names_model():
    m = 32
    W = graphs.matrix(m, m, true_rank=4)
    nodes = [helper.make_node("MatMul", ["in put:0", ODD], ["out/pút 1"], name="mm/ü 1:x")]
    return graphs.model(nodes, [graphs.vi("in put:0", ["batch", m])], [graphs.vi("out/pút 1", ["batch", m])],
                        [numpy_helper.from_array(W, ODD)])


@pytest.mark.parametrize("external", [False, True])
def test_odd_names(external, tmp_path, capsys):
    folder = tmp_path / "dír with space"
    folder.mkdir()
    p = folder / "in ü.onnx"
    onnx.save(odd_names_model(), p)
    out = folder / "out: ü.onnx"
    code, _, err = cli(capsys, "optimize", p, out, "--rank", "4", "-q", *(["--save-external-data"] if external else []))
    assert code == 0, err
    m = onnx.load(out)
    assert [i.name for i in m.graph.input] == ["in put:0"] and [o.name for o in m.graph.output] == ["out/pút 1"]
    assert any(t.name.startswith(ODD + ".lmf") for t in m.graph.initializer)
    assert listing(folder) == sorted(["in ü.onnx", "out: ü.onnx"] + (["out: ü.onnx.data"] if external else []))


# -- output paths -----------------------------------------------------------------------------

def test_output_is_input_by_another_name(tied, tmp_path, capsys, monkeypatch):
    link = tmp_path / "link.onnx"
    link.symlink_to(tied)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    for out in (link, tmp_path / "sub" / ".." / "in.onnx", "./in.onnx", "in.onnx"):
        for extra in ([], ["--force"]):
            refused(capsys, tied, out, *extra, needle="is the input")
    # and the input given through the symlink, the output as the real file
    refused(capsys, link, tied, "--force", needle="is the input")


def test_disk_full_while_writing_external_data(tmp_path):
    """A real write failure: the child may write at most 40 kB per file (RLIMIT_FSIZE)."""
    p = tmp_path / "in.onnx"
    onnx.save(graphs.mlp_model(64, 256), p)  # ~130 kB of weights
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000)); "
            "from onnxhmf.cli import main; sys.exit(main(sys.argv[1:]))")
    before = p.read_bytes()
    for extra in ([], ["--save-external-data", "--keep", "0.9"]):
        r = subprocess.run([sys.executable, "-c", code, "optimize", str(p), str(tmp_path / "o.onnx"), "--no-verify", "--keep", "0.75", *extra],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("onnxhmf: error: cannot write") and "File too large" in r.stderr and r.stderr.count("\n") == 1
        assert listing(tmp_path) == ["in.onnx"] and p.read_bytes() == before


def test_ctrl_c_during_factorization(tmp_path):
    """SIGINT while a weight is being factorized: exit 130, one line, input intact, no temp files."""
    p = tmp_path / "in.onnx"
    onnx.save(graphs.mlp_model(64, 192), p, save_as_external_data=True, location="in.data", size_threshold=0)
    before = {f: (tmp_path / f).read_bytes() for f in listing(tmp_path)}
    # hold the pass inside its first factorization until the signal arrives; Ctrl-C as from a
    # terminal even where the test runs as a background job (which starts with SIGINT ignored)
    code = ("import signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from onnxhmf.passes.factorize import FactorizePass as F; real = F._apply_lmf\n"
            "def slow(self, *a):\n"
            "    print('FACTORIZING', file=sys.stderr, flush=True); time.sleep(30); return real(self, *a)\n"
            "F._apply_lmf = slow\n"
            "from onnxhmf.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "optimize", str(p), str(tmp_path / "o.onnx"), "--save-external-data", "--keep", "0.75"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stderr.readline().strip() == "FACTORIZING"
    assert any(name.endswith(".onnxhmf-tmp") for name in listing(tmp_path))  # the stage exists mid-run
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=20) == 130 and time.monotonic() - t < 10
    assert err == "onnxhmf: interrupted; no output written\n"
    assert listing(tmp_path) == sorted(before)
    assert all((tmp_path / f).read_bytes() == b for f, b in before.items())


def test_bf16_weight_read_directly_left_untouched(tmp_path, capsys):
    m = 32
    W = helper.make_tensor("W", TensorProto.BFLOAT16, [m, m], graphs.matrix(m, m).flatten().tolist())
    model = graphs.model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
                         [graphs.vi("X", ["batch", m], TensorProto.BFLOAT16)], [graphs.vi("Y", ["batch", m], TensorProto.BFLOAT16)], [W])
    p = tmp_path / "in.onnx"
    onnx.save(model, p)
    refused(capsys, p, tmp_path / "o.onnx", "--no-verify", needle="dtype BFLOAT16 is not fp32/fp16/fp64")


def test_an_internal_error_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """A bug inside the pipeline (here: onnxruntime refusing a session mid-run) is one line,
    exit 3, nothing written and no temp files left; ONNXHMF_DEBUG=1 re-raises it."""
    import onnxhmf.executor as executor

    src = tmp_path / "m.onnx"
    onnx.save(graphs.matmul_model(64, 48), src)
    before = sorted(os.listdir(tmp_path))

    def boom(*a, **k):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : a made-up failure\nsecond line")
    monkeypatch.setattr(executor, "_store_blocked", boom)
    code, out, err = cli(capsys, "optimize", src, tmp_path / "o.onnx", "--keep", "0.5")
    assert code == 3
    assert err.strip().splitlines() == ["onnxhmf: internal error: RuntimeError: [ONNXRuntimeError] : 10 : INVALID_GRAPH : "
                                        "a made-up failure (no output written; ONNXHMF_DEBUG=1 shows the traceback)"]
    assert sorted(os.listdir(tmp_path)) == before
    monkeypatch.setenv("ONNXHMF_DEBUG", "1")
    with pytest.raises(RuntimeError, match="made-up"):
        main(["optimize", str(src), str(tmp_path / "o.onnx"), "--keep", "0.5"])
    assert sorted(os.listdir(tmp_path)) == before
