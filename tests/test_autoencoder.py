"""Autoencoder compression: gradients, training, determinism, and the ONNX subgraphs."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper, TensorProto
from onnx.reference import ReferenceEvaluator

import graphs
import onnxhmf
from onnxhmf.cli import main
from onnxhmf.factorize.autoencoder import (
    MLP, EmbeddingAEConfig, StorageAEConfig, embedding_ae_params, embedding_ae_rank, embedding_loss,
    frequency_weights, storage_ae_params, storage_ae_width, storage_loss, train_embedding_ae, train_storage_ae,
)


def _ort(model: onnx.ModelProto, feeds: dict) -> list:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _numeric_grad(f, p, idx, h=1e-6):
    old = p[idx]
    p[idx] = old + h
    up = f()
    p[idx] = old - h
    down = f()
    p[idx] = old
    return (up - down) / (2 * h)


def _check_grads(f, params, grads, rng, n=12):
    for p, g in zip(params, grads):
        for _ in range(n):
            idx = tuple(rng.integers(0, s) for s in p.shape)
            num = _numeric_grad(f, p, idx)
            assert g[idx] == pytest.approx(num, rel=1e-4, abs=1e-8), (p.shape, idx)


@pytest.mark.parametrize("decoder,act", [("linear", "relu"), ("nonlinear", "tanh"), ("nonlinear", "leakyrelu")])
def test_embedding_gradients_match_finite_differences(decoder, act):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((9, 7))
    w = rng.uniform(0.5, 2.0, 9)
    cfg = EmbeddingAEConfig(rank=3, decoder=decoder, activation=act, hidden=5, alpha_start=0.3, dtype=np.float64)
    enc = MLP.random([7, 3], ["linear"], rng, np.float64)
    dec = MLP.random([3, 7] if decoder == "linear" else [3, 5, 7],
                     ["linear"] if decoder == "linear" else [act, "linear"], rng, np.float64)
    for p in enc.params + dec.params:  # non-zero biases
        p += 0.1 * rng.standard_normal(p.shape)
    alpha = 0.3

    def loss():
        return embedding_loss(dec.forward(enc.forward(X)), X, w, alpha, cfg, grad=False)[0]

    ce, cd = [], []
    Y = dec.forward(enc.forward(X, ce), cd)
    _, g = embedding_loss(Y, X, w, alpha, cfg)
    gd, gz = dec.backward(cd, g)
    ge, _ = enc.backward(ce, gz)
    _check_grads(loss, enc.params + dec.params, ge + gd, rng)


def test_storage_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((10, 8))
    norms = np.linalg.norm(X, axis=1)
    cfg = StorageAEConfig(width=2, dtype=np.float64)
    enc = MLP.random([8, 16, 8, 2], ["leakyrelu", "leakyrelu", "linear"], rng, np.float64)
    dec = MLP.random([2, 4, 8, 8], ["leakyrelu", "leakyrelu", "tanh"], rng, np.float64)
    for p in enc.params + dec.params:
        p += 0.1 * rng.standard_normal(p.shape)

    def loss():
        return storage_loss(dec.forward(enc.forward(X)), X, norms, cfg, grad=False)[0]

    ce, cd = [], []
    T = dec.forward(enc.forward(X, ce), cd)
    _, g = storage_loss(T, X, norms, cfg)
    gd, gz = dec.backward(cd, g)
    ge, _ = enc.backward(ce, gz)
    _check_grads(loss, enc.params + dec.params, ge + gd, rng)


def test_embedding_training_lowers_loss_and_is_deterministic():
    E = graphs.matrix(200, 24, seed=3)
    cfg = EmbeddingAEConfig(rank=6, init="random", epochs=6, lr=3e-3, seed=5)
    a, b = train_embedding_ae(E, cfg), train_embedding_ae(E, cfg)
    assert a.history[-1] < 0.7 * a.history[0]
    np.testing.assert_array_equal(a.codes, b.codes)
    for p, q in zip(a.decoder.params, b.decoder.params):
        np.testing.assert_array_equal(p, q)
    c = train_embedding_ae(E, EmbeddingAEConfig(rank=6, init="random", epochs=6, lr=3e-3, seed=6))
    assert not np.array_equal(a.codes, c.codes)


@pytest.mark.parametrize("decoder,act", [("linear", "relu"), ("nonlinear", "relu"), ("nonlinear", "leakyrelu")])
def test_svd_init_starts_at_pca_and_never_ends_worse(decoder, act):
    E = graphs.matrix(150, 20, seed=4)
    cfg0 = EmbeddingAEConfig(rank=5, decoder=decoder, activation=act, epochs=0)
    ae0 = train_embedding_ae(E, cfg0)
    mu = E.mean(0)
    _, _, vt = np.linalg.svd(E - mu, full_matrices=False)
    pca = (E - mu) @ vt[:5].T @ vt[:5] + mu
    np.testing.assert_allclose(ae0.reconstruct(), pca, atol=2e-5)
    ae = train_embedding_ae(E, EmbeddingAEConfig(rank=5, decoder=decoder, activation=act, epochs=4))
    assert ae.history[-1] <= ae.history[0] and min(ae.history) == pytest.approx(ae.history[ae.best_epoch])


def test_frequency_weights_shift_the_fit_to_frequent_rows():
    E = graphs.matrix(120, 16, seed=7, decay=0.97)
    counts = np.zeros(120)
    counts[:10] = 1000
    w = frequency_weights(counts)
    plain = train_embedding_ae(E, EmbeddingAEConfig(rank=3, epochs=0)).reconstruct()
    weighted = train_embedding_ae(E, EmbeddingAEConfig(rank=3, epochs=0), weights=w).reconstruct()
    err = lambda Eh: np.linalg.norm(Eh[:10] - E[:10])  # noqa: E731
    assert err(weighted) < 0.7 * err(plain)


def test_budget_counts_codes_decoder_and_biases():
    assert embedding_ae_params(1000, 64, 10) == 1000 * 10 + 10 * 64 + 64
    assert embedding_ae_params(1000, 64, 10, "nonlinear") == 1000 * 10 + 10 * 20 + 20 + 20 * 64 + 64
    k = embedding_ae_rank(1000, 64, 20000, "nonlinear")
    assert embedding_ae_params(1000, 64, k, "nonlinear") <= 20000 < embedding_ae_params(1000, 64, k + 1, "nonlinear")
    x = storage_ae_width(768, 64, 12000)
    assert storage_ae_params(768, 64, x) <= 12000 < storage_ae_params(768, 64, x + 1)


def _decode(inits, codes, n_layers, prefix, acts):
    y = inits[codes]
    for i in range(n_layers):
        y = y @ inits[f"{prefix}_W{i}"] + inits[f"{prefix}_b{i}"]
        y = {"relu": lambda u: np.maximum(u, 0), "linear": lambda u: u, "tanh": np.tanh,
             "leakyrelu": lambda u: np.where(u > 0, u, 0.01 * u)}[acts[i]](y)
    return y


def test_linear_subgraph_is_codes_times_decoder_plus_bias_in_ort():
    m = graphs.gather_model(vocab=300, d=32)
    out, rep = onnxhmf.optimize(m, embedding_method="ae", keep=0.4, verify=False, ae_options={"epochs": 2})
    site = rep.rewritten[0]
    assert site.method == "ae" and site.params_after <= 0.4 * 300 * 32
    inits = _inits(out)
    assert "E" not in inits
    assert site.params_after == sum(v.size for v in inits.values())
    ids = np.arange(300, dtype=np.int64).reshape(3, 100)
    (y,) = _ort(out, {"ids": ids})
    want = inits["E.ae_codes"] @ inits["E.ae_dec_W0"] + inits["E.ae_dec_b0"]
    np.testing.assert_allclose(y.reshape(300, 32), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoder", ["linear", "nonlinear"])
def test_tied_synthetic_model_keeps_one_small_copy(decoder):
    V, d = 400, 32
    m = graphs.tied_model(vocab=V, d=d)
    out, rep = onnxhmf.optimize(m, embedding_method="ae", keep=0.5, ae_options={"epochs": 2, "decoder": decoder},
                                min_top1=None)  # 2 epochs on a synthetic table: not an argmax-preserving fit
    assert rep.passed, rep.failures
    inits = _inits(out)
    assert all(v.size < V * d / 2 for v in inits.values())
    assert out.ByteSize() < 0.6 * m.ByteSize()
    acts = ["linear"] if decoder == "linear" else ["relu", "linear"]
    E_hat = _decode(inits, "E.ae_codes", len(acts), "E.ae_dec", acts)
    ids = np.random.default_rng(0).integers(0, V, (2, 16)).astype(np.int64)
    (logits,) = _ort(out, {"ids": ids})
    want = (E_hat[ids] * inits["s"]) @ E_hat.T
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    (ref_logits,) = ReferenceEvaluator(out).run(None, {"ids": ids})
    np.testing.assert_allclose(ref_logits, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("decoder", ["linear", "nonlinear"])
def test_glassllm_tied_table_ae_verifies_and_is_stored_once(glassllm_path, decoder):
    src = onnx.load(str(glassllm_path))
    out, rep = onnxhmf.optimize(glassllm_path, embedding_method="ae", keep=0.5, include=["^embed.weight$"],
                                ae_options={"epochs": 1, "decoder": decoder, "batch_size": 128}, min_top1=None)
    assert rep.passed, rep.failures
    site = next(s for s in rep.sites if s.weight == "embed.weight")
    assert site.status == "rewritten" and site.ops == "gather+matmul"
    assert not any(tuple(t.dims) == (1024, 128) for t in out.graph.initializer)
    assert out.ByteSize() < src.ByteSize() - 0.4 * 1024 * 128 * 4
    onnx.checker.check_model(out)
    assert out.ir_version == src.ir_version and out.opset_import == src.opset_import


def _stacked_model(layers=3, m=24, n=16, seed=0):
    """X → MatMul(layer.i.key.weight) → Tanh → … : the same role in several layers, plus one odd weight."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "X"
    for i in range(layers):
        W = (rng.standard_normal((m, m)) / np.sqrt(m)).astype(np.float32)
        inits.append(numpy_helper.from_array(W, f"layer.{i}.key.weight"))
        nodes += [helper.make_node("MatMul", [cur, f"layer.{i}.key.weight"], [f"h{i}"], name=f"mm{i}"),
                  helper.make_node("Tanh", [f"h{i}"], [f"t{i}"], name=f"tanh{i}")]
        cur = f"t{i}"
    inits.append(numpy_helper.from_array((rng.standard_normal((m, n)) / 5).astype(np.float32), "head.weight"))
    nodes.append(helper.make_node("MatMul", [cur, "head.weight"], ["Y"], name="head"))
    return graphs.model(nodes, [graphs.vi("X", ["b", m])], [graphs.vi("Y", ["b", n])], inits)


@pytest.mark.parametrize("opset", [17, 18])
def test_storage_ae_rebuilds_weights_exactly_in_ort_and_reference(opset):
    m = _stacked_model()
    m.opset_import[0].version = opset
    out, rep = onnxhmf.optimize(m, include=["^$"], storage_ae={"include": [r"\.weight$"], "keep": 0.5,
                                                               "options": {"epochs": 3}}, verify=False)
    done = {s.weight: s for s in rep.rewritten}
    assert set(done) == {f"layer.{i}.key.weight" for i in range(3)}
    head = next(s for s in rep.sites if s.weight == "head.weight")
    assert head.status == "skipped" and "fewer than 2" in head.reason
    inits = _inits(out)
    assert not any(f"layer.{i}.key.weight" in inits for i in range(3))
    stored = sum(v.size for k, v in inits.items() if k != "head.weight")
    assert stored == sum(s.params_after for s in done.values()) <= 0.5 * 3 * 24 * 24
    decoded = [next(o for n in out.graph.node for o in n.output if o.startswith(f"layer.{i}.key.weight.ae_decoded"))
               for i in range(3)]
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in decoded)
    x = np.random.default_rng(0).standard_normal((2, 24)).astype(np.float32)
    got_ort = _ort(probe, {"X": x})[1:]
    got_ref = ReferenceEvaluator(probe).run(None, {"X": x})[1:]
    prefix = next(k for k in inits if k.endswith("ae_dec_W0"))[: -len("_W0")]
    for i, name in enumerate(decoded):
        t = _decode(inits, f"layer.{i}.key.weight.ae_codes", 3, prefix, ["leakyrelu", "leakyrelu", "tanh"])
        want = t * (inits[f"layer.{i}.key.weight.ae_norms"] / np.linalg.norm(t, axis=1, keepdims=True))
        np.testing.assert_allclose(got_ort[i], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_ref[i], want, rtol=1e-5, atol=1e-6)
        orig = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == f"layer.{i}.key.weight"))
        np.testing.assert_allclose(np.linalg.norm(want, axis=1), np.linalg.norm(orig, axis=1), rtol=1e-5)
    onnx.checker.check_model(out)


def test_storage_training_lowers_loss():
    X = graphs.matrix(96, 16, seed=2)
    ae = train_storage_ae(X, StorageAEConfig(width=4, epochs=15, lr=3e-3))
    assert ae.history[ae.best_epoch] < 0.8 * ae.history[0]
    np.testing.assert_allclose(np.linalg.norm(ae.reconstruct(), axis=1), np.linalg.norm(X, axis=1), rtol=1e-5)


def test_cli_ae_options(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save(graphs.tied_model(vocab=300, d=32), src)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), str(out), "--embedding-method", "ae", "--ae-loss-weights", "1", "-q"]) == 2
    assert "--ae-loss-weights" in capsys.readouterr().err and not out.exists()
    assert main(["optimize", str(src), str(out), "--embedding-method", "ae", "--ae-epochs", "1", "--ae-decoder",
                 "nonlinear", "--keep", "0.5", "-q", "--min-top1", "0"]) == 0
    assert out.exists() and out.stat().st_size < 0.6 * src.stat().st_size
