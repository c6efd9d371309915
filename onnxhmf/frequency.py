"""Token frequencies for embedding HMF: from id arrays (.npz) or from text plus a tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import OnnxHmfError

__all__ = ["token_counts"]


def token_counts(path: str | os.PathLike, vocab_size: int, tokenizer: str | os.PathLike | None = None) -> np.ndarray:
    """Counts per token id (length ``vocab_size``).

    ``path`` is an .npz whose arrays hold token ids (every integer array is counted), or a
    text file tokenized with ``tokenizer`` (a Hugging Face tokenizer.json, read by the
    ``tokenizers`` library).
    """
    p = Path(path)
    if not p.is_file():
        raise OnnxHmfError(f"--token-freq {str(p)!r}: no such file")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as data:
                ids = [data[k].ravel() for k in data.files if np.issubdtype(data[k].dtype, np.integer)]
        except Exception as e:
            raise OnnxHmfError(f"--token-freq {str(p)!r}: not a readable .npz ({e})") from None
        if not ids:
            raise OnnxHmfError(f"--token-freq {str(p)!r} holds no integer arrays")
        flat = np.concatenate(ids).astype(np.int64)
    else:
        if tokenizer is None:
            raise OnnxHmfError("--token-freq with a text file needs --tokenizer tokenizer.json")
        from .calibration import load_tokenizer

        tok = load_tokenizer(tokenizer)
        lines = [line for line in p.read_text(errors="replace").splitlines() if line.strip()]
        flat = np.concatenate([np.asarray(e.ids, np.int64) for e in tok.encode_batch(lines)] or [np.zeros(0, np.int64)])
    if flat.size == 0:
        raise OnnxHmfError(f"--token-freq {str(p)!r}: no tokens")
    if flat.min() < 0 or flat.max() >= vocab_size:
        raise OnnxHmfError(f"--token-freq {str(p)!r}: ids outside [0, {vocab_size}) of the embedding table")
    return np.bincount(flat, minlength=vocab_size)
