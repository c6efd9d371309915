"""Issue 2 benchmark: LMF (truncated SVD) against the original and onnxruntime int8, one run.

    python benchmarks/bench_core.py [--models minilm,glassllm] [--keeps 0.75,0.5]

Prints, per model: file size, fidelity (MiniLM: mean cosine + Spearman of sentence
embeddings on 600 held-out Shakespeare/KJV sentences; glassllm: held-out perplexity),
ORT CPU latency ratio to the original at 1 thread and default threads (batch 1 × 128
tokens), and the tool's wall time and peak RSS (optimize + verify, fresh process).
Then a MatMul micro-benchmark: latency ratio of X·A·B to X·W at 128 tokens vs the
parameter ratio.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import harness as H


def model_rows(name: str, src, keeps: list[float]) -> str:
    out = H.OUT / name
    out.mkdir(parents=True, exist_ok=True)
    paths = {"original": src, "ort int8": H.int8(src, out / "int8.onnx")}
    tool = {}
    for keep in keeps:
        p = out / f"lmf{keep}.onnx"
        tool[f"lmf keep {keep}"] = H.optimize(src, p, "--keep", keep, "--min-cosine", "0")
        paths[f"lmf keep {keep}"] = p

    if name == "minilm":
        fid = H.minilm_fidelity(paths, H.heldout_sentences(600))
        fid_cols = ["mean cos", "min cos", "spearman"]
        fid_vals = {k: [f"{v['mean_cosine']:.4f}", f"{v['min_cosine']:.4f}", f"{v['spearman']:.4f}"] for k, v in fid.items()}
        ids = np.random.default_rng(0).integers(1000, 30000, size=(1, 128))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    else:
        ppl = H.glassllm_perplexity(paths)
        fid_cols = ["ppl shakespeare", "ppl kjv"]
        fid_vals = {k: [f"{v['shakespeare']:.2f}", f"{v['kjv']:.2f}"] for k, v in ppl.items()}
        feeds = {"input_ids": np.random.default_rng(0).integers(0, 1024, size=(1, 128))}
    feeds = {k: v.astype(np.int64) for k, v in feeds.items()}
    lat1 = H.latency(paths, feeds, threads=1)
    latn = H.latency(paths, feeds, threads=0)
    base = os.path.getsize(src)
    rows = []
    for k, p in paths.items():
        t = tool.get(k)
        rows.append(
            [k, H.mb(p), f"{os.path.getsize(p) / base:.3f}", *fid_vals[k],
             f"{lat1[k] / lat1['original']:.3f}", f"{latn[k] / latn['original']:.3f}",
             f"{t['wall_s']:.1f}" if t else "-", f"{t['peak_rss_mb']:.0f}" if t else "-"]
        )
    header = ["variant", "MB", "size ratio", *fid_cols, "latency 1T", "latency all T", "tool s", "tool peak MB"]
    ms = f"original latency: {lat1['original'] * 1e3:.2f} ms (1 thread), {latn['original'] * 1e3:.2f} ms (default threads)"
    return f"### {name} ({base / 1e6:.1f} MB)\n\n" + H.table(header, rows) + f"\n\n{ms}\n"


def matmul_micro(shapes=((384, 384), (384, 1536), (1536, 384)), keeps=(0.75, 0.5, 0.25), tokens=128) -> str:
    from onnxhmf.factorize.svd import rank_for_keep

    rng = np.random.default_rng(0)
    out = H.OUT / "micro"
    out.mkdir(parents=True, exist_ok=True)
    x = {"X": rng.standard_normal((1, tokens, shapes[0][0])).astype(np.float32)}
    rows = []
    for m, n in shapes:
        x = {"X": rng.standard_normal((1, tokens, m)).astype(np.float32)}
        paths = {"dense": out / f"d{m}x{n}.onnx"}
        onnx.save(_mm_model(m, n, None), paths["dense"])
        for keep in keeps:
            r = rank_for_keep(m, n, keep)
            paths[r] = out / f"r{m}x{n}_{r}.onnx"
            onnx.save(_mm_model(m, n, r), paths[r])
        lat = H.latency(paths, x, threads=1, rounds=25, per_round=20)
        for keep in keeps:
            r = rank_for_keep(m, n, keep)
            pr = r * (m + n) / (m * n)
            lr = lat[r] / lat["dense"]
            rows.append([f"{m}x{n}", r, f"{pr:.3f}", f"{lr:.3f}", f"{lr / pr:.2f}"])
    return "### MatMul micro-benchmark (1 thread, 1x128 tokens)\n\n" + H.table(
        ["weight", "rank", "param ratio", "latency ratio", "latency/param"], rows
    )


def _mm_model(m: int, n: int, r: int | None) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    vi = lambda name, d: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", "s", d])  # noqa: E731
    if r is None:
        inits = [numpy_helper.from_array(rng.standard_normal((m, n)).astype(np.float32), "W")]
        nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"])]
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((m, r)).astype(np.float32), "A"),
                 numpy_helper.from_array(rng.standard_normal((r, n)).astype(np.float32), "B")]
        nodes = [helper.make_node("MatMul", ["X", "A"], ["T"]), helper.make_node("MatMul", ["T", "B"], ["Y"])]
    g = helper.make_graph(nodes, "mm", [vi("X", m)], [vi("Y", n)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,glassllm")
    ap.add_argument("--keeps", default="0.75,0.5")
    args = ap.parse_args()
    keeps = [float(k) for k in args.keeps.split(",")]
    for name in args.models.split(","):
        src = H.ensure_minilm() if name == "minilm" else H.GLASSLLM
        print(model_rows(name, src, keeps), flush=True)
    print(matmul_micro(), flush=True)


if __name__ == "__main__":
    main()
