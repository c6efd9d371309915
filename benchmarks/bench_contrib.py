"""MiniLM against onnxruntime's own int4 quantizer (contrib MatMulNBits + GatherBlockQuantized):
`--plan auto` at the peer's file size, in standard ops and with `--kernels onnxruntime`.

    ONNXHMF_MODEL_CACHE=models/cache OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_contrib.py

Calibration on pydoc topics (bench_runtime's), fidelity on 300 held-out Shakespeare + KJV
sentences (mean cosine of sentence embeddings), latency interleaved at 1 thread on 8×128 tokens
(ratio to the original), resident growth of three fresh processes each (load, five runs; min–max).
Outputs go to benchmarks/out/runtime/minilm/ beside bench_runtime's; an existing output is reused.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runtime as B  # noqa: E402
import harness as H  # noqa: E402
from onnxhmf.calibration import load_calibration  # noqa: E402


def main() -> None:
    out = H.OUT / "runtime" / "minilm"
    out.mkdir(parents=True, exist_ok=True)
    src = H.ensure_minilm()
    text = out / "pydoc.txt"
    if not text.exists():
        text.write_text(H.corpora.pydoc_topics_text())
    feeds = out / "feeds.npz"
    if not feeds.exists():
        ids = np.random.default_rng(0).integers(1000, 30000, size=(8, 128)).astype(np.int64)
        np.savez(feeds, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids))
    peer = out / "nbits4.onnx"
    if not peer.exists():
        cal = load_calibration(text, onnx.load(str(src)), tokenizer=H.MINILM_TOKENIZER, samples=512)
        B.peers(src, out, cal, only="ort nbits4")
    calib = ["--calib", str(text), "--tokenizer", str(H.MINILM_TOKENIZER)]
    runs = {"plan @nbits4 (standard ops)": [], "plan @nbits4 --kernels onnxruntime": ["--kernels", "onnxruntime"]}
    paths = {"original": src, "ort nbits4 (contrib)": peer}
    for label, extra in runs.items():
        dst = out / ("cli_plan_at_nbits4" + ("_ort" if extra else "_std") + ".onnx")
        if not dst.exists():
            r = H.optimize(src, dst, "--plan", "auto", "--target-size", str(os.path.getsize(peer)), *extra,
                           "--no-measure", *calib)
            print(f"  {label}: {r['wall_s']:.1f} s", flush=True)
        paths[label] = dst
    fid = H.minilm_fidelity(paths, H.heldout_sentences(300))
    lat = H.latency(paths, dict(np.load(feeds)), threads=1, rounds=11, per_round=2)
    mem = {k: [B.resident(p, feeds) for _ in range(3)] for k, p in paths.items()}
    size0 = os.path.getsize(src)
    rows = [[k, f"{os.path.getsize(p):,}", f"{os.path.getsize(p) / size0:.3f}", f"{fid[k]['mean_cosine']:.4f}",
             f"{lat[k] / lat['original']:.2f}", f"{min(mem[k]):.1f}–{max(mem[k]):.1f}", "yes" if B.standard(p) else "no"]
            for k, p in paths.items()]
    print(H.table(["variant", "bytes", "size", "cosine", "lat 1t", "mem MB", "std"], rows))


if __name__ == "__main__":
    main()
