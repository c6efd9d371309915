"""Issue 15 benchmark: integer treatments that pay at run time, against onnxruntime's quantizers.

    python benchmarks/bench_runtime.py [--models minilm,glassllm,ppocr] [--samples 512] [--rounds 9]

Calibration on Python's pydoc topics; fidelity on held-out text from other domains (MiniLM: mean
cosine of sentence embeddings on Shakespeare + KJV sentences; glassllm: perplexity on Shakespeare
and KJV tokens). The third model, ``ppocr``, is PP-OCRv4's text-line recognizer (an SVTR
encoder: conv stem, two transformer blocks, CTC head; models/build_ppocr.py, ``pip install
--no-deps rapidocr-onnxruntime==1.4.4 pillow``): calibrated on 32 rendered Shakespeare lines,
measured on 200 rendered KJV lines (benchmarks/ocr_eval.py: agreement with the original's
reading, 1 − edit distance / length; lines read exactly alike; CER against the text).
Peers (onnxruntime 1.32):

    ort dyn pt        quantize_dynamic int8, per tensor (MatMulInteger; Gather + DQ)
    ort dyn pc        quantize_dynamic int8, per_channel=True
    ort static qdq    quantize_static QDQ int8 per channel (MinMax on the calibration batches)
    ort nbits4        matmul_nbits_quantizer int4 block 32 symmetric, MatMul + Gather (contrib
                      MatMulNBits / GatherBlockQuantized)
    ort nbits4 qdq    the same quantizer in QDQ form (DQ(int4, block 32) → MatMul, opset 21)

onnxhmf treatments (passes/intquant.py, every weight, tables included unless said):

    hmf int4 rtn / clip / gptq   blocked int4 (block 32, symmetric) DQ → MatMul, tables as gathered
                                 int4 rows; scales by round-to-nearest, Gram clip search, GPTQ
    hmf int8b128                 blocked int8, block 128 (DQ → MatMul, MatMulNBits 8-bit)
    hmf lqer                     int4 block 32 + rank-32 blocked-int8 residual L·R (matmuls), GPTQ Q
    hmf pc gptq + t4             per-channel MatMulInteger with GPTQ-refitted integers, tables int4
                                 (block 32, clip; gathered rows, opset unchanged)
    hmf plan @nbits4             planners.integer.integer_plan at the file size of "ort nbits4": per weight
                                 int4 b32 GPTQ, int8 b128 or int4 b128 (or dense), one knapsack over
                                 measured losses
    cli int8                     `onnxhmf optimize --quantize int8` (tied tables: shared int8 rows and a
                                 MatMulInteger head)
    cli int8pc smooth [t4]       `--quantize int8pc --smooth all --calib <pydoc>` [`--table-bits 4`]
    cli default [ort kernels]    the default planner (fidelity 0.99) on the same --calib [with
                                 `--kernels onnxruntime`: MatMulNBits written out, not std]
    cli plan @P                  `onnxhmf optimize --plan auto --target-size <P's bytes>
                                 --max-latency-ratio <1.05 × P's 1-thread latency ratio, measured first>
                                 --max-memory <1.05 × P's resident MiB, median of 3 processes, first>
                                 --inputs <the benchmark's feeds> --calib <pydoc>`, for the peers P of
                                 ``--plans`` (default: dyn pt, dyn pc);
                                 a contrib-op peer also gets the row with `--kernels onnxruntime`
    cli file NAME                `onnxhmf optimize --plan-file benchmarks/plans/<model>_NAME.json`
                                 for every plan file there (glassllm_int8_w2w: int8 everywhere but
                                 blocks.0.ffn.w2, weight-only int8: a plan the planner does not make)

glassllm's fidelity is also given as the mean KL(original ‖ variant) per token, in nats
(lm_eval.kl_to_reference): perplexity moves by ±0.5 either way under changes whose KL differs 5×.

Columns: size (ratio to the original file), fidelity, latency at 1 and 2 threads (ratio to the
original, interleaved), resident memory (RSS growth of a fresh process that loads the model and
runs it 5 times, MB), std (only default-domain ops in the file), and the tool's fit time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
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
from onnxhmf.planners.integer import integer_plan  # noqa: E402
from onnxhmf.runtime import STEADY_MALLOC  # noqa: E402

_RSS = r"""
import sys, numpy as np, onnxruntime as ort
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024
feeds = dict(np.load(sys.argv[2]))
base = rss()
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])
for _ in range(5):
    s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})
print(rss() - base)
"""


FIXED_MMAP = STEADY_MALLOC  # glibc with a fixed mmap threshold (onnxhmf.runtime.STEADY_MALLOC)


def resident(path: Path, feeds_npz: Path, env: dict | None = None) -> float:
    """MiB of resident growth of a fresh process that loads ``path`` and runs it five times
    (``env``: extra environment, e.g. FIXED_MMAP)."""
    p = subprocess.run([sys.executable, "-c", _RSS, str(path), str(feeds_npz)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return float(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else float("nan")


def standard(path: Path) -> bool:
    m = onnx.load(str(path), load_external_data=False)
    return all(n.domain in ("", "ai.onnx") for n in m.graph.node)


def peers(src: Path, out: Path, cal, only: str | None = None) -> dict[str, Path]:
    """onnxruntime's quantizers on ``src`` (``only``: just that one)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    p = {"ort dyn pt": out / "dyn_pt.onnx", "ort dyn pc": out / "dyn_pc.onnx", "ort static qdq": out / "static.onnx",
         "ort nbits4": out / "nbits4.onnx", "ort nbits4 qdq": out / "nbits4_qdq.onnx"}
    if only is not None:
        p = {only: p[only]}
    if "ort dyn pt" in p:
        quantize_dynamic(str(src), str(p["ort dyn pt"]), weight_type=QuantType.QInt8)
    if "ort dyn pc" in p:
        quantize_dynamic(str(src), str(p["ort dyn pc"]), weight_type=QuantType.QInt8, per_channel=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(cal.batches[:16])

        def get_next(self):
            return next(self.it, None)

    if "ort static qdq" in p:
        static_src = src
        if qdq.default_opset(onnx.load(str(src), load_external_data=False)) < 13:
            # per-channel DequantizeLinear (axis) needs opset 13; the quantizer does not convert (PP-OCR: 12)
            from onnx import version_converter

            static_src = out / "src_opset13.onnx"
            onnx.save(version_converter.convert_version(onnx.load(str(src)), 13), str(static_src))
        quantize_static(str(static_src), str(p["ort static qdq"]), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    # the nbits quantizer raises the opset to 21 without converting older ops (glassllm's ReduceMean
    # axes attribute makes its output invalid): give it the input already at opset 21 (exactly equal)
    src21 = onnx.load(str(src))
    qdq.upgrade_opset(src21)
    for key, fmt in (("ort nbits4", QuantFormat.QOperator), ("ort nbits4 qdq", QuantFormat.QDQ)):
        if key not in p:
            continue
        cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, quant_format=fmt,
                                           op_types_to_quantize=("MatMul", "Gather") if fmt == QuantFormat.QOperator
                                           else ("MatMul",))
        fresh = onnx.ModelProto()
        fresh.CopyFrom(src21)  # the quantizer edits its input in place
        q = MatMulNBitsQuantizer(fresh, block_size=32, is_symmetric=True, quant_format=fmt,
                                 op_types_to_quantize=cfg.op_types_to_quantize, algo_config=cfg)
        q.process()
        q.model.save_model_to_file(str(p[key]), False)
    return p


def ours(src: Path, out: Path, cal, tables: list[str], matmuls: list[str],
         targets: dict[str, int]) -> tuple[dict[str, Path], dict[str, float], list[str]]:
    m = onnx.load(str(src))
    t0 = time.perf_counter()
    grams = weight_grams(m, matmuls + tables, cal)
    gram_s = time.perf_counter() - t0
    i4 = lambda meth: IntTreatment("int4b", 4, 32, True, meth)  # noqa: E731
    plans = {
        "hmf int4 rtn": {w: i4("rtn") for w in matmuls + tables},
        "hmf int4 clip": {w: i4("clip") for w in matmuls + tables},
        "hmf int4 gptq": {w: i4("gptq") for w in matmuls + tables},
        "hmf int8b128": {w: IntTreatment("int8b", 8, 128, True, "clip") for w in matmuls + tables},
        "hmf lqer": {**{w: IntTreatment("lqer", 4, 32, True, "gptq", 32) for w in matmuls},
                     **{w: i4("clip") for w in tables}},
        "hmf pc gptq + t4": {**{w: IntTreatment("int8pc", 8, 0, True, "gptq") for w in matmuls},
                             **{w: i4("clip") for w in tables}},
    }
    paths, secs = {}, {}
    for label, plan in plans.items():
        t = time.perf_counter()
        model, notes = apply_treatments(m, plan, grams=grams)
        secs[label] = time.perf_counter() - t + gram_s
        paths[label] = out / (label.replace(" ", "_").replace("+", "") + ".onnx")
        onnx.save(model, str(paths[label]))
        skipped = [n for n in notes if "skip" in n]
        print(f"  {label}: {secs[label]:.1f} s{'; ' + '; '.join(skipped) if skipped else ''}", flush=True)
    menu = [i4("gptq"), IntTreatment("int8b", 8, 128, True, "clip"), IntTreatment("int4b", 4, 128, True, "clip")]
    mixes = []
    for label, target in targets.items():
        t = time.perf_counter()
        model, plan, info = integer_plan(m, cal, target, menu, grams=grams, batches=1)
        secs[label] = time.perf_counter() - t + gram_s
        paths[label] = out / (label.replace(" ", "_").replace("@", "at_") + ".onnx")
        onnx.save(model, str(paths[label]))
        mixes.append(f"{label}: " + ", ".join(f"{v} {k}" for k, v in sorted(info["counts"].items())) +
                     f", {info['dense']} dense; predicted loss {info['predicted_loss']:.4f}")
        print(f"  {label}: {secs[label]:.1f} s", flush=True)
    return paths, secs, mixes


def cli_plans(name: str, src: Path, out: Path, calib: list[str], peers: dict[str, Path],
              lat: dict[str, float], mem: dict[str, float], reuse: bool = False) -> tuple[dict, dict]:
    """The tool's own runs: --quantize int8, the default planner (standard ops, and with
    --kernels onnxruntime), and --plan auto at each peer's size, latency and resident memory
    (``mem``, MiB), measured on the benchmark's own inputs (``calib``: the --calib/--tokenizer
    arguments)."""
    paths, secs = {}, {}
    runs = {"cli int8": ["--quantize", "int8", "--no-measure"],
            "cli int8pc smooth": ["--quantize", "int8pc", "--smooth", "all", "--no-measure", *calib],
            "cli int8pc smooth t4": ["--quantize", "int8pc", "--smooth", "all", "--table-bits", "4", "--no-measure", *calib],
            "cli default": ["--no-measure", *calib],
            "cli default ort kernels": ["--kernels", "onnxruntime", "--no-measure", *calib]}
    for k, p in peers.items():
        runs[f"cli plan @{k.removeprefix('ort ')}"] = [
            "--plan", "auto", "--target-size", str(os.path.getsize(p)), "--max-latency-ratio",
            f"{1.05 * lat[k] / lat['original']:.3f}", "--max-memory", f"{1.05 * mem[k]:.1f}MiB",
            "--inputs", str(out / "feeds.npz"), "--no-measure", *calib]
        if not standard(p):  # a contrib-op peer: also the plan written with onnxruntime's kernels
            runs[f"cli plan @{k.removeprefix('ort ')} ort kernels"] = [
                *runs[f"cli plan @{k.removeprefix('ort ')}"], "--kernels", "onnxruntime"]
    for f in sorted((ROOT / "benchmarks" / "plans").glob(f"{name}_*.json")):
        runs[f"cli file {f.stem.removeprefix(name + '_')}"] = ["--plan-file", str(f), "--no-measure", *calib]
    for label, args in runs.items():
        dst = out / (label.replace(" ", "_").replace("@", "at_") + ".onnx")
        report = dst.with_suffix(".report.json")
        if reuse and dst.exists() and report.exists():  # --reuse: an earlier run's output and its time
            paths[label], secs[label] = dst, json.loads(report.read_text())["timings"]["total_s"]
            print(f"  {label}: reused ({secs[label]:.1f} s then)", flush=True)
            continue
        try:
            r = H.optimize(src, dst, *args)
        except RuntimeError as e:  # the tool refused (e.g. a peer smaller than any plan): no row
            print(f"  {label}: {[l for l in str(e).splitlines() if l.startswith('onnxhmf:')][:1]}", flush=True)
            continue
        if r["exit"] != 0 or not dst.exists():
            print(f"  {label}: exit {r['exit']}", flush=True)
            continue
        paths[label], secs[label] = dst, r["wall_s"]
        print(f"  {label}: {r['wall_s']:.1f} s", flush=True)
    return paths, secs


def run(name: str, samples: int, rounds: int, plan_peers: list[str], reuse: bool = False) -> str:
    out = H.OUT / "runtime" / name
    out.mkdir(parents=True, exist_ok=True)
    src = {"minilm": H.ensure_minilm, "ppocr": H.ensure_ppocr}.get(name, lambda: H.GLASSLLM)()
    m = onnx.load(str(src))
    text = H.corpora.pydoc_topics_text()
    if name == "ppocr":  # calibrated on Shakespeare's lines, measured on KJV's
        import ocr_eval

        ocr_eval.calibration(out / "cal.npz", ocr_eval.lines(H.corpora.shakespeare_text(), 32, seed=1))
        cal = load_calibration(out / "cal.npz", m, samples=samples)
        feeds = {"x": ocr_eval.ppocr.render(ocr_eval.lines(text, 8, seed=3), ocr_eval.WIDTH)}
    elif name == "minilm":
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
    feeds = {k: v.astype(np.float32 if v.dtype.kind == "f" else np.int64) for k, v in feeds.items()}
    np.savez(out / "feeds.npz", **feeds)
    kinds = {t.name: qdq.site_kind(m, t.name) for t in m.graph.initializer}
    matmuls = [w for w, k in kinds.items() if k == "matmul"]
    tables = [w for w, k in kinds.items() if k in ("table", "tied") and
              next(t for t in m.graph.initializer if t.name == w).dims[1] % 32 == 0 and
              np.prod(next(t for t in m.graph.initializer if t.name == w).dims) >= 4096]
    paths = {"original": src, **peers(src, out, cal)}
    mine, secs, mixes = ours(src, out, cal, tables, matmuls, {"hmf plan @nbits4": os.path.getsize(paths["ort nbits4"])})
    paths.update(mine)
    if plan_peers:
        chosen = {k: paths[k] for k in plan_peers}
        first = H.latency({"original": src, **chosen}, feeds, threads=1, rounds=rounds, per_round=2)
        first_mem = {k: float(np.median([resident(p, out / "feeds.npz") for _ in range(3)])) for k, p in chosen.items()}
        calib = ["--calib", str(out / "pydoc.txt"), "--tokenizer", str(H.MINILM_TOKENIZER)] if name == "minilm" \
            else ["--calib", str(out / "cal.npz")]
        cli, cli_s = cli_plans(name, src, out, calib, chosen, first, first_mem, reuse)
        paths.update(cli)
        secs.update(cli_s)
    if name == "ppocr":
        import ocr_eval

        fid = ocr_eval.fidelity(paths, ocr_eval.lines(H.corpora.kjv_text(), 200, seed=2))
        cols = ["agree", "exact", "CER"]
        vals = {k: [f"{v['agree']:.4f}", f"{v['exact']:.3f}", f"{v['cer']:.4f}"] for k, v in fid.items()}
    elif name == "minilm":
        fid = H.minilm_fidelity(paths, H.heldout_sentences(300))
        cols = ["cosine"]
        vals = {k: [f"{v['mean_cosine']:.4f}"] for k, v in fid.items()}
    else:
        ppl = H.glassllm_perplexity(paths, tokens=8192)
        kl = H.glassllm_kl(paths, tokens=8192)
        cols = ["ppl shakesp", "ppl kjv", "KL shakesp", "KL kjv"]
        vals = {k: [f"{v['shakespeare']:.2f}", f"{v['kjv']:.2f}", f"{kl[k]['shakespeare']:.5f}", f"{kl[k]['kjv']:.5f}"]
                for k, v in ppl.items()}
    lat1 = H.latency(paths, feeds, threads=1, rounds=rounds, per_round=2)
    lat2 = H.latency(paths, feeds, threads=2, rounds=rounds, per_round=2)
    mem = {k: resident(p, out / "feeds.npz") for k, p in paths.items()}
    size0 = os.path.getsize(src)
    rows = []
    for k, p in paths.items():
        rows.append([k, f"{os.path.getsize(p) / size0:.3f}", *vals[k], f"{lat1[k] / lat1['original']:.2f}",
                     f"{lat2[k] / lat2['original']:.2f}", f"{mem[k]:.0f}", "yes" if standard(p) else "no",
                     f"{secs[k]:.1f}" if k in secs else "-"])
    header = ["variant", "size", *cols, "lat 1t", "lat 2t", "mem MB", "std", "fit s"]
    shape = "×".join(str(d) for d in next(iter(feeds.values())).shape)
    return (f"### {name} ({size0 / 1e6:.2f} MB; original latency {lat1['original'] * 1e3:.1f} ms at 1 thread, "
            f"{lat2['original'] * 1e3:.1f} ms at 2, on {shape} tokens)\n\n" + H.table(header, rows) + "\n\n"
            + "\n".join(mixes) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,glassllm")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--plans", default="ort dyn pt,ort dyn pc",
                    help="peers to run `--plan auto` at (their size and latency); '' for none")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the CLI rows' outputs of an earlier run (their fit time is that run's)")
    args = ap.parse_args()
    for name in args.models.split(","):
        print(run(name, args.samples, args.rounds, [p for p in args.plans.split(",") if p], args.reuse), flush=True)


if __name__ == "__main__":
    main()
