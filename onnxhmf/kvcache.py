"""KV-cache decoders: recognise their inputs and build the feeds of a first and a cached step.

A decoder exported with a cache (Hugging Face optimum's layout) reads ``past_key_values.{i}.key``
/ ``.value`` (batch, heads, past_sequence_length, head_dim) and writes ``present.{i}.key`` /
``.value`` with the new positions appended; optimum's merged decoder also reads a boolean
``use_cache_branch`` that picks, in an ``If``, the branch that uses the past (True) or the one
that ignores it (False, the first step). Token ids of length L are fed as two steps:

    first  : ids[:, :p], an empty past (length 0), use_cache_branch False, positions 0..p-1
    cached : ids[:, p:], the first step's presents as the past, use_cache_branch True,
             positions p..L-1, attention_mask all ones over the p + (L − p) positions

so calibration and verification exercise both branches, and the cached step sees a real cache.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from .calibration import input_roles
from .errors import OnnxHmfError

__all__ = ["KVSignature", "kv_signature", "step_feeds", "run_step", "two_step_batches", "chained_outputs", "inline_branch", "text_roles"]

_PAST = re.compile(r"^(past_key_values|past_key|past_value|past)([._].*)$")


@dataclass
class KVSignature:
    """Where a KV-cache decoder's inputs are. ``present[past name]`` is the matching output."""

    ids: str
    mask: str | None = None
    positions: str | None = None
    branch: str | None = None  # optimum's use_cache_branch
    past: list[str] = field(default_factory=list)
    present: dict[str, str] = field(default_factory=dict)
    past_shape: dict[str, list[int | None]] = field(default_factory=dict)  # None: batch / past-length axes
    past_axis: dict[str, int] = field(default_factory=dict)
    past_dtype: dict[str, np.dtype] = field(default_factory=dict)
    dtypes: dict[str, np.dtype] = field(default_factory=dict)  # ids / mask / positions element types


def _np_type(vi: onnx.ValueInfoProto):
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))


def _present_name(past: str, outputs: set[str]) -> str | None:
    m = _PAST.match(past)
    if not m:
        return None
    for prefix in ("present", "present_key_values"):
        cand = prefix + m.group(2)
        if cand in outputs:
            return cand
    if m.group(1) in ("past_key", "past_value"):  # past_key.0 -> present_key.0
        cand = m.group(1).replace("past", "present") + m.group(2)
        return cand if cand in outputs else None
    return None


def text_roles(model: onnx.ModelProto) -> dict[str, str]:
    """input_roles, with past_* inputs as "past" and a boolean use_cache_branch as "branch"."""
    roles = input_roles(model)
    for vi in model.graph.input:
        if vi.name not in roles:
            continue
        if _PAST.match(vi.name):
            roles[vi.name] = "past"
        elif "use_cache" in vi.name.lower():
            roles[vi.name] = "branch"
    return roles


def kv_signature(model: onnx.ModelProto) -> KVSignature | None:
    """The KV-cache signature, or None when the model reads no past with a matching present."""
    roles = text_roles(model)
    outputs = {o.name for o in model.graph.output}
    vis = {vi.name: vi for vi in model.graph.input}
    ids = [n for n, r in roles.items() if r == "ids"]
    past = [n for n, r in roles.items() if r == "past"]
    if len(ids) != 1 or not past:
        return None
    sig = KVSignature(ids=ids[0])
    for name in past:
        present = _present_name(name, outputs)
        if present is None:
            return None
        dims = vis[name].type.tensor_type.shape.dim
        shape, axis = [], None
        for i, d in enumerate(dims):
            sym = d.dim_param if d.HasField("dim_param") else ""
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                shape.append(None)
                if "past" in sym.lower() or ("seq" in sym.lower() and axis is None):
                    axis = i
        if axis is None:
            axis = len(shape) - 2 if len(shape) >= 2 else 0
        shape[axis] = None
        sig.past.append(name)
        sig.present[name] = present
        sig.past_shape[name], sig.past_axis[name], sig.past_dtype[name] = shape, axis, _np_type(vis[name])
    for name, role in roles.items():
        if role == "mask" and sig.mask is None:
            sig.mask = name
        elif role == "position" and sig.positions is None:
            sig.positions = name
        elif role == "branch":
            sig.branch = name
        elif role not in ("ids", "past"):
            return None  # token types, encoder states, ...: not a plain decoder
    sig.dtypes = {n: _np_type(vis[n]) for n in (sig.ids, sig.mask, sig.positions) if n}
    return sig


def step_feeds(sig: KVSignature, ids: np.ndarray, past: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Feeds of one step on ``ids`` (b, n); ``past`` {past name: array} or None (empty past)."""
    b, n = ids.shape
    p = 0
    if past is not None:
        first = sig.past[0]
        p = past[first].shape[sig.past_axis[first]]
    feeds = {sig.ids: ids.astype(sig.dtypes[sig.ids])}
    if sig.mask:
        feeds[sig.mask] = np.ones((b, p + n), sig.dtypes[sig.mask])
    if sig.positions:
        feeds[sig.positions] = np.broadcast_to(np.arange(p, p + n), (b, n)).astype(sig.dtypes[sig.positions])
    for name in sig.past:
        if past is not None:
            feeds[name] = past[name]
        else:
            shape = sig.past_shape[name]
            if None in [d for i, d in enumerate(shape) if i not in (0, sig.past_axis[name])]:
                raise OnnxHmfError(f"input {name!r} has a symbolic head axis; cannot build an empty past for it "
                                   "(give --calib with an .npz of feeds)")
            dims = [b if i == 0 else 0 if i == sig.past_axis[name] else d for i, d in enumerate(shape)]
            feeds[name] = np.zeros(dims, sig.past_dtype[name])
    if sig.branch:
        feeds[sig.branch] = np.array([past is not None])
    return feeds


def run_step(sess, sig: KVSignature, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(outputs, {past name: the matching present}) of one onnxruntime run."""
    names = [o.name for o in sess.get_outputs()]
    try:
        outs = dict(zip(names, sess.run(names, feeds)))
    except Exception as e:
        msg = re.sub(r"\s+", " ", str(e)).strip()
        raise OnnxHmfError(f"onnxruntime failed on a KV-cache step: {msg[:300]}") from None
    return outs, {p: outs[sig.present[p]] for p in sig.past}


def two_step_batches(sess, sig: KVSignature, ids: np.ndarray, split: int | None = None) -> list[dict[str, np.ndarray]]:
    """[first step on ids[:, :split] with an empty past, cached step on the rest] for one batch.

    The cached step's past is the first step's presents from ``sess`` (the reference model).
    ``split`` defaults to half the length; each step gets at least one token.
    """
    L = ids.shape[1]
    if L < 2:
        raise OnnxHmfError("a KV-cache step pair needs sequences of at least 2 tokens")
    split = max(1, min(L - 1, L // 2 if split is None else split))
    first = step_feeds(sig, ids[:, :split], None)
    _, past = run_step(sess, sig, first)
    return [first, step_feeds(sig, ids[:, split:], past)]


def chained_outputs(sess, sig: KVSignature, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs of ``sess`` on (first, cached) step pairs, each cached step fed ``sess``'s own
    presents from its first step instead of the stored past (so a candidate's cache errors
    show in its cached-step logits)."""
    outs = []
    for i in range(0, len(batches) - 1, 2):
        first, cached = batches[i], dict(batches[i + 1])
        o1, past = run_step(sess, sig, first)
        cached.update(past)
        o2, _ = run_step(sess, sig, cached)
        outs += [o1, o2]
    return outs


def inline_branch(model: onnx.ModelProto, branch: str, value: bool) -> onnx.ModelProto:
    """A copy of ``model`` with the ``If`` on the graph input ``branch`` replaced by its then
    (``value`` True) or else branch, and that input removed.

    The branch's tensors become main-graph tensors, so onnxruntime can return them as extra
    outputs (activation capture cannot reach inside an ``If``). Both branches of optimum's merged
    decoder read the same main-graph weights, so each weight's statistics are the sum over the
    two inlined models. Feed it the step's feeds without ``branch``.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    ifs = [i for i, n in enumerate(g.node) if n.op_type == "If" and n.input[0] == branch]
    if len(ifs) != 1 or any(n.input[0] == branch for i, n in enumerate(g.node) if i != ifs[0]) or any(
            o.name == branch for o in g.output):
        raise OnnxHmfError(f"input {branch!r} does not drive exactly one If (and nothing else); cannot inline it")
    node = g.node[ifs[0]]
    sub = next(a.g for a in node.attribute if a.name == ("then_branch" if value else "else_branch"))
    new_nodes = list(sub.node) + [onnx.helper.make_node("Identity", [so.name], [o], name=f"{node.name}/inlined/{o}")
                                  for so, o in zip(sub.output, node.output)]
    nodes = list(g.node[: ifs[0]]) + new_nodes + list(g.node[ifs[0] + 1:])
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(sub.initializer)
    g.value_info.extend(sub.value_info)
    keep = [vi for vi in g.input if vi.name != branch]
    del g.input[:]
    g.input.extend(keep)
    return m
