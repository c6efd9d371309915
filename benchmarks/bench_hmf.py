"""Issue 3 benchmark: HMF vs LMF vs magnitude pruning at equal parameter budgets, one run.

    python benchmarks/bench_hmf.py [--models minilm,glassllm] [--keeps 0.75,0.5,0.25]

Per model and budget (keep = fraction of every compressed weight's parameters, embedding
tables included): fidelity (MiniLM: sentence-embedding cosine/Spearman on 600 held-out
Shakespeare + KJV sentences; glassllm: held-out perplexity), ORT CPU latency ratio to the
original (1 thread, batch 1 × 128 tokens, round-robin), file size; plus the original and
ORT int8 in the same table. Then the HMF permutation cost (folded vs Gather) and the
embedding table alone at 2x/4x/8x: SVD, HMF by residual, HMF by token frequency
(frequencies counted on Python's pydoc text, a different domain from the evaluation text).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

import harness as H


def _fidelity(name: str, paths: dict) -> dict[str, list[str]]:
    if name == "minilm":
        fid = H.minilm_fidelity(paths, H.heldout_sentences(600))
        return {k: [f"{v['mean_cosine']:.4f}", f"{v['spearman']:.4f}"] for k, v in fid.items()}
    ppl = H.glassllm_perplexity(paths)
    return {k: [f"{v['shakespeare']:.2f}", f"{v['kjv']:.2f}"] for k, v in ppl.items()}


def _fid_cols(name: str) -> list[str]:
    return ["mean cos", "spearman"] if name == "minilm" else ["ppl shakespeare", "ppl kjv"]


def _feeds(name: str) -> dict:
    if name == "minilm":
        ids = np.random.default_rng(0).integers(1000, 30000, size=(1, 128)).astype(np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {"input_ids": np.random.default_rng(0).integers(0, 1024, size=(1, 128)).astype(np.int64)}


def freq_file(name: str) -> list[str]:
    """Token-frequency options: counted on pydoc text (calibration domain)."""
    text = H.OUT / "pydoc.txt"
    if not text.exists():
        text.write_text(H.corpora.pydoc_topics_text())
    if name == "minilm":
        return ["--token-freq", str(text), "--tokenizer", str(H.MINILM_TOKENIZER)]
    ids = H.OUT / "glassllm_pydoc_ids.npz"
    if not ids.exists():
        np.savez(ids, ids=H.lm_eval.glassllm_token_ids(text.read_text()))
    return ["--token-freq", str(ids)]


def methods_table(name: str, src, keeps: list[float]) -> str:
    out = H.OUT / name
    out.mkdir(parents=True, exist_ok=True)
    paths = {"original": src, "ort int8": H.int8(src, out / "int8.onnx")}
    params, wall = {}, {}
    for keep in keeps:
        for method in ("lmf", "hmf", "prune"):
            key = f"{method} {keep}"
            p = out / f"{method}{keep}.onnx"
            r = H.optimize(src, p, "--method", method, "--keep", keep, "--min-cosine", "0")
            rep = r["report"]
            paths[key], params[key] = p, rep["nonzero_after"] if rep["nonzero_after"] is not None else rep["params_after"]
            wall[key] = f"{r['wall_s']:.1f}"
    fid = _fidelity(name, paths)
    lat = H.latency(paths, _feeds(name), threads=1)
    base = os.path.getsize(src)
    rows = [[k, f"{params.get(k, 0):,}" if k in params else "-", H.mb(p), f"{os.path.getsize(p) / base:.3f}", *fid[k],
             f"{lat[k] / lat['original']:.3f}", wall.get(k, "-")] for k, p in paths.items()]
    text = H.table(["variant", "params", "MB", "size ratio", *_fid_cols(name), "latency 1T", "tool s"], rows)
    claims = []
    for keep in keeps:
        l, h, p = (f"{m} {keep}" for m in ("lmf", "hmf", "prune"))
        claims.append([keep, fid[l][0], fid[h][0], f"{lat[p] / lat[h]:.2f}x"])
    text += "\n\n" + H.table(["keep", f"LMF {_fid_cols(name)[0]}", f"HMF {_fid_cols(name)[0]}", "HMF speed-up over prune"], claims)
    return f"### {name}: methods at equal parameter budgets\n\n{text}\n"


def fold_table(name: str, src, keep: float = 0.5) -> str:
    out = H.OUT / name
    paths = {"original": src}
    for label, extra in (("hmf folded", []), ("hmf gather", ["--no-fold"])):
        p = out / f"hmf_{label.split()[1]}.onnx"
        H.optimize(src, p, "--method", "hmf", "--keep", keep, "--min-cosine", "0", *extra)
        paths[label] = p
    lat = H.latency(paths, _feeds(name), threads=1, rounds=25)
    rows = [[k, f"{lat[k] * 1e3:.2f}", f"{lat[k] / lat['original']:.3f}"] for k in paths]
    return f"### {name}: cost of the HMF permutation Gather (keep {keep})\n\n" + H.table(["variant", "ms", "ratio"], rows) + "\n"


def embedding_table(name: str, src) -> str:
    table_name = "embeddings.word_embeddings.weight" if name == "minilm" else "embed.weight"
    out = H.OUT / name
    paths = {"original": src}
    errs = {}
    for factor in (2, 4, 8):
        keep = 1 / factor
        for label, extra in (("svd", ["--method", "lmf"]), ("hmf residual", ["--method", "hmf"]),
                             ("hmf freq", ["--method", "hmf", *freq_file(name)])):
            key = f"{label} {factor}x"
            p = out / f"emb_{label.replace(' ', '_')}_{factor}.onnx"
            r = H.optimize(src, p, "--include", f"^{table_name}$", "--keep", keep, "--min-cosine", "0", *extra)
            site = next(s for s in r["report"]["sites"] if s["weight"] == table_name)
            paths[key], errs[key] = p, (site["rel_error"], site["params_after"], site.get("detail", ""))
    fid = _fidelity(name, paths)
    rows = [[k, f"{errs[k][1]:,}" if k in errs else "-", f"{errs[k][0]:.4f}" if k in errs else "-", *fid[k]]
            for k in paths]
    return f"### {name}: embedding table `{table_name}` alone\n\n" + H.table(
        ["variant", "table params", "rel err", *_fid_cols(name)], rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,glassllm")
    ap.add_argument("--keeps", default="0.75,0.5,0.25")
    ap.add_argument("--parts", default="methods,fold,embedding")
    args = ap.parse_args()
    keeps = [float(k) for k in args.keeps.split(",")]
    for name in args.models.split(","):
        src = H.ensure_minilm() if name == "minilm" else H.GLASSLLM
        if "methods" in args.parts:
            print(methods_table(name, src, keeps), flush=True)
        if "fold" in args.parts:
            print(fold_table(name, src), flush=True)
        if "embedding" in args.parts:
            print(embedding_table(name, src), flush=True)


if __name__ == "__main__":
    main()
