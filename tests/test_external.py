"""External data: lazy memmapped weights, factors spilled to disk, saving with a data file."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import external_data_helper

import graphs
from onnxhmf import optimize_file
from onnxhmf.cli import main
from onnxhmf.external import TensorStore, external_tensors, needs_external_data
from onnxhmf.graph.index import GraphIndex
from onnxhmf.io import OutputStage, load_model
from onnxhmf.executor import ExecContext, execute
from onnxhmf.options import Options
from onnxhmf.planners.uniform import uniform_plan


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def locations(path):
    m = onnx.load(path, load_external_data=False)
    return {external_data_helper.ExternalDataInfo(t).location for t in external_tensors(m)}


@pytest.fixture
def ext_input(tmp_path):
    """An MLP whose weights live in w.bin next to the model (threshold 0: every tensor external)."""
    src = tmp_path / "in"
    src.mkdir()
    p = src / "in.onnx"
    onnx.save(graphs.mlp_model(64, 192), p, save_as_external_data=True, location="w.bin", size_threshold=0)
    return p


def run(model_path, feeds):
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_round_trip_with_external_data(tmp_path, capsys):
    p = tmp_path / "in.onnx"
    onnx.save(graphs.mlp_model(64, 192), p)
    out = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "optimize", p, out, "--keep", "0.5", "-q",
                       "--save-external-data", "--external-data-size-threshold", "256")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx", "out.onnx.data"]  # no temp files left
    assert locations(out) == {"out.onnx.data"}
    m = onnx.load(out, load_external_data=False)
    src = onnx.load(p)
    # every tensor of 256 bytes or more is external, smaller ones stay inline
    for t in m.graph.initializer:
        big = int(np.prod(t.dims)) * 4 >= 256
        assert external_data_helper.uses_external_data(t) == big, t.name
    assert m.ir_version == src.ir_version and m.opset_import == src.opset_import
    assert [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim][0] == "batch"
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    ref, got = run(p, {"X": x}), run(out, {"X": x})
    assert np.allclose(ref, got, atol=0.5 * np.abs(ref).max())  # keep 0.5 on a decaying spectrum
    # and the same model saved inline gives identical numbers
    out2 = tmp_path / "inline.onnx"
    assert cli(capsys, "optimize", p, out2, "--keep", "0.5", "-q")[0] == 0
    assert locations(out2) == set()
    np.testing.assert_array_equal(run(out2, {"X": x}), got)


def test_named_location_and_stale_data_file_replaced(tmp_path, capsys):
    p = tmp_path / "in.onnx"
    onnx.save(graphs.mlp_model(64, 192), p)
    stale = tmp_path / "weights.bin"
    stale.write_bytes(b"\xff" * 3_000_000)  # onnx's own save would append after this
    out = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "optimize", p, out, "-q", "--save-external-data", "weights.bin")
    assert code == 2 and "exists; pass --force" in err  # an existing data file is replaced only with consent
    assert stale.read_bytes() == b"\xff" * 3_000_000 and not out.exists()
    code, _, err = cli(capsys, "optimize", p, out, "-q", "--save-external-data", "weights.bin", "--force")
    assert code == 0, err
    assert locations(out) == {"weights.bin"}
    data = stale.read_bytes()
    assert len(data) < 3_000_000 and not data.startswith(b"\xff" * 64)
    m = onnx.load(out, load_external_data=False)
    end = max(int(dict((e.key, e.value) for e in t.external_data)["offset"]) + int(dict((e.key, e.value) for e in t.external_data)["length"])
              for t in external_tensors(m))
    assert end == len(data)  # nothing left over from the stale file
    x = np.ones((2, 3, 64), np.float32)
    assert np.isfinite(run(out, {"X": x})).all()


@pytest.mark.parametrize("loc,needle", [("sub/w.bin", "file name"), ("/tmp/w.bin", "file name"), ("..", "file name"),
                                        ("out.onnx", "output model itself")])
def test_bad_locations_refused(loc, needle, tmp_path, capsys):
    p = tmp_path / "in.onnx"
    onnx.save(graphs.mlp_model(32, 64), p)
    code, _, err = cli(capsys, "optimize", p, tmp_path / "out.onnx", "--save-external-data", loc)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


def test_input_data_file_never_touched(ext_input, tmp_path, capsys):
    data = ext_input.parent / "w.bin"
    before, mtime = data.read_bytes(), data.stat().st_mtime_ns
    # writing next to the input with the input's data-file name is refused before any work
    code, _, err = cli(capsys, "optimize", ext_input, ext_input.parent / "o.onnx", "--save-external-data", "w.bin")
    assert code == 2 and "input's data file" in err
    code, _, err = cli(capsys, "optimize", ext_input, ext_input.parent / "o.onnx", "--save-external-data", "in.onnx")
    assert code == 2 and "input model" in err
    # the default name (<output>.data) is vetted up front too
    other = ext_input.parent / "other.onnx"
    onnx.save(graphs.mlp_model(16, 32), other, save_as_external_data=True, location="o.onnx.data", size_threshold=0)
    code, _, err = cli(capsys, "optimize", other, ext_input.parent / "o.onnx", "--rank", "2")
    assert code == 2 and "input's data file" in err, err
    other.unlink()
    (ext_input.parent / "o.onnx.data").unlink()
    assert sorted(os.listdir(ext_input.parent)) == ["in.onnx", "w.bin"]
    # a different folder, the same data-file name: fine, and the input's file is untouched
    out = tmp_path / "o.onnx"
    code, _, err = cli(capsys, "optimize", ext_input, out, "-q", "--save-external-data", "w.bin", "--keep", "0.5")
    assert code == 0, err
    assert data.read_bytes() == before and data.stat().st_mtime_ns == mtime
    assert locations(out) == {"w.bin"} and (tmp_path / "w.bin").is_file()
    # an external-data input keeps that layout by default: no whole-model copy in memory
    out2 = tmp_path / "default.onnx"
    assert cli(capsys, "optimize", ext_input, out2, "-q", "--keep", "0.5")[0] == 0
    assert locations(out2) == {"default.onnx.data"}
    assert data.read_bytes() == before and data.stat().st_mtime_ns == mtime


def test_weights_are_read_lazily_as_memmaps(ext_input, tmp_path):
    model = load_model(ext_input, lazy=True)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in model.graph.initializer)
    store = TensorStore(ext_input.parent, spill_dir=tmp_path, spill_threshold=1024)
    index = GraphIndex(model, store)
    ref = index.const("W1")
    W = index.array(ref)
    assert isinstance(W, np.memmap) and W.shape == (64, 192)
    orig = {t.name: onnx.numpy_helper.to_array(t) for t in graphs.mlp_model(64, 192).graph.initializer}
    np.testing.assert_array_equal(np.asarray(W), orig["W1"])
    # the pass reads through the store and spills its factors instead of keeping them in the proto
    reports = execute(model, uniform_plan(model, Options.from_kwargs(keep=0.5)), ExecContext(store=store)).sites
    assert {r.status for r in reports} == {"rewritten"}
    assert store.memmaps >= 3  # W, W1 read for the pass, W2
    new = [t for t in model.graph.initializer if ".lmf_" in t.name or ".piv_" in t.name]
    assert new and all(external_data_helper.uses_external_data(t) for t in new if int(np.prod(t.dims)) * 4 >= 1024)
    assert all(external_data_helper.ExternalDataInfo(t).location == store.spill_location for t in new if external_data_helper.uses_external_data(t))
    store.close()


def test_auto_switch_to_external_data_past_the_limit(ext_input, tmp_path, monkeypatch, capsys):
    m = graphs.mlp_model(64, 192)
    size = m.ByteSize()
    assert needs_external_data(m, limit=size) and not needs_external_data(m, limit=size + 1)
    lazy = load_model(ext_input, lazy=True)  # external bytes count towards the limit too
    assert lazy.ByteSize() < size and needs_external_data(lazy, limit=size)
    with OutputStage(tmp_path / "o.onnx") as stage:
        stage.write(m, external=None, limit=size)
        assert stage.data_location == "o.onnx.data"
        assert sorted(os.listdir(stage.dir)) == ["o.onnx", "o.onnx.data"]
    assert not stage.dir.exists()
    # through the CLI, with a fake 1 kB limit
    import onnxhmf.io as io

    real = io.needs_external_data
    monkeypatch.setattr(io, "needs_external_data", lambda model, **kw: real(model, limit=1000))
    p = tmp_path / "plain.onnx"
    onnx.save(graphs.mlp_model(64, 192), p)  # m now points at the stage's (deleted) data file
    code, out, err = cli(capsys, "optimize", p, tmp_path / "big.onnx", "--keep", "0.5")
    assert code == 0, err
    assert "2 GB limit" in out
    assert locations(tmp_path / "big.onnx") == {"big.onnx.data"}


def test_api_optimize_file_external(ext_input, tmp_path):
    rep = optimize_file(ext_input, tmp_path / "o.onnx", keep=0.5, save_external_data=True, external_data_size_threshold=0)
    assert rep.passed and rep.bytes_after == sum(f.stat().st_size for f in tmp_path.glob("o.onnx*"))
    assert sorted(os.listdir(tmp_path)) == ["in", "o.onnx", "o.onnx.data"]


def test_api_optimize_returns_self_contained_proto(ext_input):
    from onnxhmf import optimize

    model, rep = optimize(ext_input, keep=0.5)
    assert rep.passed and not external_tensors(model)  # read back in: the proto stands alone
    onnx.checker.check_model(model)
    x = np.ones((1, 2, 64), np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"X": x})[0].shape == (1, 2, 64)


def test_store_reads_every_dtype_from_external_data(tmp_path):
    arrays = {"f16": np.arange(12, dtype=np.float16).reshape(3, 4), "i8": np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
              "f64": np.linspace(0, 1, 12).reshape(4, 3)}
    inits = [onnx.numpy_helper.from_array(a, k) for k, a in arrays.items()]
    inits.append(onnx.helper.make_tensor("bf16", onnx.TensorProto.BFLOAT16, [2, 2], [1.0, -2.0, 0.5, 3.0]))
    g = onnx.helper.make_graph([], "g", [], [], initializer=inits)
    p = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(g), p, save_as_external_data=True, location="d.bin", size_threshold=0)
    m = onnx.load(p, load_external_data=False)
    store = TensorStore(tmp_path)
    got = {t.name: store.array(t) for t in m.graph.initializer}
    for k, a in arrays.items():
        assert isinstance(got[k], np.memmap) and got[k].dtype == a.dtype
        np.testing.assert_array_equal(got[k], a)
    np.testing.assert_array_equal(got["bf16"].astype(np.float32), [[1.0, -2.0], [0.5, 3.0]])  # decoded copy


def test_calibration_on_external_data_input(ext_input, tmp_path, capsys):
    feeds = tmp_path / "calib.npz"
    np.savez(feeds, X=np.random.default_rng(0).standard_normal((8, 4, 64)).astype(np.float32))
    out = tmp_path / "o.onnx"
    code, _, err = cli(capsys, "optimize", ext_input, out, "--calib", feeds, "--keep", "0.5", "-q", "--allocate", "uniform")
    assert code == 0, err
    assert locations(out) == {"o.onnx.data"}  # the input's layout is kept
    assert sorted(os.listdir(tmp_path)) == ["calib.npz", "in", "o.onnx", "o.onnx.data"]
