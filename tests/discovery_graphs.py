"""Tiny models and tokenizers for the discovery / KV-cache / fidelity / folder tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphs import model, vi

I64 = TensorProto.INT64
F = TensorProto.FLOAT
V, D = 120, 8  # vocabulary (≥ 100: counted as one) and width
WORDS = ["the", "a", "and", "of", "to", "in", "is", "it", "that", "was", "for", "on", "with", "as", "by", "at"]


def table(seed: int = 0, rows: int = V, cols: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def causal_lm(seed: int = 0, mask: bool = False) -> onnx.ModelProto:
    """logits[b, i] = E[ids[b, i]] · W · Eᵀ: each position sees only its own token (causal)."""
    E, W = table(seed), np.random.default_rng(seed + 1).standard_normal((D, D)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "W"], ["hw"], name="mm"),
             helper.make_node("Transpose", ["E"], ["Et"], name="tr", perm=[1, 0]),
             helper.make_node("MatMul", ["hw", "Et"], ["logits"], name="head")]
    ins = [vi("input_ids", ["batch", "sequence"], I64)] + ([vi("attention_mask", ["batch", "sequence"], I64)] if mask else [])
    return model(nodes, ins, [vi("logits", ["batch", "sequence", V])],
                 [numpy_helper.from_array(E, "E"), numpy_helper.from_array(W, "W")])


def bidirectional_lm(seed: int = 0) -> onnx.ModelProto:
    """Like causal_lm, plus the mean over the whole sequence: later tokens change earlier logits."""
    E = table(seed)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed"),
             helper.make_node("ReduceMean", ["h"], ["m"], name="mean", axes=[1], keepdims=1),
             helper.make_node("Add", ["h", "m"], ["hm"], name="add"),
             helper.make_node("Transpose", ["E"], ["Et"], name="tr", perm=[1, 0]),
             helper.make_node("MatMul", ["hm", "Et"], ["logits"], name="head")]
    return model(nodes, [vi("input_ids", ["batch", "sequence"], I64)], [vi("logits", ["batch", "sequence", V])],
                 [numpy_helper.from_array(E, "E")])


def text_encoder(seed: int = 0) -> onnx.ModelProto:
    """(input_ids, attention_mask, token_type_ids) -> hidden (b, s, D) and pooled (b, D)."""
    E, W = table(seed), np.random.default_rng(seed + 1).standard_normal((D, D)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "W"], ["hidden"], name="mm"),
             helper.make_node("ReduceMean", ["hidden"], ["pooled"], name="pool", axes=[1], keepdims=0)]
    ins = [vi("input_ids", ["batch", "sequence"], I64), vi("attention_mask", ["batch", "sequence"], I64),
           vi("token_type_ids", ["batch", "sequence"], I64)]
    return model(nodes, ins, [vi("hidden", ["batch", "sequence", D]), vi("pooled", ["batch", D])],
                 [numpy_helper.from_array(E, "E"), numpy_helper.from_array(W, "W")])


def float_model() -> onnx.ModelProto:
    W = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    return model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", ["batch", 4])],
                 [vi("y", ["batch", 3])], [numpy_helper.from_array(W, "W")])


def kv_merged(seed: int = 0, layers: int = 1) -> onnx.ModelProto:
    """A toy optimum-style merged decoder: If(use_cache_branch).

    h = E[ids] (b, n, D); present.i.key = present.i.value = Concat(past, h[:, None]) on axis 2;
    logits = (h + Σ_past) · Eᵀ in the cached branch, h · Eᵀ in the first-step branch.
    """
    E = table(seed)
    outs = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]

    def branch(with_past: bool, tag: str) -> onnx.GraphProto:
        nodes = [helper.make_node("Gather", ["E", "input_ids"], [f"{tag}h"], name=f"{tag}embed"),
                 helper.make_node("Unsqueeze", [f"{tag}h", "one"], [f"{tag}h4"], name=f"{tag}unsq"),
                 helper.make_node("Transpose", ["E"], [f"{tag}Et"], name=f"{tag}tr", perm=[1, 0])]
        x = f"{tag}h"
        if with_past:
            nodes += [helper.make_node("ReduceSum", ["past_key_values.0.key", "two"], [f"{tag}s"], name=f"{tag}sum", keepdims=0),
                      helper.make_node("Add", [f"{tag}h", f"{tag}s"], [f"{tag}hs"], name=f"{tag}add")]
            x = f"{tag}hs"
        nodes.append(helper.make_node("MatMul", [x, f"{tag}Et"], [f"{tag}logits"], name=f"{tag}head"))
        bouts = [f"{tag}logits"]
        for i in range(layers):
            for kv in ("key", "value"):
                o = f"{tag}present.{i}.{kv}"
                if with_past:
                    nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.{kv}", f"{tag}h4"], [o], name=o, axis=2))
                else:
                    nodes.append(helper.make_node("Identity", [f"{tag}h4"], [o], name=o))
                bouts.append(o)
        shapes = [["batch", "sequence_length", V]] + [["batch", 1, "total", D]] * (2 * layers)
        return helper.make_graph(nodes, tag.strip("_"), [], [vi(o, s) for o, s in zip(bouts, shapes)])

    ins = [vi("input_ids", ["batch", "sequence_length"], I64), vi("attention_mask", ["batch", "total"], I64),
           vi("position_ids", ["batch", "sequence_length"], I64)]
    ins += [vi(f"past_key_values.{i}.{kv}", ["batch", 1, "past_sequence_length", D]) for i in range(layers)
            for kv in ("key", "value")]
    ins.append(vi("use_cache_branch", [1], TensorProto.BOOL))
    node = helper.make_node("If", ["use_cache_branch"], outs, name="if", then_branch=branch(True, "wp_"),
                            else_branch=branch(False, "np_"))
    inits = [numpy_helper.from_array(E, "E"), numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([2], np.int64), "two")]
    shapes = [["batch", "sequence_length", V]] + [["batch", 1, "total", D]] * (2 * layers)
    return model([node], ins, [vi(o, s) for o, s in zip(outs, shapes)], inits)


def write_tokenizer(path: Path, vocab_size: int = V, words_last: bool = False) -> Path:
    """A word-level Hugging Face tokenizer.json: WORDS, then w0, w1, ... up to ``vocab_size``
    (``words_last``: the fillers first, so common words get the highest ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    fill = [f"w{i}" for i in range(vocab_size - len(WORDS) - 2)]
    words = ["[PAD]", "[UNK]"] + (fill + WORDS if words_last else WORDS + fill)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def write_config(folder: Path, **config) -> None:
    (folder / "config.json").write_text(json.dumps(config))
