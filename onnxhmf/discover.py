"""Calibration found, not asked for: where the data for a model comes from when no flag says.

In this order (:func:`discover_calibration`):

1. ``calib`` (the user's ``--calib``): an .npz, a folder of them, or text (tokenized with the
   given tokenizer, or else the one found beside the model).
2. A tokenizer beside the model, as Hugging Face / optimum exports lay it out
   (``tokenizer.json``, with ``config.json`` / ``tokenizer_config.json``, in the model's folder
   or its parent), fed a built-in text sample that needs no download: sentences of Python's
   reference documentation (``pydoc_data.topics``, on every Python) interleaved with the
   everyday English prose shipped in ``onnxhmf/data/sample_prose.txt``.
3. A causal LM (token ids in, logits over the vocabulary out, later positions never changing
   earlier logits) with no text: sequences sampled from the model itself with onnxruntime
   (seeded, temperature sampling; through the KV cache when the model has one).
4. Otherwise no data: None, and the sentence to print.

KV-cache decoders (``past_key_values.*`` in, ``present.*`` out, optional ``use_cache_branch``)
get each sequence as two batches, a first step with an empty past and the cached step fed its
presents (:mod:`onnxhmf.kvcache`); ``Calibration.group`` = 2 keeps each pair on one side of the
held-out split. :meth:`Discovery.split` gives (fit, held-out) of the same source.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from .calibration import Calibration, load_calibration
from .capture import session
from .errors import OnnxHmfError
from .fidelity import vocab_sizes
from .kvcache import KVSignature, kv_signature, run_step, step_feeds, text_roles, two_step_batches

__all__ = ["Discovery", "discover_calibration", "find_tokenizer", "builtin_sentences", "causal_lm_output",
           "sample_sequences", "ids_calibration", "DATA_FREE_MESSAGE"]

DATA_FREE_MESSAGE = "a conservative data-free plan; --calib or --inputs would allow more"
TOKENIZER_FILES = ("tokenizer.json",)
CONFIG_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
SAMPLED_SEQUENCES = 64  # sequences sampled from a causal LM
NO_CACHE_SAMPLE_LEN = 64  # without a KV cache every sampled token reruns the whole prefix: O(L²)
_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_length", "model_max_length")


@dataclass
class Discovery:
    """Where calibration came from. ``source``: "calib", "tokenizer", "sampled" or "none"."""

    source: str
    message: str
    calibration: Calibration | None
    tokenizer: Path | None = None
    folder: Path | None = None  # where the tokenizer / config files were found
    config: dict = field(default_factory=dict)  # config.json (+ generation_config.json keys it lacks)
    kv: KVSignature | None = None
    logits: str | None = None  # the logits output of a causal LM
    vocab: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def split(self, holdout: float = 0.25) -> tuple[Calibration, Calibration]:
        """(fit, held-out): the last ``holdout`` of the batches (whole step pairs) held out."""
        if self.calibration is None:
            raise OnnxHmfError("no calibration data to split: " + DATA_FREE_MESSAGE)
        return self.calibration.split(holdout)


# --------------------------------------------------------------------------- tokenizer and config

def _read_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _loads_tokenizer(p: Path):
    """The tokenizer found beside a model, or None when it is not one the library loads."""
    from .calibration import load_tokenizer

    try:
        return load_tokenizer(p)
    except OnnxHmfError:
        return None


def find_tokenizer(model_path: str | os.PathLike) -> tuple[Path | None, Path | None, dict, list[str]]:
    """(folder, tokenizer.json, config, notes) beside the model: its folder, then its parent.

    Also accepts ``<model stem>.tokenizer.json`` beside the model. A file that the ``tokenizers``
    library cannot load is passed over with a note. ``config`` merges config.json with the keys of
    generation_config.json and tokenizer_config.json it lacks (from the same folder).
    """
    p = Path(model_path)
    here = p.parent if str(p.parent) else Path(".")
    notes: list[str] = []
    candidates = [here / f"{p.stem}.tokenizer.json"] + [d / name for d in (here, here.parent) for name in TOKENIZER_FILES]
    for cand in candidates:
        if not cand.is_file():
            continue
        if _loads_tokenizer(cand) is None:
            notes.append(f"{cand} is not a Hugging Face tokenizer.json the `tokenizers` library can load; not used")
            continue
        folder = cand.parent
        config: dict = {}
        for name in CONFIG_FILES:
            for k, v in _read_json(folder / name).items():
                config.setdefault(k, v)
        return folder, cand, config, notes
    config = {}
    for name in CONFIG_FILES:
        for k, v in _read_json(here / name).items():
            config.setdefault(k, v)
    return (here if config else None), None, config, notes


# --------------------------------------------------------------------------- built-in text

_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z])")
_PLAIN = re.compile(r"^[\"'(\[]*[A-Za-z][A-Za-z'-]*[\"')\],.;:!?]*$")


def _prose(text: str, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Sentences that read as prose (mostly plain words; code and grammar rules dropped)."""
    out: dict[str, None] = {}
    for para in re.split(r"\n\s*\n", text):
        for s in _SENT_END.split(" ".join(para.split())):
            words = s.split()
            if not (min_words <= len(words) <= max_words) or not re.match(r"^[\"'(]?[A-Z]", s):
                continue
            plain = [bool(_PLAIN.match(w)) for w in words]
            if plain[-1] and sum(plain) >= 0.8 * len(words) and re.search(r"[.!?][\"')]*$", s):
                out.setdefault(s)
    return list(out)


def builtin_sentences(n: int, seed: int = 0) -> list[str]:
    """Up to ``n`` sentences: shipped prose and Python's reference docs, alternating, shuffled by ``seed``."""
    shipped = (resources.files("onnxhmf") / "data" / "sample_prose.txt").read_text(encoding="utf-8")
    prose = [" ".join(ln.split()) for ln in shipped.splitlines() if ln.strip() and not ln.startswith("#")]
    try:
        from pydoc_data.topics import topics

        docs = _prose("\n\n".join(topics[k] for k in sorted(topics)))
    except ImportError:  # some distributions strip it
        docs = []
    rng = random.Random(seed)
    rng.shuffle(prose)
    rng.shuffle(docs)
    out: list[str] = []
    for i in range(max(len(prose), len(docs))):
        out += [s[i] for s in (prose, docs) if i < len(s)]
    return out[:n]


# --------------------------------------------------------------------------- causal LMs

def _ids_input(model: onnx.ModelProto) -> str | None:
    ids = [n for n, r in text_roles(model).items() if r == "ids"]
    return ids[0] if len(ids) == 1 else None


def _plain_feeds(model: onnx.ModelProto, ids: np.ndarray) -> dict[str, np.ndarray] | None:
    """Feeds of a model without a cache from token ids (None if some input is not text-like)."""
    types = {vi.name: onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type) for vi in model.graph.input}
    feeds = {}
    for name, role in text_roles(model).items():
        if role == "ids":
            v = ids
        elif role == "mask":
            v = np.ones_like(ids)
        elif role == "type":
            v = np.zeros_like(ids)
        elif role == "position":
            v = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        else:
            return None
        feeds[name] = np.ascontiguousarray(v).astype(types[name])
    return feeds


def _step(sess, model, kv: KVSignature | None, ids: np.ndarray, past=None):
    """(outputs, presents) of one run on ``ids`` (with ``past`` for a cached step)."""
    if kv is not None:
        return run_step(sess, kv, step_feeds(kv, ids, past))
    feeds = _plain_feeds(model, ids)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds))), None


def _may_be_logits(vi: onnx.ValueInfoProto, vocab: set[int]) -> bool:
    dims = vi.type.tensor_type.shape.dim
    if len(dims) != 3:
        return not dims and "logit" in vi.name.lower()  # shape unknown: trust the name
    last = dims[-1]
    return last.dim_value in vocab if last.HasField("dim_value") and last.dim_value > 0 else True


def causal_lm_output(model: onnx.ModelProto, sess, kv: KVSignature | None, vocab: set[int]) -> str | None:
    """The logits output if ``model`` is a causal LM, else None.

    A causal LM: token ids in (plus mask / positions / cache), a float output (batch, sequence, V)
    with V a vocabulary size, and changing the last token leaves every earlier position's logits
    unchanged (checked with two runs).
    """
    if _ids_input(model) is None or not vocab or (kv is None and _plain_feeds(model, np.zeros((1, 2), np.int64)) is None):
        return None
    if not any(_may_be_logits(o, vocab) for o in model.graph.output):
        return None  # (no session run needed: e.g. an encoder whose outputs are hidden states)
    V = min(vocab)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, size=(1, 8))
    try:
        a, _ = _step(sess, model, kv, ids)
        ids2 = ids.copy()
        ids2[0, -1] = (ids2[0, -1] + 1) % V
        b, _ = _step(sess, model, kv, ids2)
    except Exception:  # noqa: BLE001 - not runnable as a decoder
        return None
    for name, x in a.items():
        if (np.issubdtype(x.dtype, np.floating) and x.ndim == 3 and x.shape[:2] == ids.shape and x.shape[-1] in vocab
                and not name.startswith(("present", "past"))):
            same_prefix = np.allclose(a[name][:, :-1], b[name][:, :-1], rtol=1e-4, atol=1e-5)
            if same_prefix and not np.allclose(a[name][:, -1], b[name][:, -1]):
                return name
    return None


def _max_length(config: dict, want: int) -> int:
    for key in _LENGTH_KEYS:
        v = config.get(key)
        if isinstance(v, int) and 1 < v < want:
            return v
    return want


def sample_sequences(sess, model: onnx.ModelProto, kv: KVSignature | None, logits: str, vocab: int, *, count: int,
                     length: int, seed: int = 0, temperature: float = 1.0, bos: int | None = None,
                     batch: int = 64) -> np.ndarray:
    """``count`` sequences of ``length`` token ids sampled from the model (int64, (count, length)).

    The first token is ``bos`` when known, else uniform over the vocabulary; each next token is
    drawn from softmax(logits / temperature) by the Gumbel-max trick with a seeded generator.
    With a KV cache each step feeds one token and the presents; without one, the whole prefix.
    """
    if temperature <= 0:
        raise OnnxHmfError("sampling temperature must be > 0")
    rng = np.random.default_rng(seed)
    out = []
    for lo in range(0, count, batch):
        b = min(batch, count - lo)
        ids = np.full((b, 1), bos, np.int64) if bos is not None else rng.integers(0, vocab, size=(b, 1))
        past = None
        while ids.shape[1] < length:
            step_ids = ids if kv is None or past is None else ids[:, -1:]
            outs, presents = _step(sess, model, kv, step_ids, past)
            past = presents
            z = outs[logits][:, -1, :vocab].astype(np.float64) / temperature
            nxt = np.argmax(z + rng.gumbel(size=z.shape), axis=-1)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
        out.append(ids)
    return np.concatenate(out).astype(np.int64)


def ids_calibration(sess, model: onnx.ModelProto, kv: KVSignature | None, ids: np.ndarray, batch_size: int,
                    source: str) -> Calibration:
    """Batches of feeds from token-id sequences (n, L); for a KV decoder, first + cached step pairs."""
    batches = []
    for lo in range(0, ids.shape[0], batch_size):
        chunk = ids[lo : lo + batch_size]
        batches += two_step_batches(sess, kv, chunk) if kv is not None else [_plain_feeds(model, chunk)]
    return Calibration(batches, None, source, group=2 if kv is not None else 1)


def _text_windows(tokenizer: Path, sentences: list[str], length: int, count: int, vocab: int | None) -> np.ndarray:
    """``count`` windows of ``length`` consecutive token ids of the sentences' running text."""
    from .calibration import load_tokenizer

    tok = load_tokenizer(tokenizer)  # padding and truncation off
    flat = np.asarray(tok.encode(" ".join(sentences), add_special_tokens=False).ids, np.int64)
    n = min(count, flat.size // length)
    if n < 2:
        raise OnnxHmfError(f"the text gives only {flat.size} tokens: too few for windows of {length}")
    if vocab is not None and flat.max() >= vocab:
        raise OnnxHmfError(f"tokenizer {str(tokenizer)!r} gives ids up to {int(flat.max())}, beyond the model's vocabulary of {vocab}")
    return flat[: n * length].reshape(n, length)


# --------------------------------------------------------------------------- the search

def discover_calibration(model_path: str | os.PathLike, model: onnx.ModelProto | None = None, *,
                         calib: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                         samples: int = 256, seq_len: int = 128, batch_size: int = 16, seed: int = 0,
                         temperature: float = 1.0, sampled: int = SAMPLED_SEQUENCES, lm_text: bool = True) -> Discovery:
    """Find calibration data for ``model`` (loaded from ``model_path`` when not given).

    ``samples``: rows of text (sentences, or windows for an LM); ``sampled``: sequences drawn
    from a causal LM; ``lm_text=False``: a causal LM is sampled even with a tokenizer beside it
    (the built-in text may be far from what it was trained on). Returns a :class:`Discovery`
    whose ``message`` says which source was used.
    """
    if model is None:
        from .io import load_model

        model = load_model(model_path)
    folder, found_tok, config, notes = find_tokenizer(model_path)
    kv = kv_signature(model)
    vocab = vocab_sizes(model, config)
    tok = Path(tokenizer) if tokenizer is not None else found_tok
    d = Discovery("none", "", None, tok, folder, config, kv, None, vocab, notes)
    maybe_lm = kv is not None or any(_may_be_logits(o, vocab) for o in model.graph.output)
    sess = session(model) if maybe_lm else None
    d.logits = causal_lm_output(model, sess, kv, vocab) if sess is not None else None
    lm = d.logits is not None or kv is not None
    length = _max_length(config, seq_len)
    if calib is not None:
        d.source = "calib"
        p = Path(calib)
        if lm and p.is_file() and p.suffix != ".npz":
            if tok is None:
                raise OnnxHmfError(f"--calib {str(p)!r} is text: give --tokenizer tokenizer.json (none found beside the model)")
            try:
                text = p.read_text(errors="replace")
            except OSError as e:
                raise OnnxHmfError(f"--calib {str(p)!r}: {e.strerror or e}") from None
            ids = _text_windows(tok, [" ".join(text.split())], length, samples, min(vocab) if vocab else None)
            sess = sess or session(model)
            d.calibration = ids_calibration(sess, model, kv, ids, batch_size, str(p))
        else:
            d.calibration = load_calibration(p, model, tokenizer=tok, samples=samples, seq_len=seq_len, batch_size=batch_size)
        d.message = f"calibration: --calib {p} ({_describe(d.calibration, kv)})"
        return d
    if tok is not None and (lm_text or not lm):
        sents = builtin_sentences(max(samples, 4 * samples if lm else samples), seed)
        try:
            if lm:
                ids = _text_windows(tok, sents, length, samples, min(vocab) if vocab else None)
                d.calibration = ids_calibration(sess, model, kv, ids, batch_size, "built-in text sample")
            else:
                d.calibration = _sentence_calibration(model, tok, sents, samples, seq_len, batch_size)
        except OnnxHmfError as e:  # found, not asked for: say why and try the next source
            d.notes.append(f"the tokenizer beside the model was not used: {e}")
        else:
            d.source = "tokenizer"
            d.message = (f"calibration: built-in text sample (Python's reference docs and onnxhmf's prose sample), "
                         f"tokenized with {tok} ({_describe(d.calibration, kv)})")
            return d
    if d.logits is not None:
        V = min(v for v in vocab)
        bos = config.get("bos_token_id") if isinstance(config.get("bos_token_id"), int) else None
        L = length if kv is not None else min(length, NO_CACHE_SAMPLE_LEN)
        ids = sample_sequences(sess, model, kv, d.logits, V, count=sampled, length=L, seed=seed,
                               temperature=temperature, bos=bos)
        d.calibration = ids_calibration(sess, model, kv, ids, batch_size, "sampled from the model")
        d.source = "sampled"
        d.message = (f"calibration: {ids.shape[0]} sequences of {L} tokens sampled from the model itself "
                     f"({'no text or tokenizer found' if tok is None else 'no usable text'}; seed {seed}, temperature {temperature:g}; {_describe(d.calibration, kv)})")
        return d
    d.message = f"no calibration data (no --calib, no tokenizer beside the model, not a causal LM): {DATA_FREE_MESSAGE}"
    return d


def _sentence_calibration(model, tok: Path, sents: list[str], samples: int, seq_len: int, batch_size: int) -> Calibration:
    """One sentence per row, through load_calibration's text reader (written to a temp file)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onnxhmf-calib-") as tmp:
        path = Path(tmp) / "builtin.txt"
        path.write_text("\n\n".join(sents) + "\n", encoding="utf-8")
        cal = load_calibration(path, model, tokenizer=tok, samples=samples, seq_len=seq_len, batch_size=batch_size)
    cal.source = "built-in text sample"
    return cal


def _describe(cal: Calibration, kv: KVSignature | None) -> str:
    if kv is not None:
        return f"{cal.samples // 2} sequences, each as a first step with an empty past and a cached step"
    return f"{cal.samples} samples, {cal.tokens} tokens"
