"""onnxruntime's own kernel form for blocked integer MatMuls, written offline (opt-in).

onnxruntime fuses a constant blocked ``DequantizeLinear(W_q, s, [z], axis=0, block_size=b) →
MatMul`` into its ``com.microsoft.MatMulNBits`` kernel when it creates a session
(DQMatMulToMatMulNBits), building transposed copies of every weight at load, and always at the
session's accuracy level. ``to_matmulnbits`` does the fusion ahead of time, with the same
integers:

* B (uint8, [N, ceil(K/b), b·bits/8]): column n, block j holds W_q[j·b : (j+1)·b, n], packed low
  bits first; signed values are stored offset by 2^(bits-1) and the zero point is left out (the
  kernel's default is 2^(bits-1)), so (q + 2^(bits-1)) − 2^(bits-1) = q exactly;
* scales ([N·ceil(K/b)], column-major over blocks) and, when asymmetric, zero points packed
  per column ([N, ceil(ceil(K/b)·bits/8)]);
* ``accuracy_level``, the kernel's compute type, which the standard form cannot carry (onnxruntime
  fuses it with the session's ``session.qdq_matmulnbits_accuracy_level``, default 4: activations
  quantized to int8 per block). By default (``AUTO_ACCURACY``) 4-bit weights get level 0 (float
  compute) and 8-bit weights level 4. Measured on MiniLM's no-flags plan (8×128 tokens, one
  thread, resident growth of a fresh process over five runs): level 4 everywhere 86–93 MiB;
  4-bit at 0 and 8-bit at 4, 81.4–81.8 MiB (onnxruntime's own int4 quantizer, level 0: 78 MiB),
  4% slower than level 4 and still faster than the input. 8-bit at level 0 is worse on both
  (88–94 MiB; glassllm 15% slower), so 8-bit stays at 4.

K is padded to a whole number of blocks (the kernel's layout), so a weight whose K is not a
multiple of its block takes more bytes than its DQ form. The result runs on onnxruntime only (a
contrib op); nothing else in the graph changes.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .index import readers_of

__all__ = ["to_matmulnbits", "pack_weight", "CONTRIB_DOMAIN", "AUTO_ACCURACY"]

CONTRIB_DOMAIN = "com.microsoft"
AUTO_ACCURACY = {4: 0, 8: 4}  # bits -> accuracy_level (see above)
LEVELS = (0, 1, 2, 3, 4)
_INT = {TensorProto.INT4: (4, True), TensorProto.UINT4: (4, False), TensorProto.INT8: (8, True),
        TensorProto.UINT8: (8, False)}


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes from unsigned ``bits``-bit values along the last axis (low bits first)."""
    per = 8 // bits
    v = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per)
    out = np.zeros(v.shape[:-1], np.uint8)
    for i in range(per):
        out |= v[..., i] << (bits * i)
    return out


def pack_weight(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int, signed: bool, block: int):
    """MatMulNBits' (B, scales, zero points or None) for K×N integers ``q`` with blocked
    ``scale``/``zero`` ([ceil(K/block), N]); ``signed``: q is shifted by 2^(bits-1) into the
    kernel's unsigned range (a given ``zero`` must be shifted already)."""
    K, N = q.shape
    nb = -(-K // block)
    mid = 1 << (bits - 1)
    u = q.astype(np.int32) + (mid if signed else 0)
    pad = np.full((nb * block - K, N), mid if zero is None else 0, np.int32)
    if zero is not None and pad.size:  # padding rows must dequantize to zero in their block
        pad[:] = zero[-1].astype(np.int32)
    u = np.concatenate([u, pad]).reshape(nb, block, N).transpose(2, 0, 1)  # [N, nb, block]
    B = _pack(u, bits)
    s = np.ascontiguousarray(scale.astype(np.float32).T).reshape(-1)
    z = None
    if zero is not None:
        zp = zero.astype(np.int32).T  # [N, nb]
        per = 8 // bits
        width = -(-nb // per) * per
        zp = np.concatenate([zp, np.zeros((N, width - nb), np.int32)], axis=1)
        z = _pack(zp, bits)
    return B, s, z


def _ints(t: TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t).astype(np.int32)


def _folded_scale(name: str, inits: dict, producer: dict, overridable: set) -> tuple[onnx.TensorProto | None, list]:
    """A DQ's scale as a float32 initializer: itself, or the compact forms graph/qdq._store
    writes (Cast(float16 init), Cast(uint8 init)·Cast(float16 step)), evaluated; with the nodes
    that built it."""
    if name in inits:
        return inits[name], []
    node = producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx"):
        return None, []
    if node.op_type == "Cast" and node.input[0] in inits and node.input[0] not in overridable \
            and _attr(node, "to", 0) == TensorProto.FLOAT:
        return numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]).astype(np.float32), name), [node]
    if node.op_type == "Mul" and node.input[1] not in overridable:
        inner, nodes = _folded_scale(node.input[0], inits, producer, overridable)
        step, more = _folded_scale(node.input[1], inits, producer, overridable)
        if inner is not None and nodes and step is not None:
            value = numpy_helper.to_array(inner) * numpy_helper.to_array(step).astype(np.float32)
            return numpy_helper.from_array(value.astype(np.float32), name), nodes + more + [node]
    return None, []


def _convert(graph: onnx.GraphProto, accuracy: int | None) -> int:
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    overridable = {i.name for i in graph.input}  # an initializer a caller may feed stays as it is
    drop, done, new_inits, packed, built = set(), {}, [], {}, []
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or _attr(dq, "axis", 1) != 0:
            continue
        block = _attr(dq, "block_size", 0)
        (s, scale_nodes), w = _folded_scale(dq.input[1], inits, producer, overridable), inits.get(dq.input[0])
        z = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        use = readers.get(dq.output[0], [])
        if (w is None or s is None or (len(dq.input) > 2 and dq.input[2] and z is None) or w.data_type not in _INT
                or {w.name, s.name, z.name if z is not None else ""} & overridable
                or len(w.dims) != 2 or block < 16 or block & (block - 1) or s.data_type != TensorProto.FLOAT
                or len(use) != 1 or use[0].op_type != "MatMul" or use[0].domain not in ("", "ai.onnx")
                or list(use[0].input[1:]) != [dq.output[0]] or dq.output[0] in outputs):
            continue
        bits, signed = _INT[w.data_type]
        K, N = w.dims
        if list(s.dims) != [-(-K // block), N] or (z is not None and list(z.dims) != list(s.dims)):
            continue
        key = (w.name, s.name, z.name if z is not None else "", block)
        if key not in packed:  # MatMuls sharing one weight (each with its own DQ) share one packed copy
            zero = None if z is None else _ints(z)
            if zero is not None and signed:  # signed integers with a zero point: both shift (below)
                zero = zero + (1 << (bits - 1))
            B, sc, zp = pack_weight(_ints(w), numpy_helper.to_array(s), zero, bits, signed, block)
            base = f"{w.name}.nbits{block}"
            names = [base, f"{base}.scales"] + ([f"{base}.zeros"] if zp is not None else [])
            new_inits += [numpy_helper.from_array(a, n) for a, n in zip((B, sc, zp), names)]
            packed[key] = names
        names = packed[key]
        mm = use[0]
        done[id(mm)] = helper.make_node("MatMulNBits", [mm.input[0], *names], list(mm.output), name=mm.name or mm.output[0],
                                        domain=CONTRIB_DOMAIN, K=K, N=N, bits=bits, block_size=block,
                                        accuracy_level=AUTO_ACCURACY[bits] if accuracy is None else accuracy)
        drop.add(id(dq))
        built += scale_nodes
    if not done:
        return 0
    nodes = [done.get(id(n), n) for n in graph.node if id(n) not in drop]
    inner = _inner_reads(graph) | outputs
    while True:  # the compact scales' nodes that only the fused DQs read (a Mul first, then its Cast)
        read = {i for n in nodes for i in n.input} | inner
        dead = {id(n) for n in built if not set(n.output) & read}
        if not {id(n) for n in nodes} & dead:
            break
        nodes = [n for n in nodes if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | _inner_reads(graph)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    return len(done)


def _inner_reads(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for n in graph.node:
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= {i for m in g.node for i in m.input} | _inner_reads(g)
    return names


def _bodies(graph: onnx.GraphProto):
    for n in graph.node:
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _bodies(g)
                yield g


def to_matmulnbits(model: onnx.ModelProto, accuracy: int | None = None) -> int:
    """Rewrite, in place, every constant blocked DQ → MatMul that onnxruntime would fuse into
    MatMulNBits (main graph and control-flow bodies), with ``accuracy`` as every kernel's
    accuracy_level (None: ``AUTO_ACCURACY`` by bits). Returns how many MatMuls were rewritten;
    the ``com.microsoft`` opset import is added when any was."""
    if accuracy is not None and accuracy not in LEVELS:
        raise ValueError(f"accuracy level must be one of {LEVELS}, got {accuracy!r}")
    count = sum(_convert(g, accuracy) for g in list(_bodies(model.graph))) + _convert(model.graph, accuracy)
    if count and not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return count
