"""Held-out fidelity of the PP-OCRv4 recognizer (models/build_ppocr.py): text lines rendered from
one corpus, read back by a variant, compared with what the original reads.

* ``agree``: 1 − (edit distance to the original's reading) / (its length), over all lines;
* ``exact``: the share of lines read exactly as the original reads them;
* ``cer``: character error rate against the rendered text itself (the original's is the floor).

Lines are cut from prose at word boundaries, 20–48 characters (a text box's width), ASCII only
(the font renders ASCII; the model also reads Chinese).
"""
from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import numpy as np
import onnx

from seqmetrics import edit_distance

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_ppocr", ROOT / "models" / "build_ppocr.py")
ppocr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ppocr)

WIDTH = 640


def lines(text: str, n: int, seed: int = 0, lo: int = 20, hi: int = 48) -> list[str]:
    """Up to ``n`` distinct lines of ``lo``..``hi`` characters, prose re-flowed and cut at spaces."""
    words = " ".join(text.split()).encode("ascii", "ignore").decode().split(" ")
    out, cur = [], ""
    for w in words:
        if not re.fullmatch(r"[A-Za-z0-9,.;:!?'\"()-]+", w):
            cur = ""
            continue
        nxt = f"{cur} {w}".strip()
        if len(nxt) > hi:
            if len(cur) >= lo:
                out.append(cur)
            cur = w
        else:
            cur = nxt
    pool = list(dict.fromkeys(out))
    return random.Random(seed).sample(pool, min(n, len(pool)))


def read(path: Path, images: np.ndarray, batch: int = 16) -> list[str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    chars = ppocr.charset(onnx.load(str(path), load_external_data=False))
    out = []
    for i in range(0, len(images), batch):
        out += ppocr.decode(s.run(None, {"x": images[i: i + batch]})[0], chars)
    return out


def fidelity(paths: dict[str, Path], texts: list[str], ref: str = "original") -> dict[str, dict]:
    images = ppocr.render(texts, WIDTH)
    reads = {k: read(p, images) for k, p in paths.items()}
    base = reads[ref]
    total = sum(len(t) for t in base) or 1
    res = {}
    for k, r in reads.items():
        res[k] = {"agree": 1 - sum(edit_distance(a, b) for a, b in zip(base, r)) / total,
                  "exact": float(np.mean([a == b for a, b in zip(base, r)])),
                  "cer": sum(edit_distance(t, b) for t, b in zip(texts, r)) / max(sum(len(t) for t in texts), 1)}
    return res


def calibration(path: Path, texts: list[str]) -> Path:
    """An .npz of rendered lines (``x``) for ``--calib``."""
    np.savez(path, x=ppocr.render(texts, WIDTH))
    return path
