"""Shared benchmark plumbing: real models, the int8 peer, the tool run, fidelity, latency.

Every table compares variants measured in the same process run; latency is measured
round-robin across variants (so machine noise hits all of them alike) and reported as a
ratio to the original.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
GLASSLLM = ROOT / "models" / "glassllm.onnx"
MINILM = ROOT / "models" / "cache" / "minilm.onnx"
MINILM_TOKENIZER = ROOT / "models" / "cache" / "minilm.tokenizer.json"
PPOCR = ROOT / "models" / "cache" / "ppocr_rec.onnx"
sys.path.insert(0, str(BENCH))

import corpora  # noqa: E402
import embed_eval  # noqa: E402
import lm_eval  # noqa: E402


def ensure_minilm() -> Path:
    if not MINILM.is_file():
        spec = importlib.util.spec_from_file_location("build_minilm", ROOT / "models" / "build_minilm.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.build_minilm(MINILM)
    return MINILM


def minilm_setup(name: str, samples: int):
    """(out folder benchmarks/out/NAME, MiniLM's path, its model, a Calibration of ``samples``
    pydoc sentences): the calibration the MiniLM benchmarks share (never the held-out text)."""
    import onnx

    from onnxhmf.calibration import load_calibration

    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    src = ensure_minilm()
    m = onnx.load(str(src))
    (out / "pydoc.txt").write_text(corpora.pydoc_topics_text())
    return out, src, m, load_calibration(out / "pydoc.txt", m, tokenizer=MINILM_TOKENIZER, samples=samples)


def minilm_feeds(batch: int = 8, seq: int = 128) -> dict[str, np.ndarray]:
    """The latency feeds: random word ids (seed 0), every token attended, token type 0."""
    ids = np.random.default_rng(0).integers(1000, 30000, size=(batch, seq))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def ensure_ppocr() -> Path:
    """PP-OCRv4's recognizer (models/build_ppocr.py; pip install --no-deps rapidocr-onnxruntime==1.4.4)."""
    if not PPOCR.is_file():
        import ocr_eval

        ocr_eval.ppocr.build(PPOCR)
    return PPOCR


def int8(src: Path, out: Path) -> Path:
    """The peer: onnxruntime.quantization.quantize_dynamic, int8 weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not out.exists():
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    return out


# Peak RSS from /proc/self/status VmHWM: ru_maxrss would include the parent's RSS at fork.
_TOOL = (
    "import sys, time; from onnxhmf.cli import main; t = time.perf_counter(); "
    "code = main(sys.argv[1:]); "
    "hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')); "
    "print('@@', code, time.perf_counter() - t, hwm, file=sys.stderr)"
)


def run_tool(args: list[str]) -> dict:
    """Run ``onnxhmf ARGS`` in a fresh process; wall time (s) and peak RSS (MB) of that process."""
    p = subprocess.run([sys.executable, "-c", _TOOL, *map(str, args)], capture_output=True, text=True)
    line = next((l for l in p.stderr.splitlines() if l.startswith("@@")), None)
    if line is None:
        raise RuntimeError(f"onnxhmf {' '.join(map(str, args))} crashed:\n{p.stderr[-3000:]}")
    _, code, wall, rss_kb = line.split()
    if int(code) not in (0, 1):
        raise RuntimeError(f"onnxhmf {' '.join(map(str, args))} failed:\n{p.stderr}")
    return {"exit": int(code), "wall_s": float(wall), "peak_rss_mb": int(rss_kb) / 1024, "stdout": p.stdout}


def optimize(src: Path, out: Path, *args) -> dict:
    """onnxhmf optimize (with its verification), forced so the output exists for evaluation."""
    rep = out.with_suffix(".report.json")
    r = run_tool(["optimize", src, out, "--force", "-q", "--report", rep, *args])
    r["report"] = json.loads(rep.read_text())
    return r


def heldout_sentences(n: int = 600) -> list[str]:
    """Held-out real sentences from two domains the tool never sees: Shakespeare and the KJV."""
    half = n // 2
    return corpora.sentences(corpora.shakespeare_text(), half, seed=1) + corpora.sentences(corpora.kjv_text(), n - half, seed=2)


def minilm_fidelity(paths: dict[str, Path], sentences: list[str], ref: str = "original") -> dict[str, dict]:
    embs = {k: embed_eval.encode(str(p), sentences, str(MINILM_TOKENIZER)) for k, p in paths.items()}
    return {k: embed_eval.fidelity(embs[ref], e) for k, e in embs.items()}


def glassllm_perplexity(paths: dict[str, Path], tokens: int = 20480) -> dict[str, dict]:
    """Held-out perplexity on Shakespeare and KJV (first ``tokens`` tokens of each)."""
    texts = {"shakespeare": corpora.shakespeare_text(), "kjv": corpora.kjv_text()}
    ids = {k: lm_eval.glassllm_token_ids(t)[: tokens + 1] for k, t in texts.items()}
    return {name: {k: lm_eval.perplexity(str(p), v) for k, v in ids.items()} for name, p in paths.items()}


def glassllm_kl(paths: dict[str, Path], tokens: int = 8192, ref: str = "original") -> dict[str, dict]:
    """Mean KL(original ‖ variant) per token on Shakespeare and KJV (lm_eval.kl_to_reference)."""
    texts = {"shakespeare": corpora.shakespeare_text(), "kjv": corpora.kjv_text()}
    ids = {k: lm_eval.glassllm_token_ids(t)[:tokens] for k, t in texts.items()}
    return {name: {k: lm_eval.kl_to_reference(str(paths[ref]), str(p), v) for k, v in ids.items()}
            for name, p in paths.items()}


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency(paths: dict[str, Path], feeds: dict[str, np.ndarray], threads: int = 1, rounds: int = 15, per_round: int = 5) -> dict[str, float]:
    """Median seconds per call, measured round-robin across the variants."""
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, s in sessions.items():
            f = {i.name: feeds[i.name] for i in s.get_inputs()}
            t = time.perf_counter()
            for _ in range(per_round):
                s.run(None, f)
            times[k].append((time.perf_counter() - t) / per_round)
    return {k: float(np.median(v)) for k, v in times.items()}


def table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(line, cells[1:])])


def mb(path: Path) -> str:
    return f"{os.path.getsize(path) / 1e6:.2f}"
