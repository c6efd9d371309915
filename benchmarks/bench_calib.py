"""Issue 4 benchmark: calibration-aware compression of the linear layers, one run.

    python benchmarks/bench_calib.py [--models minilm,glassllm] [--keeps 0.9,0.75,0.5] [--samples 128]
                                     [--methods lmf,hmf,wlmf,whmf,seq,shared,measured,best]

Calibration: Python's pydoc topics (MiniLM: the text file with the model's tokenizer;
glassllm: an .npz of 128-token windows from glassllm's own tokenizer). Evaluation on held-out
text from other domains: MiniLM, the mean cosine and Spearman of sentence embeddings on 600
Shakespeare + KJV sentences; glassllm, perplexity on 20,480 tokens of each. ``keep`` is the
fraction of the linear layers' parameters kept (embedding tables untouched:
``--embedding-method skip``). Methods:

    lmf       plain truncated SVD, same keep for every weight
    hmf       plain hybrid (dense columns + low rank)
    wlmf      whitened LMF (SVD-LLM), uniform keep             --calib --allocate uniform
    whmf      whitened HMF, uniform keep                        --method hmf --calib --allocate uniform
    seq       whitened LMF, sequential calibration              --calib --allocate uniform --sequential
    shared    whitened LMF, Q/K/V share one basis               --calib --allocate uniform --share-bases
    measured  whitened LMF, measured allocation of the budget   --calib (the default allocation)
    best      measured allocation + sequential                  --calib --sequential

Plus ORT int8 and the original; columns: size, fidelity, the fidelity loss relative to wlmf
at the same keep (the issue's target is ≤ 0.5), ORT latency ratio (1 thread, 1×128), tool wall
time. Set OPENBLAS_NUM_THREADS=1 on a shared machine (BLAS oversubscription slows SVDs 5-70×).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import harness as H

METHODS = {
    "lmf": [],
    "hmf": ["--method", "hmf"],
    "wlmf": ["CALIB", "--allocate", "uniform"],
    "whmf": ["--method", "hmf", "CALIB", "--allocate", "uniform"],
    "seq": ["CALIB", "--allocate", "uniform", "--sequential"],
    "shared": ["CALIB", "--allocate", "uniform", "--share-bases"],
    "measured": ["CALIB"],
    "best": ["CALIB", "--sequential"],
}


def calib_args(name: str, out, samples: int) -> list[str]:
    text = H.corpora.pydoc_topics_text()
    if name == "minilm":
        p = out / "pydoc.txt"
        p.write_text(text)
        return ["--calib", p, "--tokenizer", H.MINILM_TOKENIZER, "--calib-samples", samples]
    ids = H.lm_eval.glassllm_token_ids(text)
    n = min(samples, ids.size // 128)
    p = out / "pydoc_windows.npz"
    np.savez(p, input_ids=ids[: n * 128].reshape(n, 128).astype(np.int64))
    return ["--calib", p, "--calib-samples", samples]


def run(name: str, src, keeps: list[float], methods: list[str], samples: int, min_fid: float | None) -> str:
    out = H.OUT / "calib" / name
    out.mkdir(parents=True, exist_ok=True)
    calib = calib_args(name, out, samples)
    paths = {"original": src, "ort int8": H.int8(src, out / "int8.onnx")}
    tool, keep_of = {}, {}
    for keep in keeps:
        for meth in methods:
            args = [a for x in METHODS[meth] for a in (calib if x == "CALIB" else [x])]
            label = f"{meth} {keep}"
            p = out / f"{meth}_{keep}.onnx"
            t = time.perf_counter()
            tool[label] = H.optimize(src, p, "--keep", keep, "--embedding-method", "skip", "--min-cosine", "0", *args)
            tool[label]["bench_s"] = time.perf_counter() - t
            paths[label], keep_of[label] = p, (meth, keep)
            print(f"  {label}: {tool[label]['wall_s']:.1f} s", flush=True)
    if min_fid is not None:
        label = f"min-fidelity {min_fid}"
        p = out / "minfid.onnx"
        tool[label] = H.optimize(src, p, "--embedding-method", "skip", "--min-cosine", "0", "--min-fidelity", min_fid, *calib)
        paths[label] = p
        print(f"  {label}: {tool[label]['wall_s']:.1f} s", flush=True)

    if name == "minilm":
        fid = H.minilm_fidelity(paths, H.heldout_sentences(600))
        loss = {k: 1 - v["mean_cosine"] for k, v in fid.items()}
        cols = ["mean cos", "spearman"]
        vals = {k: [f"{v['mean_cosine']:.4f}", f"{v['spearman']:.4f}"] for k, v in fid.items()}
        ids = np.random.default_rng(0).integers(1000, 30000, size=(1, 128))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    else:
        ppl = H.glassllm_perplexity(paths)
        base = ppl["original"]
        loss = {k: (v["shakespeare"] - base["shakespeare"]) / base["shakespeare"] for k, v in ppl.items()}
        cols = ["ppl shakespeare", "ppl kjv"]
        vals = {k: [f"{v['shakespeare']:.2f}", f"{v['kjv']:.2f}"] for k, v in ppl.items()}
        feeds = {"input_ids": np.random.default_rng(0).integers(0, 1024, size=(1, 128))}
    feeds = {k: v.astype(np.int64) for k, v in feeds.items()}
    lat = H.latency(paths, feeds, threads=1)
    size0 = os.path.getsize(src)
    rows = []
    for k, p in paths.items():
        t = tool.get(k)
        rel = "-"
        if k in keep_of:
            ref = f"wlmf {keep_of[k][1]}"
            if ref in loss and loss[ref] > 0:
                rel = f"{loss[k] / loss[ref]:.2f}"
        rows.append([k, H.mb(p), f"{os.path.getsize(p) / size0:.3f}", *vals[k], rel,
                     f"{lat[k] / lat['original']:.3f}", f"{t['wall_s']:.1f}" if t else "-"])
    header = ["variant", "MB", "size", *cols, "loss / wlmf", "latency", "tool s"]
    notes = []
    for k, t in tool.items():
        cal = t["report"]["settings"].get("calibration") or {}
        if "keep_found" in cal:
            notes.append(f"{k}: keep {cal['keep_found']:.3f} found, held-out calibration cosine {cal['heldout_fidelity']:.4f}")
    what = "1 - mean cosine" if name == "minilm" else "relative Shakespeare perplexity increase"
    return (f"### {name} ({size0 / 1e6:.1f} MB), calibrated on pydoc ({samples} samples)\n\n" + H.table(header, rows)
            + f"\n\nloss / wlmf: fidelity loss ({what}) relative to uniform whitened LMF at the same keep.\n"
            + "".join(f"\n{n}" for n in notes) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,glassllm")
    ap.add_argument("--keeps", default="0.9,0.75,0.5")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--min-fidelity", type=float, default=0.95, help="MiniLM only; 0 to skip")
    args = ap.parse_args()
    keeps = [float(k) for k in args.keeps.split(",")]
    methods = args.methods.split(",")
    for name in args.models.split(","):
        src = H.ensure_minilm() if name == "minilm" else H.GLASSLLM
        mf = args.min_fidelity if (name == "minilm" and args.min_fidelity) else None
        print(run(name, src, keeps, methods, args.samples, mf), flush=True)


if __name__ == "__main__":
    main()
