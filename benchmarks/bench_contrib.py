"""MiniLM against onnxruntime's own int4 quantizer (contrib MatMulNBits + GatherBlockQuantized):
`--plan auto` at the peer's file size, in standard ops and with `--kernels onnxruntime`.

    ONNXHMF_MODEL_CACHE=models/cache OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_contrib.py

Calibration on pydoc topics (bench_runtime's), fidelity on 300 held-out Shakespeare + KJV
sentences (mean cosine of sentence embeddings), latency interleaved at 1 thread on 8×128 tokens
(ratio to the original), resident growth of five fresh processes each (load, five runs; min–max),
with glibc's defaults and with a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_=131072``: what
the session holds, without the heap glibc keeps of onnxruntime's load-time temporaries, which
varies from process to process). Also the default planner with ``--kernels onnxruntime``.
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
    at_peer = ["--plan", "auto", "--target-size", str(os.path.getsize(peer))]
    runs = {"plan @nbits4 (standard ops)": ("cli_plan_at_nbits4_std", at_peer),
            "plan @nbits4 --kernels onnxruntime": ("cli_plan_at_nbits4_ort", [*at_peer, "--kernels", "onnxruntime"]),
            "default --kernels onnxruntime": ("cli_default_ort_kernels", ["--kernels", "onnxruntime"])}
    paths = {"original": src, "ort nbits4 (contrib)": peer}
    for label, (stem, extra) in runs.items():
        dst = out / f"{stem}.onnx"  # (bench_runtime writes cli_default_ort_kernels too)
        if not dst.exists():
            r = H.optimize(src, dst, *extra, "--no-measure", *calib)
            print(f"  {label}: {r['wall_s']:.1f} s", flush=True)
        paths[label] = dst
    fid = H.minilm_fidelity(paths, H.heldout_sentences(300))
    lat = H.latency(paths, dict(np.load(feeds)), threads=1, rounds=11, per_round=2)
    mem = {k: [B.resident(p, feeds) for _ in range(5)] for k, p in paths.items()}
    live = {k: [B.resident(p, feeds, B.FIXED_MMAP) for _ in range(5)] for k, p in paths.items()}
    size0 = os.path.getsize(src)
    rows = [[k, f"{os.path.getsize(p):,}", f"{os.path.getsize(p) / size0:.3f}", f"{fid[k]['mean_cosine']:.4f}",
             f"{lat[k] / lat['original']:.2f}", f"{min(mem[k]):.1f}–{max(mem[k]):.1f}",
             f"{min(live[k]):.1f}–{max(live[k]):.1f}", "yes" if B.standard(p) else "no"]
            for k, p in paths.items()]
    print(H.table(["variant", "bytes", "size", "cosine", "lat 1t", "mem MB", "mem MB fixed mmap", "std"], rows))


if __name__ == "__main__":
    main()
