"""models/build_glassllm_kv.py: glassllm with a KV cache in optimum's folder layout."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("build_glassllm_kv", ROOT / "models" / "build_glassllm_kv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_cached_and_uncached_steps_agree_with_glassllm(tmp_path, glassllm_path):
    import glassllm

    mod = _builder()
    out = mod.build_folder(tmp_path / "kv", split=True)  # runs check() before renaming into place
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["decoder_model_merged.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "config.json",
         "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
    model, _ = glassllm.load_pretrained("en")
    diffs = mod.check(out, model)
    assert set(diffs) == {"merged_uncached", "merged_cached", "split_cached"} and max(diffs.values()) < 1e-4
    merged = onnx.load(str(out / "decoder_model_merged.onnx"))
    assert [n.op_type for n in merged.graph.node] == ["If"]
    assert sum(t.name == "embed.weight" for t in merged.graph.initializer) == 1  # tied table stored once
    plain = onnx.load(str(glassllm_path))
    params = lambda m: sum(int(np.prod(t.dims)) for t in m.graph.initializer)  # noqa: E731
    assert params(merged) < 1.02 * params(plain)  # both branches share the weights
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 1024 and cfg["num_key_value_heads"] == 2
    with pytest.raises(RuntimeError, match="refusing to replace"):
        (tmp_path / "other").mkdir()
        mod.build_folder(tmp_path / "other")


@pytest.mark.slow
def test_tokenizer_json_matches_glassllm_tokenizer(tmp_path):
    from importlib import resources

    from tokenizers import Tokenizer

    from glassllm.tokenizer import Tokenizer as GlassTokenizer

    mod = _builder()
    with resources.as_file(resources.files("glassllm") / "weights" / "en.tokenizer.json") as src:
        (tmp_path / "tokenizer.json").write_text(mod.hf_tokenizer_json(src), encoding="utf-8")
        ours = GlassTokenizer.load(src)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    from pydoc_data.topics import topics

    text = topics["if"] + topics["while"] + "Ünïcödé ☃ — “quoted”\n\n  spaces"
    assert hf.encode(text).ids == ours.encode(text) and hf.get_vocab_size() == 1024
    assert hf.decode(hf.encode("Once upon a time.").ids) == ours.decode(ours.encode("Once upon a time."))


@pytest.mark.slow
def test_inlined_branches_of_the_merged_decoder_match_and_can_be_captured(tmp_path):
    from onnxhmf.calibration import Calibration
    from onnxhmf.capture import capture_stats, session
    from onnxhmf.kvcache import inline_branch, kv_signature, two_step_batches

    mod = _builder()
    out = mod.build_folder(tmp_path / "kv", verify=False)
    merged = onnx.load(str(out / "decoder_model_merged.onnx"))
    sig = kv_signature(merged)
    ids = np.random.default_rng(0).integers(4, 1024, size=(2, 20))
    pair = two_step_batches(session(merged), sig, ids)
    want = [session(merged).run(["logits"], f)[0] for f in pair]
    for value, feeds, scope in ((False, pair[0], "/no_past"), (True, pair[1], "/with_past")):
        flat = inline_branch(merged, "use_cache_branch", value)
        feeds = {k: v for k, v in feeds.items() if k != "use_cache_branch"}
        (got,) = session(flat).run(["logits"], feeds)
        np.testing.assert_array_equal(got, want[value])
        act = f"{scope}/blocks.0/norm1/Mul_1_output_0"  # what blocks.0.attn.wq multiplies
        stats = capture_stats(flat, Calibration([feeds]), [act])
        assert stats.grams[act].shape == (128, 128) and stats.rows[act] == 20  # 2 rows × 10 tokens per step
