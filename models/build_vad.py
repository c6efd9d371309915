"""Build a voice-activity model shaped like Silero VAD v5: every weight inside the two branches
of one If on the sample rate.

    sr == 16000 → branch 16k, else → branch 8k; each branch:
      STFT (reflect pad, Conv1d with a fixed basis, magnitude) → 4 × (Conv1d + ReLU)
      → LSTM cell written as two Linear layers (Gemm: x·W_ihᵀ + b_ih, h·W_hhᵀ + b_hh) → ReLU
      → Conv1d(128, 1, 1) → Sigmoid → mean over frames
    inputs: input [batch, samples] (576 at 16 kHz, 288 at 8 kHz: 512/256 new samples + context),
            state [2, batch, 128] (h, c), sr int64 scalar;  outputs: output [batch, 1], stateN.

The module is scripted, so ``torch.onnx.export`` writes one If whose branches read the
parameters as outer-scope initializers; ``--inline`` (the default) then moves every initializer
that only one branch reads into that branch, as in the released Silero model, whose weights
are the branches' own. The two branches' Gemm weights (W_ih, W_hh: 512×128 each) are the
MatMul/Gemm sites; the convolutions are not.

Weights: with the PyPI package ``silero-vad`` installed (``pip install --no-deps silero-vad``)
they are the released model's (its ``silero_vad.onnx`` keeps them as Constants inside the
If branches, its LSTM cell as an ONNX LSTM op in nested Ifs); without it, seeded random
weights of the same shapes (``--random``).

    python models/build_vad.py models/cache/vad.onnx [--random] [--outer-scope]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

HIDDEN = 128
RATES = {16000: (256, 128, 64), 8000: (128, 64, 32)}  # filter length, hop, right reflect pad
SAMPLES = {16000: 576, 8000: 288}


class Branch(nn.Module):
    """One sample rate's STFT, encoder, LSTM cell (two Linear layers) and decoder."""

    def __init__(self, filt: int, hop: int, pad: int):
        super().__init__()
        self.hop, self.pad, self.cut = hop, pad, filt // 2 + 1
        self.register_buffer("basis", torch.zeros(filt + 2, 1, filt))
        bins = filt // 2 + 1
        self.enc = nn.ModuleList([nn.Conv1d(bins, 128, 3, 1, 1), nn.Conv1d(128, 64, 3, 2, 1),
                                  nn.Conv1d(64, 64, 3, 2, 1), nn.Conv1d(64, 128, 3, 1, 1)])
        self.ih, self.hh = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(HIDDEN, 4 * HIDDEN)
        self.dec = nn.Conv1d(HIDDEN, 1, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor):
        x = nn.functional.pad(x.unsqueeze(1), (0, self.pad), mode="reflect")
        f = nn.functional.conv1d(x, self.basis, stride=self.hop)
        x = torch.sqrt(f[:, : self.cut] ** 2 + f[:, self.cut :] ** 2)
        for conv in self.enc:
            x = torch.relu(conv(x))
        x = x.mean(-1)  # one frame at the nominal window
        h, c = state[0], state[1]
        gates = self.ih(x) + self.hh(h)
        i, fg, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        y = torch.sigmoid(self.dec(torch.relu(h).unsqueeze(-1)))
        return y.squeeze(1).mean(1, keepdim=True), torch.stack([h, c])


class VAD(nn.Module):
    def __init__(self):
        super().__init__()
        self.b16, self.b8 = Branch(*RATES[16000]), Branch(*RATES[8000])

    def forward(self, x: torch.Tensor, state: torch.Tensor, sr: torch.Tensor):
        if bool(sr == 16000):
            return self.b16(x, state)
        return self.b8(x, state)


def _silero_constants() -> dict[str, dict[str, np.ndarray]] | None:
    """{"then": {...}, "else": {...}}: the released model's weights by module name, or None."""
    try:
        import importlib.resources as res

        path = res.files("silero_vad") / "data" / "silero_vad.onnx"
        m = onnx.load(str(path))
    except Exception:
        return None
    (if_node,) = [n for n in m.graph.node if n.op_type == "If"]
    out = {}
    for a in if_node.attribute:
        prefix = f"If_0_{a.name}__Inline_0__"
        vals = {}
        for n in a.g.node:
            if n.op_type == "Constant" and n.output[0].startswith(prefix):
                vals[n.output[0][len(prefix):]] = onnx.numpy_helper.to_array(n.attribute[0].t)
        out[a.name.split("_")[0]] = vals
    return out


def load_weights(model: VAD, random: bool, seed: int = 0) -> str:
    """Fill the parameters; returns where they came from."""
    src = None if random else _silero_constants()
    torch.manual_seed(seed)
    for branch, key in ((model.b16, "then"), (model.b8, "else")):  # the released model: then = 16 kHz
        if src is None:
            filt = branch.basis.shape[-1]
            t = np.arange(filt)
            k = np.arange(filt // 2 + 1)[:, None]
            win = np.hanning(filt + 1)[:filt]
            basis = np.concatenate([np.cos(2 * np.pi * k * t / filt), -np.sin(2 * np.pi * k * t / filt)]) * win
            branch.basis.copy_(torch.tensor(basis[:, None, :], dtype=torch.float32))
            continue
        w = src[key]
        with torch.no_grad():
            branch.basis.copy_(torch.tensor(w["stft.forward_basis_buffer"]))
            for i, conv in enumerate(branch.enc):
                conv.weight.copy_(torch.tensor(w[f"encoder.{i}.reparam_conv.weight"]))
                conv.bias.copy_(torch.tensor(w[f"encoder.{i}.reparam_conv.bias"]))
            branch.ih.weight.copy_(torch.tensor(w["decoder.rnn.weight_ih"]))
            branch.ih.bias.copy_(torch.tensor(w["decoder.rnn.bias_ih"]))
            branch.hh.weight.copy_(torch.tensor(w["decoder.rnn.weight_hh"]))
            branch.hh.bias.copy_(torch.tensor(w["decoder.rnn.bias_hh"]))
            branch.dec.weight.copy_(torch.tensor(w["decoder.decoder.2.weight"]))
            branch.dec.bias.copy_(torch.tensor(w["decoder.decoder.2.bias"]))
    return "random (seeded)" if src is None else "silero-vad's released silero_vad.onnx"


def move_into_branches(model: onnx.ModelProto) -> int:
    """Move each main-graph initializer that exactly one If branch reads (and nothing else) into
    that branch; returns how many moved."""
    from onnxhmf.graph.index import GraphIndex  # noqa: PLC0415 (the build runs from the repo)

    index = GraphIndex(model)
    main = index.main
    moved = 0
    for t in list(model.graph.initializer):
        where = {id(s): s for s in index.seeing(t.name, main) if s.consumers.get(t.name) or t.name in s.outputs}
        if len(where) != 1 or main.consumers.get(t.name) or t.name in main.outputs:
            continue
        (s,) = where.values()
        while s.parent is not main:  # into the top-level branch that holds the reader
            s = s.parent
        s.graph.initializer.append(t)
        moved += 1
    keep = [t for t in model.graph.initializer if not any(t.name == x.name for s in index.scopes.values() if s.path
                                                         for x in s.graph.initializer)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return moved


def build(out: Path, random: bool = False, inline: bool = True) -> dict:
    model = VAD().eval()
    source = load_weights(model, random)
    scripted = torch.jit.script(model)
    x = torch.zeros(1, SAMPLES[16000])
    state = torch.zeros(2, 1, HIDDEN)
    sr = torch.tensor(16000, dtype=torch.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(scripted, (x, state, sr), str(out), dynamo=False, opset_version=17,
                      input_names=["input", "state", "sr"], output_names=["output", "stateN"],
                      dynamic_axes={"input": {0: "batch", 1: "samples"}, "state": {1: "batch"}, "output": {0: "batch"},
                                    "stateN": {1: "batch"}})
    m = onnx.load(str(out))
    moved = move_into_branches(m) if inline else 0
    m.ir_version = min(m.ir_version, 8)
    m.producer_name = "onnxhmf models/build_vad.py"
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(out))
    return {"weights": source, "moved_into_branches": moved, "bytes": out.stat().st_size}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--random", action="store_true", help="seeded random weights even if silero-vad is installed")
    ap.add_argument("--outer-scope", action="store_true", help="leave the weights in the main graph (torch's layout)")
    a = ap.parse_args(argv)
    info = build(a.out, a.random, inline=not a.outer_scope)
    print(f"{a.out}: {info['bytes']:,} bytes, weights {info['weights']}, "
          f"{info['moved_into_branches']} initializers moved into the If branches")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
