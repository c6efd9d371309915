"""Real models end to end through the CLI: glassllm (tied embedding + LM head) and MiniLM."""
import json

import numpy as np
import onnx
import pytest

from onnxhmf.cli import main
from onnxhmf.verify import make_inputs, run_onnxruntime

pytestmark = pytest.mark.slow


def optimize_cli(capsys, src, out, *args):
    rep = out.with_suffix(".json")
    # --min-top1 0: these tests check structure at keeps whose top-1 agreement the default check
    # (0.9) rightly refuses (glassllm at --keep 0.75: 0.64; see tests/test_safety_verify.py)
    code = main(["optimize", str(src), str(out), "--report", str(rep), "-q", "--min-top1", "0", *map(str, args)])
    _, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(rep.read_text())


def assert_io_unchanged(a: onnx.ModelProto, b: onnx.ModelProto):
    for x, y in ((a.graph.input, b.graph.input), (a.graph.output, b.graph.output)):
        assert [(v.name, v.type) for v in x] == [(v.name, v.type) for v in y]  # names, dtypes, symbolic dims
    assert b.ir_version == a.ir_version and list(b.opset_import) == list(a.opset_import)
    assert b.producer_name == a.producer_name
    meta_a = {p.key: p.value for p in a.metadata_props}
    meta_b = {p.key: p.value for p in b.metadata_props}
    assert meta_a.items() <= meta_b.items() and "onnxhmf" in meta_b
    assert all(n.domain in ("", "ai.onnx") for n in b.graph.node)


def test_glassllm_end_to_end(glassllm_path, tmp_path, capsys):
    before = glassllm_path.read_bytes()
    out = tmp_path / "g.onnx"
    rep = optimize_cli(capsys, glassllm_path, out, "--keep", "0.5")
    assert glassllm_path.read_bytes() == before
    a, b = onnx.load(glassllm_path), onnx.load(out)
    onnx.checker.check_model(b, full_check=True)
    assert_io_unchanged(a, b)

    # The tied table is one group (Gather + LM head), factorized once, stored once.
    embed = next(s for s in rep["sites"] if s["weight"] == "embed.weight")
    assert embed["ops"] == "gather+matmul" and embed["status"] == "rewritten"
    names = {t.name for t in b.graph.initializer}
    floats = {t.name for t in b.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}  # (pivoted: + int32 maps)
    assert "embed.weight" not in names and sum(n.startswith("embed.weight.") for n in floats) == 2

    # Size drops as planned: every rewritten site keeps ≤ 50 %, everything else is untouched.
    rewritten = [s for s in rep["sites"] if s["status"] == "rewritten"]
    assert len(rewritten) == 29  # 4 blocks × 7 linears + the tied table
    assert all(s["params_after"] <= 0.5 * s["params_before"] for s in rewritten)
    saved = sum(s["params_before"] - s["params_after"] for s in rewritten)
    assert rep["params_before"] - rep["params_after"] == saved
    assert out.stat().st_size == rep["bytes_after"] < 0.55 * rep["bytes_before"]

    # Verification numbers are reported and agree with an independent run.
    (stat,) = rep["outputs"]
    assert stat["name"] == "logits" and stat["top1"] is not None and 0 < stat["mean_cosine"] < 1
    feeds = make_inputs(a, seed=0)
    ra, rb = run_onnxruntime(a, feeds)["logits"], run_onnxruntime(b, feeds)["logits"]
    cos = np.sum(ra * rb, -1) / (np.linalg.norm(ra, axis=-1) * np.linalg.norm(rb, axis=-1))
    assert np.mean(cos) == pytest.approx(stat["mean_cosine"], abs=1e-5)


def test_glassllm_runs_in_reference_evaluator(glassllm_path, tmp_path, capsys):
    from onnx.reference import ReferenceEvaluator

    out = tmp_path / "g.onnx"
    optimize_cli(capsys, glassllm_path, out, "--keep", "0.75")
    b = onnx.load(out)
    ids = np.random.default_rng(1).integers(0, 1024, size=(1, 9)).astype(np.int64)
    ort_out = run_onnxruntime(b, {"input_ids": ids})["logits"]
    ref_out = ReferenceEvaluator(b).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(ref_out, ort_out, atol=1e-4, rtol=1e-4)


def test_minilm_end_to_end(minilm_path, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rep = optimize_cli(capsys, minilm_path, out, "--keep", "0.75", "--min-cosine", "0",
                       "--input-shapes", "input_ids:2,128", "--input-shapes", "attention_mask:2,128",
                       "--input-shapes", "token_type_ids:2,128")
    a, b = onnx.load(minilm_path), onnx.load(out)
    onnx.checker.check_model(b)
    assert_io_unchanged(a, b)
    rewritten = [s for s in rep["sites"] if s["status"] == "rewritten"]
    # 6 layers × (Q, K, V, attention out, FFN in, FFN out) + word and position embeddings.
    assert sum(s["ops"] == "matmul" for s in rewritten) == 36
    assert {s["weight"] for s in rewritten if s["ops"] == "gather"} >= {"embeddings.word_embeddings.weight"}
    assert all(s["params_after"] <= 0.75 * s["params_before"] for s in rewritten)
    assert rep["bytes_after"] == out.stat().st_size < 0.8 * rep["bytes_before"]
    outs = {o["name"]: o for o in rep["outputs"]}
    assert set(outs) == {"last_hidden_state", "sentence_embedding"}
    assert all(0 < o["mean_cosine"] <= 1 for o in outs.values())
    assert rep["settings"]["inputs"]["input_ids"] == [2, 128]


@pytest.mark.parametrize("method", ["hmf", "prune"])
def test_glassllm_hmf_and_prune_in_ort_and_reference(method, glassllm_path, tmp_path, capsys):
    from onnx.reference import ReferenceEvaluator

    out = tmp_path / f"g_{method}.onnx"
    rep = optimize_cli(capsys, glassllm_path, out, "--method", method, "--keep", "0.5", "--min-cosine", "0")
    a, b = onnx.load(glassllm_path), onnx.load(out)
    onnx.checker.check_model(b, full_check=True)
    assert_io_unchanged(a, b)
    rewritten = [s for s in rep["sites"] if s["status"] == "rewritten"]
    assert len(rewritten) == 29 and all(s["planned"] == method for s in rewritten)
    assert all(s["method"] in (method, "lmf") for s in rewritten)  # an hmf budget may fit best as plain lmf
    assert all(s["params_after"] <= 0.5 * s["params_before"] for s in rewritten)
    if method == "hmf":  # parameter accounting equals what the file stores
        assert rep["params_after"] == sum(int(np.prod(t.dims)) for t in b.graph.initializer)
        assert out.stat().st_size < 0.55 * glassllm_path.stat().st_size
    else:  # pruning stores zeros: same size, fewer non-zeros
        assert rep["nonzero_after"] <= 0.52 * rep["params_before"]
    ids = np.random.default_rng(2).integers(0, 1024, size=(1, 11)).astype(np.int64)
    ort_out = run_onnxruntime(b, {"input_ids": ids})["logits"]
    ref_out = ReferenceEvaluator(b).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(ref_out, ort_out, atol=1e-4, rtol=1e-4)


def test_minilm_hmf_with_token_frequencies(minilm_path, tmp_path, capsys):
    import pydoc_data.topics

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(list(pydoc_data.topics.topics.values())[:40]))
    tok = minilm_path.with_name("minilm.tokenizer.json")
    out = tmp_path / "m.onnx"
    rep = optimize_cli(capsys, minilm_path, out, "--method", "hmf", "--keep", "0.5", "--min-cosine", "0",
                       "--include", "word_embeddings", "--token-freq", text, "--tokenizer", tok)
    (site,) = [s for s in rep["sites"] if s["status"] == "rewritten"]
    assert site["weight"] == "embeddings.word_embeddings.weight" and site["params_after"] <= 0.5 * site["params_before"]
    b = onnx.load(out)
    onnx.checker.check_model(b)
    if site["dense"]:  # the most frequent tokens' rows are stored exactly
        assert "most frequent tokens" in site["detail"]
        slot = onnx.numpy_helper.to_array(next(t for t in b.graph.initializer if t.name.endswith("hmf_slot")))
        assert int(np.sum(slot < site["dense"])) == site["dense"]
    feeds = make_inputs(onnx.load(minilm_path), {"input_ids": [2, 16], "attention_mask": [2, 16], "token_type_ids": [2, 16]})
    assert run_onnxruntime(b, feeds)["sentence_embedding"].shape == (2, 384)
