"""onnxhmf.discover: where calibration comes from when no flag says."""
import json
import shutil

import numpy as np
import onnx
import pytest

from discovery_graphs import V, bidirectional_lm, causal_lm, float_model, kv_merged, text_encoder, write_config, write_tokenizer
from onnxhmf.discover import (DATA_FREE_MESSAGE, builtin_sentences, discover_calibration, find_tokenizer,
                              sample_sequences)
from onnxhmf.capture import session
from onnxhmf.errors import OnnxHmfError


def _save(m, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path))
    return path


def test_find_tokenizer_beside_the_model_or_in_its_parent(tmp_path):
    m = _save(text_encoder(), tmp_path / "a" / "model.onnx")
    write_tokenizer(tmp_path / "a" / "tokenizer.json")
    write_config(tmp_path / "a", vocab_size=V, max_position_embeddings=32)
    (tmp_path / "a" / "generation_config.json").write_text('{"bos_token_id": 2, "vocab_size": 1}')
    folder, tok, config, notes = find_tokenizer(m)
    assert folder == tmp_path / "a" and tok == tmp_path / "a" / "tokenizer.json" and not notes
    assert config["vocab_size"] == V and config["bos_token_id"] == 2  # config.json wins, generation_config fills in
    m2 = _save(text_encoder(), tmp_path / "b" / "onnx" / "model.onnx")  # transformers.js: onnx/ under the repo
    write_tokenizer(tmp_path / "b" / "tokenizer.json")
    assert find_tokenizer(m2)[1] == tmp_path / "b" / "tokenizer.json"


def test_a_file_that_is_not_a_hf_tokenizer_is_passed_over(tmp_path):
    m = _save(text_encoder(), tmp_path / "model.onnx")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": 1, "alphabet": ["a"], "merges": []}))
    folder, tok, config, notes = find_tokenizer(m)
    assert tok is None and "not a Hugging Face tokenizer.json" in notes[0]


def test_builtin_sentences_mix_both_sources_deterministically():
    s = builtin_sentences(40)
    assert len(s) == 40 and s == builtin_sentences(40) and s != builtin_sentences(40, seed=1)
    shipped = {ln.strip() for ln in open("onnxhmf/data/sample_prose.txt") if ln.strip() and not ln.startswith("#")}
    ours = [x for x in s if x in shipped]
    assert 15 <= len(ours) <= 25  # alternating: about half prose, half Python docs
    assert not any(x.startswith("#") for x in s)


def test_tokenizer_beside_an_encoder_gives_builtin_text(tmp_path):
    m = _save(text_encoder(), tmp_path / "model.onnx")
    write_tokenizer(tmp_path / "tokenizer.json")
    d = discover_calibration(m, samples=40, batch_size=8)
    assert d.source == "tokenizer" and str(tmp_path / "tokenizer.json") in d.message and "built-in text" in d.message
    cal = d.calibration
    assert cal.samples == 40 and cal.mask == "attention_mask" and len(cal.batches) == 5
    b = cal.batches[0]
    assert b["input_ids"].max() < V and (b["attention_mask"] == 0).any() and set(b) == {"input_ids", "attention_mask", "token_type_ids"}
    fit, held = d.split()
    assert len(held.batches) == 1 and len(fit.batches) == 4


def test_calib_flag_wins(tmp_path):
    m = _save(text_encoder(), tmp_path / "model.onnx")
    write_tokenizer(tmp_path / "tokenizer.json")
    ids = np.arange(12).reshape(4, 3) % V
    np.savez(tmp_path / "c.npz", input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids))
    d = discover_calibration(m, calib=tmp_path / "c.npz", batch_size=2)
    assert d.source == "calib" and "--calib" in d.message and d.calibration.samples == 4
    (tmp_path / "t.txt").write_text("the cat and the dog. a cat of the dog is it.\n")
    d = discover_calibration(m, calib=tmp_path / "t.txt")  # text: the tokenizer beside the model reads it
    assert d.source == "calib" and d.calibration.samples == 2


def test_no_data_for_non_text_inputs(tmp_path):
    d = discover_calibration(_save(float_model(), tmp_path / "m.onnx"))
    assert d.source == "none" and d.calibration is None and d.message.endswith(DATA_FREE_MESSAGE)
    with pytest.raises(OnnxHmfError, match="data-free"):
        d.split()


def test_a_bidirectional_model_is_not_sampled(tmp_path):
    d = discover_calibration(_save(bidirectional_lm(), tmp_path / "m.onnx"))
    assert d.source == "none" and d.logits is None


def test_a_causal_lm_without_text_is_sampled(tmp_path):
    p = _save(causal_lm(), tmp_path / "lm.onnx")
    d = discover_calibration(p, sampled=10, batch_size=4)
    assert d.source == "sampled" and d.logits == "logits" and "sampled from the model itself" in d.message
    ids = np.concatenate([b["input_ids"] for b in d.calibration.batches])
    assert ids.shape == (10, 64) and ids.max() < V and len(d.calibration.batches) == 3
    again = np.concatenate([b["input_ids"] for b in discover_calibration(p, sampled=10).calibration.batches])
    other = np.concatenate([b["input_ids"] for b in discover_calibration(p, sampled=10, seed=1).calibration.batches])
    assert (ids == again).all() and not (ids == other).all()


def test_sampling_follows_the_model_and_the_config(tmp_path):
    m = causal_lm()
    p = _save(m, tmp_path / "lm.onnx")
    write_config(tmp_path, bos_token_id=7, max_position_embeddings=9)
    d = discover_calibration(p, sampled=6)
    ids = np.concatenate([b["input_ids"] for b in d.calibration.batches])
    assert ids.shape == (6, 9) and (ids[:, 0] == 7).all()
    # at a low temperature, each next token is the argmax of the logits at the previous one
    sess = session(m)
    cold = sample_sequences(sess, m, None, "logits", V, count=3, length=6, seed=0, temperature=1e-4)
    (logits,) = sess.run(["logits"], {"input_ids": cold})
    assert (cold[:, 1:] == logits[:, :-1].argmax(-1)).all()


def test_a_kv_decoder_without_text_is_sampled_as_step_pairs(tmp_path):
    d = discover_calibration(_save(kv_merged(), tmp_path / "decoder_model_merged.onnx"), sampled=8, batch_size=4, seq_len=10)
    assert d.source == "sampled" and d.kv is not None and d.calibration.group == 2
    b = d.calibration.batches
    assert len(b) == 4 and [x["use_cache_branch"][0] for x in b] == [False, True, False, True]
    assert b[0]["past_key_values.0.key"].shape[2] == 0 and b[1]["past_key_values.0.key"].shape[2] == 5
    assert "first step with an empty past and a cached step" in d.message


def test_a_kv_decoder_with_a_tokenizer_gets_windows_of_text(tmp_path):
    p = _save(kv_merged(), tmp_path / "decoder_model_merged.onnx")
    write_tokenizer(tmp_path / "tokenizer.json")
    d = discover_calibration(p, samples=8, seq_len=16, batch_size=4)
    assert d.source == "tokenizer" and len(d.calibration.batches) == 4
    assert d.calibration.batches[1]["input_ids"].shape == (4, 8)
    fit, held = d.split()
    assert [x["use_cache_branch"][0] for x in held.batches] == [False, True]


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    p = _save(kv_merged(), tmp_path / "decoder_model_merged.onnx")
    write_tokenizer(tmp_path / "tokenizer.json", vocab_size=5000)
    (tmp_path / "t.txt").write_text(" ".join(f"w{i}" for i in range(200, 4000)))
    with pytest.raises(OnnxHmfError, match="beyond the model's vocabulary of 120"):
        discover_calibration(p, calib=tmp_path / "t.txt", seq_len=16)


# ------------------------------------------------------------------ real models


@pytest.fixture(scope="module")
def glassllm_kv_folder(tmp_path_factory):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("build_glassllm_kv", root / "models" / "build_glassllm_kv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_folder(tmp_path_factory.mktemp("kv") / "glassllm_kv", split=True)


@pytest.mark.slow
def test_glassllm_is_sampled(glassllm_path):
    d = discover_calibration(glassllm_path)
    assert d.source == "sampled" and d.logits == "logits" and d.vocab == {1024}
    assert d.calibration.samples == 64 and d.calibration.batches[0]["input_ids"].shape == (16, 64)
    assert any("glassllm.tokenizer.json is not a Hugging Face tokenizer.json" in n for n in d.notes)


@pytest.mark.slow
def test_glassllm_kv_sampling_through_the_cache_matches_the_plain_model(glassllm_path, glassllm_kv_folder):
    """Same seed, same tokens: the cached sampler and the full-recompute sampler agree."""
    from onnxhmf.kvcache import kv_signature

    plain = onnx.load(str(glassllm_path))
    merged = onnx.load(str(glassllm_kv_folder / "decoder_model_merged.onnx"))
    a = sample_sequences(session(plain), plain, None, "logits", 1024, count=4, length=24, seed=3, bos=2)
    b = sample_sequences(session(merged), merged, kv_signature(merged), "logits", 1024, count=4, length=24, seed=3, bos=2)
    assert (a == b).all()


@pytest.mark.slow
def test_glassllm_kv_folder_uses_its_tokenizer(glassllm_kv_folder):
    for name in ("decoder_model_merged.onnx", "decoder_with_past_model.onnx"):
        d = discover_calibration(glassllm_kv_folder / name, samples=32)
        assert d.source == "tokenizer" and d.kv is not None and d.logits == "logits" and d.vocab == {1024}
        assert d.calibration.group == 2 and len(d.calibration.batches) == 4
        cached = d.calibration.batches[1]
        assert cached["past_key_values.3.value"].shape == (16, 2, 64, 32) and cached["attention_mask"].shape == (16, 128)


@pytest.mark.slow
def test_minilm_folder_uses_its_tokenizer(minilm_path, tmp_path):
    folder = tmp_path / "minilm"
    folder.mkdir()
    (folder / "model.onnx").symlink_to(minilm_path)
    shutil.copyfile(minilm_path.with_name("minilm.tokenizer.json"), folder / "tokenizer.json")
    d = discover_calibration(folder / "model.onnx")
    assert d.source == "tokenizer" and d.calibration.samples == 256 and d.logits is None and d.kv is None
    fit, held = d.split()
    assert held.samples == 64 and held.mask == "attention_mask"


def test_lm_text_off_samples_a_causal_lm_despite_a_tokenizer(tmp_path):
    p = _save(kv_merged(), tmp_path / "decoder_model_merged.onnx")
    write_tokenizer(tmp_path / "tokenizer.json")
    d = discover_calibration(p, sampled=4, seq_len=8, lm_text=False)
    assert d.source == "sampled" and "no usable text" in d.message and len(d.calibration.batches) == 2
    e = _save(text_encoder(), tmp_path / "enc" / "model.onnx")
    write_tokenizer(tmp_path / "enc" / "tokenizer.json")
    assert discover_calibration(e, samples=8, lm_text=False).source == "tokenizer"  # not an LM: text still


def test_an_unusable_tokenizer_found_beside_the_model_falls_through(tmp_path):
    p = _save(kv_merged(), tmp_path / "decoder_model_merged.onnx")
    write_tokenizer(tmp_path / "tokenizer.json", vocab_size=5000, words_last=True)  # ids beyond the model's 120
    d = discover_calibration(p, sampled=4, seq_len=8)
    assert d.source == "sampled" and "beyond the model's vocabulary" in d.notes[-1]
    f = _save(float_model(), tmp_path / "f" / "model.onnx")  # a tokenizer, but no text inputs
    write_tokenizer(tmp_path / "f" / "tokenizer.json")
    d = discover_calibration(f)
    assert d.source == "none" and "cannot feed text" in d.notes[-1]
