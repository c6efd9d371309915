"""Export glassllm (the same weights as models/glassllm.onnx) as a KV-cache decoder, laid out
as Hugging Face optimum writes one, into a folder:

    decoder_model_merged.onnx   inputs  input_ids (batch, sequence_length) int64
                                        attention_mask (batch, past_sequence_length + sequence_length) int64
                                        position_ids (batch, sequence_length) int64
                                        past_key_values.{i}.key / .value (batch, 2, past_sequence_length, 32) float
                                        use_cache_branch [1] bool
                                outputs logits (batch, sequence_length, 1024)
                                        present.{i}.key / .value (batch, 2, past_sequence_length + sequence_length, 32)
    config.json, generation_config.json, tokenizer.json (Hugging Face `tokenizers` format,
    converted from glassllm's own BPE and checked against it), tokenizer_config.json,
    special_tokens_map.json

The merged decoder is one ``If`` on ``use_cache_branch``: the then-branch concatenates the past
keys/values with the new ones, the else-branch ignores the past (the first step, where the past
has sequence length 0). Both branches read the same weights from the main graph's
initializers, so the tied embedding table (Gather + the LM head's Transpose) is stored once.
``--split`` also writes decoder_model.onnx (no past) and decoder_with_past_model.onnx, the
older optimum pair.

The check runs each file with onnxruntime and compares its logits with glassllm's NumPy
forward over the full sequence: uncached (one step, empty past), and cached (a prefix, then
the rest fed with the prefix's ``present.*`` as the past, then single-token steps).

    python models/build_glassllm_kv.py [--out models/cache/glassllm_kv] [--split] [--no-check]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

import glassllm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_glassllm import IR_VERSION, OPSET, SOURCE, GraphBuilder, rms_norm, rope  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "cache" / "glassllm_kv"
MERGED = "decoder_model_merged.onnx"
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
TOTAL = "past_sequence_length + sequence_length"


def _past_names(n_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def _present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def _shared_constants(g: GraphBuilder, model: glassllm.GlassLM, params: dict) -> None:
    """Weights and constants in the main graph, read by both branches."""
    cfg = model.cfg
    d_k = cfg.d_model // cfg.n_heads
    g.const("embed.weight", params["E"])
    attn = model.blocks[0].attn
    g.const("rope.cos", np.repeat(attn.cos, 2, axis=1))
    g.const("rope.sin", np.stack([-attn.sin, attn.sin], axis=-1).reshape(cfg.max_len, d_k))
    g.const("rope.swap_pairs", np.arange(d_k, dtype=np.int64).reshape(-1, 2)[:, ::-1].reshape(-1))
    g.const("causal_mask", np.triu(np.ones((cfg.max_len, cfg.max_len), dtype=bool), k=1))
    g.const("eps", np.array(cfg.eps, dtype=np.float32))
    g.const("attn.scale", np.array(math.sqrt(d_k), dtype=np.float32))
    g.const("neg_big", np.array(np.finfo(np.float32).min, dtype=np.float32))
    for name, value in (("zero", [0]), ("one", [1]), ("two", [2]), ("three", [3]), ("axes01", [0, 1]),
                        ("axes12", [1, 2]), ("heads_shape", [0, 0, cfg.n_heads, d_k]),
                        ("kv_heads_shape", [0, 0, cfg.n_kv_heads, d_k]),
                        ("kv_repeat", [1, 1, cfg.n_heads // cfg.n_kv_heads, 1, 1]),
                        ("gqa_shape", [0, cfg.n_heads, -1, d_k]), ("merge_shape", [0, 0, cfg.d_model])):
        g.const(name, np.array(value, dtype=np.int64))
    g.const("zero_i64", np.array(0, dtype=np.int64))
    for i in range(cfg.n_layers):
        p = f"blocks.{i}"
        for key in ("norm1.gamma", "norm2.gamma"):
            g.const(f"{p}.{key}", params[f"{p}.{key}"])
        for key in ("W_Q", "W_K", "W_V", "W_O"):
            g.const(f"{p}.attn.w{key[-1].lower()}", params[f"{p}.attn.{key}"])
        for key in ("W1", "W3", "W2"):
            g.const(f"{p}.ffn.{key.lower()}", params[f"{p}.ffn.{key}"])
    g.const("norm_f.gamma", params["norm_f.gamma"])


def _decoder_body(model: glassllm.GlassLM, with_past: bool, scope: str) -> tuple[list, list[str]]:
    """Nodes of one decoder step and its outputs [logits, present.0.key, ...] (scoped names)."""
    cfg = model.cfg
    g = GraphBuilder()
    n = g.op("Slice", [g.op("Shape", ["input_ids"], f"{scope}/Shape"), "one", "two"], f"{scope}/seq_len")  # [n]
    if with_past:
        past = g.op("Slice", [g.op("Shape", ["past_key_values.0.key"], f"{scope}/past/Shape"), "two", "three"],
                    f"{scope}/past_len")  # [p]
        total = g.op("Add", [past, n], f"{scope}/total_len")
    else:
        past, total = "zero", n
    # RoPE rows at position_ids: (b, n, d_k) -> (b, 1, n, d_k).
    cos = g.op("Unsqueeze", [g.op("Gather", ["rope.cos", "position_ids"], f"{scope}/rope/cos/Gather", axis=0), "one"],
               f"{scope}/rope/cos/Unsqueeze")
    sin = g.op("Unsqueeze", [g.op("Gather", ["rope.sin", "position_ids"], f"{scope}/rope/sin/Gather", axis=0), "one"],
               f"{scope}/rope/sin/Unsqueeze")
    # Masked (True): key j > query's absolute index p + i, or attention_mask[b, j] == 0.
    causal = g.op("Slice", ["causal_mask", g.op("Concat", [past, "zero"], f"{scope}/mask/starts", axis=0),
                            g.op("Concat", [total, total], f"{scope}/mask/ends", axis=0), "axes01"],
                  f"{scope}/mask/causal")  # (n, T)
    pad = g.op("Equal", ["attention_mask", "zero_i64"], f"{scope}/mask/pad")
    pad = g.op("Unsqueeze", [pad, "axes12"], f"{scope}/mask/pad/Unsqueeze")  # (b, 1, 1, T)
    mask = g.op("Or", [causal, pad], f"{scope}/mask/Or")  # (b, 1, n, T)

    x = g.op("Gather", ["embed.weight", "input_ids"], f"{scope}/embed/Gather", axis=0)
    presents = []
    for i in range(cfg.n_layers):
        p, s = f"blocks.{i}", f"{scope}/blocks.{i}"
        h = rms_norm(g, x, f"{p}.norm1.gamma", "eps", f"{s}/norm1")
        heads = {}
        for proj, shape in (("q", "heads_shape"), ("k", "kv_heads_shape"), ("v", "kv_heads_shape")):
            y = g.op("MatMul", [h, f"{p}.attn.w{proj}"], f"{s}/attn/{proj}_proj/MatMul")
            y = g.op("Reshape", [y, shape], f"{s}/attn/{proj}_proj/Reshape")
            heads[proj] = g.op("Transpose", [y], f"{s}/attn/{proj}_proj/Transpose", perm=[0, 2, 1, 3])
        q = rope(g, heads["q"], cos, sin, "rope.swap_pairs", f"{s}/attn/rope_q")
        k = rope(g, heads["k"], cos, sin, "rope.swap_pairs", f"{s}/attn/rope_k")
        v = heads["v"]
        if with_past:
            k = g.op("Concat", [f"past_key_values.{i}.key", k], f"{s}/attn/cache_k/Concat", axis=2)
            v = g.op("Concat", [f"past_key_values.{i}.value", v], f"{s}/attn/cache_v/Concat", axis=2)
        presents += [g.op("Identity", [k], f"{scope}/present.{i}.key"), g.op("Identity", [v], f"{scope}/present.{i}.value")]
        kv = []
        for name, t in (("k", k), ("v", v)):
            t = g.op("Unsqueeze", [t, "two"], f"{s}/attn/repeat_{name}/Unsqueeze")
            t = g.op("Expand", [t, "kv_repeat"], f"{s}/attn/repeat_{name}/Expand")
            kv.append(g.op("Reshape", [t, "gqa_shape"], f"{s}/attn/repeat_{name}/Reshape"))
        k_t = g.op("Transpose", [kv[0]], f"{s}/attn/k_transpose", perm=[0, 1, 3, 2])
        scores = g.op("Div", [g.op("MatMul", [q, k_t], f"{s}/attn/scores/MatMul"), "attn.scale"], f"{s}/attn/scores/Div")
        scores = g.op("Where", [mask, "neg_big", scores], f"{s}/attn/mask/Where")
        weights = g.op("Softmax", [scores], f"{s}/attn/Softmax", axis=-1)
        mixed = g.op("MatMul", [weights, kv[1]], f"{s}/attn/mix/MatMul")
        mixed = g.op("Transpose", [mixed], f"{s}/attn/merge/Transpose", perm=[0, 2, 1, 3])
        mixed = g.op("Reshape", [mixed, "merge_shape"], f"{s}/attn/merge/Reshape")
        x = g.op("Add", [x, g.op("MatMul", [mixed, f"{p}.attn.wo"], f"{s}/attn/o_proj/MatMul")], f"{s}/attn/residual/Add")
        h = rms_norm(g, x, f"{p}.norm2.gamma", "eps", f"{s}/norm2")
        gate = g.op("MatMul", [h, f"{p}.ffn.w1"], f"{s}/ffn/gate_proj/MatMul")
        up = g.op("MatMul", [h, f"{p}.ffn.w3"], f"{s}/ffn/up_proj/MatMul")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{s}/ffn/act/Sigmoid")], f"{s}/ffn/act/Mul")
        act = g.op("Mul", [act, up], f"{s}/ffn/act/Mul_1")
        x = g.op("Add", [x, g.op("MatMul", [act, f"{p}.ffn.w2"], f"{s}/ffn/down_proj/MatMul")], f"{s}/ffn/residual/Add")
    h = rms_norm(g, x, "norm_f.gamma", "eps", f"{scope}/norm_f")
    logits = g.op("MatMul", [h, g.op("Transpose", ["embed.weight"], f"{scope}/lm_head/Transpose", perm=[1, 0])],
                  f"{scope}/lm_head/MatMul")
    return g.nodes, [logits] + presents


def _io(cfg, with_past: bool, with_branch: bool):
    d_k = cfg.d_model // cfg.n_heads
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch", TOTAL if with_past else "sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence_length"])]
    if with_past:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", cfg.n_kv_heads, "past_sequence_length", d_k])
                   for n in _past_names(cfg.n_layers)]
    if with_branch:
        inputs.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    present_len = TOTAL if with_past else "sequence_length"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence_length", cfg.vocab_size])]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", cfg.n_kv_heads, present_len, d_k])
                for n in _present_names(cfg.n_layers)]
    return inputs, outputs


def _model(graph: onnx.GraphProto, cfg, what: str) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxhmf-models",
                          producer_version="0.1.0")
    m.ir_version = IR_VERSION
    m.doc_string = f"{what} of the causal LM converted from {SOURCE}. max_len={cfg.max_len}."
    helper.set_model_props(m, {"source": SOURCE, "license": "MIT", "max_len": str(cfg.max_len)})
    return m


def build_merged(model: glassllm.GlassLM) -> onnx.ModelProto:
    """decoder_model_merged.onnx: If(use_cache_branch) over the with-past and no-past steps."""
    cfg = model.cfg
    params = {name: p.data.astype(np.float32) for name, p in model.named_parameters().items()}
    shared = GraphBuilder()
    _shared_constants(shared, model, params)
    branches = {}
    for with_past, scope in ((True, "/with_past"), (False, "/no_past")):
        nodes, outs = _decoder_body(model, with_past, scope)
        _, io_out = _io(cfg, with_past, False)
        vis = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs]
        for vi, ref in zip(vis, io_out):
            vi.type.CopyFrom(ref.type)
        branches[with_past] = helper.make_graph(nodes, scope.strip("/"), [], vis)
    inputs, outputs = _io(cfg, True, True)
    node = helper.make_node("If", ["use_cache_branch"], [o.name for o in outputs], name="/use_cache_branch/If",
                            then_branch=branches[True], else_branch=branches[False])
    graph = helper.make_graph([node], "glassllm_en_merged_decoder", inputs, outputs, shared.initializers)
    return _model(graph, cfg, "Merged KV-cache decoder (optimum layout)")


def build_split(model: glassllm.GlassLM, with_past: bool) -> onnx.ModelProto:
    """decoder_model.onnx (no past) or decoder_with_past_model.onnx."""
    cfg = model.cfg
    params = {name: p.data.astype(np.float32) for name, p in model.named_parameters().items()}
    g = GraphBuilder()
    _shared_constants(g, model, params)
    nodes, outs = _decoder_body(model, with_past, "")
    inputs, outputs = _io(cfg, with_past, False)
    nodes += [helper.make_node("Identity", [o], [vi.name], name=f"/output/{vi.name}") for o, vi in zip(outs, outputs)]
    used = {i for n in nodes for i in n.input}
    inits = [t for t in g.initializers if t.name in used]
    graph = helper.make_graph(nodes, "glassllm_en_decoder" + ("_with_past" if with_past else ""), inputs, outputs, inits)
    return _model(graph, cfg, "KV-cache decoder" + (" with past" if with_past else " (first step)"))


# --------------------------------------------------------------------------- tokenizer and configs

def hf_tokenizer_json(glass_tokenizer_path: Path) -> str:
    """glassllm's character BPE as a Hugging Face tokenizer.json (same ids, same merges)."""
    data = json.loads(Path(glass_tokenizer_path).read_text(encoding="utf-8"))
    vocab_list = SPECIALS + data["alphabet"] + [a + b for a, b in data["merges"]]
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(SPECIALS)],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"},
                                                           {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\n|▁*[^▁\n]+|▁+"}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(vocab_list)}, "merges": [[a, b] for a, b in data["merges"]]},
    }
    return json.dumps(tok, ensure_ascii=False)


def check_tokenizer(hf_json: Path, glass_tokenizer_path: Path) -> int:
    """Both tokenizers give the same ids on glassllm's sample text; returns the tokens compared."""
    from tokenizers import Tokenizer

    from glassllm.tokenizer import Tokenizer as GlassTokenizer

    ours = GlassTokenizer.load(glass_tokenizer_path)
    hf = Tokenizer.from_file(str(hf_json))
    texts = ["Once upon a time, there was a little girl named Lily.", "  two  spaces\nand a newline, café ünïcode 42!",
             "The quick brown fox jumps over the lazy dog; Zebras? ~~ {x: 1}"]
    n = 0
    for t in texts:
        want, got = ours.encode(t), hf.encode(t).ids
        if want != got:
            raise RuntimeError(f"tokenizer.json disagrees with glassllm's tokenizer on {t!r}: {got[:20]} vs {want[:20]}")
        n += len(want)
    return n


def configs(cfg) -> dict[str, dict]:
    bos, eos, pad = SPECIALS.index("<bos>"), SPECIALS.index("<eos>"), SPECIALS.index("<pad>")
    d_k = cfg.d_model // cfg.n_heads
    return {
        "config.json": {"architectures": ["GlassLMForCausalLM"], "model_type": "glassllm", "vocab_size": cfg.vocab_size,
                        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
                        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": d_k,
                        "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.eps, "rope_theta": cfg.rope_base,
                        "tie_word_embeddings": True, "use_cache": True, "bos_token_id": bos, "eos_token_id": eos,
                        "pad_token_id": pad, "torch_dtype": "float32"},
        "generation_config.json": {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": True,
                                   "temperature": 1.0, "max_length": cfg.max_len},
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
                                  "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": cfg.max_len,
                                  "add_bos_token": False, "clean_up_tokenization_spaces": False},
        "special_tokens_map.json": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
    }


# --------------------------------------------------------------------------- check

def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def step(sess, cfg, ids: np.ndarray, past: dict | None, merged: bool) -> tuple[np.ndarray, dict]:
    """One decoder step: (logits, {present name: array}); ``past`` None = the first step."""
    b, n = ids.shape
    d_k = cfg.d_model // cfg.n_heads
    p = 0 if past is None else past["present.0.key"].shape[2]
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, p + n), np.int64),
             "position_ids": np.broadcast_to(np.arange(p, p + n, dtype=np.int64), (b, n)).copy()}
    names = {i.name for i in sess.get_inputs()}
    for pn, qn in zip(_past_names(cfg.n_layers), _present_names(cfg.n_layers)):
        if pn in names:
            feeds[pn] = past[qn] if past is not None else np.zeros((b, cfg.n_kv_heads, 0, d_k), np.float32)
    if merged:
        feeds["use_cache_branch"] = np.array([past is not None])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    return outs.pop("logits"), outs


def check(folder: Path, model: glassllm.GlassLM, tol: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """Cached and uncached logits of every decoder file in ``folder`` vs glassllm's full forward."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, cfg.vocab_size, size=(2, 40), dtype=np.int64)
    with glassllm.no_grad():
        want = model.forward(ids).data
    diffs = {}
    merged = folder / MERGED
    onnx.checker.check_model(str(merged), full_check=True)
    sess = _session(merged)
    logits, _ = step(sess, cfg, ids, None, True)
    diffs["merged_uncached"] = float(np.abs(logits - want).max())
    parts, past = [], None
    for lo, hi in ((0, 17), (17, 37), (37, 38), (38, 39), (39, 40)):
        logits, past = step(sess, cfg, ids[:, lo:hi], past, True)
        parts.append(logits)
    diffs["merged_cached"] = float(np.abs(np.concatenate(parts, axis=1) - want).max())
    if (folder / "decoder_model.onnx").is_file():
        first, second = _session(folder / "decoder_model.onnx"), _session(folder / "decoder_with_past_model.onnx")
        l1, past = step(first, cfg, ids[:, :17], None, False)
        l2, _ = step(second, cfg, ids[:, 17:], past, False)
        diffs["split_cached"] = float(np.abs(np.concatenate([l1, l2], axis=1) - want).max())
    bad = {k: v for k, v in diffs.items() if not v < tol}
    if bad:
        raise RuntimeError(f"KV-cache export disagrees with glassllm (tol {tol}): {bad}")
    return diffs


def build_folder(out: str | Path = DEFAULT_OUT, *, split: bool = False, verify: bool = True) -> Path:
    """Write the folder (atomically: a temp folder renamed into place) and return its path."""
    out = Path(out).resolve()
    if out.exists() and not (out / MERGED).is_file():
        raise RuntimeError(f"{out} exists and is not a folder this script wrote (no {MERGED}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    model, _ = glassllm.load_pretrained("en")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx.save(build_merged(model), str(tmp / MERGED))
        if split:
            onnx.save(build_split(model, False), str(tmp / "decoder_model.onnx"))
            onnx.save(build_split(model, True), str(tmp / "decoder_with_past_model.onnx"))
        with resources.as_file(resources.files("glassllm") / "weights" / "en.tokenizer.json") as src:
            (tmp / "tokenizer.json").write_text(hf_tokenizer_json(src), encoding="utf-8")
            check_tokenizer(tmp / "tokenizer.json", src)
        for name, content in configs(model.cfg).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        if verify:
            check(tmp, model)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default %(default)s)")
    parser.add_argument("--split", action="store_true", help="also write decoder_model.onnx + decoder_with_past_model.onnx")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare cached and uncached logits with glassllm's NumPy forward (default: on)")
    args = parser.parse_args(argv)
    out = build_folder(args.out, split=args.split, verify=False)
    if args.check:
        model, _ = glassllm.load_pretrained("en")
        for k, v in check(out, model).items():
            print(f"check: {k}: max |onnx - numpy| = {v:.3e}")
    for f in sorted(out.iterdir()):
        print(f"wrote {f} ({f.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
