"""Calibration: data loading, activation statistics, whitened rewrites, allocation, --min-fidelity."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphs
from onnxhmf.api import optimize
from onnxhmf.calibration import Calibration, load_calibration
from onnxhmf.capture import capture_stats
from onnxhmf.cli import main
from onnxhmf.errors import OnnxHmfError
from onnxhmf.passes.calibrated import fidelity, reference_outputs, site_levels
from onnxhmf.graph.index import GraphIndex
from onnxhmf.graph.sites import find_weight_groups


@pytest.fixture
def tmodel():
    return graphs.token_mlp_model()


@pytest.fixture
def calib_npz(tmp_path):
    p = tmp_path / "calib.npz"
    np.savez(p, **graphs.token_batches(n=96, seed=1))
    return p


def run(model, feeds, names=None):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(names, feeds)


def test_npz_batches_samples_and_folder(tmodel, calib_npz, tmp_path):
    cal = load_calibration(calib_npz, tmodel, samples=40, batch_size=16)
    assert [b["input_ids"].shape[0] for b in cal.batches] == [16, 16, 8]
    assert cal.samples == 40 and cal.mask == "attention_mask"
    full = graphs.token_batches(n=96, seed=1)
    assert cal.tokens == int(full["attention_mask"][:40].sum())
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"part{i}.npz", **graphs.token_batches(n=10, seed=10 + i))
    cal = load_calibration(folder, tmodel, samples=1000, batch_size=8)
    assert cal.samples == 30
    np.testing.assert_array_equal(cal.batches[0]["input_ids"], graphs.token_batches(n=10, seed=10)["input_ids"][:8])


def test_bad_calibration_inputs_are_one_line_errors(tmodel, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=np.zeros((2, 3), np.int64))
    with pytest.raises(OnnxHmfError, match="lacks input"):
        load_calibration(bad, tmodel)
    text = tmp_path / "t.txt"
    text.write_text("Some words here. And more words here.")
    with pytest.raises(OnnxHmfError, match="needs --tokenizer"):
        load_calibration(text, tmodel)
    with pytest.raises(OnnxHmfError, match="no such file"):
        load_calibration(tmp_path / "missing.npz", tmodel)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OnnxHmfError, match="no .npz"):
        load_calibration(empty, tmodel)


def test_text_with_tokenizer_pads_and_masks(minilm_path):
    tok = minilm_path.parent / "minilm.tokenizer.json"
    model = onnx.load(minilm_path, load_external_data=False)
    text = minilm_path.parent / "calib_test.txt"
    text.write_text("The cat sat on the mat today.\n\nA much longer sentence follows here, with several more words in it.\n"
                    "Short one here.")
    cal = load_calibration(text, model, tokenizer=tok, samples=10, batch_size=8)
    b = cal.batches[0]
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
    assert b["input_ids"].shape[0] == 3 and b["input_ids"].dtype == np.int64
    lengths = b["attention_mask"].sum(1)
    assert lengths.max() == b["input_ids"].shape[1] and lengths.min() < lengths.max()  # padded to the longest
    assert np.all(b["input_ids"][b["attention_mask"] == 0] == 0)
    assert np.all(b["token_type_ids"] == 0)
    text.unlink()


def test_grams_are_exact_masked_and_bounded(tmodel, calib_npz):
    """XᵀX equals the product over real (unpadded) rows, and accumulators are in×in whatever
    the number of tokens: memory does not grow with the data."""
    small = load_calibration(calib_npz, tmodel, samples=32)
    big = load_calibration(calib_npz, tmodel, samples=96)
    targets = ["x", "h1"]
    s_small = capture_stats(tmodel, small, targets, {"input_ids": 300})
    s_big = capture_stats(tmodel, big, targets, {"input_ids": 300})
    assert {k: v.shape for k, v in s_small.grams.items()} == {"x": (32, 32), "h1": (64, 64)}
    assert {k: v.shape for k, v in s_big.grams.items()} == {"x": (32, 32), "h1": (64, 64)}
    assert s_big.rows["x"] == big.tokens == int(graphs.token_batches(n=96, seed=1)["attention_mask"].sum())
    X = []
    # direct computation from the full activations of all real tokens
    m2 = onnx.ModelProto()
    m2.CopyFrom(tmodel)
    m2.graph.output.append(onnx.helper.make_tensor_value_info("h1", onnx.TensorProto.FLOAT, None))
    for feeds in big.batches:
        h1 = run(m2, feeds, ["h1"])[0]
        X.append(h1[feeds["attention_mask"].astype(bool)])
    X = np.concatenate(X).astype(np.float64)
    np.testing.assert_allclose(s_big.grams["h1"], X.T @ X, rtol=1e-5, atol=1e-6)
    ids = np.concatenate([f["input_ids"][f["attention_mask"].astype(bool)] for f in big.batches])
    np.testing.assert_array_equal(s_big.counts["input_ids"], np.bincount(ids, minlength=300))


def _out_err(model, ref_model, cal):
    err = 0.0
    for feeds in cal.batches:
        a = run(ref_model, feeds)[0]
        b = run(model, feeds)[0]
        m = feeds["attention_mask"].astype(bool)
        err += float(np.sum((a[m] - b[m]) ** 2))
    return err


def test_whitened_rewrite_beats_plain_svd_on_the_data(tmodel, calib_npz):
    cal = load_calibration(calib_npz, tmodel, samples=96)
    plain, _ = optimize(tmodel, rank=8, embedding_method="skip", verify=False)
    white, rep = optimize(tmodel, rank=8, embedding_method="skip", verify=False, calib=calib_npz)
    assert all("whitened" in s.detail for s in rep.rewritten)
    assert rep.settings["calibration"]["tokens"] == cal.tokens
    assert _out_err(white, tmodel, cal) < 0.7 * _out_err(plain, tmodel, cal)


def test_measured_allocation_respects_budget_and_beats_uniform(tmodel, calib_npz):
    keep = 0.4
    uni, urep = optimize(tmodel, keep=keep, embedding_method="skip", verify=False, calib=calib_npz, allocation="uniform")
    mea, mrep = optimize(tmodel, keep=keep, embedding_method="skip", verify=False, calib=calib_npz, allocation="measured")
    groups = [s for s in mrep.sites if s.weight in ("W1", "W2")]
    budget = keep * sum(s.params_before for s in groups)
    spent = sum(s.params_after if s.status == "rewritten" else s.params_before for s in groups)
    assert spent <= budget
    assert mrep.settings["calibration"]["allocation"] == "measured"
    held = Calibration([graphs.token_batches(n=64, seed=99)], "attention_mask")
    refs = reference_outputs(tmodel, held)
    assert fidelity(mea, refs, held) >= fidelity(uni, refs, held) - 1e-4


def test_min_fidelity_meets_its_own_check(tmodel, calib_npz, tmp_path):
    target = 0.995
    model, rep = optimize(tmodel, embedding_method="skip", calib=calib_npz, min_fidelity=target, verify=False)
    info = rep.settings["calibration"]
    assert info["heldout_fidelity"] >= target
    assert 0 < info["keep_found"] < 1
    assert rep.params_after < rep.params_before
    # recompute on the same held-out batches (the last quarter of the calibration data)
    cal = load_calibration(calib_npz, model, samples=256)
    _, held = cal.split(0.25)
    assert fidelity(model, reference_outputs(tmodel, held), held) == pytest.approx(info["heldout_fidelity"], abs=1e-6)


def test_sequential_levels_and_no_worse_than_independent(tmodel, calib_npz):
    groups = find_weight_groups(GraphIndex(tmodel))
    levels = site_levels(tmodel, [g for g in groups if g.name in ("W1", "W2")])
    assert levels == {"W1": 1, "W2": 2}
    cal = load_calibration(calib_npz, tmodel, samples=96)
    ind, _ = optimize(tmodel, rank=6, embedding_method="skip", verify=False, calib=calib_npz)
    seq, rep = optimize(tmodel, rank=6, embedding_method="skip", verify=False, calib=calib_npz, sequential=True)
    assert [s.detail.split(":")[0] for s in rep.rewritten] == ["whitened", "sequential"]  # W1 has no prefix error
    assert _out_err(seq, tmodel, cal) <= _out_err(ind, tmodel, cal) * 1.0001


def test_cli_calib_end_to_end(tmodel, calib_npz, tmp_path, capsys):
    src, out, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(tmodel, src)
    before = src.read_bytes()
    code = main(["optimize", str(src), str(out), "--calib", str(calib_npz), "--keep", "0.5",
                                             "--embedding-method", "skip", "--min-cosine", "0.5", "--report", str(rep), "-q"])
    assert code == 0, capsys.readouterr().err
    assert src.read_bytes() == before
    data = json.loads(rep.read_text())
    assert data["settings"]["calibration"]["allocation"] == "measured"
    onnx.checker.check_model(onnx.load(out), full_check=True)
    code = main(["optimize", str(src), str(tmp_path / "o2.onnx"), "--min-fidelity", "0.9"])
    assert code == 2 and "need calibration data" in capsys.readouterr().err


def test_shared_basis_rewrite_exact_at_full_rank():
    from onnxhmf.factorize.whiten import shared_basis_lmf
    from onnxhmf.graph.edit import GraphEditor
    from onnxhmf.graph.rewrite import rewrite_shared_basis

    model = graphs.qkv_model(shared_rows=None)
    Ws = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    A, Bs, _ = shared_basis_lmf(Ws, 32, None)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ed = GraphEditor(out)
    groups = find_weight_groups(GraphIndex(out))  # alive until commit: the editor keys nodes by id
    rewrite_shared_basis(ed, groups, A, Bs)
    ed.commit()
    onnx.checker.check_model(out, full_check=True)
    assert sum(n.op_type == "MatMul" for n in out.graph.node) == 4  # one X·A, three ·B_i
    X = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
    for a, b in zip(run(model, {"X": X}), run(out, {"X": X})):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert len(groups) == 3


@pytest.mark.parametrize("shared_rows", [8, None])
def test_share_bases_where_it_helps(shared_rows):
    model = graphs.qkv_model(shared_rows=shared_rows)
    keep = 0.4
    out, rep = optimize(model, keep=keep, share_bases=True, min_cosine=None)
    budget = keep * 3 * 32 * 32
    assert sum(s.params_after for s in rep.rewritten) <= budget
    details = [s.detail for s in rep.rewritten]
    if shared_rows:  # weights with a common row space: one basis serves all three, better than three
        assert all(d.startswith("shared basis") for d in details)
        sep, srep = optimize(model, keep=keep, min_cosine=None)
        X = np.random.default_rng(1).standard_normal((2, 7, 32)).astype(np.float32)
        ref = run(model, {"X": X})
        err = lambda m: sum(float(np.sum((a - b) ** 2)) for a, b in zip(ref, run(m, {"X": X})))  # noqa: E731
        assert err(out) < 0.5 * err(sep)
    else:  # independent weights: sharing would lose, so they stay separate and the report says why
        assert not any(d.startswith("shared basis") for d in details)
        assert any("kept separate" in n for n in rep.notes)
