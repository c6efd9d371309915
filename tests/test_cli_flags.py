"""Flags that mean one thing: --overwrite / --write-unverified, --quantize int8 alone, several
--input-shapes after one flag, the next command after a failure, readable weight names."""
import json

import numpy as np
import onnx
import pytest

import graphs
from onnxhmf.cli import _expand_input_shapes, main
from onnxhmf.report import display_name


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "in.onnx"
    onnx.save(graphs.mlp_model(32, 96), p)
    return p


def test_overwrite_and_write_unverified_are_separate(src, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"old")
    code, _, err = cli(capsys, "optimize", src, out, "-q")
    assert code == 2 and "exists" in err and out.read_bytes() == b"old"
    # a failing check with --overwrite only: refused, the old file stays
    code, _, err = cli(capsys, "optimize", src, out, "--keep", "0.05", "--min-cosine", "0.9999", "--overwrite", "-q")
    assert code == 1 and "verification failed" in err and out.read_bytes() == b"old"
    # --write-unverified without --overwrite: the existing file is still protected
    code, _, err = cli(capsys, "optimize", src, out, "--keep", "0.05", "--min-cosine", "0.9999", "--write-unverified", "-q")
    assert code == 2 and out.read_bytes() == b"old"
    code, _, err = cli(capsys, "optimize", src, out, "--keep", "0.05", "--min-cosine", "0.9999", "--overwrite",
                       "--write-unverified", "-q")
    assert code == 0, err
    onnx.load(out)  # replaced by the unverified model


def test_failed_verification_prints_the_next_command(src, tmp_path, capsys):
    code, out, err = cli(capsys, "optimize", src, tmp_path / "o.onnx", "--keep", "0.05", "--min-cosine", "0.9999")
    assert code == 1 and err.count("\n") == 1
    assert "--plan auto --target-fidelity 0.99" in out and "--calib" in out and str(src) in out


def test_quantize_int8_alone_factorizes_nothing(src, tmp_path, capsys):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    code, _, err = cli(capsys, "optimize", src, out, "--quantize", "int8", "--report", rep, "--min-cosine", "0.5", "-q")
    assert code == 0, err
    sites = json.loads(rep.read_text())["sites"]
    assert {s["method"] for s in sites if s["status"] == "rewritten"} == {"int8"}
    assert not any(t.name.endswith("lmf_A") for t in onnx.load(out).graph.initializer)


def test_several_input_shapes_after_one_flag(tmp_path):
    x = tmp_path / "m.onnx"
    x.write_bytes(b"")
    args = ["optimize", str(x), "o.onnx", "--input-shapes", "a:1,128", "b:1,128", "c:[2,3]", "--keep", "0.5"]
    assert _expand_input_shapes(args) == ["optimize", str(x), "o.onnx", "--input-shapes", "a:1,128", "--input-shapes",
                                          "b:1,128", "--input-shapes", "c:[2,3]", "--keep", "0.5"]
    # a path that exists is never taken for a spec
    weird = tmp_path / "d:1,2"
    weird.write_bytes(b"")
    assert _expand_input_shapes(["--input-shapes", "a:1", str(weird)]) == ["--input-shapes", "a:1", str(weird)]


def test_input_shapes_in_one_flag_reach_the_model(tmp_path, capsys):
    p = tmp_path / "tok.onnx"
    onnx.save(graphs.token_mlp_model(vocab=300, d=32, h=64), p)
    rep = tmp_path / "r.json"
    code, _, err = cli(capsys, "optimize", p, tmp_path / "o.onnx", "--keep", "0.9", "--min-cosine", "0",
                       "--report", rep, "-q", "--input-shapes", "input_ids:3,7", "attention_mask:3,7")
    assert code == 0, err
    inputs = json.loads(rep.read_text())["settings"]["inputs"]
    assert inputs == {"input_ids": [3, 7], "attention_mask": [3, 7]}


def test_machine_weight_names_show_the_layer_path():
    assert display_name("onnx::MatMul_470", ["/encoder/layer.0/attention/self/query/MatMul"]) == \
        "encoder/layer.0/attention/self/query (onnx::MatMul_470)"
    assert display_name("val_65", ["/h/fc1/Gemm"]) == "h/fc1 (val_65)"
    assert display_name("encoder.layer.0.weight", ["/x/MatMul"]) == "encoder.layer.0.weight"


def test_verify_calib_takes_a_sample_count_and_skips_titles(tmp_path, capsys):
    import discovery_graphs as dg

    m, tok, text, rep = tmp_path / "m.onnx", tmp_path / "tokenizer.json", tmp_path / "t.txt", tmp_path / "r.json"
    onnx.save(dg.text_encoder(), m)
    dg.write_tokenizer(tok)
    text.write_text("CHAPTER ONE\n\nthe a and of to in is it.\n\n\nit was for the a and.\nof to in is it that was.\n"
                    "the of and a to in.\n")
    code, _, err = cli(capsys, "verify", m, m, "--calib", text, "--tokenizer", tok, "--calib-samples", "3", "--report", rep)
    assert code == 0, err
    assert json.loads(rep.read_text())["inputs"]["input_ids"][0] == 3
    code, _, err = cli(capsys, "verify", m, m, "--calib", text, "--tokenizer", tok, "--report", rep)
    assert code == 0, err
    assert json.loads(rep.read_text())["inputs"]["input_ids"][0] == 4  # four sentences: the title is not one
