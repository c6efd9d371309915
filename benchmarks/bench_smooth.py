"""Issue 15: SmoothQuant before per-channel int8 (MatMulInteger) against onnxruntime's dynamic quantizer.

    python benchmarks/bench_smooth.py [--models minilm,glassllm] [--samples 512] [--rounds 9]

Calibration on Python's pydoc topics, fidelity on held-out text from other domains (MiniLM: mean
cosine of sentence embeddings on 300 Shakespeare + KJV sentences; glassllm: perplexity on
Shakespeare and KJV tokens), as in bench_runtime.py. Variants:

    ort dyn pt / pc        quantize_dynamic int8 per tensor / per_channel=True (tables: uint8 rows)
    hmf pc + t8            int8pc (onnxruntime's per-channel MatMulInteger through quantize_int8),
                           tables int8 as the quantizer stores them (uint8 rows, one scale)
    hmf pc sq-free + t8    the same after SmoothQuant folded only where it is free (an RMSNorm's
                           gamma, V's columns, SwiGLU's up projection), no new nodes
    hmf pc sq-all + t8     SmoothQuant on every site; a site with no free fold (after a post-LN
                           LayerNorm, after a GELU) gets one Mul(X, 1/s) node
    hmf pc sq-all + t8/p4  the same, only the largest table int8, the other tables int4 block 32
                           (those under 4096 numbers int8)
    hmf pc sq + t8         the default (--smooth): a Mul node only where the site's MatMuls have
                           outputs at least as wide as X (not the FFN's second MatMul)
    hmf pc sq + t8/p4      the same with the tables of sq-all + t8/p4
    hmf pc sq + t4         tables int4 block 32 (clip search), gathered rows
    hmf pc sq gptq + t4    the same with GPTQ-refitted integers
    hmf pc gptq + t4       bench_runtime's previous best (no smoothing)

Columns: size (ratio to the original file), fidelity, latency at 1 thread (ratio to the original,
interleaved rounds; "lat/pc": the median over rounds of each variant's time over "ort dyn pc"'s in
the same round, onnxhmf.runtime.latency_ratios, which is the done-when's latency ≤ 1.05·P), resident memory (onnxhmf.runtime.resident_memory: RSS growth of a fresh
process that loads the model and runs it 5 times, MB), std (only default-domain ops), fit time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

import harness as H

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxhmf.calibration import load_calibration  # noqa: E402
from onnxhmf.graph import qdq  # noqa: E402
from onnxhmf.passes.intquant import IntTreatment, apply_treatments, weight_grams  # noqa: E402
from onnxhmf.passes.smooth import smooth_for_int8  # noqa: E402
from onnxhmf.runtime import latency_ratios, resident_memory  # noqa: E402


def standard(path: Path) -> bool:
    m = onnx.load(str(path), load_external_data=False)
    return all(n.domain in ("", "ai.onnx") for n in m.graph.node)


def setup(name: str, out: Path, samples: int):
    """(source path, calibration, timing feeds) as bench_runtime.py builds them."""
    src = H.ensure_minilm() if name == "minilm" else H.GLASSLLM
    m = onnx.load(str(src))
    text = H.corpora.pydoc_topics_text()
    if name == "minilm":
        (out / "pydoc.txt").write_text(text)
        cal = load_calibration(out / "pydoc.txt", m, tokenizer=H.MINILM_TOKENIZER, samples=samples)
        ids = np.random.default_rng(0).integers(1000, 30000, size=(8, 128))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    else:
        ids = H.lm_eval.glassllm_token_ids(text)
        n = min(samples, ids.size // 128)
        np.savez(out / "cal.npz", input_ids=ids[: n * 128].reshape(n, 128).astype(np.int64))
        cal = load_calibration(out / "cal.npz", m, samples=samples)
        feeds = {"input_ids": np.random.default_rng(0).integers(0, 1024, size=(8, 128))}
    return src, cal, {k: v.astype(np.int64) for k, v in feeds.items()}


def variants(src: Path, out: Path, cal) -> tuple[dict[str, Path], dict[str, float], list[str]]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    paths = {"original": src, "ort dyn pt": out / "dyn_pt.onnx", "ort dyn pc": out / "dyn_pc.onnx"}
    quantize_dynamic(str(src), str(paths["ort dyn pt"]), weight_type=QuantType.QInt8)
    quantize_dynamic(str(src), str(paths["ort dyn pc"]), weight_type=QuantType.QInt8, per_channel=True)
    m = onnx.load(str(src))
    kinds = {t.name: qdq.site_kind(m, t.name) for t in m.graph.initializer}
    matmuls = [w for w, k in kinds.items() if k == "matmul"]
    tables = [t.name for t in m.graph.initializer if kinds[t.name] in ("table", "tied") and t.dims[1] % 32 == 0
              and np.prod(t.dims) >= 4096]
    big = max(tables, key=lambda w: np.prod(next(t for t in m.graph.initializer if t.name == w).dims))
    t8 = {w: IntTreatment("int8pc") for w, k in kinds.items() if k == "table"}  # the quantizer's uint8 Gather
    t4 = {w: IntTreatment("int4b", 4, 32, True, "clip") for w in tables}
    t8p4 = {**t8, **t4, **({big: IntTreatment("int8pc")} if kinds[big] == "table" else {})}
    pc = lambda meth, sq=False: {w: IntTreatment("int8pc", 8, 0, True, meth, smooth=sq) for w in matmuls}  # noqa: E731
    t0 = time.perf_counter()
    grams = weight_grams(m, matmuls + tables, cal)
    gram_s = time.perf_counter() - t0
    free, free_res = smooth_for_int8(m, cal, nodes="none")
    every, every_res = smooth_for_int8(m, cal, nodes="all")
    plans = {"hmf pc + t8": (m, {**pc("rtn"), **t8}), "hmf pc sq-free + t8": (free, {**pc("rtn"), **t8}),
             "hmf pc sq-all + t8": (every, {**pc("rtn"), **t8}), "hmf pc sq-all + t8/p4": (every, {**pc("rtn"), **t8p4}),
             "hmf pc sq + t8": (m, {**pc("rtn", True), **t8}), "hmf pc sq + t8/p4": (m, {**pc("rtn", True), **t8p4}),
             "hmf pc sq + t4": (m, {**pc("rtn", True), **t4}), "hmf pc sq gptq + t4": (m, {**pc("gptq", True), **t4}),
             "hmf pc gptq + t4": (m, {**pc("gptq"), **t4})}
    secs, notes = {}, []
    for label, (base, plan) in plans.items():
        t = time.perf_counter()
        g = grams if base is m else weight_grams(base, matmuls + tables, cal)
        model, n = apply_treatments(base, plan, calib=cal, grams=g)
        secs[label] = time.perf_counter() - t + gram_s
        paths[label] = out / (label.replace(" ", "_").replace("+", "").replace("-", "_").replace("/", "_") + ".onnx")
        onnx.save(model, str(paths[label]))
        folds = [x for x in (free_res.notes if base is free else every_res.notes if base is every else n)
                 if x.startswith("smooth ")]
        if folds and label in ("hmf pc sq-free + t8", "hmf pc sq-all + t8", "hmf pc sq + t8"):
            by = {}
            for x in folds:
                key = x.split(", ")[1] if "folded by" in x else "kept"
                by[key] = by.get(key, 0) + 1
            notes.append(f"{label}: " + ", ".join(f"{v} sites {k}" for k, v in sorted(by.items())))
        print(f"  {label}: {secs[label]:.1f} s", flush=True)
    return paths, secs, notes


def run(name: str, samples: int, rounds: int) -> str:
    out = H.OUT / "smooth" / name
    out.mkdir(parents=True, exist_ok=True)
    src, cal, feeds = setup(name, out, samples)
    paths, secs, notes = variants(src, out, cal)
    if name == "minilm":
        fid = H.minilm_fidelity(paths, H.heldout_sentences(300))
        cols, vals = ["cosine"], {k: [f"{v['mean_cosine']:.4f}"] for k, v in fid.items()}
    else:
        ppl = H.glassllm_perplexity(paths, tokens=8192)
        cols = ["ppl shakesp", "ppl kjv"]
        vals = {k: [f"{v['shakespeare']:.2f}", f"{v['kjv']:.2f}"] for k, v in ppl.items()}
    lat = H.latency(paths, feeds, threads=1, rounds=rounds, per_round=2)
    peer = "ort dyn pc"
    order = [peer] + [k for k in paths if k != peer]
    pair = dict(zip(order, latency_ratios([paths[k] for k in order], feeds, repeats=2 * rounds)))
    mem = {k: resident_memory(p, feeds) for k, p in paths.items()}
    size0 = os.path.getsize(src)
    rows = [[k, f"{os.path.getsize(p) / size0:.3f}" + ("" if k in ("original", peer) else
                                                         " ≤" if os.path.getsize(p) <= os.path.getsize(paths[peer]) else " >"), *vals[k], f"{lat[k] / lat['original']:.2f}",
             f"{pair[k]:.2f}", f"{mem[k] / 2 ** 20:.0f}" if mem[k] is not None else "-", "yes" if standard(p) else "no",
             f"{secs[k]:.1f}" if k in secs else "-"] for k, p in paths.items()]
    header = ["variant", "size", *cols, "lat 1t", "lat/pc", "mem MB", "std", "fit s"]
    return (f"### {name} ({size0 / 1e6:.2f} MB; original {lat['original'] * 1e3:.1f} ms at 1 thread on "
            f"{'×'.join(map(str, next(iter(feeds.values())).shape))} tokens)\n\n" + H.table(header, rows) + "\n\n"
            + "\n".join(notes) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,glassllm")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    for name in args.models.split(","):
        print(run(name, args.samples, args.rounds), flush=True)


if __name__ == "__main__":
    main()
