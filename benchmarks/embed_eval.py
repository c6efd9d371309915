"""Fidelity of a (compressed) sentence-embedding ONNX model against its original.

    python benchmarks/embed_eval.py MODEL.onnx [--ref REF.onnx] [--n 500] [--int8-baseline]

Both models are run with onnxruntime on the same real sentences (tokenized with the
``tokenizers`` library: batch-longest padding, truncation to ``--max-length``,
token_type_ids all zero) and compared on their ``sentence_embedding`` output:

* ``mean_cosine`` / ``min_cosine``: row-wise cosine similarity between the reference
  and candidate embedding of the same sentence (1.0 = identical direction);
* ``spearman``: Spearman rank correlation between the upper-triangle pairwise cosine
  similarities of the reference set and those of the candidate set, i.e. whether the
  compressed model still ranks sentence pairs by similarity the same way.

Sentences: ``--corpus pydoc`` (default) samples the stdlib's ``pydoc_data.topics``
through ``benchmarks/corpora.py`` when that file is present (else a built-in splitter);
``--corpus shakespeare|kjv`` use corpora.py's downloads.

``--int8-baseline`` also reports onnxruntime's dynamic int8 quantization of REF
(``quantize_dynamic(..., weight_type=QuantType.QInt8)``) as a point of comparison.
Only numpy, scipy, onnxruntime and tokenizers are needed (no torch).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_REF = REPO / "models" / "cache" / "minilm.onnx"
DEFAULT_TOKENIZER = REPO / "models" / "cache" / "minilm.tokenizer.json"
DEFAULT_N = 500
SEED = 0


# ----------------------------------------------------------------------------- encoding

def _session(model, threads: int | None):
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not isinstance(model, (str, os.PathLike, bytes)):  # an onnx.ModelProto
        model = model.SerializeToString()
    if isinstance(model, os.PathLike):
        model = str(model)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _tokenizer(tokenizer_json, max_length: int, pad: bool = True):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    # MiniLM's tokenizer.json pads every sequence to a fixed 128; pad to the batch's longest.
    tok.no_padding()
    if pad:
        pad_id = tok.token_to_id("[PAD]")
        tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    tok.enable_truncation(max_length=max_length)
    return tok


def encode(model_path_or_session, sentences: Sequence[str], tokenizer_json,
           batch: int = 32, max_length: int = 128, threads: int | None = None) -> np.ndarray:
    """Sentence embeddings (N, dim) as float32 from an ONNX model's ``sentence_embedding`` output.

    ``model_path_or_session`` may be a path, an ``onnxruntime.InferenceSession`` or an
    ``onnx.ModelProto``.  Sentences are batched in order of token length (less padding)
    and the rows returned in the input order.  A model without ``sentence_embedding``
    but with ``last_hidden_state`` is mean-pooled over the attention mask and
    L2-normalised here instead.
    """
    sentences = list(sentences)
    sess = _session(model_path_or_session, threads)
    input_names = {i.name for i in sess.get_inputs()}
    output_names = [o.name for o in sess.get_outputs()]
    pool_here = "sentence_embedding" not in output_names
    if pool_here and "last_hidden_state" not in output_names:
        raise ValueError(f"model has neither sentence_embedding nor last_hidden_state outputs: {output_names}")
    out_name = "last_hidden_state" if pool_here else "sentence_embedding"

    tok = _tokenizer(tokenizer_json, max_length)
    if not sentences:
        return np.zeros((0, int(sess.get_outputs()[output_names.index(out_name)].shape[-1])), np.float32)
    lengths = [len(e.ids) for e in _tokenizer(tokenizer_json, max_length, pad=False).encode_batch(sentences)]
    order = np.argsort(lengths, kind="stable")
    rows: list[np.ndarray] = [None] * len(sentences)  # type: ignore[list-item]
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        enc = tok.encode_batch([sentences[i] for i in idx])
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feed = {k: v for k, v in feed.items() if k in input_names}
        (out,) = sess.run([out_name], feed)
        if pool_here:
            w = mask[..., None].astype(out.dtype)
            out = (out * w).sum(1) / np.maximum(w.sum(1), 1e-9)
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        for j, i in enumerate(idx):
            rows[i] = out[j]
    return np.stack(rows).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- metrics

def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fidelity(ref_emb: np.ndarray, cand_emb: np.ndarray) -> dict:
    """Compare candidate embeddings with reference embeddings of the same sentences.

    Returns ``mean_cosine`` and ``min_cosine`` (row-wise cosine between the two models'
    embeddings of each sentence), ``spearman`` (rank correlation of the two sets'
    upper-triangle pairwise cosine similarities; needs at least 3 sentences) and ``n``.
    """
    from scipy.stats import spearmanr

    ref, cand = _unit(ref_emb), _unit(cand_emb)
    if ref.shape != cand.shape or ref.ndim != 2:
        raise ValueError(f"embedding shapes differ or are not 2-D: {ref.shape} vs {cand.shape}")
    row = np.einsum("ij,ij->i", ref, cand)
    iu = np.triu_indices(ref.shape[0], k=1)
    sims_ref = (ref @ ref.T)[iu]
    sims_cand = (cand @ cand.T)[iu]
    if sims_ref.size >= 2:
        rho = spearmanr(sims_ref, sims_cand).statistic
    else:
        rho = float("nan")
    return {
        "mean_cosine": float(row.mean()),
        "min_cosine": float(row.min()),
        "spearman": float(rho),
        "n": int(ref.shape[0]),
    }


# ----------------------------------------------------------------------------- sentences

def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def _split_sentences(text: str, n: int, seed: int = SEED, min_chars: int = 30,
                     max_chars: int = 300) -> list[str]:
    """Deterministic sample of n distinct prose-like sentences from text."""
    flat = re.sub(r"\s+", " ", text)
    candidates = []
    seen = set()
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", flat):
        s = s.strip()
        if not (min_chars <= len(s) <= max_chars) or s in seen:
            continue
        letters = sum(c.isalpha() or c == " " for c in s)
        if letters < 0.8 * len(s) or len(s.split()) < 5:
            continue  # code, tables, grammar productions
        seen.add(s)
        candidates.append(s)
    if len(candidates) < n:
        raise ValueError(f"only {len(candidates)} usable sentences, {n} requested")
    return random.Random(seed).sample(candidates, n)


def _corpora():
    """benchmarks/corpora.py if present (loaded by path, so no package is needed), else None."""
    path = HERE / "corpora.py"
    if not path.exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location("_onnxhmf_bench_corpora", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod if hasattr(mod, "sentences") else None
    except Exception as exc:  # noqa: BLE001
        print(f"(benchmarks/corpora.py not usable: {exc!r}; using the built-in splitter)", file=sys.stderr)
        return None


def eval_sentences(n: int = DEFAULT_N, corpus: str = "pydoc") -> list[str]:
    """n held-out real sentences, sampled deterministically.

    ``corpus`` "pydoc" (default) is the stdlib's ``pydoc_data.topics`` (no download);
    "shakespeare" and "kjv" need ``benchmarks/corpora.py``.  When corpora.py is present
    its ``sentences(text, n)`` does the splitting; otherwise a small built-in splitter does.
    """
    corpora = _corpora()
    if corpora is None:
        if corpus != "pydoc":
            raise RuntimeError(f"corpus {corpus!r} needs benchmarks/corpora.py")
        return _split_sentences(_pydoc_text(), n)
    text = {"pydoc": getattr(corpora, "pydoc_topics_text", _pydoc_text),
            "shakespeare": getattr(corpora, "shakespeare_text", None),
            "kjv": getattr(corpora, "kjv_text", None)}[corpus]
    if text is None:
        raise RuntimeError(f"benchmarks/corpora.py has no loader for {corpus!r}")
    out = list(corpora.sentences(text(), n))
    if len(out) < n:
        raise ValueError(f"only {len(out)} usable sentences in {corpus!r}, {n} requested")
    return out


# ----------------------------------------------------------------------------- int8 baseline

def quantize_int8(ref_path, out_path) -> Path:
    """onnxruntime dynamic int8 quantization (QInt8 weights) of ref_path, written to out_path."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # silence "Please consider to run pre-processing" on the root logger
    try:
        quantize_dynamic(str(ref_path), str(out_path), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return Path(out_path)


# ----------------------------------------------------------------------------- CLI

def _fmt(d: dict) -> str:
    return f"mean_cosine {d['mean_cosine']:.6f}  min_cosine {d['min_cosine']:.6f}  spearman {d['spearman']:.6f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, nargs="?", help="candidate model (default: REF itself)")
    p.add_argument("--ref", type=Path, default=DEFAULT_REF, help="reference model (default %(default)s)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json (default: <ref stem>.tokenizer.json beside REF, else %s)" % DEFAULT_TOKENIZER)
    p.add_argument("--n", type=int, default=DEFAULT_N, help="number of sentences (default %(default)s)")
    p.add_argument("--corpus", choices=["pydoc", "shakespeare", "kjv"], default="pydoc",
                   help="sentence source (default pydoc_data.topics; the others need benchmarks/corpora.py)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--int8-baseline", action="store_true",
                   help="also report onnxruntime dynamic int8 quantization of REF")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    a = p.parse_args(argv)

    if not a.ref.exists():
        p.error(f"reference model {a.ref} not found; build it with: python models/build_minilm.py")
    model = a.model or a.ref
    tok = a.tokenizer
    if tok is None:
        beside = a.ref.with_name(a.ref.stem + ".tokenizer.json")
        tok = beside if beside.exists() else DEFAULT_TOKENIZER
    sents = eval_sentences(a.n, a.corpus)
    kw = dict(batch=a.batch, max_length=a.max_length, threads=a.threads)
    src = "benchmarks/corpora.py" if _corpora() is not None else "built-in splitter"
    print(f"{len(sents)} {a.corpus} sentences ({src}); tokenizer {tok}")

    results = {}

    def run(label: str, path: Path) -> np.ndarray:
        t0 = time.perf_counter()
        emb = encode(path, sents, tok, **kw)
        dt = time.perf_counter() - t0
        results.setdefault(label, {}).update(
            path=str(path), size_bytes=path.stat().st_size, encode_seconds=round(dt, 3))
        print(f"{label:9s} {path} ({path.stat().st_size / 1e6:.1f} MB): encoded in {dt:.1f} s")
        return emb

    ref = run("reference", a.ref)
    cand = ref if model.resolve() == a.ref.resolve() else run("candidate", model)
    fid = fidelity(ref, cand)
    results.setdefault("candidate", {"path": str(model), "size_bytes": model.stat().st_size}).update(fid)
    print(f"candidate vs reference: {_fmt(fid)}")

    if a.int8_baseline:
        with tempfile.TemporaryDirectory() as tmp:
            q = quantize_int8(a.ref, Path(tmp) / "int8.onnx")
            qfid = fidelity(ref, run("int8", q))
        results["int8"].update(qfid)
        print(f"int8      vs reference: {_fmt(qfid)}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
