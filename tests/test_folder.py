"""onnxhmf.folder: folder in, folder out (what to optimize, what to copy, what is unsafe)."""
import os

import onnx
import pytest
from onnx import external_data_helper

from discovery_graphs import text_encoder
from onnxhmf.errors import OnnxHmfError
from onnxhmf.folder import copy_folder_files, plan_folder


def _folder(root, names, onnx_names=("model.onnx",)):
    root.mkdir(parents=True, exist_ok=True)
    for n in onnx_names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(text_encoder(), str(root / n))
    for n in names:
        (root / n).write_text(f"content of {n}")
    return root


def test_hf_layout(tmp_path):
    src = _folder(tmp_path / "in", ["tokenizer.json", "config.json", "vocab.txt", "README.md", "model.safetensors",
                                    ".gitattributes", "notes.xyz"], ["model.onnx", "model_quantized.onnx"])
    plan = plan_folder(src, tmp_path / "out")
    assert [(m.src.name, m.dst, m.role, m.group) for m in plan.models] == [("model.onnx", tmp_path / "out" / "model.onnx", "model", "")]
    assert sorted(s.name for s, _ in plan.copies) == ["README.md", "config.json", "tokenizer.json", "vocab.txt"]
    why = {s.name: w for s, w in plan.skipped}
    assert "variant of model.onnx" in why["model_quantized.onnx"] and "weights" in why["model.safetensors"]
    assert "notes.xyz" in why and ".gitattributes" not in why
    assert plan.create_out and not (tmp_path / "out").exists()  # planning writes nothing
    done = copy_folder_files(plan)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "tokenizer.json", "vocab.txt"]
    assert (tmp_path / "out" / "config.json").read_text() == "content of config.json" and len(done) == 4
    assert (src / "config.json").read_text() == "content of config.json"


def test_onnx_subfolder_layout(tmp_path):
    src = _folder(tmp_path / "in", ["tokenizer.json"], ["onnx/model.onnx", "onnx/model_fp16.onnx"])
    plan = plan_folder(src, tmp_path / "out")
    assert [m.dst for m in plan.models] == [tmp_path / "out" / "onnx" / "model.onnx"]
    copy_folder_files(plan)
    assert (tmp_path / "out" / "onnx").is_dir() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_encoder_decoder_and_merged_decoders(tmp_path):
    src = _folder(tmp_path / "in", ["config.json", "generation_config.json"],
                  ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "decoder_model_merged.onnx"])
    plan = plan_folder(src, tmp_path / "out")
    got = {m.src.name: (m.role, m.group, m.covered_by) for m in plan.models}
    assert got == {"encoder_model.onnx": ("encoder", "encoder-decoder", None),
                   "decoder_model.onnx": ("decoder", "encoder-decoder", "decoder_model_merged.onnx"),
                   "decoder_with_past_model.onnx": ("decoder_with_past", "encoder-decoder", "decoder_model_merged.onnx"),
                   "decoder_model_merged.onnx": ("decoder_merged", "encoder-decoder", None)}
    src2 = _folder(tmp_path / "in2", [], ["decoder_model_merged.onnx"])
    assert [(m.role, m.group) for m in plan_folder(src2, tmp_path / "o2").models] == [("decoder_merged", "decoder")]


def test_external_data_is_not_copied(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    m = text_encoder()
    external_data_helper.convert_model_to_external_data(m, location="model.onnx_data", size_threshold=0)
    onnx.save(m, str(src / "model.onnx"))
    (src / "tokenizer.json").write_text("{}")
    plan = plan_folder(src, tmp_path / "out")
    assert [s.name for s, _ in plan.copies] == ["tokenizer.json"]
    assert "model.onnx_data" not in {s.name for s, _ in plan.skipped}


def test_unsafe_outputs_are_refused(tmp_path):
    src = _folder(tmp_path / "in", ["tokenizer.json"])
    with pytest.raises(OnnxHmfError, match="is the input folder"):
        plan_folder(src, src)
    with pytest.raises(OnnxHmfError, match="is the input folder"):
        plan_folder(src, tmp_path / "in" / ".." / "in")
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(OnnxHmfError, match="is the input folder"):
        plan_folder(src, tmp_path / "link")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OnnxHmfError, match="not a folder"):
        plan_folder(src, tmp_path / "file")
    with pytest.raises(OnnxHmfError, match="does not exist"):
        plan_folder(src, tmp_path / "no" / "out")
    with pytest.raises(OnnxHmfError, match="no .onnx model"):
        plan_folder(_folder(tmp_path / "empty", ["config.json"], []), tmp_path / "o")
    with pytest.raises(OnnxHmfError, match="not a folder"):
        plan_folder(tmp_path / "file", tmp_path / "o")


def test_existing_outputs_need_overwrite_and_must_be_regular_files(tmp_path):
    src = _folder(tmp_path / "in", ["tokenizer.json"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("old")
    with pytest.raises(OnnxHmfError, match="exists; pass --overwrite"):
        plan_folder(src, out)
    plan = plan_folder(src, out, overwrite=True)
    copy_folder_files(plan, overwrite=True)
    assert (out / "tokenizer.json").read_text() == "content of tokenizer.json"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(OnnxHmfError, match="is a symlink"):
        plan_folder(src, out, overwrite=True)
    (out / "tokenizer.json").unlink()
    (out / "model.onnx").mkdir()
    with pytest.raises(OnnxHmfError, match="not a regular file"):
        plan_folder(src, out, overwrite=True)


def test_an_output_that_is_an_input_file_is_refused(tmp_path):
    src = _folder(tmp_path / "in", ["tokenizer.json"])
    out = tmp_path / "out"
    out.mkdir()
    os.link(src / "tokenizer.json", out / "tokenizer.json")  # the same file under another name
    with pytest.raises(OnnxHmfError, match="is an input file"):
        plan_folder(src, out, overwrite=True)


def test_copy_rechecks_destinations(tmp_path):
    src = _folder(tmp_path / "in", ["tokenizer.json"])
    plan = plan_folder(src, tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.json").write_text("appeared meanwhile")
    with pytest.raises(OnnxHmfError, match="exists"):
        copy_folder_files(plan)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "appeared meanwhile"
