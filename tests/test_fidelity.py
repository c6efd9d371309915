"""onnxhmf.fidelity: per-output metrics, classification, minimums and the verdict."""
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from discovery_graphs import V, causal_lm, kv_merged, text_encoder
from onnxhmf.calibration import Calibration
from onnxhmf.errors import OnnxHmfError
from onnxhmf.fidelity import (FidelityMeter, compare_batches, evaluate_fidelity, fidelity_verdict, next_token_labels,
                              output_kind, parse_minimums, vocab_sizes)


def test_vocab_sizes_counts_token_tables_not_position_tables(tmp_path):
    m = kv_merged()  # E (120 rows) is gathered inside the If branches
    assert vocab_sizes(m) == {V}
    # a position table of 130 rows indexed by position_ids is not a vocabulary
    g = m.graph
    g.initializer.append(numpy_helper.from_array(np.zeros((130, 8), np.float32), "P"))
    g.node[0].attribute[0].g.node.append(onnx.helper.make_node("Gather", ["P", "position_ids"], ["pe"], name="pos"))
    assert vocab_sizes(m) == {V}
    (tmp_path / "config.json").write_text('{"vocab_size": 50257}')
    assert vocab_sizes(m, tmp_path / "config.json") == {V, 50257}
    assert vocab_sizes(None, {"text_config": {"vocab_size": 7}}) == {7}


def test_output_kind():
    assert output_kind("logits", (2, 5, 11), np.float32, set()) == "logits"
    assert output_kind("scores", (2, 5, 120), np.float32, {120}) == "logits"
    assert output_kind("last_hidden_state", (2, 5, 384), np.float32, {30522}) == "embedding"
    assert output_kind("present.0.key", (2, 2, 5, 32), np.float32, set()) == "cache"
    assert output_kind("ids", (2, 5), np.int64, set()) is None


def test_cosine_and_masked_positions_excluded():
    r = np.zeros((1, 3, 2), np.float32)
    c = np.zeros_like(r)
    r[0, 0], c[0, 0] = [1, 0], [1, 1]  # cosine 1/√2
    r[0, 1], c[0, 1] = [0, 2], [0, 5]  # cosine 1
    r[0, 2], c[0, 2] = [1, 0], [-1, 0]  # cosine −1, but padding
    mask = np.array([[1, 1, 0]])
    meter = FidelityMeter()
    meter.add({"h": r}, {"h": c}, mask)
    out = meter.outputs()["h"]
    assert out.kind == "embedding" and out.rows == 2
    assert out.value == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    meter = FidelityMeter()
    meter.add({"h": r}, {"h": c}, None)  # without the mask the padded row counts
    assert meter.outputs()["h"].value == pytest.approx((1 / math.sqrt(2) + 1 - 1) / 3)


def test_cached_step_mask_uses_its_last_columns():
    r = np.ones((1, 2, 2), np.float32)
    c = r.copy()
    c[0, 0] = [-1, -1]
    meter = FidelityMeter()
    meter.add({"h": r}, {"h": c}, np.array([[1, 1, 1, 0, 1]]))  # past 3 + 2 new tokens; the first new one padded
    assert meter.outputs()["h"].value == pytest.approx(1.0) and meter.outputs()["h"].rows == 1


def test_logit_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    r = rng.standard_normal((2, 4, 11)).astype(np.float32)
    c = (r + 0.5 * rng.standard_normal(r.shape)).astype(np.float32)
    labels = rng.integers(0, 11, size=(2, 4))
    meter = FidelityMeter(top_k=3)
    meter.add({"logits": r}, {"logits": c}, None, labels)
    o = meter.outputs()["logits"]
    p = np.exp(r.astype(np.float64)) / np.exp(r.astype(np.float64)).sum(-1, keepdims=True)
    q = np.exp(c.astype(np.float64)) / np.exp(c.astype(np.float64)).sum(-1, keepdims=True)
    kl = float(np.mean(np.sum(p * np.log(p / q), -1)))
    assert o.kind == "logits" and o.kl == pytest.approx(kl, rel=1e-6) and o.value == pytest.approx(math.exp(-kl))
    assert o.top1 == pytest.approx(np.mean(r.argmax(-1) == c.argmax(-1)))
    nll = -np.mean(np.log(np.take_along_axis(p, labels[..., None], -1)))
    assert o.ppl_ref == pytest.approx(math.exp(nll), rel=1e-6)
    assert 0 < o.topk <= 1 and o.k == 3


def test_uniform_logits_have_the_vocabulary_as_perplexity():
    z = np.zeros((1, 5, 40), np.float32)
    meter = FidelityMeter()
    meter.add({"logits": z}, {"logits": z}, None, next_token_labels(np.arange(5)[None]))
    o = meter.outputs()["logits"]
    assert o.ppl_ref == pytest.approx(40.0) and o.value == pytest.approx(1.0)


def test_next_token_labels():
    assert next_token_labels(np.array([[5, 6, 7]])).tolist() == [[6, 7, -1]]
    assert next_token_labels(np.array([[5, 6]]), np.array([9])).tolist() == [[6, 9]]


def test_parse_minimums():
    assert parse_minimums(["0.99", "logits:0.95"], ["logits", "h"]) == {"": 0.99, "logits": 0.95}
    assert parse_minimums(["a:b:0.9"], ["a:b"]) == {"a:b": 0.9}
    for bad in (["h:1.5"], ["h:x"], ["0"]):
        with pytest.raises(OnnxHmfError, match="bad --min-cosine"):
            parse_minimums(bad, ["h"])
    with pytest.raises(OnnxHmfError, match="unknown output 'nope'"):
        parse_minimums(["nope:0.9"], ["h"])


def test_verdict_per_output_minimums_and_counted_outputs():
    r = {"emb": np.ones((2, 4), np.float32), "present.0.key": np.ones((2, 1, 3, 4), np.float32)}
    c = {"emb": np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32), "present.0.key": -r["present.0.key"]}
    res = compare_batches([r], [c])
    cos = (1 + 3 / (2 * math.sqrt(3))) / 2
    assert res.outputs["emb"].value == pytest.approx(cos) and res.counted == ["emb"]
    assert not res.passed and res.failures[0].startswith("emb: cosine")  # 0.93 < the default 0.99; cache not counted
    assert compare_batches([r], [c], minimums={"emb": 0.9}).passed
    assert compare_batches([r], [c], minimums={"": 0.9}).value == pytest.approx(cos)
    res = fidelity_verdict(res.outputs, {"": 0.5}, counted=["emb", "present.0.key"])
    assert res.failures == ["present.0.key: cosine -1.0000 < minimum 0.5"] and res.worst == "present.0.key"
    with pytest.raises(OnnxHmfError, match="--outputs names unknown"):
        fidelity_verdict(res.outputs, counted=["missing"])


def test_shape_change_is_an_error():
    with pytest.raises(OnnxHmfError, match="changed shape"):
        FidelityMeter().add({"h": np.ones((2, 3))}, {"h": np.ones((3, 2))})


def _perturbed(m: onnx.ModelProto, name: str, scale: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if t.name == name:
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(a + scale * np.random.default_rng(99).standard_normal(a.shape).astype(a.dtype), name))
    return out


def test_evaluate_fidelity_on_an_encoder_with_padding():
    m = text_encoder()
    ids = np.array([[3, 4, 5, 0], [6, 7, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    cal = Calibration([{"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}], "attention_mask")
    same = evaluate_fidelity(m, m, cal)
    assert same.passed and same.outputs["hidden"].value == pytest.approx(1.0) and same.outputs["hidden"].rows == 5
    res = evaluate_fidelity(m, _perturbed(m, "W", 0.3), cal)
    assert 0.5 < res.outputs["hidden"].value < 0.999 and res.outputs["pooled"].rows == 2


def test_evaluate_fidelity_on_a_causal_lm_scores_perplexity():
    m = causal_lm()
    ids = np.random.default_rng(0).integers(0, V, size=(3, 6))
    cal = Calibration([{"input_ids": ids}])
    res = evaluate_fidelity(m, _perturbed(m, "W", 0.2), cal, logits="logits", vocab={V})
    o = res.outputs["logits"]
    assert o.kind == "logits" and o.ppl_ref is not None and o.ppl_cand is not None and o.value < 1.0
    assert o.rows == 18


@pytest.mark.slow
def test_glassllm_exp_minus_kl_tracks_the_perplexity_ratio(glassllm_path):
    """On text the model itself samples, exp(−KL) ≈ ppl_ref / ppl_cand."""
    from onnxhmf.discover import discover_calibration

    d = discover_calibration(glassllm_path)
    _, held = d.split()
    ref = onnx.load(str(glassllm_path))
    cand = _perturbed(ref, "blocks.0.ffn.w1", 0.05)
    for name in ("blocks.1.ffn.w1", "blocks.2.attn.wq", "blocks.3.ffn.w2"):
        cand = _perturbed(cand, name, 0.05)
    res = evaluate_fidelity(ref, cand, held, logits=d.logits, vocab=d.vocab)
    o = res.outputs["logits"]
    assert 0.8 < o.value < 0.999
    assert o.value == pytest.approx(o.ppl_ref / o.ppl_cand, abs=0.02)
    assert o.top1 < 1.0 and res.counted == ["logits"]


@pytest.mark.slow
def test_minilm_int8_cosines_and_kinds(minilm_path, tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    from onnxhmf.discover import discover_calibration

    d = discover_calibration(minilm_path)
    _, held = d.split()
    q = tmp_path / "q.onnx"
    quantize_dynamic(str(minilm_path), str(q), per_channel=True)
    res = evaluate_fidelity(minilm_path, q, held, vocab=d.vocab)
    assert d.vocab == {30522}
    assert {n: o.kind for n, o in res.outputs.items()} == {"last_hidden_state": "embedding", "sentence_embedding": "embedding"}
    assert 0.97 < res.outputs["sentence_embedding"].value < 0.9999
    assert res.outputs["last_hidden_state"].rows == sum(int(b["attention_mask"].sum()) for b in held.batches)
