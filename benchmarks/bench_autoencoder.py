"""Issue 5 benchmark: autoencoder compression against SVD and HMF, one run.

    python benchmarks/bench_autoencoder.py [--models minilm,glassllm] [--factors 2.5,5,10] [--parts embedding,storage]

Embedding part: the word-embedding table alone (every other weight untouched) compressed
2.5x/5x/10x by SVD, frequency-weighted PCA (``--embedding-method ae --ae-epochs 0`` with
token counts), frequency HMF, AE with a linear decoder (uniform and frequency row weights)
and AE with a nonlinear decoder. Token counts come from Python's pydoc text; fidelity is
measured on held-out Shakespeare + KJV (MiniLM: sentence-embedding cosine and Spearman on 600
sentences; glassllm: perplexity on 20,480 tokens of each). Columns: table parameters stored,
relative Frobenius error of the table, fidelity, tool wall time (training included),
onnxruntime session-creation time and latency ratio (1 thread, batch 1 × 128).

Storage part: MiniLM's query/key/value weights of all 6 layers rebuilt by one storage AE per
role (shared decoder) against plain LMF and HMF on the same weights at about the same size;
session-creation time, latency, and whether onnxruntime folded the decode subgraphs (node
count of ORT's optimized graph).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import harness as H
from bench_hmf import _feeds, _fid_cols, _fidelity, freq_file

TABLE = {"minilm": "embeddings.word_embeddings.weight", "glassllm": "embed.weight"}


def session_ms(paths: dict[str, Path], reps: int = 5) -> dict[str, float]:
    """Median session-creation time (default graph optimizations, 1 thread), round-robin."""
    times = {k: [] for k in paths}
    for _ in range(reps):
        for k, p in paths.items():
            t = time.perf_counter()
            H._session(p, 1)
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def ort_nodes_left(path: Path, marker: str = "/decode/") -> tuple[int, int]:
    """(decode nodes in the file, decode nodes left in onnxruntime's optimized graph)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath, load_external_data=False)
    before = sum(marker in n.name for n in onnx.load(str(path), load_external_data=False).graph.node)
    return before, sum(marker in n.name for n in opt.graph.node)


def embedding_table(name: str, src: Path, factors: list[float], b32: bool, freq_ae: bool) -> str:
    """One table per compression factor (printed as it is done), then AE vs SVD."""
    table = TABLE[name]
    out = H.OUT / "ae" / name
    out.mkdir(parents=True, exist_ok=True)
    freq = freq_file(name)
    big = name == "minilm"  # 30522 rows: batch 256 with lr scaled by sqrt(8); glassllm (1024 rows): batch 32
    fast = ["--ae-batch-size", "256", "--ae-lr", f"{1e-3 * np.sqrt(8):.4g}"] if big else []
    variants = [
        ("svd", ["--method", "lmf"]),
        ("svd freq", ["--embedding-method", "ae", "--ae-epochs", "0", *freq]),
        ("hmf freq", ["--method", "hmf", *freq]),
        ("ae linear", ["--embedding-method", "ae", *fast]),
        *([("ae linear freq", ["--embedding-method", "ae", *fast, *freq])] if freq_ae else []),
        ("ae nonlinear", ["--embedding-method", "ae", "--ae-decoder", "nonlinear", *fast]),
    ]
    fid_all, texts = {}, []
    for factor in factors:
        paths, info = {"original": src}, {}
        vs = list(variants)
        if b32 and big and factor == factors[len(factors) // 2]:
            vs.append(("ae linear b32", ["--embedding-method", "ae"]))
        for label, extra in vs:
            key = f"{label} {factor:g}x"
            p = out / f"{label.replace(' ', '_')}_{factor:g}.onnx"
            r = H.optimize(src, p, "--include", f"^{table}$", "--keep", f"{1 / factor:.6f}", "--min-cosine", "0", *extra)
            site = next(s for s in r["report"]["sites"] if s["weight"] == table)
            paths[key] = p
            info[key] = (site["params_after"], site["rel_error"], r["wall_s"])
            print(f"  {key}: {site['params_after']:,} params, rel err {site['rel_error']:.4f}, {r['wall_s']:.1f} s "
                  f"{site.get('detail', '')}", flush=True)
        fid = _fidelity(name, paths)
        fid_all.update(fid)
        lat = H.latency(paths, _feeds(name), threads=1)
        sess = session_ms(paths)
        rows = []
        for k in paths:
            p_after, rel, wall = info.get(k, (None, None, None))
            rows.append([k, f"{p_after:,}" if p_after else "-", f"{rel:.4f}" if rel is not None else "-", *fid[k],
                         f"{wall:.1f}" if wall is not None else "-", f"{sess[k]:.0f}", f"{lat[k] / lat['original']:.3f}"])
        text = H.table(["variant", "table params", "rel err", *_fid_cols(name), "tool s", "session ms", "latency 1T"], rows)
        print(text + "\n", flush=True)
        texts.append(text)
    col = _fid_cols(name)[0]
    better = (lambda a, b: float(a) > float(b)) if name == "minilm" else (lambda a, b: float(a) < float(b))
    labels = ["ae linear", *(["ae linear freq"] if freq_ae else []), "ae nonlinear"]
    summary = []
    for factor in factors:
        s = fid_all[f"svd {factor:g}x"][0]
        cells = [f"{factor:g}x", s]
        for label in labels:
            v = fid_all[f"{label} {factor:g}x"][0]
            cells.append(f"{v} ({'beats' if better(v, s) else 'loses to'} SVD)")
        summary.append(cells)
    texts.append(H.table(["factor", f"SVD {col}", *[f"{lab} {col}" for lab in labels]], summary))
    return f"### {name}: embedding table `{table}` alone\n\n" + "\n\n".join(texts) + "\n"


def storage_table(src: Path, keep: float, epochs: int) -> str:
    out = H.OUT / "ae" / "minilm"
    out.mkdir(parents=True, exist_ok=True)
    qkv = r"attention\.self\.(query|key|value)\.weight$"
    paths, info = {"original": src}, {}
    p = out / f"storage_{keep:g}.onnx"
    r = H.optimize(src, p, "--include", "^$", "--storage-ae-include", qkv, "--storage-ae-keep", f"{keep:g}",
                   "--storage-ae-epochs", str(epochs), "--min-cosine", "0")
    sites = [s for s in r["report"]["sites"] if s["status"] == "rewritten"]
    stored, before = sum(s["params_after"] for s in sites), sum(s["params_before"] for s in sites)
    key = f"storage ae {keep:g}"
    paths[key], info[key] = p, (stored, before, r["wall_s"], np.mean([s["rel_error"] for s in sites]))
    eq = stored / before  # LMF/HMF at the same fraction of the same weights
    for method in ("lmf", "hmf"):
        k = f"{method} {eq:.3f}"
        p = out / f"qkv_{method}_{eq:.3f}.onnx"
        r = H.optimize(src, p, "--method", method, "--include", qkv, "--keep", f"{eq:.6f}", "--min-cosine", "0",
                       "--embedding-method", "skip")
        s2 = [s for s in r["report"]["sites"] if s["status"] == "rewritten"]
        paths[k], info[k] = p, (sum(s["params_after"] for s in s2), sum(s["params_before"] for s in s2), r["wall_s"],
                                np.mean([s["rel_error"] for s in s2]))
    fid = _fidelity("minilm", paths)
    lat = H.latency(paths, _feeds("minilm"), threads=1)
    sess = session_ms(paths)
    base = os.path.getsize(src)
    rows = []
    for k, pth in paths.items():
        st, bf, wall, rel = info.get(k, (None, None, None, None))
        rows.append([k, H.mb(pth), f"{os.path.getsize(pth) / base:.3f}", f"{st:,} / {bf:,}" if st else "-",
                     f"{rel:.4f}" if rel is not None else "-", *fid[k], f"{sess[k]:.0f}", f"{lat[k] / lat['original']:.3f}",
                     f"{wall:.1f}" if wall is not None else "-"])
    text = H.table(["variant", "MB", "size ratio", "q/k/v params", "mean rel err", "mean cos", "spearman", "session ms",
                    "latency 1T", "tool s"], rows)
    before_n, left = ort_nodes_left(paths[key])
    text += f"\n\nonnxruntime folding: {before_n} decode nodes in the file, {left} left in ORT's optimized graph."
    return f"### minilm: storage AE on query/key/value of all 6 layers\n\n{text}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,glassllm")
    ap.add_argument("--factors", default="2.5,5,10")
    ap.add_argument("--parts", default="embedding,storage")
    ap.add_argument("--no-b32", action="store_true", help="skip the batch-32 MiniLM run (about 4 min)")
    ap.add_argument("--no-freq-ae", action="store_true", help="skip the frequency-weighted AE")
    ap.add_argument("--storage-keep", type=float, default=0.25)
    ap.add_argument("--storage-epochs", type=int, default=60)
    args = ap.parse_args()
    factors = [float(f) for f in args.factors.split(",")]
    for name in args.models.split(","):
        src = H.ensure_minilm() if name == "minilm" else H.GLASSLLM
        if "embedding" in args.parts:
            print(embedding_table(name, src, factors, not args.no_b32, not args.no_freq_ae), flush=True)
        if "storage" in args.parts and name == "minilm":
            print(storage_table(src, args.storage_keep, args.storage_epochs), flush=True)


if __name__ == "__main__":
    main()
