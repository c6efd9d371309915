"""Perplexity of an ONNX causal LM (input ``input_ids``, output ``logits``) on token ids.

Windows of ``window`` input tokens are scored against the same tokens shifted one to
the right, as glassllm's own training and validation do, so with ``stride == window``
every token after the first is predicted exactly once. ``python benchmarks/lm_eval.py``
checks models/glassllm.onnx against glassllm's NumPy model and prints its perplexity
on Shakespeare, the King James Bible and Python's pydoc topics.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from importlib import resources
from pathlib import Path
from typing import Callable, Union

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpora  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LogitsFn = Callable[[np.ndarray], np.ndarray]
Model = Union[str, Path, bytes, ort.InferenceSession, LogitsFn]


@functools.lru_cache(maxsize=1)
def _glassllm_tokenizer():
    import glassllm

    with resources.as_file(resources.files("glassllm") / "weights" / "en.tokenizer.json") as path:
        return glassllm.Tokenizer.load(path)


def glassllm_token_ids(text: str) -> np.ndarray:
    """Encode ``text`` with glassllm's English BPE tokenizer (unknown characters become <unk>)."""
    return np.asarray(_glassllm_tokenizer().encode(text), dtype=np.int64)


def _logits_fn(model: Model, threads: int | None) -> LogitsFn:
    if callable(model) and not isinstance(model, ort.InferenceSession):
        return model
    if not isinstance(model, ort.InferenceSession):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        source = str(model) if isinstance(model, Path) else model
        model = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    session = model
    return lambda ids: session.run(["logits"], {"input_ids": ids})[0]


def perplexity(model: Model, ids: np.ndarray, window: int = 128, stride: int = 128, batch: int = 8,
               threads: int | None = None, max_windows: int | None = None) -> float:
    """exp(mean next-token cross-entropy), computed in float64, over windows of ``ids``.

    ``model`` is an .onnx path, serialized model bytes, an onnxruntime InferenceSession,
    or a function mapping int64 ids (batch, window) to logits (batch, window, vocab).
    Window k feeds ids[s:s+window] (s = k * stride) and predicts ids[s+1:s+window+1];
    after the first window only its last ``min(stride, window)`` positions are scored,
    so overlapping windows (stride < window) count each target once.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if window < 1 or stride < 1 or batch < 1:
        raise ValueError("window, stride and batch must be positive")
    starts = list(range(0, len(ids) - window, stride))[:max_windows]
    if not starts:
        raise ValueError(f"need more than window={window} tokens, got {len(ids)}")
    run = _logits_fn(model, threads)
    total, count = 0.0, 0
    for first in range(0, len(starts), batch):
        chunk = starts[first:first + batch]
        x = np.stack([ids[s:s + window] for s in chunk])
        y = np.stack([ids[s + 1:s + window + 1] for s in chunk])
        logits = np.asarray(run(x), dtype=np.float64)
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
        nll = log_z - np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        for row, s in enumerate(chunk):
            scored = nll[row] if s == 0 else nll[row, window - min(stride, window):]
            total += float(scored.sum())
            count += scored.size
    return math.exp(total / count)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def kl_to_reference(reference: Model, model: Model, ids: np.ndarray, window: int = 128, batch: int = 8,
                    threads: int | None = None) -> float:
    """Mean over positions of KL(p_reference ‖ p_model), nats per token, on consecutive windows of
    ``ids``: how far the model's next-token distributions moved from the reference's. Unlike a
    perplexity difference it is never negative, and it is not hidden by changes that cancel."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    starts = list(range(0, len(ids) - window + 1, window))
    if not starts:
        raise ValueError(f"need at least window={window} tokens, got {len(ids)}")
    ref, run = _logits_fn(reference, threads), _logits_fn(model, threads)
    total, count = 0.0, 0
    for first in range(0, len(starts), batch):
        x = np.stack([ids[s:s + window] for s in starts[first:first + batch]])
        lp, lq = _log_softmax(ref(x)), _log_softmax(run(x))
        total += float((np.exp(lp) * (lp - lq)).sum())
        count += lp.shape[0] * lp.shape[1]
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "glassllm.onnx")
    parser.add_argument("--tokens", type=int, default=20_480, help="leading tokens of each corpus")
    parser.add_argument("--check-windows", type=int, default=40,
                        help="windows per corpus also scored by glassllm's (slow) NumPy model")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import glassllm

    numpy_model, _ = glassllm.load_pretrained("en")

    def numpy_logits(x: np.ndarray) -> np.ndarray:
        with glassllm.no_grad():
            return numpy_model.forward(x).data

    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    unk = _glassllm_tokenizer().unk_id
    print(f"model: {args.model}; windows of 128 tokens, stride 128, float64 cross-entropy")
    for name, load in corpora.CORPORA.items():
        text = load()
        ids = glassllm_token_ids(text[: 10 * args.tokens])[: args.tokens + 1]
        onnx_ppl = perplexity(session, ids)
        # Cross-check: the same leading windows through onnxruntime and glassllm's NumPy forward.
        check = perplexity(session, ids, max_windows=args.check_windows)
        reference = perplexity(numpy_logits, ids, max_windows=args.check_windows)
        rel = abs(check - reference) / reference
        if not rel < 1e-3:
            raise RuntimeError(f"ONNX and glassllm perplexities differ on {name}: {check} vs {reference}")
        print(f"{name:12s} {len(ids) - 1:6d} predicted tokens ({np.mean(ids == unk):.2%} <unk>): "
              f"perplexity {onnx_ppl:8.3f}; first {args.check_windows} windows: onnx {check:.6f}, "
              f"glassllm numpy {reference:.6f} (rel diff {rel:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
