"""Build the g2p-en grapheme-to-phoneme GRU seq2seq model as ONNX (greedy decoding in the graph).

``pip install --no-deps g2p-en`` ships ``checkpoint20.npz``: the real weights of a GRU
encoder-decoder (graphemes 29 → emb 256 → GRU 256; phonemes 74 → emb 256 → GRU cell 256 → 74).
The port (torch) exports:

* ``g2p.onnx``: ``chars`` int64 [batch, T] (a word's letters then ``</s>``) → encoder
  ``nn.GRU`` (an ONNX GRU op, linear_before_reset = 1) → a 20-step greedy decoder unrolled in
  the graph (each step a GRU cell as MatMuls/Gemms reading the same weights, ArgMax, Gather of
  the next phoneme embedding) → ``logits`` [batch, 20, 74]. So one model holds two of the
  issue's three shapes: a recurrent op (W/R of the encoder) and unrolled cells (the decoder).
* ``g2p_bi.onnx`` (``--bidirectional``): the same with the encoder run as a bidirectional GRU
  whose backward direction is a copy of the forward weights and whose output is the forward
  half: numerically the original, but the op is ``direction="bidirectional"`` so the shared
  input basis of two directions is exercised on real weights. (g2p-en has no bidirectional
  weights of its own.)

g2p-en's own numpy forward (``G2p.predict``) is the reference: ``check_port`` decodes words
with both and asserts identical phonemes. Importing g2p_en needs nltk for its dictionary and
POS tagger (and inflect for spelling numbers) only; stubs stand in for them (the neural
forward never uses either).

Decoding a batch: words of one length share a batch (no padding, no sequence_lens); the
decoded sequence is cut at the first ``</s>`` (id 3), as ``G2p.predict`` stops there.
Each build takes a few seconds on one core.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np

GRAPHEMES = ["<pad>", "<unk>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz")
STEPS = 20
EOS = 3


def _npz_path() -> Path:
    spec = importlib.util.find_spec("g2p_en")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("g2p-en is not installed: pip install --no-deps g2p-en")
    return Path(list(spec.submodule_search_locations)[0]) / "checkpoint20.npz"


def reference_g2p():
    """g2p-en's own G2p object (its numpy forward), with nltk stubbed out."""
    if "nltk" not in sys.modules:
        nltk = types.ModuleType("nltk")
        nltk.pos_tag = lambda words: [(w, "NN") for w in words]
        nltk.data = types.SimpleNamespace(find=lambda name: name)
        nltk.download = lambda name: None
        corpus = types.ModuleType("nltk.corpus")
        corpus.cmudict = types.SimpleNamespace(dict=lambda: {})
        tokenize = types.ModuleType("nltk.tokenize")
        tokenize.TweetTokenizer = lambda: types.SimpleNamespace(tokenize=str.split)
        nltk.corpus, nltk.tokenize = corpus, tokenize
        sys.modules.update({"nltk": nltk, "nltk.corpus": corpus, "nltk.tokenize": tokenize})
    if "inflect" not in sys.modules and importlib.util.find_spec("inflect") is None:  # number spelling only
        inflect = types.ModuleType("inflect")
        inflect.engine = lambda: types.SimpleNamespace(number_to_words=str)
        sys.modules["inflect"] = inflect
    from g2p_en.g2p import G2p

    return G2p()


def encode(words: list[str]) -> np.ndarray:
    """Grapheme ids [batch, len + 1] for words of one length (letters, then </s>)."""
    idx = {g: i for i, g in enumerate(GRAPHEMES)}
    return np.array([[idx.get(c, 1) for c in w] + [2] for w in words], dtype=np.int64)


def decode(logits: np.ndarray) -> list[list[int]]:
    """Phoneme ids per row of ``logits`` [batch, steps, 74], cut at the first </s>."""
    out = []
    for row in logits.argmax(-1):
        ids = list(row)
        out.append([int(i) for i in ids[: ids.index(EOS)]] if EOS in ids else [int(i) for i in ids])
    return out


def _module(bidirectional: bool):
    import torch
    import torch.nn.functional as F

    v = np.load(_npz_path())
    t = lambda name: torch.tensor(v[name])  # noqa: E731

    class G2P(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_emb = torch.nn.Embedding.from_pretrained(t("enc_emb"))
            E, H = v["enc_emb"].shape[1], v["enc_w_hh"].shape[1]
            self.H = H
            self.enc = torch.nn.GRU(E, H, batch_first=True, bidirectional=bidirectional)
            with torch.no_grad():
                for sfx in [""] + (["_reverse"] if bidirectional else []):
                    getattr(self.enc, f"weight_ih_l0{sfx}").copy_(t("enc_w_ih"))
                    getattr(self.enc, f"weight_hh_l0{sfx}").copy_(t("enc_w_hh"))
                    getattr(self.enc, f"bias_ih_l0{sfx}").copy_(t("enc_b_ih"))
                    getattr(self.enc, f"bias_hh_l0{sfx}").copy_(t("enc_b_hh"))
            self.dec_emb = torch.nn.Embedding.from_pretrained(t("dec_emb"))
            self.w_ih, self.w_hh = torch.nn.Parameter(t("dec_w_ih")), torch.nn.Parameter(t("dec_w_hh"))
            self.b_ih, self.b_hh = torch.nn.Parameter(t("dec_b_ih")), torch.nn.Parameter(t("dec_b_hh"))
            self.fc = torch.nn.Linear(H, v["fc_w"].shape[0])
            with torch.no_grad():
                self.fc.weight.copy_(t("fc_w"))
                self.fc.bias.copy_(t("fc_b"))

        def cell(self, x, h):  # g2p-en's grucell: gates r, z, n; linear before reset
            gi, gh = F.linear(x, self.w_ih, self.b_ih), F.linear(h, self.w_hh, self.b_hh)
            H = self.H
            r = torch.sigmoid(gi[:, :H] + gh[:, :H])
            z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
            n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
            return (1 - z) * n + z * h

        def forward(self, chars):
            y, _ = self.enc(self.enc_emb(chars))
            h = y[:, -1, : self.H]  # the forward direction's last state
            prev = torch.full_like(chars[:, 0], 2)  # <s>
            logits = []
            for _ in range(STEPS):
                h = self.cell(self.dec_emb(prev), h)
                lg = self.fc(h)
                prev = lg.argmax(-1)
                logits.append(lg)
            return torch.stack(logits, 1)

    return G2P().eval()


def build_g2p(path: str | Path, bidirectional: bool = False) -> Path:
    """Export the model to ``path`` (opset 17, IR 8) and check it against g2p-en's numpy forward."""
    import warnings

    import onnx
    import torch

    torch.manual_seed(0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = _module(bidirectional)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.tensor(encode(["hello"])),), str(tmp), dynamo=False, opset_version=17,
                          input_names=["chars"], output_names=["logits"],
                          dynamic_axes={"chars": {0: "batch", 1: "chars"}, "logits": {0: "batch"}})
    model = onnx.load(str(tmp))
    model.ir_version = 8
    model.producer_name = "onnxhmf models/build_g2p.py"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    tmp.unlink()
    check_port(path)
    return path


CHECK_WORDS = ["hello", "activationist", "onnxruntime", "grapheme", "phoneme", "zyxt", "a", "shakespearean",
               "bidirectional", "kubernetes", "recurrent", "quixotic"]


def check_port(path: str | Path, words: list[str] = CHECK_WORDS) -> None:
    """Decode ``words`` with the ONNX model (onnxruntime) and g2p-en's numpy ``predict``: identical."""
    import onnxruntime as ort

    ref = reference_g2p()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for w in words:
        got = [ref.idx2p[i] for i in decode(sess.run(None, {"chars": encode([w])})[0])[0]]
        want = ref.predict(w)
        if got != want:
            raise AssertionError(f"port differs from g2p-en on {w!r}: {got} vs {want}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=str(Path(__file__).parent / "cache" / "g2p.onnx"))
    ap.add_argument("--bidirectional", action="store_true")
    a = ap.parse_args()
    print(build_g2p(a.out, a.bidirectional))
