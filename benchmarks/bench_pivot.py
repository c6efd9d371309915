"""Issue 16 benchmark: pivoted low-rank storage (PIFA) against A·B, HMF and pruning, one run.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_pivot.py [--models minilm,glassllm]
        [--keeps 0.9,0.75,0.5,0.25] [--methods lmf,plmf,hmf,phmf,prune,wlmf,pwlmf,whmf,pwhmf] [--samples 64]

Per model and keep (the fraction of every weight's parameters kept, linear layers and embedding
tables alike; index maps count):

    lmf    A·B LMF (truncated SVD)                   --no-pivot
    plmf   pivoted LMF (the default storage)          (no flag)
    hmf    today's HMF (dense cols/rows + A·B rest)   --method hmf --no-pivot
    phmf   HMF with a pivoted remainder              --method hmf
    prune  magnitude pruning (dense with zeros)       --method prune
    wlmf / pwlmf   whitened LMF, A·B / pivoted        --calib pydoc --allocate uniform [--no-pivot]
    whmf / pwhmf   whitened HMF, A·B / pivoted rest   --method hmf --calib pydoc --allocate uniform [--no-pivot]

A pivoted variant whose file comes out larger than its A·B partner's (its extra nodes' names are
bytes the parameter budget does not see) is rerun at a slightly lower keep ("keep used") until it
is no larger: the pairs are compared at equal bytes. Fidelity on held-out text the tool never sees: MiniLM, sentence-embedding cosine and Spearman on
Shakespeare + KJV sentences; glassllm, perplexity on 8,192 tokens of each. Calibration: pydoc
topics (MiniLM: text + tokenizer; glassllm: 128-token windows). Latency: ORT, 1 thread, 1×128
tokens, interleaved round-robin, as a ratio to the original. Then the margins (pivoted − A·B at
the same keep), the fidelity-matched speed-up over pruning, and the speed of one BERT FFN
(384→1536→384) at the same rank as A·B, pivoted with the permutation folded, and pivoted with
the gather.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import harness as H
from bench_calib import calib_args

METHODS = {
    "lmf": ["--no-pivot"],
    "plmf": [],
    "hmf": ["--method", "hmf", "--no-pivot"],
    "phmf": ["--method", "hmf"],
    "prune": ["--method", "prune"],
    "wlmf": ["CALIB", "--allocate", "uniform", "--no-pivot"],
    "pwlmf": ["CALIB", "--allocate", "uniform"],
    "whmf": ["--method", "hmf", "CALIB", "--allocate", "uniform", "--no-pivot"],
    "pwhmf": ["--method", "hmf", "CALIB", "--allocate", "uniform"],
}
PAIRS = [("lmf", "plmf"), ("wlmf", "pwlmf"), ("hmf", "phmf"), ("whmf", "pwhmf")]
PARTNER = {b: a for a, b in PAIRS}  # pivoted method -> its A·B counterpart


def _run(src, p, keep, args) -> dict:
    r = H.optimize(src, p, "--keep", f"{keep:.5f}", "--no-verify", *args)
    r["keep"], r["bytes"] = keep, os.path.getsize(p)
    return r


def _equal_bytes(src, p, keep, args, r, target: int, compressible: int) -> dict:
    """Rerun a pivoted variant at a lower keep until its file is no larger than its A·B partner's
    (``target`` bytes): the pivoted nodes' names cost bytes that the parameter budget does not see."""
    for i in range(4):
        if r["bytes"] <= target:
            return r
        keep = r["keep"] - (r["bytes"] - target) / (4 * compressible) - 0.0005 * 2**i
        r = _run(src, p, keep, args)
    return r


def _feeds(name: str) -> dict:
    ids = np.random.default_rng(0).integers(1000 if name == "minilm" else 0, 30000 if name == "minilm" else 1024, size=(1, 128))
    ids = ids.astype(np.int64)
    if name == "minilm":
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {"input_ids": ids}


def _fidelity(name: str, paths: dict, n_sent: int) -> tuple[dict, dict, list[str]]:
    """(display columns, a higher-is-better score, column names) per variant."""
    if name == "minilm":
        fid = H.minilm_fidelity(paths, H.heldout_sentences(n_sent))
        return ({k: [f"{v['mean_cosine']:.4f}", f"{v['spearman']:.4f}"] for k, v in fid.items()},
                {k: v["mean_cosine"] for k, v in fid.items()}, ["mean cos", "spearman"])
    ppl = H.glassllm_perplexity(paths, tokens=8192)
    return ({k: [f"{v['shakespeare']:.2f}", f"{v['kjv']:.2f}"] for k, v in ppl.items()},
            {k: -(v["shakespeare"] + v["kjv"]) / 2 for k, v in ppl.items()}, ["ppl shakespeare", "ppl kjv"])


def methods_table(name: str, src, keeps: list[float], methods: list[str], samples: int, n_sent: int) -> str:
    out = H.OUT / "pivot" / name
    out.mkdir(parents=True, exist_ok=True)
    calib = calib_args(name, out, samples) if any("CALIB" in METHODS[m] for m in methods) else []
    paths, wall, ranks, used = {"original": src}, {}, {}, {}
    for keep in keeps:
        for meth in methods:
            args = [a for x in METHODS[meth] for a in (calib if x == "CALIB" else [x])]
            key = f"{meth} {keep}"
            p = out / f"{meth}_{keep}.onnx"
            r = _run(src, p, keep, args)
            partner = f"{PARTNER.get(meth)} {keep}"
            if partner in paths:  # at equal bytes
                compressible = sum(s["params_before"] for s in r["report"]["sites"] if s["status"] == "rewritten")
                r = _equal_bytes(src, p, keep, args, r, os.path.getsize(paths[partner]), compressible)
            paths[key], wall[key], used[key] = p, r["wall_s"], r["keep"]
            sites = [s for s in r["report"]["sites"] if s["status"] == "rewritten"]
            ranks[key] = sum(s.get("rank") or 0 for s in sites)
            print(f"  {key}: {r['wall_s']:.1f} s", flush=True)
    cols, score, names = _fidelity(name, paths, n_sent)
    lat = H.latency(paths, _feeds(name), threads=1, rounds=9 if name == "minilm" else 21, per_round=3 if name == "minilm" else 10)
    base = os.path.getsize(src)
    rows = [[k, f"{used[k]:.4f}" if k in used else "-", H.mb(p), f"{os.path.getsize(p) / base:.4f}",
             f"{ranks[k]:,}" if k in ranks else "-", *cols[k],
             f"{lat[k] / lat['original']:.3f}", f"{wall[k]:.1f}" if k in wall else "-"] for k, p in paths.items()]
    text = H.table(["variant", "keep used", "MB", "size", "Σ rank", *names, "latency", "tool s"], rows)
    margins = []
    for keep in keeps:
        for a, b in PAIRS:
            ka, kb = f"{a} {keep}", f"{b} {keep}"
            if ka in paths and kb in paths:
                d = score[kb] - score[ka]
                margins.append([f"{b} vs {a}", keep, f"{os.path.getsize(paths[kb]) / os.path.getsize(paths[ka]):.4f}",
                                f"{d:+.4f}" if name == "minilm" else f"{-d:+.2f}", "yes" if d > 0 else "no"])
    what = "cosine gain" if name == "minilm" else "mean ppl change"
    text += "\n\n" + H.table(["pair", "keep", "bytes ratio", what, "pivoted wins"], margins)
    text += "\n\n" + _speedup_over_prune(keeps, paths, score, lat, cols, names)
    return f"### {name} ({base / 1e6:.1f} MB)\n\n{text}\n"


def _speedup_over_prune(keeps, paths, score, lat, cols, names) -> str:
    """For each pruned model, the fastest factorized variant whose fidelity is at least as good."""
    rows = []
    for keep in keeps:
        p = f"prune {keep}"
        if p not in paths:
            continue
        good = [k for k in paths if k != "original" and not k.startswith("prune") and score[k] >= score[p]]
        if not good:
            rows.append([p, cols[p][0], "-", "-", "-"])
            continue
        best = min(good, key=lambda k: lat[k])
        rows.append([p, cols[p][0], best, cols[best][0], f"{lat[p] / lat[best]:.2f}x"])
    return H.table(["pruned", names[0], "fastest as faithful", names[0] + " ", "speed-up"], rows)


def ffn_model(d: int = 384, h: int = 1536, seed: int = 0):
    """A BERT feed-forward block (graphs.mlp_model's shape: MatMul, bias, erf-GELU, MatMul, bias)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    W1 = (rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32)
    W2 = (rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32)
    c = lambda v, n: numpy_helper.from_array(np.asarray(v, np.float32), n)  # noqa: E731
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h0"], name="ffn_in"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
        helper.make_node("Div", ["h1", "sqrt2"], ["g0"], name="gelu_div"),
        helper.make_node("Erf", ["g0"], ["g1"], name="gelu_erf"),
        helper.make_node("Add", ["g1", "one"], ["g2"], name="gelu_add"),
        helper.make_node("Mul", ["h1", "g2"], ["g3"], name="gelu_mul"),
        helper.make_node("Mul", ["g3", "half"], ["g4"], name="gelu_half"),
        helper.make_node("MatMul", ["g4", "W2"], ["y0"], name="ffn_out"),
        helper.make_node("Add", ["y0", "b2"], ["Y"], name="bias2"),
    ]
    inits = [c(W1, "W1"), c(W2, "W2"), c(rng.standard_normal(h) * 0.1, "b1"), c(rng.standard_normal(d) * 0.1, "b2"),
             c(np.sqrt(2.0), "sqrt2"), c(1.0, "one"), c(0.5, "half")]
    g = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", "s", d])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "s", d])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def speed_table(ranks=(96, 192, 288)) -> str:
    """One FFN at the same rank: A·B, pivoted with the permutation folded into W2, pivoted with the
    gather (--no-fold), all interleaved; W1 (384×1536) folds, W2's output (a graph output) always
    gathers, so the folded row has one gather and the gather row two."""
    import onnx

    out = H.OUT / "pivot" / "ffn"
    out.mkdir(parents=True, exist_ok=True)
    src = out / "ffn.onnx"
    onnx.save(ffn_model(), src)
    paths, params = {"dense": src}, {"dense": 2 * 384 * 1536}
    for r in ranks:
        for label, extra in ((f"A·B r={r}", ["--no-pivot"]), (f"pivoted folded r={r}", []),
                             (f"pivoted gather r={r}", ["--no-fold"])):
            p = out / f"{label.replace(' ', '_').replace('·', '').replace('=', '')}.onnx"
            rep = H.optimize(src, p, "--rank", r, "--no-verify", *extra)["report"]
            paths[label], params[label] = p, sum(s["params_after"] for s in rep["sites"] if s["status"] == "rewritten")
    x = np.random.default_rng(0).standard_normal((1, 128, 384)).astype(np.float32)
    lat = H.latency(paths, {"X": x}, threads=1, rounds=25, per_round=10)
    rows = [[k, f"{params[k]:,}", f"{params[k] / params['dense']:.3f}", f"{lat[k] * 1e3:.3f}", f"{lat[k] / lat['dense']:.3f}"]
            for k in paths]
    return ("### one BERT FFN (384→1536→384), 1×128 tokens, ORT 1 thread: speed at the same rank\n\n"
            + H.table(["variant", "params", "params ratio", "ms", "latency ratio"], rows) + "\n")


def plan_table(name: str, src, ratios: list[float], samples: int, n_sent: int) -> str:
    """--plan auto with pivoted treatments (the default) and without (--no-pivot: A·B only), at
    the same target ratios: the size-versus-fidelity curve, new beside old."""
    out = H.OUT / "pivot" / f"plan_{name}"
    out.mkdir(parents=True, exist_ok=True)
    calib = calib_args(name, out, samples)
    paths, reps = {"original": src}, {}
    for ratio in ratios:
        for label, extra in ((f"plan {ratio} A·B", ["--no-pivot"]), (f"plan {ratio} pivoted", [])):
            p = out / f"{label.replace(' ', '_').replace('·', '')}.onnx"
            r = H.optimize(src, p, "--plan", "auto", "--target-ratio", ratio, "--min-cosine", "0", *calib, *extra)
            paths[label], reps[label] = p, r["report"]["plan"]
            print(f"  {label}: {r['wall_s']:.1f} s", flush=True)
    cols, _, names = _fidelity(name, paths, n_sent)
    base = os.path.getsize(src)
    rows = []
    for k, p in paths.items():
        mix = "-"
        if k in reps:
            counts: dict[str, int] = {}
            for site in reps[k]["sites"]:
                kind = site["treatment"].split()[0]
                counts[kind] = counts.get(kind, 0) + 1
            mix = ", ".join(f"{v} {c}" for c, v in sorted(counts.items()))
        rows.append([k, H.mb(p), f"{os.path.getsize(p) / base:.4f}", *cols[k],
                     f"{reps[k]['heldout_fidelity']:.4f}" if k in reps else "-", mix])
    return (f"### {name}: --plan auto with and without pivoted treatments (calibrated on pydoc, {samples} samples)\n\n"
            + H.table(["variant", "MB", "size", *names, "calib fid", "treatments"], rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,glassllm")
    ap.add_argument("--keeps", default="0.9,0.75,0.5,0.25")
    ap.add_argument("--methods", default="lmf,plmf,hmf,phmf,prune,wlmf,pwlmf")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples")
    ap.add_argument("--sentences", type=int, default=300, help="held-out MiniLM sentences")
    ap.add_argument("--parts", default="methods,speed", help="methods, speed, plan (the planner curve; MiniLM ~7 min)")
    ap.add_argument("--ratios", default="0.17,0.14,0.11", help="--parts plan: target ratios")
    ap.add_argument("--plan-samples", type=int, default=256)
    args = ap.parse_args()
    t0 = time.perf_counter()
    keeps = [float(k) for k in args.keeps.split(",")]
    if "speed" in args.parts:
        print(speed_table(), flush=True)
    for name in args.models.split(","):
        if "methods" in args.parts:
            src = H.ensure_minilm() if name == "minilm" else H.GLASSLLM
            print(methods_table(name, src, keeps, args.methods.split(","), args.samples, args.sentences), flush=True)
        if "plan" in args.parts:
            src = H.ensure_minilm() if name == "minilm" else H.GLASSLLM
            print(plan_table(name, src, [float(r) for r in args.ratios.split(",")], args.plan_samples, args.sentences),
                  flush=True)
    print(f"(benchmark wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
