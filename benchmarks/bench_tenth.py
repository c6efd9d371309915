"""Issue 15: MiniLM at one tenth of its size with standard ops only; the size/fidelity curve.

    python benchmarks/bench_tenth.py [--targets 0.10,0.12,0.14] [--cli 0.10,0.12] [--compact] [--no-uniform]
                                     [--samples 512] [--rounds 9]

Calibration: ``--samples`` pydoc sentences (never the held-out text), for the API rows and the
CLI rows alike (``--calib-samples``). Fidelity: mean cosine of sentence
embeddings against the original on 300 held-out Shakespeare and 300 KJV sentences, reported
separately. Variants:

    original
    ort nbits4          onnxruntime's MatMulNBits quantizer, int4 block 32, MatMul + Gather (contrib ops)
    table pq4 only      the word table product-quantized (sub-vectors of 4, 256 centroids, int8
                        codebooks), everything else float: what the table alone costs
    int4b128s + pq4     every MatMul int4 block 128 GPTQ (s: symmetric int4, a: asymmetric uint4 with
    int4b128a + pq4     zero points), word table pq4, position table int4 b32
    int4b128a rot + pq4 the same, every MatMul asymmetric int4 block 128 of the weight rotated by a
                        128×128 block Hadamard on its input side, the input rotated at run time
    int4bBa rot s8 + pq4   the same with a 32×32 block Hadamard and the block scales stored in 8 bits
                        (B = 64, 32): what the planner's int4b64r / int4b32r are
    plan @R             planners.integer.integer_plan at R × the input's bytes, menu MENU below
    cli @R              (--cli R,...) `onnxhmf optimize --plan auto --target-ratio R --rotate --calib pydoc.txt
                        --tokenizer minilm.tokenizer.json --calib-samples SAMPLES` (run with --force: written even where its
                        own verification, on its calibration-held-out batches, is below 0.9)
    cli @R --compact-names (--compact) the same with --compact-names: short intermediate names, and
    cli @R --compact-names --float16-biases   also biases and LayerNorm vectors as float16 on disk: bytes
                        the plan spends on its weights
(--no-uniform: only the original, the peer and the plan/CLI rows.)

Columns: size (ratio to the input file), cosine on Shakespeare / KJV / both, latency at 1 thread
(median of interleaved rounds on 8×128 tokens, ratio to the original), resident memory (RSS growth
of a fresh process that loads the model and runs it 5 times), std (default-domain ops only; the
file must load in onnxruntime, which the fidelity run does).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx

import harness as H
from bench_runtime import peers, resident, standard

sys.path.insert(0, str(H.ROOT))

from onnxhmf.graph import qdq  # noqa: E402
from onnxhmf.passes.intquant import apply_treatments, parse_treatment, weight_grams  # noqa: E402
from onnxhmf.planners.integer import integer_plan  # noqa: E402

WORD, POS = "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"
MENU = ["int4b:256:a:gptq:s8", "int4b:128:a:gptq:s8", "int4b:64:a:gptq:s8", "int4b:32:a:gptq:s8", "int8b:128:s:clip",
        "int4b:256:a:gptq:rot32:s8", "int4b:128:a:gptq:rot32:s8", "int4b:64:a:gptq:rot32:s8",
        "int4b:32:a:gptq:rot32:s8", "pq:4:i8", "pq:6:i8", "pq:8:i8"]


def build(src, out, cal, targets: list[float], uniform: bool = True) -> tuple[dict, dict, list[str]]:
    m = onnx.load(str(src))
    kinds = {t.name: qdq.site_kind(m, t.name) for t in m.graph.initializer}
    weights = [w for w, k in kinds.items() if k in ("matmul", "table")
               and np.prod(next(t for t in m.graph.initializer if t.name == w).dims) >= 4096]
    matmuls = [w for w in weights if kinds[w] == "matmul"]
    t0 = time.perf_counter()
    grams = weight_grams(m, weights, cal) if uniform or targets else {}
    fitted, paths, secs, notes = {}, {}, {}, []
    pq4 = parse_treatment("pq:4:i8")
    rows = {"table pq4 only": {WORD: pq4},
               **{f"int4b128{x} + pq4": {**{w: parse_treatment(f"int4b:128:{x}:gptq") for w in matmuls}, WORD: pq4,
                                         POS: parse_treatment("int4b:32:s:clip")} for x in "sa"},
               **{f"int4b{b}a rot{' s8' * s8} + pq4": {
                   **{w: parse_treatment(f"int4b:{b}:a:gptq:rot{32 if s8 else 128}{':s8' * s8}") for w in matmuls}, WORD: pq4,
                   POS: parse_treatment("int4b:32:s:clip")} for b, s8 in ((128, False), (64, True), (32, True))}}
    for label, plan in (rows if uniform else {}).items():
        t = time.perf_counter()
        model, _ = apply_treatments(m, plan, grams=grams, fitted=fitted)
        paths[label], secs[label] = out / f"{label.replace(' ', '_').replace('+', '')}.onnx", time.perf_counter() - t
        onnx.save(model, str(paths[label]))
        print(f"  {label}: {secs[label]:.0f} s", flush=True)
    menu = [parse_treatment(x) for x in MENU]
    size0 = os.path.getsize(src)
    for r in targets:
        label = f"plan @{r:.2f}"
        t = time.perf_counter()
        model, plan, info = integer_plan(m, cal, int(r * size0), menu, grams=grams, batches=2, fitted=fitted)
        paths[label], secs[label] = out / f"plan_{r:.2f}.onnx", time.perf_counter() - t
        onnx.save(model, str(paths[label]))
        notes.append(f"{label}: " + ", ".join(f"{v} {k}" for k, v in sorted(info["counts"].items()))
                     + f", {info['dense']} dense; word table {plan[WORD].name if WORD in plan else 'dense'}; "
                     f"predicted loss {info['predicted_loss']:.4f}")
        print(f"  {label}: {secs[label]:.0f} s", flush=True)
    notes.append(f"Grams: {time.perf_counter() - t0 - sum(secs.values()):.0f} s (shared)")
    return paths, secs, notes


def cli_rows(src, out, pydoc, targets: list[float], samples: int, compact: bool = False) -> tuple[dict, dict, list[str]]:
    paths, secs, notes = {}, {}, []
    forms = ([], ["--compact-names"], ["--compact-names", "--float16-biases"]) if compact else ([],)
    for r, flags in [(r, f) for r in targets for f in forms]:
        label = " ".join([f"cli @{r:.2f}", *flags])
        p = out / f"cli_{r:.2f}{''.join(f.replace('-', '_') for f in flags)}.onnx"
        res = H.optimize(src, p, "--plan", "auto", "--target-ratio", str(r), "--calib", pydoc,
                         "--tokenizer", H.MINILM_TOKENIZER, "--rotate", "--calib-samples", str(samples), *flags)
        paths[label], secs[label] = p, res["wall_s"]
        counts = {}
        for s in res["report"]["plan"]["sites"]:
            k = s["treatment"].split()[0]
            counts[k] = counts.get(k, 0) + 1
        notes.append(f"{label}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                     + f"; its verification {'passed' if res['report']['passed'] else 'failed'}: "
                     + "; ".join(res["report"]["failures"]))
    return paths, secs, notes


def run(targets: list[float], samples: int, rounds: int, cli: list[float], compact: bool = False,
        uniform: bool = True) -> str:
    out, src, m, cal = H.minilm_setup("tenth", samples)
    feeds = H.minilm_feeds()
    np.savez(out / "feeds.npz", **feeds)
    paths = {"original": src, "ort nbits4": peers(src, out, cal, only="ort nbits4")["ort nbits4"]}
    mine, secs, notes = build(src, out, cal, targets, uniform)
    paths.update(mine)
    if cli:
        more, s2, n2 = cli_rows(src, out, out / "pydoc.txt", cli, samples, compact)
        paths.update(more), secs.update(s2), notes.extend(n2)
    sents = H.heldout_sentences(600)  # 300 Shakespeare, then 300 KJV
    embs = {k: H.embed_eval.encode(str(p), sents, str(H.MINILM_TOKENIZER)) for k, p in paths.items()}
    parts = {"shakespeare": slice(0, 300), "kjv": slice(300, 600), "both": slice(0, 600)}
    fid = {part: {k: H.embed_eval.fidelity(embs["original"][sl], e[sl]) for k, e in embs.items()} for part, sl in parts.items()}
    lat = H.latency(paths, feeds, threads=1, rounds=rounds, per_round=2)
    mem = {k: resident(p, out / "feeds.npz") for k, p in paths.items()}
    size0 = os.path.getsize(src)
    rows = [[k, f"{os.path.getsize(p) / size0:.3f}", *(f"{fid[c][k]['mean_cosine']:.4f}" for c in ("shakespeare", "kjv", "both")),
             f"{lat[k] / lat['original']:.2f}", f"{mem[k]:.0f}", "yes" if standard(p) else "no",
             f"{secs[k]:.0f}" if k in secs else "-"] for k, p in paths.items()]
    header = ["variant", "size", "cos shakesp", "cos kjv", "cos both", "lat 1t", "mem MB", "std", "fit s"]
    return (f"### minilm ({size0:,} B; original {lat['original'] * 1e3:.1f} ms at 1 thread on 8×128 tokens)\n\n"
            + H.table(header, rows) + "\n\n" + "\n".join(notes) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="0.10,0.12,0.14")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--cli", default="", help="also run `onnxhmf optimize --plan auto` at these target ratios")
    ap.add_argument("--compact", action="store_true", help="each CLI row also with --compact-names, and with --float16-biases too")
    ap.add_argument("--no-uniform", action="store_true", help="leave out the uniform rows")
    args = ap.parse_args()
    cli = [float(x) for x in args.cli.split(",") if x]
    print(run([float(x) for x in args.targets.split(",") if x], args.samples, args.rounds, cli, args.compact,
              not args.no_uniform), flush=True)


if __name__ == "__main__":
    main()
