"""Per-output fidelity: the metric that fits each output, one number per output, one verdict.

Each float output is classified by what it holds:

* ``logits``: the last axis is a vocabulary (its size is the row count of a Gather table of the
  model, or ``vocab_size`` in config.json, or the name says "logits"). Scored by the
  distributions p = softmax(r), q = softmax(c) per position:
      KL      = mean over positions of Σ p·(log p − log q)            (nats)
      top1    = fraction of positions with argmax r = argmax c
      topk    = mean |top-k(r) ∩ top-k(c)| / k
  and, when the labels are known (a causal LM: the next input id), the perplexities
  exp(mean −log p[y]) of both models. The fidelity number is exp(−KL): 1 when identical.
  On text the reference model itself would write, KL(p‖q) is the expected excess
  cross-entropy per token, so exp(−KL) ≈ ppl_ref / ppl_cand: a fidelity of 0.97 is about
  "perplexity within 3%".
* ``cache``: ``present.*`` / ``past_key_values.*`` outputs of a KV-cache decoder, scored by
  cosine but not counted by default (their effect shows in the next step's logits).
* ``embedding``: any other float output; the fidelity number is the mean row cosine
  ⟨r, c⟩ / (‖r‖·‖c‖) over rows along the last axis.

Positions are rows over the leading axes. When an attention mask is given and its shape is the
output's leading axes (or, for a cached decoder step, ends with them: its last columns are the
new tokens), padded positions are excluded from every metric.

Minimums are given per output (``--min-cosine OUT:0.99``, or a bare number for every output)
and default per kind (DEFAULT_MINIMUM). :class:`FidelityMeter` accumulates batches;
:func:`fidelity_verdict` turns the numbers into pass/fail lines.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from .errors import OnnxHmfError

__all__ = ["OutputFidelity", "FidelityResult", "FidelityMeter", "vocab_sizes", "output_kind", "parse_minimums",
           "fidelity_verdict", "compare_batches", "next_token_labels", "evaluate_fidelity", "FidelityJudge", "DEFAULT_MINIMUM", "KINDS"]

KINDS = ("logits", "embedding", "cache")
DEFAULT_MINIMUM = {"embedding": 0.99, "logits": 0.97, "cache": 0.99}  # cosine; exp(−KL) ≈ 1/perplexity ratio
TOP_K = 5
_CACHE_PREFIXES = ("present", "past_key_values")


# --------------------------------------------------------------------------- classification

def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_graphs(g)


_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Slice", "Concat"}


def _token_id_inputs(model: onnx.ModelProto) -> set[str]:
    """Integer graph inputs that carry token ids (by name; else every integer non-mask input)."""
    init = {t.name for t in model.graph.initializer}
    ints = [vi for vi in model.graph.input if vi.name not in init
            and np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type or 1), np.integer)]
    named = {vi.name for vi in ints if "ids" in vi.name.lower() and "position" not in vi.name.lower()
             and "type" not in vi.name.lower()}
    return named or {vi.name for vi in ints if not any(w in vi.name.lower() for w in ("mask", "position", "type"))}


def vocab_sizes(model: onnx.ModelProto | None, config: dict | str | os.PathLike | None = None,
                min_rows: int = 100) -> set[int]:
    """Row counts of 2-D constant tables that a Gather indexes with the token ids (in any
    subgraph: a merged decoder's If branches), plus ``vocab_size`` from ``config`` (a dict or a
    config.json path). Position tables (indexed by positions) are not vocabularies."""
    sizes: set[int] = set()
    if model is not None:
        consts: dict[str, tuple[int, ...]] = {}
        for g in _all_graphs(model.graph):
            consts.update({t.name: tuple(t.dims) for t in g.initializer})
            for n in g.node:
                if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
                    consts[n.output[0]] = tuple(n.attribute[0].t.dims)
        ids = _token_id_inputs(model)
        nodes = [n for g in _all_graphs(model.graph) for n in g.node]
        changed = True
        while changed:  # names derived from the ids through shape-only ops
            changed = False
            for n in nodes:
                if n.op_type in _PASS_THROUGH and n.input and n.input[0] in ids and n.output[0] not in ids:
                    ids.add(n.output[0])
                    changed = True
        for n in nodes:
            if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] in ids and len(consts.get(n.input[0], ())) == 2:
                rows = consts[n.input[0]][0]
                if rows >= min_rows:
                    sizes.add(int(rows))
    if isinstance(config, (str, os.PathLike)):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError):
            config = None
    if isinstance(config, dict):
        for key in ("vocab_size", "n_vocab"):
            v = config.get(key)
            if isinstance(v, int) and v > 1:
                sizes.add(v)
        for sub in ("text_config", "decoder"):
            if isinstance(config.get(sub), dict) and isinstance(config[sub].get("vocab_size"), int):
                sizes.add(config[sub]["vocab_size"])
    return sizes


def output_kind(name: str, shape: tuple[int, ...], dtype, vocab: set[int]) -> str | None:
    """"logits", "cache", "embedding", or None (not a float output: compared exactly elsewhere)."""
    if not np.issubdtype(np.dtype(dtype), np.floating):
        return None
    low = name.lower()
    if low.startswith(_CACHE_PREFIXES):
        return "cache"
    if len(shape) >= 1 and shape[-1] > 1 and ("logit" in low or shape[-1] in vocab):
        return "logits"
    return "embedding"


# --------------------------------------------------------------------------- metrics

def _rows_mask(shape: tuple[int, ...], mask: np.ndarray | None) -> np.ndarray | None:
    """Boolean mask over the output's leading axes, or None when the mask does not apply."""
    if mask is None or len(shape) < 2:
        return None
    lead = tuple(shape[:-1])
    if mask.shape == lead:
        return mask.astype(bool)
    if mask.ndim == len(lead) and mask.shape[:-1] == lead[:-1] and mask.shape[-1] > lead[-1]:
        return mask[..., -lead[-1]:].astype(bool)  # cached step: the new tokens are the last columns
    return None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


@dataclass
class _Sums:
    rows: int = 0
    cos: float = 0.0
    kl: float = 0.0
    top1: float = 0.0
    topk: float = 0.0
    nll_ref: float = 0.0
    nll_cand: float = 0.0
    labels: int = 0


@dataclass
class OutputFidelity:
    """One output's numbers; ``value`` is its fidelity (cosine, or exp(−KL) for logits)."""

    name: str
    kind: str
    value: float
    rows: int
    cosine: float | None = None
    kl: float | None = None
    top1: float | None = None
    topk: float | None = None
    k: int | None = None
    ppl_ref: float | None = None
    ppl_cand: float | None = None

    @property
    def ppl_ratio(self) -> float | None:
        return self.ppl_cand / self.ppl_ref if self.ppl_ref and self.ppl_cand is not None else None

    def describe(self) -> str:
        if self.kind == "logits":
            s = f"exp(-KL) {self.value:.4f} (KL {self.kl:.4f} nats, top-1 {self.top1:.3f}, top-{self.k} {self.topk:.3f}"
            if self.ppl_ref is not None:
                s += f", perplexity {self.ppl_ref:.3f} -> {self.ppl_cand:.3f}"
            return s + ")"
        return f"cosine {self.value:.4f}"


@dataclass
class FidelityResult:
    outputs: dict[str, OutputFidelity]
    counted: list[str]
    minimums: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def worst(self) -> str | None:
        """The counted output with the smallest margin over its minimum."""
        return min(self.counted, key=lambda n: self.outputs[n].value - self.minimums[n]) if self.counted else None

    @property
    def value(self) -> float:
        """The overall number: the worst counted output's fidelity (1.0 when none counts)."""
        return self.outputs[self.worst].value if self.worst else 1.0


class FidelityMeter:
    """Accumulates reference and candidate outputs batch by batch.

    ``masks``: per batch, the attention mask (or None); ``labels``: per batch, next-token ids
    for the logits of a causal LM (shape = logits' leading axes; −1 = no label), or None.
    """

    def __init__(self, vocab: set[int] = frozenset(), top_k: int = TOP_K):
        self.vocab, self.top_k = set(vocab), top_k
        self.kinds: dict[str, str] = {}
        self.sums: dict[str, _Sums] = {}

    def add(self, ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], mask: np.ndarray | None = None,
            labels: np.ndarray | None = None) -> None:
        from .verify import paired_outputs

        for name, r, c in paired_outputs(ref, cand):
            kind = self.kinds.setdefault(name, output_kind(name, r.shape, r.dtype, self.vocab))
            if kind is None or not r.size:
                continue
            s = self.sums.setdefault(name, _Sums())
            m = _rows_mask(r.shape, mask)
            lab = labels if labels is not None and kind == "logits" and labels.shape == r.shape[:-1] else None
            if m is not None:
                rr, cc = r[m], c[m]
                lab = lab[m] if lab is not None else None
            else:
                rr, cc = r.reshape(-1, r.shape[-1]), c.reshape(-1, r.shape[-1])
                lab = lab.reshape(-1) if lab is not None else None
            self._add_rows(s, kind, rr.astype(np.float64), cc.astype(np.float64), lab)

    def _add_rows(self, s: _Sums, kind: str, r: np.ndarray, c: np.ndarray, labels: np.ndarray | None) -> None:
        nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
        ok = (nr > 0) & (nc > 0)
        cos = np.where(ok, np.sum(r * c, axis=1) / np.where(ok, nr * nc, 1.0), (nr == nc).astype(float))
        s.rows += r.shape[0]
        s.cos += float(np.sum(cos))
        if kind != "logits":
            return
        lp, lq = _log_softmax(r), _log_softmax(c)
        s.kl += float(np.sum(np.exp(lp) * (lp - lq)))
        s.top1 += float(np.sum(np.argmax(r, -1) == np.argmax(c, -1)))
        k = min(self.top_k, r.shape[-1])
        tr = np.argpartition(-r, k - 1, axis=-1)[:, :k]
        tc = np.argpartition(-c, k - 1, axis=-1)[:, :k]
        s.topk += float(sum(np.intersect1d(a, b).size for a, b in zip(tr, tc)) / k)
        if labels is not None:
            ok = (labels >= 0) & (labels < r.shape[-1])
            idx = np.nonzero(ok)[0]
            s.nll_ref -= float(np.sum(lp[idx, labels[idx]]))
            s.nll_cand -= float(np.sum(lq[idx, labels[idx]]))
            s.labels += int(idx.size)

    def outputs(self) -> dict[str, OutputFidelity]:
        out = {}
        for name, s in self.sums.items():
            kind, n = self.kinds[name], max(s.rows, 1)
            cos = s.cos / n
            if kind == "logits":
                kl = max(0.0, s.kl / n)
                ppl = {}
                if s.labels:
                    ppl = dict(ppl_ref=math.exp(s.nll_ref / s.labels), ppl_cand=math.exp(s.nll_cand / s.labels))
                out[name] = OutputFidelity(name, kind, math.exp(-kl), s.rows, cosine=cos, kl=kl, top1=s.top1 / n,
                                           topk=s.topk / n, k=self.top_k, **ppl)
            else:
                out[name] = OutputFidelity(name, kind, cos, s.rows, cosine=cos)
        return out


# --------------------------------------------------------------------------- minimums and verdict

def parse_minimums(specs: Iterable[str] | None, outputs: Iterable[str], option: str = "--min-cosine") -> dict[str, float]:
    """``["0.99", "logits:0.95"]`` -> {"": 0.99, "logits": 0.95}; names must be outputs, values in (0, 1]."""
    names = list(outputs)
    out: dict[str, float] = {}
    for spec in specs or []:
        name, _, val = str(spec).rpartition(":")
        try:
            v = float(val)
            if not 0.0 < v <= 1.0:
                raise ValueError
        except ValueError:
            raise OnnxHmfError(f"bad {option} {spec!r}: expected a number in (0, 1] or OUTPUT:number") from None
        if name and name not in names:
            raise OnnxHmfError(f"{option} {spec!r} names unknown output {name!r}; outputs are {names}")
        out[name] = v
    return out


def fidelity_verdict(outputs: dict[str, OutputFidelity], minimums: dict[str, float] | None = None,
                     counted: Iterable[str] | None = None) -> FidelityResult:
    """Pass/fail of each counted output against its minimum.

    ``counted``: the outputs that count (``--outputs``); default every non-cache float output.
    ``minimums``: {output or "": minimum}; an output not named takes "" or DEFAULT_MINIMUM[kind].
    """
    minimums = dict(minimums or {})
    if counted is None:
        counted = [n for n, o in outputs.items() if o.kind != "cache"]
    counted = list(counted)
    unknown = [n for n in counted if n not in outputs]
    if unknown:
        raise OnnxHmfError(f"--outputs names unknown or non-float output(s) {unknown}; scored outputs are {list(outputs)}")
    mins = {n: minimums.get(n, minimums.get("", DEFAULT_MINIMUM[outputs[n].kind])) for n in outputs}
    fails = [f"{n}: {outputs[n].describe()} < minimum {mins[n]}" for n in counted if outputs[n].value < mins[n]]
    return FidelityResult(outputs, counted, mins, fails)


def compare_batches(ref: list[dict[str, np.ndarray]], cand: list[dict[str, np.ndarray]], *,
                    masks: list[np.ndarray | None] | None = None, labels: list[np.ndarray | None] | None = None,
                    vocab: set[int] = frozenset(), minimums: dict[str, float] | None = None,
                    counted: Iterable[str] | None = None, top_k: int = TOP_K) -> FidelityResult:
    """Score ``cand`` against ``ref`` (lists of {output: array}, one per batch) and give the verdict."""
    meter = FidelityMeter(vocab, top_k)
    for i, (r, c) in enumerate(zip(ref, cand)):
        meter.add(r, c, masks[i] if masks else None, labels[i] if labels else None)
    return fidelity_verdict(meter.outputs(), minimums, counted)


def next_token_labels(input_ids: np.ndarray, following: np.ndarray | None = None) -> np.ndarray:
    """Labels for a causal LM's logits at each position: the next id (−1 where unknown).

    ``following``: the first ids of the next chunk (b,), which label the last position.
    """
    ids = np.asarray(input_ids, np.int64)
    labels = np.full(ids.shape, -1, np.int64)
    labels[..., :-1] = ids[..., 1:]
    if following is not None:
        labels[..., -1] = following
    return labels


def _labels(batches: list[dict[str, np.ndarray]], ids: str, pairs: bool) -> list[np.ndarray]:
    """Next-token labels per batch; a first step's last position is labelled by its cached step."""
    if not pairs:
        return [next_token_labels(b[ids]) for b in batches]
    out = []
    for i in range(0, len(batches) - 1, 2):
        first, cached = batches[i][ids], batches[i + 1][ids]
        out += [next_token_labels(first, cached[:, 0]), next_token_labels(cached)]
    return out


def _session(m):
    from .capture import session

    if isinstance(m, onnx.ModelProto):
        return session(m)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m if isinstance(m, bytes) else str(m), so, providers=["CPUExecutionProvider"])


class FidelityJudge:
    """The reference's outputs on ``calibration`` computed once; :meth:`score` runs a candidate
    (ModelProto, path or bytes) on the same batches and gives the verdict (see
    :func:`evaluate_fidelity`)."""

    def __init__(self, reference, calibration, *, kv=None, logits: str | None = None, vocab: set[int] = frozenset(),
                 minimums: dict[str, float] | None = None, counted: Iterable[str] | None = None, top_k: int = TOP_K):
        self.calibration, self.kv, self.logits = calibration, kv, logits
        self.vocab, self.minimums, self.top_k = set(vocab), minimums, top_k
        self.counted = None if counted is None else list(counted)
        batches = calibration.batches
        self.ref = self._outputs(reference)
        self.masks = [b.get(calibration.mask) if calibration.mask else None for b in batches]
        self.labels = None
        if logits is not None:
            ints = [n for n, v in batches[0].items() if np.issubdtype(v.dtype, np.integer)]
            ids = kv.ids if kv is not None else next((n for n in ints if "ids" in n.lower() and "position" not in n.lower()
                                                      and "type" not in n.lower()), ints[0] if len(ints) == 1 else None)
            self.labels = _labels(batches, ids, kv is not None) if ids else None

    def _outputs(self, m) -> list[dict[str, np.ndarray]]:
        from .kvcache import chained_outputs

        s = _session(m)
        names = [o.name for o in s.get_outputs()]
        batches = self.calibration.batches
        return chained_outputs(s, self.kv, batches) if self.kv is not None else [dict(zip(names, s.run(names, b)))
                                                                                 for b in batches]

    def score(self, candidate) -> FidelityResult:
        meter = FidelityMeter(self.vocab, self.top_k)
        if self.logits is not None:
            meter.kinds[self.logits] = "logits"
        for i, (r, c) in enumerate(zip(self.ref, self._outputs(candidate))):
            meter.add(r, c, self.masks[i], self.labels[i] if self.labels else None)
        return fidelity_verdict(meter.outputs(), self.minimums, self.counted)

    def kinds(self) -> dict[str, str]:
        """{output: kind} of the reference's outputs (None for non-float ones)."""
        return {n: output_kind(n, r.shape, r.dtype, self.vocab) if n != self.logits else "logits"
                for n, r in self.ref[0].items()}


def evaluate_fidelity(reference, candidate, calibration, *, kv=None, logits: str | None = None,
                      vocab: set[int] = frozenset(), minimums: dict[str, float] | None = None,
                      counted: Iterable[str] | None = None, top_k: int = TOP_K) -> FidelityResult:
    """Run ``reference`` and ``candidate`` (ModelProto, path or bytes) on ``calibration``'s
    batches (held-out ones, typically) and score every output; the verdict against ``minimums``.

    ``kv`` (a KVSignature): batches are (first, cached) step pairs and each model's cached step
    reads its own presents. ``logits``: the causal-LM output, scored with next-token perplexity
    too (the labels are the ids themselves). Masked (padding) positions are excluded.
    """
    judge = FidelityJudge(reference, calibration, kv=kv, logits=logits, vocab=vocab, minimums=minimums,
                          counted=counted, top_k=top_k)
    return judge.score(candidate)
