"""Issue 6 benchmark: tool wall time and peak RSS on a synthetic ~3 GB model with external data.

    python benchmarks/bench_bigmodel.py [--layers 14] [--rank 256] [--workdir DIR] [--skip-minilm]

Generates (and deletes afterwards) a transformer-shaped float32 model: a 32000×2048 embedding
table (Gather, tied to the LM head through Transpose), then per layer Q/K/V/O (2048×2048) and
up/down (2048×8192, 8192×2048) MatMuls with LayerNormalization. Every weight is low rank plus
noise (W = U·diag(s)·V + 0.02·N/√n, s decaying), so the SVD is meaningful. The data file is
written chunk by chunk: generating it never holds more than one 64-row block.

Then runs ``onnxhmf optimize`` on it in a fresh process (harness.run_tool: wall time and VmHWM)
with and without verification, and the same for MiniLM, and prints peak RSS as a ratio of
the model's size on disk. A last table measures what a bare onnxruntime session costs on
the big model (create + one run), with and without ORT's weight pre-packing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

import harness as H

HIDDEN, FFN, VOCAB = 2048, 8192, 32000


def _external(name: str, dims, location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _write_weight(f, m: int, n: int, rng: np.random.Generator, rank: int = 96) -> tuple[int, int]:
    """Append an m×n low-rank-plus-noise float32 matrix to ``f`` at a 64 KiB boundary, 64 rows at a time."""
    pad = -f.tell() % 65536
    f.write(b"\0" * pad)
    offset = f.tell()
    s = np.exp(-np.arange(rank) / (rank / 4)).astype(np.float32)
    V = (rng.standard_normal((rank, n), dtype=np.float32) * s[:, None]) / np.sqrt(n)
    for i in range(0, m, 64):
        rows = min(64, m - i)
        U = rng.standard_normal((rows, rank), dtype=np.float32)
        block = U @ V + rng.standard_normal((rows, n), dtype=np.float32) * (0.02 / np.sqrt(n))
        f.write(block.astype("<f4").tobytes())
    return offset, m * n * 4


def generate(folder: Path, layers: int, seed: int = 0) -> Path:
    """Write folder/big.onnx + folder/big.onnx.data; returns the model path."""
    rng = np.random.default_rng(seed)
    loc = "big.onnx.data"
    inits, nodes = [], []
    with open(folder / loc, "wb") as f:
        def weight(name, m, n):
            off, length = _write_weight(f, m, n, rng)
            inits.append(_external(name, [m, n], loc, off, length))
            return name

        emb = weight("embed.weight", VOCAB, HIDDEN)
        nodes.append(helper.make_node("Gather", [emb, "input_ids"], ["h0"], name="embed"))
        h = "h0"
        for i in range(layers):
            p = f"layer{i}"
            for nm in ("ln1", "ln2"):
                inits.append(helper.make_tensor(f"{p}.{nm}.g", TensorProto.FLOAT, [HIDDEN], np.ones(HIDDEN, np.float32)))
                inits.append(helper.make_tensor(f"{p}.{nm}.b", TensorProto.FLOAT, [HIDDEN], np.zeros(HIDDEN, np.float32)))
            nodes.append(helper.make_node("LayerNormalization", [h, f"{p}.ln1.g", f"{p}.ln1.b"], [f"{p}.x"], name=f"{p}/ln1", axis=-1))
            qkv = []
            for w in ("q", "k", "v"):
                nodes.append(helper.make_node("MatMul", [f"{p}.x", weight(f"{p}.attn.{w}.weight", HIDDEN, HIDDEN)], [f"{p}.{w}"], name=f"{p}/{w}_proj"))
                qkv.append(f"{p}.{w}")
            # attention-shaped mixing without the softmax over positions: (q ⊙ k) + v, enough for shape and numerics
            nodes.append(helper.make_node("Mul", qkv[:2], [f"{p}.qk"], name=f"{p}/qk"))
            nodes.append(helper.make_node("Add", [f"{p}.qk", qkv[2]], [f"{p}.a"], name=f"{p}/mix"))
            nodes.append(helper.make_node("MatMul", [f"{p}.a", weight(f"{p}.attn.o.weight", HIDDEN, HIDDEN)], [f"{p}.o"], name=f"{p}/o_proj"))
            nodes.append(helper.make_node("Add", [h, f"{p}.o"], [f"{p}.r1"], name=f"{p}/res1"))
            nodes.append(helper.make_node("LayerNormalization", [f"{p}.r1", f"{p}.ln2.g", f"{p}.ln2.b"], [f"{p}.y"], name=f"{p}/ln2", axis=-1))
            nodes.append(helper.make_node("MatMul", [f"{p}.y", weight(f"{p}.mlp.up.weight", HIDDEN, FFN)], [f"{p}.u"], name=f"{p}/up"))
            nodes.append(helper.make_node("Relu", [f"{p}.u"], [f"{p}.ur"], name=f"{p}/act"))
            nodes.append(helper.make_node("MatMul", [f"{p}.ur", weight(f"{p}.mlp.down.weight", FFN, HIDDEN)], [f"{p}.d"], name=f"{p}/down"))
            nodes.append(helper.make_node("Add", [f"{p}.r1", f"{p}.d"], [f"{p}.out"], name=f"{p}/res2"))
            h = f"{p}.out"
        nodes.append(helper.make_node("Transpose", [emb], ["embed.T"], name="lm_head/T", perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", [h, "embed.T"], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        nodes, "synthetic_big",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "big.onnx"
    onnx.save(model, path)
    return path


_ORT = (
    "import sys, time, numpy as np, onnxruntime as ort; t = time.perf_counter(); so = ort.SessionOptions(); "
    "so.add_session_config_entry('session.disable_prepacking', sys.argv[2]); "
    "s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider']); "
    "s.run(None, {'input_ids': np.zeros((1, 16), np.int64)}); "
    "hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')); "
    "print('@@', time.perf_counter() - t, hwm)"
)


def ort_alone(path: Path, disable_prepacking: bool) -> tuple[float, float]:
    p = subprocess.run([sys.executable, "-c", _ORT, str(path), "1" if disable_prepacking else "0"], capture_output=True, text=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith("@@")), None)
    if line is None:
        raise RuntimeError(p.stderr[-2000:])
    _, wall, kb = line.split()
    return float(wall), int(kb) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--rank", type=int, default=256, help="fixed LMF rank (randomized SVD path)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate the model (deleted afterwards)")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--variants", default="verify,no-verify", help="comma list of verify, no-verify")
    ap.add_argument("--blas-threads", default="1",
                    help="OPENBLAS_NUM_THREADS for the tool (on a loaded 2-core machine, 2 threads made each QR ~25x slower)")
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", args.blas_threads)

    need = (args.layers * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN) + VOCAB * HIDDEN) * 4
    work = Path(tempfile.mkdtemp(prefix="onnxhmf-big-", dir=args.workdir))
    free = shutil.disk_usage(work).free
    if free < 2.5 * need:
        shutil.rmtree(work)
        sys.exit(f"need about {2.5 * need / 1e9:.1f} GB free in {work.parent}, have {free / 1e9:.1f} GB")
    rows = []
    try:
        t = time.perf_counter()
        src = generate(work, args.layers)
        gen_s = time.perf_counter() - t
        size = src.stat().st_size + (work / "big.onnx.data").stat().st_size
        print(f"generated {size / 1e9:.2f} GB ({args.layers} layers) in {gen_s:.0f} s under {work}", flush=True)
        common = ["--rank", str(args.rank), "--input-shapes", "input_ids:1,16", "--min-cosine", "0.5"]
        variants = [v for v in [("verify (ORT ref + candidate)", []), ("--no-verify", ["--no-verify"])]
                    if ("no-verify" if v[1] else "verify") in args.variants.split(",")]
        for label, extra in variants:
            out = work / "out.onnx"
            r = H.run_tool(["optimize", src, out, "--force", "-q", *common, *extra])
            out_size = out.stat().st_size + sum(p.stat().st_size for p in work.glob("out.onnx.data"))
            rows.append([f"synthetic {args.layers}L", label, f"{size / 1e6:.0f}", f"{out_size / 1e6:.0f}", f"{r['wall_s']:.0f}",
                         f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] * 2**20 / size:.2f}", r["exit"]])
            print(rows[-1], flush=True)
            for p in work.glob("out.onnx*"):
                p.unlink()
        ort_rows = []
        for flag in (False, True):
            wall, rss = ort_alone(src, flag)
            ort_rows.append([f"disable_prepacking={int(flag)}", f"{wall:.1f}", f"{rss:.0f}", f"{rss * 2**20 / size:.2f}"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.skip_minilm:
        src = H.ensure_minilm()
        size = src.stat().st_size
        tmp = Path(tempfile.mkdtemp(prefix="onnxhmf-minilm-"))
        try:
            for label, extra in [("verify (ORT ref + candidate)", []), ("--no-verify", ["--no-verify"]),
                                 ("--save-external-data", ["--save-external-data"])]:
                out = tmp / "out.onnx"
                r = H.run_tool(["optimize", src, out, "--force", "-q", *extra])
                out_size = sum(p.stat().st_size for p in tmp.glob("out.onnx*"))
                rows.append(["MiniLM-L6", label, f"{size / 1e6:.0f}", f"{out_size / 1e6:.0f}", f"{r['wall_s']:.1f}",
                             f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] * 2**20 / size:.2f}", r["exit"]])
                for p in tmp.glob("out.onnx*"):
                    p.unlink()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"onnxhmf optimize (--rank {args.rank} on the synthetic model, default --keep 0.75 on MiniLM); fresh process each; "
          f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    print(H.table(["model", "variant", "in MB", "out MB", "wall s", "peak RSS MiB", "RSS / model size", "exit"], rows))
    print()
    print("bare onnxruntime session on the synthetic model (create + one run of 1×16 tokens)")
    print(H.table(["session option", "wall s", "peak RSS MiB", "RSS / model size"], ort_rows))


if __name__ == "__main__":
    main()
