"""Issue 15: per-token activation scales for the int8 MatMulIntegers against onnxruntime's dynamic int8.

    python benchmarks/bench_pertoken.py [--models glassllm,minilm] [--rounds 15] [--mem 3]

onnxruntime's dynamic int8 (and `onnxhmf --quantize int8`) quantizes each MatMul's input with one
scale for the whole tensor (DynamicQuantizeLinear). `--activations per-token` gives every row
(token) its own scale in standard ops (graph/pertoken.py). Rows, one run, latency interleaved at
one thread on 8×128 tokens:

    original, ort dyn pt, ort dyn pc      the input and onnxruntime's quantize_dynamic
    cli int8 [pt|auto]                    onnxhmf optimize --quantize int8 [--activations per-token|auto]
    cli int8pc [smooth] [pt|auto]         --quantize int8pc (glassllm) / int8pc --smooth all --calib (MiniLM)
    ... int8w | uint8w                    --int8-weights int8 | uint8 (glassllm; without: auto)

auto chooses its sites on the calibration data: pydoc (glassllm: 256 × 128 tokens of it).

Fidelity: glassllm, mean KL(original ‖ variant) per token on 8,192 Shakespeare and KJV tokens and
KJV perplexity; MiniLM, mean cosine of sentence embeddings on 300 + 300 held-out Shakespeare and
KJV sentences (calibration: pydoc). mem: resident growth of a fresh process that loads the model
and runs it 5 times, the range over ``--mem`` processes.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import harness as H
from bench_runtime import peers, resident, standard

sys.path.insert(0, str(H.ROOT))


def variants(name: str, src, out) -> dict[str, list[str]]:
    if name == "glassllm":
        cal = ["--calib", str(out / "cal.npz")]
        return {"cli int8": ["--quantize", "int8"], "cli int8 int8w": ["--quantize", "int8", "--int8-weights", "int8"],
                "cli int8 uint8w": ["--quantize", "int8", "--int8-weights", "uint8"],
                "cli int8 pt": ["--quantize", "int8", "--activations", "per-token"],
                "cli int8 auto": ["--quantize", "int8", "--activations", "auto", *cal],
                "cli int8 auto int8w": ["--quantize", "int8", "--activations", "auto", *cal, "--int8-weights", "int8"],
                "cli int8 auto uint8w": ["--quantize", "int8", "--activations", "auto", *cal, "--int8-weights", "uint8"],
                "cli int8pc pt": ["--quantize", "int8pc", "--activations", "per-token"],
                "cli int8pc auto": ["--quantize", "int8pc", "--activations", "auto", *cal]}
    pc = ["--quantize", "int8pc", "--smooth", "all", "--calib", str(out / "pydoc.txt"), "--tokenizer", str(H.MINILM_TOKENIZER)]
    return {"cli int8": ["--quantize", "int8"], "cli int8 pt": ["--quantize", "int8", "--activations", "per-token"],
            "cli int8 auto": ["--quantize", "int8", "--activations", "auto", *pc[4:]],
            "cli int8pc smooth": pc, "cli int8pc smooth pt": pc + ["--activations", "per-token"],
            "cli int8pc smooth auto": pc + ["--activations", "auto"]}


def run(name: str, rounds: int, mem: int) -> str:
    out = H.OUT / "pertoken" / name
    out.mkdir(parents=True, exist_ok=True)
    src = H.GLASSLLM if name == "glassllm" else H.ensure_minilm()
    if name == "minilm":
        (out / "pydoc.txt").write_text(H.corpora.pydoc_topics_text())
        ids = np.random.default_rng(0).integers(1000, 30000, size=(8, 128))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    else:
        ids = H.lm_eval.glassllm_token_ids(H.corpora.pydoc_topics_text())  # calibration: pydoc, never the held-out text
        n = min(256, ids.size // 128)
        np.savez(out / "cal.npz", input_ids=ids[: n * 128].reshape(n, 128).astype(np.int64))
        feeds = {"input_ids": np.random.default_rng(0).integers(0, 1024, size=(8, 128))}
    feeds = {k: v.astype(np.int64) for k, v in feeds.items()}
    np.savez(out / "feeds.npz", **feeds)
    paths = {"original": src}
    both = peers(src, out, None, only="ort dyn pt")
    both.update(peers(src, out, None, only="ort dyn pc"))
    paths.update(both)
    secs = {}
    for label, args in variants(name, src, out).items():
        p = out / f"{label.replace(' ', '_')}.onnx"
        res = H.optimize(src, p, *args)
        paths[label], secs[label] = p, res["wall_s"]
    if name == "glassllm":
        kl = H.glassllm_kl(paths, tokens=8192)
        ppl = H.glassllm_perplexity(paths, tokens=8192)
        fid = {k: [f"{kl[k]['shakespeare']:.5f}", f"{kl[k]['kjv']:.5f}", f"{ppl[k]['kjv']:.2f}"] for k in paths}
        head = ["KL shakesp", "KL kjv", "ppl kjv"]
    else:
        sents = H.heldout_sentences(600)
        embs = {k: H.embed_eval.encode(str(p), sents, str(H.MINILM_TOKENIZER)) for k, p in paths.items()}
        fid = {k: [f"{H.embed_eval.fidelity(embs['original'][sl], e[sl])['mean_cosine']:.4f}"
                   for sl in (slice(0, 300), slice(300, 600), slice(0, 600))] for k, e in embs.items()}
        head = ["cos shakesp", "cos kjv", "cos both"]
    lat = H.latency(paths, feeds, threads=1, rounds=rounds, per_round=2)
    rss = {k: [] for k in paths}
    for _ in range(mem):  # processes interleaved across the variants too
        for k, p in paths.items():
            rss[k].append(resident(p, out / "feeds.npz"))
    size0 = os.path.getsize(src)
    rows = [[k, f"{os.path.getsize(p) / size0:.3f}", *fid[k], f"{lat[k] / lat['original']:.2f}",
             f"{min(rss[k]):.1f}–{max(rss[k]):.1f}", "yes" if standard(p) else "no", f"{secs[k]:.0f}" if k in secs else "-"]
            for k, p in paths.items()]
    header = ["variant", "size", *head, "lat 1t", "mem MB", "std", "fit s"]
    return (f"### {name} ({size0:,} B; original {lat['original'] * 1e3:.1f} ms at 1 thread on 8×128 tokens)\n\n"
            + H.table(header, rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="glassllm,minilm")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--mem", type=int, default=3)
    args = ap.parse_args()
    for name in args.models.split(","):
        print(run(name, args.rounds, args.mem), flush=True)


if __name__ == "__main__":
    main()
