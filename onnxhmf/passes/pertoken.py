"""``--activations auto``: per-token activation scales only where they pay (graph/pertoken.py).

Per-row scales cost a few elementwise passes over a MatMul's input; on a small model (glassllm,
d = 128) rewriting all 17 int8 inputs costs 0.80 against 0.67 of the float latency. The loss they
remove is concentrated: glassllm's four FFN down projections (SwiGLU outputs) hold nearly all of
it. So, on a few calibration batches, with L(S) the output loss (Σ_outputs 1 − mean row cosine
against the input model) when the inputs S are per-token:

    g_c = L(∅) − L({c}) for each candidate c,   G = L(∅) − L(all),

and the chosen set is the fewest candidates, by decreasing g_c > 0, whose gains add up to
``share``·G. Nothing is chosen when G < ``least``·L(∅): per-token must remove at least that
share of the int8 loss to be worth its passes (glassllm's default plan, whose one int8 input is
its head: G = 0.3% of L(∅), left alone).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..capture import session
from ..graph.pertoken import candidates, per_token_activations
from .calibrated import output_loss

__all__ = ["choose_per_token", "Choice", "SHARE"]

SHARE = 0.8
LEAST = 0.05


@dataclass
class Choice:
    chosen: list[str]  # DynamicQuantizeLinear outputs to rewrite
    candidates: int
    loss_none: float  # L(∅), L(all), L(chosen) on the batches used
    loss_all: float
    loss_chosen: float


def _loss(model: onnx.ModelProto, batches, refs, mask: str | None, only: set[str] | None, keep,
          unsigned: bool = False) -> float:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if only is None or only:
        per_token_activations(m, keep, only, unsigned)
    sess = session(m)
    names = [o.name for o in sess.get_outputs()]
    return sum(output_loss(r, sess.run(names, f), f.get(mask) if mask else None) for f, r in zip(batches, refs)) / len(batches)


def choose_per_token(model: onnx.ModelProto, reference: onnx.ModelProto, calibration, keep=frozenset(),
                     batches: int = 4, share: float = SHARE, least: float = LEAST, unsigned: bool = False) -> Choice:
    """Which of ``model``'s int8 inputs to quantize per token (see the module docstring);
    ``reference``: the model the losses are taken against (the executor's input); ``unsigned``:
    measured with their weights as uint8 (as they will be written)."""
    cand = candidates(model, keep)
    if not cand:
        return Choice([], 0, 0.0, 0.0, 0.0)
    data = list(calibration.batches[:batches])
    ref_sess = session(reference)
    names = [o.name for o in ref_sess.get_outputs()]
    inputs = {i.name for i in ref_sess.get_inputs()}
    refs = [ref_sess.run(names, {k: v for k, v in f.items() if k in inputs}) for f in data]
    mask = calibration.mask
    none = _loss(model, data, refs, mask, set(), keep, unsigned)
    every = _loss(model, data, refs, mask, None, keep, unsigned)
    total = none - every
    if total <= 0 or total < least * none:
        return Choice([], len(cand), none, every, none)
    gains = sorted(((none - _loss(model, data, refs, mask, {c}, keep, unsigned), c) for c in cand), reverse=True)
    chosen, got = [], 0.0
    for g, c in gains:
        if g <= 0 or got >= share * total:
            break
        chosen.append(c)
        got += g
    if len(chosen) == len(cand):
        return Choice(chosen, len(cand), none, every, every)
    return Choice(chosen, len(cand), none, every, _loss(model, data, refs, mask, set(chosen), keep, unsigned))
