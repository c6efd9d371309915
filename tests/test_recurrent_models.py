"""Real recurrent models (built into models/cache/ when missing): g2p-en's GRU seq2seq and a
char LSTM LM trained on Shakespeare. All slow: they build or run real models."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import onnxhmf
from conftest import MODEL_CACHE, ROOT

pytestmark = pytest.mark.slow


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "models" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def g2p():
    pytest.importorskip("torch")
    if importlib.util.find_spec("g2p_en") is None:
        pytest.skip("g2p-en not installed: pip install --no-deps g2p-en")
    mod = _script("build_g2p")
    path = MODEL_CACHE / "g2p.onnx"
    if not path.is_file():
        mod.build_g2p(path)  # checks the port against g2p-en's numpy forward
    return mod, path


@pytest.fixture(scope="module")
def lstm_lm():
    pytest.importorskip("torch")
    mod = _script("build_lstm_lm")
    path = MODEL_CACHE / "lstm_lm.onnx"
    if not path.is_file():
        mod.build_lstm_lm(path)
    return mod, path


def _sess(m):
    return ort.InferenceSession(m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m),
                                providers=["CPUExecutionProvider"])


def _w(path):
    return [n.input[1] for n in onnx.load(str(path)).graph.node if n.op_type in ("LSTM", "GRU")]


def test_g2p_port_matches_g2p_en(g2p):
    mod, path = g2p
    mod.check_port(path, ["pneumonia", "xylophone", "streetwise", "queue", "rhythm", "anticonstitutional"])


def test_g2p_lowered_dense_is_exact_in_ort_and_reference(g2p):
    mod, path = g2p
    out, rep = onnxhmf.optimize(str(path), keep=1.0, lower_recurrent=True, verify=False,
                                include=[f"^{re.escape(n)}$" for n in _w(path)])
    assert "GRU" not in {n.op_type for n in out.graph.node} and "Scan" in {n.op_type for n in out.graph.node}
    feeds = {"chars": mod.encode(["shakespeare", "comedianism"])}
    want = _sess(path).run(None, feeds)[0]
    assert np.abs(_sess(out).run(None, feeds)[0] - want).max() < 1e-4
    assert np.abs(ReferenceEvaluator(out).run(None, feeds)[0] - want).max() < 1e-4


def test_g2p_encoder_w_at_half_keep_keeps_most_words(g2p):
    mod, path = g2p
    words = ["castle", "kingdom", "thunder", "whisper", "gentle", "honour", "villain", "sorrow", "midnight", "crown"]
    model, rep = onnxhmf.optimize(str(path), keep=0.5, verify=False, include=[f"^{re.escape(n)}$" for n in _w(path)])
    (site,) = rep.rewritten
    assert site.ops == "gru" and site.params_after <= 0.5 * site.params_before
    base, cand = _sess(path), _sess(model)
    same = [mod.decode(base.run(None, {"chars": mod.encode([w])})[0]) == mod.decode(cand.run(None, {"chars": mod.encode([w])})[0])
            for w in words]
    assert np.mean(same) >= 0.5


def test_lstm_lm_lowered_dense_exact_and_w_lmf_keeps_perplexity(lstm_lm):
    mod, path = lstm_lm
    _, held = mod.corpus_split()
    wins = mod.windows(held, 8)
    ids = {"ids": wins[:2, :64]}
    low, _ = onnxhmf.optimize(str(path), keep=1.0, lower_recurrent=True, verify=False,
                              include=[f"^{re.escape(n)}$" for n in _w(path)])
    assert np.abs(_sess(low).run(None, ids)[0] - _sess(path).run(None, ids)[0]).max() < 1e-4
    lmf, rep = onnxhmf.optimize(str(path), keep=0.5, verify=False, include=[f"^{re.escape(n)}$" for n in _w(path)])
    assert [s.ops for s in rep.rewritten] == ["lstm"]
    p0, p1 = mod.perplexity(_sess(path), wins), mod.perplexity(_sess(lmf), wins)
    assert p0 < 12 and p1 < 1.15 * p0


def test_lstm_lm_unrolled_cells_are_matmul_sites(lstm_lm):
    mod, path = lstm_lm
    unrolled = path.with_name("lstm_lm_unrolled.onnx")
    model, rep = onnxhmf.optimize(str(unrolled), keep=0.5, verify=False, min_params=100_000)
    done = {s.weight: s for s in rep.rewritten}
    assert len(done) == 2 and all(s.ops in ("matmul", "gemm") for s in done.values())
    wins = mod.windows(mod.corpus_split()[1], 8)
    p0, p1 = mod.perplexity(_sess(unrolled), wins), mod.perplexity(_sess(model), wins)
    assert p1 < 1.5 * p0
