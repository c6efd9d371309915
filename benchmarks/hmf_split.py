"""HMF's (k, r) search against plain LMF and a fixed half split, on real MatMul weights.

    python benchmarks/hmf_split.py [--model PATH] [--keeps 0.25,0.5,0.75]

Weights: every 2-D float initializer read by a MatMul with ≥ 16k parameters, from
models/cache/minilm.onnx if it exists, else models/glassllm.onnx. For each budget P = keep·m·n:

    LMF        svd.lmf at rank_for_keep(m, n, keep)
    HMF        hmf.hmf(W, P): chosen columns/rows, chosen k, rank filling the rest
    HMF cols   hmf.hmf(W, P, axis="columns");  HMF rows likewise
    half split hmf.hmf(W, P, axis="columns", k_candidates=[⌊P/2⌋ // m]): the same column choice,
               but k fixed at half the budget's worth of columns

Prints the mean relative Frobenius error ‖W − Ŵ‖_F/‖W‖_F over the matrices, how many matrices
HMF left at k = 0 (plain LMF) or put on rows, the mean dense share k/side, and hmf's wall time per
matrix (median, 90th percentile and max, one process, so machine noise applies).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxhmf.factorize.hmf import hmf
from onnxhmf.factorize.svd import lmf, rank_for_keep

ROOT = Path(__file__).resolve().parents[1]
MIN_PARAMS = 16 * 1024


def default_model() -> Path:
    cached = ROOT / "models" / "cache" / "minilm.onnx"
    return cached if cached.is_file() else ROOT / "models" / "glassllm.onnx"


def matmul_weights(path: Path) -> list[tuple[str, np.ndarray]]:
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    out, seen = [], set()
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        for name in node.input:
            if name in inits and name not in seen:
                seen.add(name)
                W = numpy_helper.to_array(inits[name])
                if W.ndim == 2 and W.dtype.kind == "f" and W.size >= MIN_PARAMS:
                    out.append((name, W))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--keeps", default="0.25,0.5,0.75")
    args = ap.parse_args(argv)
    path = args.model or default_model()
    keeps = [float(k) for k in args.keeps.split(",")]
    mats = matmul_weights(path)
    shapes = sorted({W.shape for _, W in mats})
    print(f"{path.name}: {len(mats)} MatMul weights ≥ {MIN_PARAMS} params, shapes {', '.join(f'{m}×{n}' for m, n in shapes)}\n")

    cols = ["LMF", "HMF", "HMF cols", "HMF rows", "half split"]
    head = f"{'keep':>5} | " + " | ".join(f"{c:>10}" for c in cols) + " | HMF/LMF | k=0 | rows | k/side | time med / p90 / max"
    print(head)
    print("-" * len(head))
    per_shape: dict[tuple, list[float]] = {}
    slow: list[str] = []
    for keep in keeps:
        errs = {c: [] for c in cols}
        times, k0, rows, share = [], 0, 0, []
        for name, W in mats:
            m, n = W.shape
            P = int(keep * m * n)
            r = rank_for_keep(m, n, keep)
            errs["LMF"].append(lmf(W, r).relative_error if r else 1.0)
            t = time.perf_counter()
            f = hmf(W, P)
            dt = time.perf_counter() - t
            times.append(dt)
            if dt > 2.0:
                slow.append(f"{name} at keep {keep}: {dt:.1f}s")
            per_shape.setdefault(W.shape, []).append(dt)
            assert f.params <= P
            errs["HMF"].append(f.relative_error)
            k0 += f.k == 0
            rows += f.k > 0 and f.axis == 0
            share.append(f.k / (n if f.axis == 1 else m))
            errs["HMF cols"].append(hmf(W, P, axis="columns").relative_error)
            errs["HMF rows"].append(hmf(W, P, axis="rows").relative_error)
            errs["half split"].append(hmf(W, P, axis="columns", k_candidates=[(P // 2) // m]).relative_error)
        mean = {c: float(np.mean(v)) for c, v in errs.items()}
        print(f"{keep:>5} | " + " | ".join(f"{mean[c]:>10.4f}" for c in cols)
              + f" | {mean['HMF'] / mean['LMF']:>7.3f} | {k0:>3} | {rows:>4} | {np.mean(share):>6.3f}"
              + f" | {np.median(times):.3f}s / {np.percentile(times, 90):.3f}s / {max(times):.3f}s")
    print("\nhmf wall time per matrix, by shape (all budgets): "
          + ", ".join(f"{m}×{n}: median {np.median(v):.3f}s" for (m, n), v in sorted(per_shape.items())))
    if slow:
        print("calls over 2 s (rerun alone to tell machine load from the algorithm): " + "; ".join(slow))


if __name__ == "__main__":
    main()
