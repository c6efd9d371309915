"""Issue 15: MiniLM's 36 linears alone at int4, with and without the block Hadamard rotation and 8-bit scales.

    python benchmarks/bench_rotate.py [--samples 512] [--rounds 9]

Every MatMul weight of all-MiniLM-L6-v2 gets one treatment (passes/intquant.parse_treatment,
asymmetric uint4, act-order GPTQ on 512 pydoc calibration sentences); the tables stay float, so
the rows show what the linears' storage alone costs. Variants: block 256 / 64 / 32, each plain
(float32 scales), with 8-bit scales (``s8``, factorize/quant.compact_scales), and rotated
(``rot32``: a 32×32 block Hadamard on the input side, factorize/rotate.py) with 8-bit scales,
which is what the planner's int4bNr options are; block 64 also rotated by 128.

Columns: the linears' stored bytes (MB: values, scales, zero points; the rotation's 1 kB matrix
not counted), mean cosine of the sentence embeddings against the original on 300 held-out
Shakespeare and 300 KJV sentences, latency at 1 thread (median of interleaved rounds on 8×128
tokens, ratio to the original), fit seconds.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx

import harness as H

sys.path.insert(0, str(H.ROOT))

from onnxhmf.graph import qdq  # noqa: E402
from onnxhmf.passes.intquant import apply_treatments, parse_treatment, weight_grams  # noqa: E402

VARIANTS = ["int4b:256:a:gptq", "int4b:256:a:gptq:s8", "int4b:256:a:gptq:rot32:s8",
            "int4b:64:a:gptq", "int4b:64:a:gptq:s8", "int4b:64:a:gptq:rot32:s8", "int4b:64:a:gptq:rot128:s8",
            "int4b:32:a:gptq", "int4b:32:a:gptq:s8", "int4b:32:a:gptq:rot32:s8"]


def run(samples: int, rounds: int) -> str:
    out, src, m, cal = H.minilm_setup("rotate", samples)
    arrays = {t.name: t for t in m.graph.initializer}
    matmuls = [t.name for t in m.graph.initializer if qdq.site_kind(m, t.name) == "matmul" and np.prod(t.dims) >= 4096]
    grams = weight_grams(m, matmuls, cal)
    paths, secs, nbytes = {"original": src}, {}, {}
    for v in VARIANTS:
        t = parse_treatment(v)
        t0 = time.perf_counter()
        model, _ = apply_treatments(m, {w: t for w in matmuls}, grams=grams)
        secs[v] = time.perf_counter() - t0
        nbytes[v] = sum(t.nbytes(tuple(arrays[w].dims)) for w in matmuls)
        paths[v] = out / f"{v.replace(':', '_')}.onnx"
        onnx.save(model, str(paths[v]))
        print(f"  {v}: {secs[v]:.0f} s", flush=True)
    cos = {k: f["mean_cosine"] for k, f in H.minilm_fidelity(paths, H.heldout_sentences(600)).items()}
    lat = H.latency(paths, H.minilm_feeds(), threads=1, rounds=rounds, per_round=2)
    dense = sum(4 * int(np.prod(arrays[w].dims)) for w in matmuls)
    rows = [[k, f"{nbytes.get(k, dense) / 1e6:.2f}", f"{cos[k]:.4f}", f"{lat[k] / lat['original']:.2f}",
             f"{secs[k]:.0f}" if k in secs else "-"] for k in paths]
    return (f"### minilm's linears ({len(matmuls)} weights, {dense / 1e6:.1f} MB float; original "
            f"{lat['original'] * 1e3:.1f} ms at 1 thread on 8×128 tokens)\n\n"
            + H.table(["linears", "MB", "cosine", "lat 1t", "fit s"], rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    print(run(args.samples, args.rounds), flush=True)


if __name__ == "__main__":
    main()
