"""PP-OCRv4's text-line recognizer (an SVTR encoder) as a third real encoder for the benchmarks.

``pip install --no-deps rapidocr-onnxruntime==1.4.4`` (Apache-2.0) ships PaddleOCR's
``ch_PP-OCRv4_rec_infer.onnx``: a conv stem (MobileNetV1-enhanced), two SVTR transformer blocks
(width 120: QKV, attention, MLP 120→240→120) and a CTC head (120 → 6,625 characters: Chinese,
ASCII letters, digits, punctuation, space), 2.7M parameters, 38% of them in MatMul weights
(the head alone 30%). Input ``x`` [batch, 3, 48, width], a text line scaled to height 48 and
normalized to [-1, 1]; output ``softmax_11.tmp_0`` [batch, width/8, 6625], greedy CTC decoded
(index 0 is the blank). The character list is in the model's metadata (``character``).

paddle2onnx wrote every weight as a ``Constant`` node; onnxruntime's quantizers only see
initializers, so ``build`` moves the float Constants of two or more dimensions into
initializers (exactly the same values; IR version, opset and metadata kept). Only
``find_spec`` locates the package: importing it needs OpenCV, which the model does not.

Text lines are rendered with Pillow's built-in scalable font (``render``), black on white, the
way RapidOCR prepares a detected box; PP-OCRv4 reads them back exactly.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HEIGHT = 48
MODEL = "ch_PP-OCRv4_rec_infer.onnx"


def rec_model_path() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("rapidocr-onnxruntime is not installed: pip install --no-deps rapidocr-onnxruntime==1.4.4")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / MODEL


def hoist_constants(model: onnx.ModelProto) -> int:
    """Float Constant nodes of rank ≥ 2 in the main graph → initializers (same name and values)."""
    keep, moved = [], 0
    for n in model.graph.node:
        t = next((a.t for a in n.attribute if a.name == "value"), None) if n.op_type == "Constant" else None
        if t is not None and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2:
            arr = numpy_helper.to_array(t)
            model.graph.initializer.append(numpy_helper.from_array(arr, n.output[0]))
            moved += 1
        else:
            keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return moved


def charset(model: onnx.ModelProto) -> list[str]:
    """CTC classes: blank, the dictionary in the model's metadata, space."""
    meta = {p.key: p.value for p in model.metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]


def render(lines: list[str], width: int = 640, size: int = 32) -> np.ndarray:
    """Text lines as the recognizer's input: [len(lines), 3, 48, width] in [-1, 1]; a line wider
    than ``width`` is scaled down to fit (as RapidOCR resizes a box)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    out = np.ones((len(lines), 3, HEIGHT, width), np.float32)
    for i, text in enumerate(lines):
        w = int(font.getlength(text)) + 16
        im = Image.new("L", (w, HEIGHT), 255)
        ImageDraw.Draw(im).text((8, 6), text, fill=0, font=font)
        if w > width:
            im = im.resize((width, HEIGHT), Image.BILINEAR)
        a = np.asarray(im, np.float32) / 255.0
        out[i, :, :, : a.shape[1]] = ((a - 0.5) / 0.5)[None]
    return out


def decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    """Greedy CTC: the arg-max class per step, repeats merged, blanks dropped (and the spaces the
    padding reads as at either end)."""
    texts = []
    for row in probs.argmax(-1):
        keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != 0)
        texts.append("".join(chars[i] for i in row[keep]).strip())
    return texts


def build(out: Path) -> Path:
    m = onnx.load(str(rec_model_path()))
    moved = hoist_constants(m)
    onnx.checker.check_model(m)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(out))
    check(out)
    print(f"wrote {out} ({moved} weights moved from Constant nodes to initializers)")
    return out


def check(path: Path) -> None:
    """The built model reads rendered lines back and equals the shipped model bit for bit."""
    import onnxruntime as ort

    lines = ["To be, or not to be, that is the question:", "In the beginning God created the heaven and the earth."]
    x = render(lines)
    ref = ort.InferenceSession(str(rec_model_path()), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)
    texts = decode(got, charset(onnx.load(str(path), load_external_data=False)))
    assert texts == lines, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "cache" / "ppocr_rec.onnx")
    build(ap.parse_args().out)


if __name__ == "__main__":
    main()
