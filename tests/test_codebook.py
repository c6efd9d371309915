"""Product-quantized tables: the k-means math, the codes → codebook Gather graph, the treatment."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import gather_model, matmul_model, model, token_batches, token_mlp_model, vi
from onnxhmf.calibration import Calibration
from onnxhmf.errors import OnnxHmfError
from onnxhmf.factorize.codebook import ProductQuantized, kmeans, pq_bytes, product_quantize
from onnxhmf.graph.codebook import codebook_table
from onnxhmf.graph.qdq import default_opset
from onnxhmf.passes.intquant import IntTreatment, apply_treatments, parse_treatment


def _run(m, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _table_from_codebooks(V=300, S=8, k=16, d=4, seed=0):
    """A table whose sub-vectors take at most k distinct values per subspace: PQ with k centroids is exact."""
    rng = np.random.default_rng(seed)
    books = rng.standard_normal((S, k, d))
    codes = rng.integers(0, k, (V, S))
    codes[:k] = np.arange(k)[:, None]  # every centroid used
    return books[np.arange(S)[None, :], codes].reshape(V, S * d), books, codes


def test_kmeans_recovers_separated_clusters_and_is_exact_when_k_covers_the_rows():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((5, 3)) * 10
    X = np.repeat(centers, 40, axis=0) + 0.01 * rng.standard_normal((200, 3))
    C, a = kmeans(X, 5, seed=1)
    assert np.abs(C[a] - X).max() < 0.1
    assert len(set(a.tolist())) == 5
    Y = rng.standard_normal((7, 3))
    C, a = kmeans(Y, 10)
    np.testing.assert_array_equal(C[a], Y)


def test_product_quantize_is_exact_on_a_table_built_from_codebooks():
    E, _, _ = _table_from_codebooks()
    pq = product_quantize(E, sub=4, k=16)
    assert pq.codes.dtype == np.uint8 and pq.codes.shape == (300, 8) and pq.codebooks.shape == (8, 16, 4)
    np.testing.assert_allclose(pq.dequantize(), E, atol=1e-6)
    assert pq.nbytes() == pq_bytes(300, 32, 4, 16) == 300 * 8 + 8 * 16 * 4 * 4


def test_product_quantize_error_falls_with_more_centroids_and_shorter_subvectors():
    E = np.random.default_rng(3).standard_normal((400, 32))
    err = lambda pq: np.linalg.norm(pq.dequantize() - E)  # noqa: E731
    assert err(product_quantize(E, 4, 256)) < err(product_quantize(E, 4, 16)) < err(product_quantize(E, 8, 16))
    half = product_quantize(E, 4, 64, itemsize=2)
    assert half.nbytes() == 400 * 8 + 8 * 64 * 4 * 2
    # the float16 codebook's values are what dequantize uses
    np.testing.assert_array_equal(half.dequantize(), half.codebooks.astype(np.float16).astype(np.float32)[
        np.arange(8)[None, :], half.codes.astype(np.int64)].reshape(400, 32))
    full, i8 = product_quantize(E, 4, 64), product_quantize(E, 4, 64, itemsize=1)
    assert i8.nbytes() == 400 * 8 + 8 * 64 * 4 + 4 * 8  # int8 codebooks and a float32 scale per subspace
    q, a = i8.int8_books()
    assert q.dtype == np.int8 and a.shape == (8, 1, 1) and np.abs(q).max() == 127
    np.testing.assert_array_equal(q.astype(np.float32) * a, i8.codebooks)  # what Cast·Mul rebuilds, exactly
    assert err(i8) < 1.02 * err(full)  # the int8 rounding of the centroids costs little
    with pytest.raises(ValueError):
        product_quantize(E, 5)
    with pytest.raises(ValueError):
        product_quantize(E, 4, 512)


@pytest.mark.parametrize("itemsize", [4, 2, 1])
def test_codebook_table_runs_in_onnxruntime_exactly_with_standard_ops(itemsize):
    m = gather_model(300, 32)
    E = numpy_helper.to_array(m.graph.initializer[0])
    pq = product_quantize(E, 4, 64, itemsize=itemsize)
    assert codebook_table(m, "E", pq) == 1
    onnx.checker.check_model(m, full_check=True)
    assert default_opset(m) == 17 and all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    ids = np.random.default_rng(0).integers(0, 300, (3, 7))
    np.testing.assert_array_equal(_run(m, {"ids": ids}), pq.dequantize()[ids])
    assert not any(t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 300 * 32 // 4 for t in m.graph.initializer)
    assert m.ByteSize() < pq.nbytes() + (800 if itemsize > 1 else 1100)  # (int8: three more nodes and constants)


def test_codebook_table_serves_gathers_of_different_index_ranks():
    E, _, _ = _table_from_codebooks(V=64, S=4, k=16, d=2)
    E = E.astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "a"], ["ya"], name="ga", axis=0),
             helper.make_node("Gather", ["E", "b"], ["yb"], name="gb", axis=0)]
    m = model(nodes, [vi("a", ["n"], TensorProto.INT64), vi("b", ["p", "q"], TensorProto.INT64)],
              [vi("ya", ["n", 8]), vi("yb", ["p", "q", 8])], [numpy_helper.from_array(E, "E")])
    pq = product_quantize(E, 2, 16)
    assert codebook_table(m, "E", pq) == 2
    onnx.checker.check_model(m, full_check=True)
    a, b = np.array([3, 0, 63]), np.array([[1, 2], [5, 7], [9, 11]])
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    ya, yb = s.run(None, {"a": a, "b": b})
    np.testing.assert_allclose(ya, E[a], atol=1e-6)  # exact table: the rows themselves
    np.testing.assert_allclose(yb, E[b], atol=1e-6)


def test_codebook_table_refuses_other_sites_and_wrong_shapes():
    m = matmul_model(48, 40)
    with pytest.raises(OnnxHmfError, match="not a product-quantized table"):
        codebook_table(m, "W", product_quantize(np.zeros((48, 40)), 4, 8))
    g = gather_model(200, 32)
    with pytest.raises(OnnxHmfError, match="not a product-quantized table"):
        codebook_table(g, "E", ProductQuantized(np.zeros((100, 8), np.uint8), np.zeros((8, 4, 4), np.float32)))


def test_pq_treatment_through_apply_treatments():
    t = parse_treatment("pq:4:f16")
    assert t == IntTreatment("pq", 8, 4, True, "f16") and t.name == "pq4k256-f16" and t.sites() == ("table",)
    assert t.nbytes((320, 32)) == pq_bytes(320, 32, 4, 256, 2)
    with pytest.raises(OnnxHmfError):
        parse_treatment("pq:4:f8")
    m = token_mlp_model(vocab=320, d=32, h=64)
    cal = Calibration([token_batches(320, 32, 12, seed=1)], mask="attention_mask")
    out, notes = apply_treatments(m, {"E": t, "W1": t}, calib=cal)
    assert any("W1: pq4k256-f16 skipped" in n for n in notes)
    assert default_opset(out) == 17 and {i.name for i in out.graph.initializer} >= {"E.pq4.codes", "E.pq4.codebook"}
    E = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "E"))
    Eq = t.weight(E, None, "table")
    assert Eq.shape == E.shape and np.linalg.norm(Eq - E) < 0.5 * np.linalg.norm(E)
    feeds = token_batches(320, 4, 12, seed=5)
    ref = m.graph
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    next(i for i in probe.graph.initializer if i.name == "E").CopyFrom(numpy_helper.from_array(Eq, "E"))
    np.testing.assert_allclose(_run(out, feeds), _run(probe, feeds), rtol=1e-5, atol=1e-5)
    assert ref is m.graph


def test_planner_offers_pq4_for_tables_only_and_prices_it():
    from onnxhmf.passes.intquant import PLANNED, planner_options
    from onnxhmf.plan import treatment_bytes

    m = token_mlp_model(vocab=320, d=32, h=64)
    arrays = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    probes = []

    def loss_with(name, W):
        probes.append((name, W.shape))
        return float(np.linalg.norm(W - arrays[name]))

    opts = {w: planner_options(m, w, arrays[w], {}, loss_with, lambda b, l, t: (b, l, t)) for w in ("E", "W1")}
    assert "pq4" in [t[0] for _, _, t in opts["E"]] and "pq4" not in [t[0] for _, _, t in opts["W1"]]
    b, lost, _ = next(o for o in opts["E"] if o[2][0] == "pq4")
    assert b == PLANNED["pq4"].nbytes((320, 32), "table") and lost > 0
    assert 0 < treatment_bytes("pq4", (320, 32)) - b <= 2700 and ("E", (320, 32)) in probes


def test_a_plan_file_with_pq4_writes_codes(tmp_path):
    import json

    from onnxhmf.api import optimize

    m = token_mlp_model(vocab=320, d=32, h=64)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    p = tmp_path / "p.json"
    from onnxhmf.cli import main

    assert main(["optimize", str(src), str(tmp_path / "x.onnx"), "--dry-run", "--save-plan", str(p), "-q"]) == 0
    data = json.loads(p.read_text())
    for d in data["decisions"]:
        d.update(treatment="pq4" if d["weight"] == "E" else "dense", rank=None, budget=None)
    data["settings"]["quantize"] = None  # (the data-free plan int8-quantizes what it keeps dense)
    p.write_text(json.dumps(data))
    out, report = optimize(str(src), plan_file=p, verify=False)
    assert "E.pq4.codes" in {t.name for t in out.graph.initializer} and default_opset(out) == 17
    assert {s.weight: s.method for s in report.rewritten}.get("E") == "pq4"
    feeds = token_batches(320, 4, 12, seed=5)
    a, b = _run(m, feeds).ravel(), _run(out, feeds).ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.9


@pytest.mark.slow
def test_minilm_word_table_as_pq4_is_small_standard_and_close(minilm_path):
    m = onnx.load(minilm_path)
    word = "embeddings.word_embeddings.weight"
    t = parse_treatment("pq:4:f16")
    out, notes = apply_treatments(m, {word: t})
    assert default_opset(out) == default_opset(m) and not notes
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)
    assert m.ByteSize() - out.ByteSize() > 30522 * 384 * 4 - t.nbytes((30522, 384)) - 3000  # (names, nodes: 2.1 KB)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (4, 32))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    s = [ort.InferenceSession(x.SerializeToString(), providers=["CPUExecutionProvider"]) for x in (m, out)]
    name = "sentence_embedding"
    a, b = (x.run([name], feeds)[0] for x in s)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() > 0.95  # random ids: every row is as likely as any (held-out text: 0.984)
