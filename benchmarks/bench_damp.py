"""Issue 15: GPTQ's damping against the calibration size, on MiniLM's 36 linears alone.

    python benchmarks/bench_damp.py [--samples 256,2048] [--damps 0.01,0.05,0.1,0.2]

GPTQ minimises ‖X·(W − Q)‖² with the Hessian H = XᵀX + δ·mean(diag XᵀX)·I (factorize/quant.gptq,
δ = the treatment's ``damp``, quant.GPTQ_DAMP by default). A small δ fits the calibration text closely; the question is what holds out on
text unlike it. Every MatMul weight of all-MiniLM-L6-v2 is stored as the planner's ``int4b128r``
(asymmetric uint4, block 128, rotated by a 32×32 block Hadamard, 8-bit scales) and, for
comparison, as ``int4b64`` unrotated with 8-bit scales; the tables stay float. The Grams come
from the first N pydoc sentences (N in ``--samples``); the fidelity is the mean cosine of the
sentence embeddings against the original on 300 held-out Shakespeare and 300 KJV sentences.
The stored bytes do not depend on δ, so the table gives cosines only.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np
import onnx

import harness as H

sys.path.insert(0, str(H.ROOT))

from onnxhmf.calibration import Calibration  # noqa: E402
from onnxhmf.graph import qdq  # noqa: E402
from onnxhmf.passes.intquant import PLANNED, apply_treatments, parse_treatment, weight_grams  # noqa: E402

TREATMENTS = {"int4b128r": PLANNED["int4b128r"], "int4b64 s8": parse_treatment("int4b:64:a:gptq:s8")}


def run(samples: list[int], damps: list[float]) -> str:
    out, src, m, cal = H.minilm_setup("damp", max(samples))
    matmuls = [t.name for t in m.graph.initializer if qdq.site_kind(m, t.name) == "matmul" and np.prod(t.dims) >= 4096]
    paths, tokens = {"original": src}, {}
    for n in samples:
        part = Calibration(cal.batches[: max(1, n // cal.batches[0]["input_ids"].shape[0])], cal.mask, cal.source)
        tokens[n] = part.tokens
        grams = weight_grams(m, matmuls, part)
        for label, t in TREATMENTS.items():
            for d in damps:
                t0 = time.perf_counter()
                model, _ = apply_treatments(m, {w: replace(t, damp=d) for w in matmuls}, grams=grams)
                key = (label, n, d)
                paths[key] = out / f"{label.replace(' ', '_')}_{n}_{d}.onnx"
                onnx.save(model, str(paths[key]))
                print(f"  {label} {n} samples, damp {d}: {time.perf_counter() - t0:.0f} s", flush=True)
    cos = {k: f["mean_cosine"] for k, f in H.minilm_fidelity(paths, H.heldout_sentences(600)).items()}
    rows = [[label, f"{n} ({tokens[n]:,} tokens)", *(f"{cos[(label, n, d)]:.4f}" for d in damps)]
            for label in TREATMENTS for n in samples]
    return ("### minilm's linears: held-out cosine by GPTQ damping δ (columns) and calibration size\n\n"
            + H.table(["linears", "calibration sentences", *(f"δ {d:g}" for d in damps)], rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", default="256,2048")
    ap.add_argument("--damps", default="0.01,0.05,0.1,0.2")
    args = ap.parse_args()
    print(run([int(x) for x in args.samples.split(",")], [float(x) for x in args.damps.split(",")]), flush=True)


if __name__ == "__main__":
    main()
