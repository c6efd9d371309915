"""Recurrent models: size, fidelity and latency of onnxhmf's recurrent treatments against int8.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_recurrent.py [--quick]

Models (built into models/cache/ when missing, see models/build_g2p.py and build_lstm_lm.py):

* g2p: g2p-en's real GRU seq2seq (encoder = ONNX GRU op, greedy decoder unrolled as Gemms).
  Fidelity on 2000 distinct Shakespeare words: exact-match rate of the decoded phoneme
  sequences against g2p-en's own numpy ``predict``, and phoneme error rate (edit distance /
  reference length). Calibration: words of Python's pydoc topics (another text).
* g2p_bi: the same with the encoder as a bidirectional GRU op (reverse = copy of forward).
* lstm_lm: a char LSTM LM (LSTM op) trained on Shakespeare; fidelity = per-character
  perplexity on held-out Shakespeare and on KJV. Calibration: Shakespeare training text.
* lstm_lm_unrolled: the same weights, the cell unrolled over 64 steps as MatMuls.

Variants: the original; onnxruntime ``quantize_dynamic`` int8 (per-tensor and per-channel; it
turns LSTM into the contrib DynamicQuantizeLSTM and has no GRU handler, so GRU stays float);
onnxhmf with ``--include`` on the recurrent W only (LMF, HMF, whitened LMF with calibration) at
keep 0.5 and 0.25; with ``--lower-recurrent`` (dense, so the lowering's own cost shows; LMF and
HMF of W and R); for the unrolled model, LMF/HMF of its W/R MatMuls. Latency: onnxruntime
CPU, one thread, round-robin over the variants of a model, 200 rounds: p50 and min per
variant, the median over rounds of (variant time / original time in the same round), and the
ratio of the minima (the machine is shared; the two ratios bound the noise).
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "models" / "cache"
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from seqmetrics import edit_distance  # noqa: E402

import corpora  # noqa: E402
import onnxhmf  # noqa: E402
from onnxhmf.calibration import Calibration  # noqa: E402


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "models" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


G2P = _script("build_g2p")
LM = _script("build_lstm_lm")


def ensure(name: str) -> Path:
    p = CACHE / f"{name}.onnx"
    if not p.is_file():
        if name.startswith("g2p"):
            G2P.build_g2p(p, bidirectional=name == "g2p_bi")
        else:
            LM.build_lstm_lm(CACHE / "lstm_lm.onnx")
    return p


def session(path_or_model, threads: int = 1) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(src, o, providers=["CPUExecutionProvider"])


# -- g2p data and metrics ---------------------------------------------------------------------

def words(text: str, n: int, seed: int) -> list[str]:
    uniq = sorted(set(re.findall(r"\b[a-z]{3,14}\b", text.lower())))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(uniq, size=min(n, len(uniq)), replace=False).tolist())


def by_length(ws: list[str], chunk: int = 64) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for w in ws:
        groups.setdefault(len(w), []).append(w)
    return [g[i: i + chunk] for _, g in sorted(groups.items()) for i in range(0, len(g), chunk)]


def g2p_decode(sess, ws: list[str]) -> dict[str, list[int]]:
    out = {}
    for batch in by_length(ws):
        for w, ids in zip(batch, G2P.decode(sess.run(None, {"chars": G2P.encode(batch)})[0])):
            out[w] = ids
    return out


def g2p_fidelity(sess, ref: dict[str, list[int]]) -> str:
    got = g2p_decode(sess, list(ref))
    exact = np.mean([got[w] == ref[w] for w in ref])
    per = sum(edit_distance(got[w], ref[w]) for w in ref) / sum(len(r) for r in ref.values())
    return f"exact {exact:.3f}  PER {per:.4f}"


# -- variants ---------------------------------------------------------------------------------

def recurrent_w(path: Path) -> list[str]:
    m = onnx.load(str(path), load_external_data=False)
    return [n.input[1] for n in m.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]


def recurrent_wr(path: Path) -> list[str]:
    m = onnx.load(str(path), load_external_data=False)
    return [x for n in m.graph.node if n.op_type in ("LSTM", "GRU", "RNN") for x in n.input[1:3]]


def int8_variants(src: Path, tmp: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = {}
    for tag, pc in (("ort int8", False), ("ort int8 per-ch", True)):
        dst = tmp / f"{src.stem}.{'pc' if pc else 'pt'}.int8.onnx"
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=pc)
        out[tag] = dst
    return out


def hmf_variants(src: Path, tmp: Path, include: list[str], calib: Calibration | None, keeps, inputs,
                 lowered: bool = True, unrolled: bool = False) -> dict[str, tuple[Path, str]]:
    """name -> (path, site summary)."""
    inc = [f"^{re.escape(n)}$" for n in include]
    runs = []
    for k in keeps:
        tag = "W+R" if unrolled else "W"
        runs += [(f"lmf {tag} k{k}", dict(method="lmf", keep=k)), (f"hmf {tag} k{k}", dict(method="hmf", keep=k))]
        if calib is not None and not unrolled:
            runs.append((f"lmf {tag} whitened k{k}", dict(method="lmf", keep=k, calib=calib, allocation="uniform")))
    if lowered and not unrolled:
        runs.append(("lowered dense", dict(method="lmf", keep=1.0, lower_recurrent=True)))
        for k in keeps:
            runs += [(f"lowered lmf W+R k{k}", dict(method="lmf", keep=k, lower_recurrent=True)),
                     (f"lowered hmf W+R k{k}", dict(method="hmf", keep=k, lower_recurrent=True))]
            if calib is not None:
                runs.append((f"lowered lmf W+R whitened k{k}",
                             dict(method="lmf", keep=k, lower_recurrent=True, calib=calib, allocation="uniform")))
        runs.append((f"lowered lmf W+R k{keeps[0]} + int8", dict(method="lmf", keep=keeps[0], lower_recurrent=True,
                                                                   quantize="int8")))
    out = {}
    for name, kw in runs:
        dst = tmp / f"{src.stem}.{name.replace(' ', '_')}.onnx"
        t = time.perf_counter()
        model, rep = onnxhmf.optimize(str(src), include=inc if "lowered" not in name else
                                      [f"^{re.escape(n)}$" for n in recurrent_wr(src)],
                                      verify=False, **kw)
        onnx.save(model, str(dst))
        sites = "; ".join(f"{s.weight[-12:]}:{s.method} r{s.rank}" + (f" k{s.dense}" if s.dense else "") +
                          (f" e{s.rel_error:.3f}" if s.rel_error is not None else "") for s in rep.rewritten)
        out[name] = (dst, f"{sites} ({time.perf_counter() - t:.1f} s)")
    return out


def latency(sessions: dict[str, ort.InferenceSession], feeds: dict, runs: int = 200) -> dict[str, float]:
    times = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feeds)
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
    base = np.array(times["original"])
    return {k: (float(np.median(v)) * 1e3, float(np.min(v)) * 1e3, float(np.median(np.array(v) / base)))
            for k, v in times.items()}


def table(title: str, rows: list[tuple], header: tuple) -> None:
    print(f"\n## {title}\n")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    print(fmt.format(*("-" * w for w in widths)))
    for r in rows:
        print(fmt.format(*r))


def bench_model(name: str, variants: dict[str, Path], details: dict[str, str], fidelity, feeds) -> None:
    base = variants["original"].stat().st_size
    sessions = {k: session(p) for k, p in variants.items()}
    lat = latency(sessions, feeds)
    rows = []
    for k, p in variants.items():
        size = p.stat().st_size
        (p50, best, paired), best_0 = lat[k], lat["original"][1]
        rows.append((k, f"{size:,}", f"{size / base:.3f}", fidelity(sessions[k]), f"{p50:.2f}", f"{best:.2f}",
                     f"{paired:.2f}", f"{best / best_0:.2f}", details.get(k, "")))
    table(name, rows, ("variant", "bytes", "size", "fidelity", "ms p50", "ms min", "paired ratio", "min ratio",
                       "sites (weight: method rank dense err)"))


def analysis(name: str, path: Path, keeps) -> None:
    """Per recurrent matrix and keep: relative error (Frobenius) of LMF, of HMF with dense input
    features (the op form), of gate HMF (dense gate rows, the lowering), and each gate's share
    of the LMF error."""
    from onnx import numpy_helper

    from onnxhmf.factorize.recurrent import GATE_NAMES, GATES, gate_errors, gate_hmf, input_hmf, stack_inputs
    from onnxhmf.factorize.svd import lmf

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    rows = []
    for node in m.graph.node:
        if node.op_type not in GATES:
            continue
        G = GATES[node.op_type]
        for label, key in (("W", node.input[1]), ("R", node.input[2])):
            A = numpy_helper.to_array(inits[key]).astype(np.float64)
            if label == "R":  # each direction has its own h: R is factorized per direction (direction 0 here)
                A = A[:1]
            M = stack_inputs(A)
            blocks = A.shape[0] * G
            for k in keeps:
                budget = int(k * M.size)
                f = lmf(M, budget // sum(M.shape))
                ih = input_hmf(A, budget - M.shape[0])
                gh = gate_hmf(M, budget - M.shape[1], blocks)
                share = gate_errors(M, f.rank, blocks)
                names = [f"{g}{d}" if A.shape[0] > 1 else g for d in range(A.shape[0]) for g in GATE_NAMES[node.op_type]]
                rows.append((f"{node.op_type} {label} {M.shape[1]}x{M.shape[0]}", k, f"{f.relative_error:.4f}",
                             f"{ih.relative_error:.4f} (k={ih.k})", f"{gh.factors.relative_error:.4f} (k={gh.factors.k}, {gh.label})",
                             " ".join(f"{n}:{x:.0%}" for n, x in zip(names, share))))
    table(f"{name}: factorization error of the recurrent matrices (Frobenius, same parameter budget)", rows,
          ("matrix", "keep", "LMF", "HMF dense inputs", "HMF dense gate rows", "gate share of LMF error"))


def gate_sensitivity(name: str, path: Path, fidelity, keep: float = 0.5) -> None:
    """End-to-end effect of truncating one gate block at a time: the block (H rows of W or R,
    per direction) replaced by its best rank-r fit, r = ⌊keep·rows·cols/(rows+cols)⌋, the rest
    exact; the op is unchanged (weights edited in place)."""
    from onnx import numpy_helper

    from onnxhmf.factorize.recurrent import GATE_NAMES, GATES
    from onnxhmf.factorize.svd import lmf

    m = onnx.load(str(path))
    node = next(n for n in m.graph.node if n.op_type in GATES)
    names = GATE_NAMES[node.op_type]
    rows = []
    for label, key in (("W", node.input[1]), ("R", node.input[2])):
        idx = next(i for i, t in enumerate(m.graph.initializer) if t.name == key)
        orig = numpy_helper.to_array(m.graph.initializer[idx])
        H = orig.shape[1] // len(names)
        for g, gname in enumerate(names):
            A = orig.copy()
            for d in range(A.shape[0]):
                blk = A[d, g * H:(g + 1) * H].astype(np.float64)
                r = max(1, int(keep * blk.size / sum(blk.shape)))
                f = lmf(blk, r)
                A[d, g * H:(g + 1) * H] = (f.A @ f.B).astype(A.dtype)
            m.graph.initializer[idx].CopyFrom(numpy_helper.from_array(A, key))
            rows.append((f"{label} gate {gname}", r, f"{f.relative_error:.3f}", fidelity(session(m))))
        m.graph.initializer[idx].CopyFrom(numpy_helper.from_array(orig, key))
    table(f"{name}: one gate block at a time at keep {keep} (rank r), the rest exact", rows,
          ("block", "rank", "block rel err", "fidelity"))
    rows = []
    from onnxhmf.factorize.hmf import hmf_fixed

    for label, key in (("W", node.input[1]), ("R", node.input[2])):
        idx = next(i for i, t in enumerate(m.graph.initializer) if t.name == key)
        orig = numpy_helper.to_array(m.graph.initializer[idx])
        GH, n = orig.shape[1:]
        H = GH // len(names)
        P = int(keep * GH * n)
        for choice in ["lmf"] + list(names):
            A = orig.copy()
            for d in range(A.shape[0]):
                blk = A[d].astype(np.float64)
                if choice == "lmf":
                    r = P // (GH + n)
                    f = lmf(blk, r)
                    A[d], err, params = f.A @ f.B, f.relative_error, f.params
                else:
                    g = names.index(choice)
                    r = (P - H * n) // (GH - H + n)
                    hf = hmf_fixed(blk, np.arange(g * H, (g + 1) * H), r, axis=0)
                    A[d], err, params = hf.reconstruct(), hf.relative_error, hf.params
            m.graph.initializer[idx].CopyFrom(numpy_helper.from_array(A.astype(orig.dtype), key))
            rows.append((label, "LMF" if choice == "lmf" else f"gate {choice} dense", r, f"{params:,}", f"{err:.3f}",
                         fidelity(session(m))))
        m.graph.initializer[idx].CopyFrom(numpy_helper.from_array(orig, key))
    table(f"{name}: HMF with one whole gate block dense vs LMF, same parameters (keep {keep} of the matrix)", rows,
          ("matrix", "split", "rank", "params/dir", "rel err", "fidelity"))


def g2p_calibration(n: int = 512) -> Calibration:
    ws = words(corpora.pydoc_topics_text(), n, seed=1)
    return Calibration([{"chars": G2P.encode(b)} for b in by_length(ws, 32)], source="pydoc words")


def lm_calibration(n: int = 64) -> Calibration:
    train, _ = LM.corpus_split()
    w = LM.windows(train, n, seed=1)[:, :-1]
    return Calibration([{"ids": w[i: i + 16]} for i in range(0, n, 16)], source="shakespeare train windows")


def run_g2p(name: str, tmp: Path, keeps, n_words: int) -> None:
    src = ensure(name)
    ws = words(corpora.shakespeare_text(), n_words, seed=0)
    ref_model = G2P.reference_g2p()
    t = time.perf_counter()
    ref = {w: [ref_model.p2idx[p] for p in ref_model.predict(w)] for w in ws}
    print(f"{name}: g2p-en numpy predict on {len(ws)} words: {time.perf_counter() - t:.1f} s")
    variants = {"original": src, **int8_variants(src, tmp)}
    extra = hmf_variants(src, tmp, recurrent_w(src), g2p_calibration(), keeps, None)
    variants.update({k: v[0] for k, v in extra.items()})
    eight = [w for w in ws if len(w) == 8][:16]
    feeds = {"chars": G2P.encode(eight)}
    analysis(name, src, keeps)
    if name == "g2p":
        gate_sensitivity(name, src, lambda sess: g2p_fidelity(sess, ref))
    bench_model(f"{name} ({len(ws)} Shakespeare words vs g2p-en numpy; latency: 16 words of 8 letters)",
                variants, {k: v[1] for k, v in extra.items()}, lambda s: g2p_fidelity(s, ref), feeds)


def run_lm(tmp: Path, keeps) -> None:
    src = ensure("lstm_lm")
    unrolled = CACHE / "lstm_lm_unrolled.onnx"
    _, held = LM.corpus_split()
    sh = LM.windows(held, 48)
    kjv = LM.windows(LM.encode(corpora.kjv_text()), 48)
    fid = lambda s: f"ppl shakespeare {LM.perplexity(s, sh):.3f}  kjv {LM.perplexity(s, kjv):.3f}"  # noqa: E731
    variants = {"original": src, **int8_variants(src, tmp)}
    extra = hmf_variants(src, tmp, recurrent_w(src), lm_calibration(), keeps, None)
    variants.update({k: v[0] for k, v in extra.items()})
    feeds = {"ids": sh[:1, :128]}
    analysis("lstm_lm", src, keeps)
    gate_sensitivity("lstm_lm", src, fid)
    bench_model("lstm_lm (char LSTM; perplexity on 48 held-out windows of 128 chars; latency: 1x128 chars)",
                variants, {k: v[1] for k, v in extra.items()}, fid, feeds)
    # the unrolled shape: the W/R MatMuls of every step, one weight each
    m = onnx.load(str(unrolled))
    big = [t.name for t in m.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 128 * 1536]
    variants = {"original": unrolled, **int8_variants(unrolled, tmp)}
    extra = hmf_variants(unrolled, tmp, big, None, keeps, None, lowered=False, unrolled=True)
    variants.update({k: v[0] for k, v in extra.items()})
    bench_model("lstm_lm_unrolled (64 steps as MatMuls; same metric on 64-char windows; latency: 1x64 chars)",
                variants, {k: v[1] for k, v in extra.items()}, fid, {"ids": sh[:1, :64]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 words, keep 0.5 only")
    ap.add_argument("--only", choices=["g2p", "g2p_bi", "lm"], action="append")
    a = ap.parse_args()
    keeps = (0.5,) if a.quick else (0.5, 0.25)
    n_words = 300 if a.quick else 2000
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}; 1 intra-op thread")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for which in a.only or ["g2p", "g2p_bi", "lm"]:
            if which == "lm":
                run_lm(tmp, keeps)
            else:
                run_g2p(which, tmp, keeps, n_words)


if __name__ == "__main__":
    main()
