"""Bad calibration data x every loader (an .npz, a folder of them, text with a tokenizer, and
`verify --calib`): one `onnxhmf: error:` line naming the option, exit 2, nothing written, and
nothing else on stderr (file descriptor 2: no onnxruntime log lines, no LAPACK noise)."""
import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphs
from onnxhmf.cli import main

SCALE = float(os.environ.get("ONNXHMF_FUZZ_SCALE", "1"))  # more examples for a longer hunt
V = 300


def tokenizer_file(path, vocab_size):
    """A WordLevel tokenizer.json with ``vocab_size`` tokens (words w0..wN, [PAD]=0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(vocab_size - 2)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    onnx.save(graphs.token_mlp_model(V, 32, 64), d / "tok.onnx")
    onnx.save(graphs.mlp_model(32, 96), d / "mlp.onnx")
    tokenizer_file(d / "small.json", 200)
    tokenizer_file(d / "big.json", 5000)  # larger than the model's 300-row table
    (d / "text.txt").write_text(" ".join(f"w{i % 150}" for i in range(3000)).replace("w7 ", "w7. ") + "\n")
    return d


def corrupt(kind, rng):
    """{input: array} for token_mlp_model (or mlp_model for the float kinds), broken as ``kind``."""
    b = graphs.token_batches(V, 32, 12, seed=int(rng.integers(100)))
    ids, mask = b["input_ids"], b["attention_mask"]
    X = rng.standard_normal((8, 3, 32)).astype(np.float32)
    return {
        "ids_past_table": ("tok", {"input_ids": ids + V, "attention_mask": mask}, "rows"),
        "ids_below_table": ("tok", {"input_ids": ids - 2 * V, "attention_mask": mask}, "rows"),
        "mask_shorter": ("tok", {"input_ids": ids, "attention_mask": mask[:, :-3]}, "disagree"),
        "ids_rank3": ("tok", {"input_ids": ids[..., None], "attention_mask": mask}, "rank"),
        "ids_float": ("tok", {"input_ids": ids.astype(np.float32), "attention_mask": mask}, "float32"),
        "ids_missing": ("tok", {"attention_mask": mask}, "lacks"),
        "empty_batch": ("tok", {"input_ids": ids[:0], "attention_mask": mask[:0]}, "non-empty"),
        "batch_mismatch": ("tok", {"input_ids": ids, "attention_mask": mask[:-1]}, "batch"),
        "pickled": ("tok", {"input_ids": np.array([{"a": 1}] * 4, dtype=object), "attention_mask": mask}, "pickled"),
        "features_wrong": ("mlp", {"X": X[..., :31]}, "axis 2"),
        "features_rank": ("mlp", {"X": X[:, 0]}, "rank"),
        "features_nan": ("mlp", {"X": np.where(X > 2, np.nan, X).astype(np.float32)}, "NaN"),
        "features_inf": ("mlp", {"X": np.where(X > 2, np.inf, X).astype(np.float32)}, "NaN or Inf"),
    }[kind]


NPZ_KINDS = ["ids_past_table", "ids_below_table", "mask_shorter", "ids_rank3", "ids_float", "ids_missing", "empty_batch",
             "batch_mismatch", "pickled", "features_wrong", "features_rank", "features_nan", "features_inf"]


def run(capfd, *args):
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, err


def refused(capfd, out, needle, *args):
    code, err = run(capfd, *args)
    assert code == 2, err
    assert err.startswith("onnxhmf: error:") and err.count("\n") == 1 and needle in err, err
    assert not os.path.exists(out)
    return err


# -- issue 13's examples --------------------------------------------------------------------

@pytest.mark.parametrize("kind", NPZ_KINDS)
def test_bad_npz_one_line(kind, base, tmp_path, capfd):
    model, arrays, needle = corrupt(kind, np.random.default_rng(0))
    np.savez(tmp_path / "c.npz", **arrays)
    out = tmp_path / "o.onnx"
    err = refused(capfd, out, needle, "optimize", base / f"{model}.onnx", out, "--calib", tmp_path / "c.npz")
    assert "--calib" in err


def test_binary_text_refused(base, tmp_path, capfd):
    (tmp_path / "bin.txt").write_bytes(np.random.default_rng(0).bytes(4000))
    out = tmp_path / "o.onnx"
    refused(capfd, out, "binary data", "optimize", base / "tok.onnx", out, "--calib", tmp_path / "bin.txt",
            "--tokenizer", base / "small.json")
    refused(capfd, out, "binary data", "verify", base / "tok.onnx", base / "tok.onnx", "--calib", tmp_path / "bin.txt",
            "--tokenizer", base / "small.json")


def test_tokenizer_larger_than_the_table_refused(base, tmp_path, capfd):
    out = tmp_path / "o.onnx"
    for cmd in (["optimize", base / "tok.onnx", out], ["verify", base / "tok.onnx", base / "tok.onnx"]):
        err = refused(capfd, out, "5000 tokens", *cmd, "--calib", base / "text.txt", "--tokenizer", base / "big.json")
        assert "300 rows" in err


def test_good_text_and_tokenizer_still_work(base, tmp_path, capfd):
    out = tmp_path / "o.onnx"
    code, err = run(capfd, "optimize", base / "tok.onnx", out, "-q", "--calib", base / "text.txt", "--tokenizer",
                    base / "small.json", "--min-cosine", "0", "--calib-samples", "16", "--calib-batch", "4")
    assert code == 0, err
    assert err == ""


# -- the property: bad data x loaders ---------------------------------------------------------

@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy noise on stderr counts as a failure
@settings(max_examples=int(40 * SCALE), deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(NPZ_KINDS), loader=st.sampled_from(["file", "folder", "folder_second"]),
       sample_cap=st.sampled_from([8, 256]), seed=st.integers(0, 100))
def test_property_bad_data_x_loaders(base, tmp_path_factory, capfd, kind, loader, sample_cap, seed):
    """Broken data as the only file, in a folder, or as the second file of a folder after good
    data (then only if the first file's samples do not already suffice)."""
    tmp = tmp_path_factory.mktemp("c")
    model, arrays, needle = corrupt(kind, np.random.default_rng(seed))
    if loader == "file":
        np.savez(tmp / "c.npz", **arrays)
        calib = tmp / "c.npz"
    else:
        calib = tmp / "folder"
        calib.mkdir()
        if loader == "folder_second":
            good = graphs.token_batches(V, 8, 12) if model == "tok" else {"X": np.ones((8, 3, 32), np.float32)}
            np.savez(calib / "a.npz", **good)
        np.savez(calib / "b.npz", **arrays)
    out = tmp / "o.onnx"
    code, err = run(capfd, "optimize", base / f"{model}.onnx", out, "-q", "--calib", calib, "--calib-samples", sample_cap,
                    "--calib-batch", 4, "--min-cosine", "0")
    if loader == "folder_second" and sample_cap <= 8:  # the good file suffices: the broken one is never read
        assert code == 0, err
        assert err == ""
        return
    assert code == 2, err
    assert err.startswith("onnxhmf: error:") and err.count("\n") == 1 and needle in err, err
    assert not out.exists()
