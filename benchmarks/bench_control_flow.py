"""Weights inside If branches: the Silero-VAD-shaped model (models/build_vad.py), compressed.

Per variant: file bytes, parameters, fidelity on streamed audio (espeak-ng speech of pydoc
sentences with pauses and noise when Debian's espeak-ng is installed, else a synthetic
voiced/unvoiced signal; the LSTM state carried from window to window, both sample rates; the
reference is the original model; calibration uses other sentences, voice and speed), and
onnxruntime CPU latency (1 thread, batch 1, 16 kHz), timed round-robin so machine noise hits
every variant alike; ratios to the original.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_control_flow.py [--runs 300] [--windows 120]
        [--calib-windows 400]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

from onnxhmf import optimize  # noqa: E402
from onnxhmf.api import count_params  # noqa: E402
from onnxhmf.graph.index import iter_scopes  # noqa: E402
from onnxhmf.io import save_model  # noqa: E402

import build_vad  # noqa: E402

WINDOW = {16000: 512, 8000: 256}
CONTEXT = {16000: 64, 8000: 32}


def signal(sr: int, seconds: float, seed: int = 0, f0: float = 120, seg_s: float = 0.6, am: float = 4) -> np.ndarray:
    """Alternating ``seg_s`` segments: low noise, then a voiced sound (harmonics of an f0 gliding
    around ``f0``, ``am`` Hz syllable-rate amplitude modulation) over noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    seg = (t // seg_s).astype(int) % 2 == 1
    f0 = f0 + 0.5 * f0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * am * t) ** 2)
    x = 0.003 * rng.standard_normal(t.size) + 0.3 * seg * voiced
    return x.astype(np.float32)


def _sentences(skip: int, count: int) -> list[str]:
    """English sentences from the stdlib's pydoc topics (always present), ``skip`` onwards."""
    import re

    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    sents = [x.strip() for x in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))]
    sents = [x for x in sents if 40 <= len(x) <= 160 and re.fullmatch(r"[A-Za-z ,.;:'()-]+", x)]
    return sents[skip:skip + count]


def speech(sr: int, seconds: float, voice: str, speed: int, skip: int, seed: int = 0) -> np.ndarray | None:
    """Sentences spoken by espeak-ng (``voice``, ``speed`` wpm) with 0.3–1.2 s pauses, over low
    noise, resampled to ``sr``; None without espeak-ng."""
    import io
    import shutil
    import subprocess
    import wave

    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        return None
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    for sent in _sentences(skip, 400):
        wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", sent], capture_output=True,
                             check=True).stdout
        with wave.open(io.BytesIO(wav)) as w:
            rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
        x = resample_poly(x, sr, rate).astype(np.float32)
        parts += [x, np.zeros(int(sr * rng.uniform(0.3, 1.2)), np.float32)]
        total += sum(len(p) for p in parts[-2:])
        if total >= sr * seconds:
            break
    x = np.concatenate(parts)[: int(sr * seconds)]
    return x + 0.003 * rng.standard_normal(x.size).astype(np.float32)


def audio(sr: int, seconds: float, held_out: bool) -> np.ndarray:
    """Evaluation (held_out) or calibration audio: espeak-ng speech (different sentences, voice
    and speed for the two), else the synthetic signal."""
    x = speech(sr, seconds, "en-gb", 140, 400, 1) if held_out else speech(sr, seconds, "en-us", 175, 0, 2)
    if x is not None:
        return x
    return signal(sr, seconds) if held_out else signal(sr, seconds, seed=7, f0=200, seg_s=0.45, am=3)


def stream(sess: ort.InferenceSession, x: np.ndarray, sr: int, windows: int):
    """Speech probabilities and final states of ``windows`` consecutive windows (batch 1)."""
    n, c = WINDOW[sr], CONTEXT[sr]
    state = np.zeros((2, 1, 128), np.float32)
    ctx = np.zeros((1, c), np.float32)
    probs, states = [], []
    for i in range(windows):
        chunk = x[None, i * n:(i + 1) * n]
        out, state = sess.run(None, {"input": np.concatenate([ctx, chunk], 1), "state": state, "sr": np.array(sr, np.int64)})
        ctx = chunk[:, -c:]
        probs.append(float(out[0, 0]))
        states.append(state.ravel())
    return np.array(probs), np.array(states)


def calibration(path: Path, windows: int, batch: int = 16):
    """Calibration batches: windows of other audio than the evaluation's with the original
    model's own streamed states, per sample rate (sr is a scalar: one rate a batch)."""
    from onnxhmf.calibration import Calibration

    sess = session(path)
    batches = []
    for sr in (16000, 8000):
        n, c = WINDOW[sr], CONTEXT[sr]
        x = audio(sr, windows * n / sr + 0.1, held_out=False)
        state, ctx, rows = np.zeros((2, 1, 128), np.float32), np.zeros((1, c), np.float32), []
        for i in range(windows):
            chunk = x[None, i * n:(i + 1) * n]
            inp = np.concatenate([ctx, chunk], 1)
            rows.append((inp, state))
            _, state = sess.run(None, {"input": inp, "state": state, "sr": np.array(sr, np.int64)})
            ctx = chunk[:, -c:]
        for j in range(0, windows, batch):
            part = rows[j:j + batch]
            batches.append({"input": np.concatenate([p[0] for p in part]), "state": np.concatenate([p[1] for p in part], 1),
                            "sr": np.array(sr, np.int64)})
    return Calibration(batches, None, "streamed audio")


def session(path: Path) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def fidelity(ref: ort.InferenceSession, cand: ort.InferenceSession, windows: int) -> dict:
    res = {}
    for sr in (16000, 8000):
        x = audio(sr, windows * WINDOW[sr] / sr + 0.1, held_out=True)
        pr, sr_ = stream(ref, x, sr, windows)
        pc, sc = stream(cand, x, sr, windows)
        cos = np.sum(sr_ * sc, 1) / np.maximum(np.linalg.norm(sr_, axis=1) * np.linalg.norm(sc, axis=1), 1e-30)
        d = np.abs(pr - pc)
        res[sr] = {"max_abs_p": float(np.max(d)), "mean_abs_p": float(np.mean(d)), "agree": float(np.mean((pr > 0.5) == (pc > 0.5))),
                   "state_cos": float(np.mean(cos)), "speech": float(np.mean(pr > 0.5))}
    return res


def latency(paths: dict[str, Path], runs: int) -> dict[str, float]:
    sessions = {k: session(p) for k, p in paths.items()}
    rng = np.random.default_rng(1)
    feeds = {"input": (0.1 * rng.standard_normal((1, 576))).astype(np.float32), "state": np.zeros((2, 1, 128), np.float32),
             "sr": np.array(16000, np.int64)}
    times = {k: [] for k in sessions}
    for _ in range(10):
        for s in sessions.values():
            s.run(None, feeds)
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--windows", type=int, default=120, help="evaluation windows per sample rate")
    ap.add_argument("--calib-windows", type=int, default=400, help="calibration windows per sample rate")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cf_"))
    src, outer = tmp / "vad.onnx", tmp / "vad_outer.onnx"
    info = build_vad.build(src)
    build_vad.build(outer, inline=False)
    print(f"model: models/build_vad.py, weights {info['weights']}; {info['moved_into_branches']} initializers in the If branches; "
          f"calibration: {a.calib_windows} windows per rate; audio: "
          + ("espeak-ng speech of pydoc sentences (calibration: en-us 175 wpm, sentences 0-399; evaluation: "
             "en-gb 140 wpm, sentences 400-), pauses 0.3-1.2 s, noise" if speech(8000, 0.1, "en", 150, 0) is not None
             else "synthetic voiced/unvoiced signal (espeak-ng not installed)"))
    rng = np.random.default_rng(0)
    feeds = {"input": (0.1 * rng.standard_normal((4, 576))).astype(np.float32), "state": np.zeros((2, 4, 128), np.float32),
             "sr": np.array(16000, np.int64)}
    variants = {"original": (src, None), "lmf keep 0.75": (src, dict(keep=0.75)), "lmf keep 0.5": (src, dict(keep=0.5)),
                "hmf keep 0.5": (src, dict(keep=0.5, method="hmf")), "lmf keep 0.5 (outer-scope weights)": (outer, dict(keep=0.5))}
    cal = calibration(src, a.calib_windows)
    variants.update({"lmf keep 0.5 whitened": (src, dict(keep=0.5, calib=cal, allocation="uniform")),
                     "hmf keep 0.5 whitened": (src, dict(keep=0.5, method="hmf", calib=cal, allocation="uniform")),
                     "lmf keep 0.5 measured": (src, dict(keep=0.5, calib=cal))})
    paths, rows = {}, {}
    for name, (path, kw) in variants.items():
        if kw is None:
            paths[name] = path
            continue
        t = time.perf_counter()
        out, rep = optimize(str(path), inputs=feeds, min_cosine=0.0, **kw)
        p = tmp / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
        save_model(out, p)
        paths[name] = p
        rows[name] = {"sites": len(rep.rewritten), "secs": time.perf_counter() - t}
        if kw.get("calib") is not None:
            print(f"{name}: " + "; ".join(f"{s.weight} r={s.rank} {s.detail}" for s in rep.rewritten))
    import logging

    from onnxruntime.quantization import quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    paths["ort quantize_dynamic int8"] = tmp / "vad_int8.onnx"  # the peer: does it reach into the branches?
    quantize_dynamic(str(src), str(paths["ort quantize_dynamic int8"]), per_channel=True)
    q = onnx.load(str(paths["ort quantize_dynamic int8"]))
    qops = sum(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "ConvInteger") for _, g, _, _ in iter_scopes(q.graph)
               for n in g.node)
    rows["ort quantize_dynamic int8"] = {"sites": f"{qops} q-ops"}
    ms = latency(paths, a.runs)
    ref = session(src)
    base_bytes, base_params = src.stat().st_size, count_params(onnx.load(str(src)))
    print(f"latency: 1 thread, batch 1, 16 kHz window, {a.runs} runs each, round-robin, p50; fidelity: {a.windows} "
          "streamed windows per rate vs the original (|Δp| of the speech probability, mean/max; agreement of the "
          "decision p>0.5; state cosine per window, mean, the worse rate's)")
    head = ("variant", "sites", "bytes", "ratio", "params", "16k |Δp| mean/max", "16k agree", "8k |Δp| mean/max", "8k agree",
            "state cos", "p50 ms", "ratio")
    table = []
    for name, p in paths.items():
        f = fidelity(ref, session(p), a.windows)
        params = count_params(onnx.load(str(p)))
        table.append((name, str(rows.get(name, {}).get("sites", "-")), f"{p.stat().st_size:,}",
                      f"{p.stat().st_size / base_bytes:.3f}x", f"{params:,}",
                      f"{f[16000]['mean_abs_p']:.4f}/{f[16000]['max_abs_p']:.3f}", f"{f[16000]['agree']:.3f}",
                      f"{f[8000]['mean_abs_p']:.4f}/{f[8000]['max_abs_p']:.3f}", f"{f[8000]['agree']:.3f}",
                      f"{min(f[16000]['state_cos'], f[8000]['state_cos']):.4f}", f"{ms[name]:.3f}",
                      f"{ms[name] / ms['original']:.3f}x"))
        if name == "original":
            share = (f[16000]["speech"], f[8000]["speech"])
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *table]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"original's speech share on the signal: 16k {share[0]:.2f}, 8k {share[1]:.2f}; params {base_params:,}")


if __name__ == "__main__":
    main()
