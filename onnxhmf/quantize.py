"""int8 weights with standard ONNX ops, through onnxruntime's dynamic quantizer.

``quantize_int8`` calls ``onnxruntime.quantization.quantize_dynamic`` in QOperator format,
restricted to MatMul and Gather:

* a MatMul with a constant weight becomes DynamicQuantizeLinear (activations, uint8 per
  tensor at run time) → MatMulInteger (int8 weight, per tensor, symmetric) → Cast → Mul by
  the product of the two scales. All in the default domain, and onnxruntime runs it with
  integer kernels (faster than fp32 on CPU).
* a Gather on a constant table gathers int8 rows and DequantizeLinear's them.

QOperator rather than QDQ: QDQ (QuantizeLinear/DequantizeLinear pairs around a float MatMul)
keeps the file as small but runs as float unless the runtime fuses it, and onnx.reference
cannot run it below opset 19 either. Every emitted node is checked to be in the default
domain (the quantizer emits com.microsoft ops for other op types; we never ask for those).

The quantizer rewrites the model's header: the input's IR version, metadata, opset imports,
graph inputs/outputs (symbolic dims) are restored afterwards.

``weight_only`` is the other treatment: the weight is stored as int8 (or two int4 per byte)
with one scale per output column and rebuilt as float by a constant subgraph (Cast, Mul;
BitShift, Concat for int4) that onnxruntime folds at load, and the MatMul or Gather stays
float. Smaller file, no activation quantization, so it is far more accurate where activations
have outliers (a BERT FFN's second MatMul), but it runs at float speed and holds float
weights in memory.

``int8_weight`` is the weight the quantizer stores, dequantized (symmetric int8 per tensor for
MatMul weights, asymmetric uint8 per tensor for Gather tables), which is what sensitivity
probes feed to predict the loss of a site's int8 treatment.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from .errors import OnnxHmfError
from .graph.index import default_opset
from .graph.qdq import unpack4

__all__ = ["quantize_int8", "int8_refusals", "int8_weight", "int8_bytes", "INT8_OVERHEAD", "weight_nodes", "weight_only", "int8w_weight", "int4_axis",
           "drop_zero_points"]

# bytes a quantized site adds besides its m·n int8 values: scale and zero point initializers
# (+ their names) and the extra nodes; measured on MiniLM's sites (see tests/test_quantize.py)
INT8_OVERHEAD = 400


def int8_weight(W: np.ndarray, table: bool = False, tied: bool = False, unsigned: bool = False) -> np.ndarray:
    """The weight onnxruntime's dynamic quantizer stores, dequantized (``tied``: what
    :func:`_own_tables` stores for a tied table instead, symmetric int8 rows with
    s_i = max_j |W_ij|/127, or with ``unsigned`` asymmetric uint8 rows, s_i = (max_j − min_j)/255
    and a zero point per row).

    MatMul weights (``table`` False): symmetric int8, s = max|W|/127, W_q = s·round(W/s).
    Gather tables (``table`` True): asymmetric uint8 over [min(W,0), max(W,0)],
    s = (hi − lo)/255, z = round(−lo/s), W_q = s·(clip(round(W/s) + z, 0, 255) − z).
    """
    W = np.asarray(W, dtype=np.float32)
    if not W.size:
        return W.copy()
    if tied:  # exactly what _own_tables stores
        from .factorize.quant import quantize_blocked

        return quantize_blocked(W.T, 8, W.shape[1], not unsigned).dequantize().T.copy()
    if table:
        lo, hi = min(float(W.min()), 0.0), max(float(W.max()), 0.0)
        if hi == lo:
            return W.copy()
        s = np.float32((hi - lo) / 255.0)
        z = np.round(-lo / s)
        return ((np.clip(np.round(W / s) + z, 0, 255) - z) * s).astype(np.float32)
    amax = float(np.max(np.abs(W)))
    if amax == 0.0:
        return W.copy()
    s = np.float32(amax / 127.0)
    return (np.clip(np.round(W / s), -127, 127) * s).astype(np.float32)


def int8_bytes(params: int) -> int:
    """Predicted bytes of one quantized MatMul/Gather weight with ``params`` elements."""
    return int(params) + INT8_OVERHEAD


def int8_refusals(model: onnx.ModelProto) -> dict[str, str]:
    """{2-D float initializer: why it must stay float}, by the rules the factorizer keeps: a graph
    input can be fed another value (quantizing it would drop the input), a graph output or a
    tensor read inside a subgraph must keep its exact value, NaN/Inf would poison the scale."""
    from .graph.index import subgraph_names

    g = model.graph
    inputs, outputs, inner = {i.name for i in g.input}, {o.name for o in g.output}, subgraph_names(g)
    out = {}
    for t in g.initializer:
        if len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT:
            continue
        if t.name in inputs:
            out[t.name] = "it is also a graph input (it may be fed at run time)"
        elif t.name in outputs:
            out[t.name] = "it is also a graph output (its exact value is returned)"
        elif t.name in inner:
            out[t.name] = "it is read inside an If/Loop/Scan subgraph"
        elif t.data_location != onnx.TensorProto.EXTERNAL and not np.isfinite(onnx.numpy_helper.to_array(t)).all():
            out[t.name] = "it has NaN or Inf values"
    return out


def weight_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """{initializer name: [names of the MatMul (input B) / Gather (input 0) nodes using it]}, for
    the 2-D float initializers the quantizer may take (not those of :func:`int8_refusals`)."""
    refused = int8_refusals(model)
    inits = {t.name for t in model.graph.initializer
             if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT and t.name not in refused}
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        w = node.input[1] if node.op_type == "MatMul" else node.input[0] if node.op_type == "Gather" else None
        if w in inits:
            out.setdefault(w, []).append(node.name)
    return out


def _all_weight_readers(model: onnx.ModelProto) -> set[str]:
    """Names of initializers read as a MatMul's B or a Gather's table."""
    return {n.input[1] if n.op_type == "MatMul" else n.input[0] for n in model.graph.node
            if n.op_type in ("MatMul", "Gather") and len(n.input) >= (2 if n.op_type == "MatMul" else 1)}


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a unique name (the quantizer selects nodes by name)."""
    taken = {n.name for n in model.graph.node if n.name}
    i = 0
    for node in model.graph.node:
        if not node.name:
            while f"{node.op_type}_q{i}" in taken:
                i += 1
            node.name = f"{node.op_type}_q{i}"
            taken.add(node.name)


def _quantize(work: onnx.ModelProto, chosen: list[str], uses: dict[str, list[str]], per_channel: bool = False) -> onnx.ModelProto:
    """onnxruntime's quantize_dynamic on the MatMul/Gather nodes that read ``chosen``
    (``per_channel``: one weight scale per output column instead of one per tensor)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .io import TMP_SUFFIX, remove_stale_stages

    nodes = sorted({n for w in chosen for n in uses[w]})
    remove_stale_stages(tempfile.gettempdir())  # copies left by killed runs
    with tempfile.TemporaryDirectory(prefix=f".{os.getpid()}.", suffix=TMP_SUFFIX) as d:
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        try:
            onnx.save_model(work, str(src))
        except OSError as e:
            raise OnnxHmfError(f"cannot write the int8 quantizer's temporary copy in {d}: {e.strerror or e}") from None
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice is not for our users
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"],
                             nodes_to_quantize=nodes, per_channel=per_channel, extra_options={"MatMulConstBOnly": True})
        except Exception as e:
            raise OnnxHmfError(f"int8 quantization failed: {str(e).splitlines()[0][:200]}") from None
        finally:
            logging.getLogger().setLevel(quiet)
        return onnx.load_model(str(dst))


def quantize_int8(model: onnx.ModelProto, weights: Iterable[str] | None = None,
                  per_channel: bool = False, notes: list[str] | None = None,
                  table_bits: int = 8, unsigned_head: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """(model with int8 weights, the initializer names quantized).

    ``per_channel``: onnxruntime's per_channel=True (per-column weight scales; still
    MatMulInteger, far more accurate on BERT's FFN weights). ``table_bits`` 4: Gather tables
    as int4 rows instead (:func:`_own_tables`). ``unsigned_head``: a tied table's 8-bit rows
    asymmetric uint8 (a zero point per row; graph/unsigned.py says why).

    ``weights``: initializer names to quantize (their MatMul/Gather uses); None = all.
    A weight the quantizer would store twice (int8 for its Gather, float for another reader such
    as a tied head's Transpose of a factor) is left float, and so is every weight of
    :func:`int8_refusals`. ``notes`` gets why weights stayed float and any opset raised (int8
    needs opset 11: DynamicQuantizeLinear). The given proto is not modified.
    """
    notes = [] if notes is None else notes
    refused = {k: v for k, v in int8_refusals(model).items() if weights is None or k in set(weights)}
    used = set(_all_weight_readers(model))
    for name, why in sorted(refused.items()):
        if name in used:
            notes.append(f"int8: {name!r} stays float: {why}")
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
        raise OnnxHmfError(f"--quantize needs onnxruntime.quantization ({e})") from None
    work = onnx.ModelProto()
    work.CopyFrom(model)
    _name_nodes(work)
    uses = weight_nodes(work)
    chosen = sorted(uses if weights is None else set(weights) & set(uses))
    if not chosen:
        return work, []
    own = _own_tables(work, chosen, notes, table_bits, unsigned_head)
    chosen = [w for w in chosen if w not in own]
    if not chosen:
        return _restore_header(work, model, notes), own
    uses = weight_nodes(work)
    q = _quantize(work, chosen, uses, per_channel)
    floats = {t.name for t in q.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    both = [w for w in chosen if w in floats and f"{w}_quantized" in {t.name for t in q.graph.initializer}]
    if both:  # also read by an op the quantizer left float (a tied head's Transpose): stored twice, so leave them
        chosen = [w for w in chosen if w not in both]
        q = _quantize(work, chosen, uses, per_channel) if chosen else work
    theirs_before = {(n.domain, n.op_type) for n in model.graph.node}  # the model's own custom ops stay as they were
    bad = sorted({f"{n.domain}:{n.op_type}" for n in q.graph.node
                  if n.domain not in ("", "ai.onnx") and (n.domain, n.op_type) not in theirs_before})
    if bad:
        raise OnnxHmfError(f"internal error: the int8 quantizer emitted non-standard ops {bad}")
    q = _restore_header(q, model, notes)
    if per_channel:
        drop_zero_points(q)
    left = set(weight_nodes(q))
    return q, own + [w for w in chosen if w not in left]


def _own_tables(work: onnx.ModelProto, chosen: list[str], notes: list[str], bits: int = 8,
                unsigned_head: bool = False) -> list[str]:
    """Quantize in place the tables among ``chosen`` that onnxruntime's quantizer would store
    worse (graph/qdq.blocked_table), returning their names:

    * tied tables (a Gather and a Transpose → MatMul head read them; site_kind 'tied'): ``bits``
      rows with one scale per row, read by the Gathers and by the head, which becomes
      DynamicQuantizeLinear → MatMulInteger, as fast as the other int8 MatMuls (onnxruntime's
      quantizer would dequantize the whole table each run for a float head); ``unsigned_head``:
      8-bit rows asymmetric uint8 over [min, max] of the row, s_i = (max − min)/255 and a zero
      point z_i, so the head is uint8 × uint8, the kernel that never saturates;
    * with ``bits`` 4, plain tables too: int4 rows, block 32 (or one block per row where 32 does
      not divide D), scales clip-searched for the least squared error.

    Needs opset 11 (DynamicQuantizeLinear, BitShift)."""
    from onnx import numpy_helper

    from .factorize.quant import clip_search, quantize_blocked
    from .graph import qdq

    if default_opset(work) < 11:
        return []
    done = []
    for w in chosen:
        kind = qdq.site_kind(work, w)
        if kind not in ("tied", "table") or (kind == "table" and bits == 8):
            continue
        E = next(numpy_helper.to_array(t) for t in work.graph.initializer if t.name == w).astype(np.float64)
        block = E.shape[1] if kind == "tied" or E.shape[1] % 32 else 32
        asym = unsigned_head and kind == "tied" and bits == 8
        bq = quantize_blocked(E.T, 8, block, not asym) if bits == 8 else clip_search(E.T, None, 4, block, True)
        qdq.blocked_table(work, w, bq)
        notes.append(f"int8: {'tied ' if kind == 'tied' else ''}table {w!r}: {'uint8' if asym else f'int{bits}'} rows"
                     + (f", one scale {'and zero point ' if asym else ''}per row, read by its Gathers and by the head "
                        f"(MatMulInteger{', uint8 × uint8' if asym else ''})" if kind == "tied"
                        else f", one scale per {block} values (gathered rows dequantized)"))
        done.append(w)
    return done


def _restore_header(q: onnx.ModelProto, model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """Give the quantized ``q`` the input's IR version, metadata, producer fields, opsets (raised
    to 11 where int8 needs it), graph input/output infos and name; drop value infos the quantizer
    added (shape inference results the input did not carry: bytes in the file, nothing else)."""
    q.ir_version = model.ir_version
    del q.metadata_props[:]
    q.metadata_props.extend(model.metadata_props)
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(q, attr, getattr(model, attr))
    theirs = {o.domain: o.version for o in q.opset_import}
    del q.opset_import[:]
    for o in model.opset_import:  # the input's opsets (the quantizer may only have raised them to 11+)
        v = max(o.version, theirs.get(o.domain, 0)) if o.domain in ("", "ai.onnx") else o.version
        if v != o.version:
            notes.append(f"opset ai.onnx raised from {o.version} to {v}: int8 needs DynamicQuantizeLinear (opset 11)")
        q.opset_import.add(domain=o.domain, version=v)
    for field in ("input", "output"):
        mine = {v.name: v for v in getattr(model.graph, field)}
        for v in getattr(q.graph, field):
            if v.name in mine:
                v.CopyFrom(mine[v.name])
    q.graph.name = model.graph.name
    kept = {v.name for v in model.graph.value_info}
    infos = [v for v in q.graph.value_info if v.name in kept]
    del q.graph.value_info[:]
    q.graph.value_info.extend(infos)
    return q


def drop_zero_points(model: onnx.ModelProto) -> int:
    """Remove MatMulInteger's weight zero point (input 3) where it is a constant all-zero int8
    initializer (symmetric weights: the quantizer stores one zero per column); ONNX's default for
    the missing input is 0, so the result is the same. Returns the bytes of zero points removed."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    dropped = set()
    for n in g.node:
        if n.op_type == "MatMulInteger" and n.domain in ("", "ai.onnx") and len(n.input) == 4 and n.input[3] in inits:
            t = inits[n.input[3]]
            if t.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(t).any():
                dropped.add(n.input[3])
                del n.input[3]
    from .graph.index import subgraph_names

    used = {i for n in g.node for i in n.input} | {o.name for o in g.output} | {i.name for i in g.input} | \
        subgraph_names(g)
    gone = [t for t in g.initializer if t.name in dropped and t.name not in used]
    for t in gone:
        g.initializer.remove(t)
    return sum(len(t.SerializeToString()) for t in gone)


def _scales(W: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    qmax = 2 ** (bits - 1) - 1
    amax = np.max(np.abs(W), axis=0, keepdims=True)
    return np.where(amax > 0, amax / qmax, 1.0).astype(np.float32), qmax


def int8w_weight(W: np.ndarray, bits: int = 8) -> np.ndarray:
    """The weight :func:`weight_only` stores, rebuilt: s_j = max_i |W_ij|/q per column j
    (q = 127 for 8 bits, 7 for 4), W_q = s·clip(round(W/s), −q, q)."""
    W = np.asarray(W, dtype=np.float32)
    if not W.size:
        return W.copy()
    s, qmax = _scales(W, bits)
    return (np.clip(np.round(W / s), -qmax, qmax) * s).astype(np.float32)


def int4_axis(shape: tuple[int, int]) -> int | None:
    """The axis two 4-bit values are packed along (an even one), or None."""
    return 0 if shape[0] % 2 == 0 else 1 if shape[1] % 2 == 0 else None


def weight_only(model: onnx.ModelProto, weights: Iterable[str], bits: int = 8) -> list[str]:
    """Store each named 2-D float initializer as ``bits``-bit integers W_q plus float scales s
    (one per output column, shape 1×n), rebuilt in the graph by a constant subgraph whose output
    keeps the initializer's name (in place; returns the names done):

    * 8 bits: Mul(Cast(W_q: int8, float), s).
    * 4 bits: two values u = W_q + 8 ∈ [1, 15] per uint8, the second half of an even axis in the
      high nibble: hi = BitShift(P, 4, RIGHT), lo = BitShift(BitShift(P, 4, LEFT), 4, RIGHT)
      (no Sub on uint8, which needs opset 14),
      W = (Cast(Concat(lo, hi)) − 8)·s. Needs opset ≥ 11 (BitShift) and an even side.

    Plain ops rather than DequantizeLinear: on constants, onnxruntime folds them when the
    session is created (it leaves DequantizeLinear alone, to fuse QDQ pairs), so the model runs
    at the input's float speed instead of rebuilding weights every run; and onnx.reference runs
    them at any opset."""
    from onnx import numpy_helper
    from onnx.helper import make_node

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits == 4 and default_opset(model) < 11:
        return []
    want = set(weights)
    keep, done, nodes = [], [], []
    for t in model.graph.initializer:
        axis = int4_axis(tuple(t.dims)) if bits == 4 and len(t.dims) == 2 else 0
        if t.name not in want or len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT or axis is None:
            keep.append(t)
            continue
        W = numpy_helper.to_array(t).astype(np.float32)
        s, qmax = _scales(W, bits)
        q = np.clip(np.round(W / s), -qmax, qmax)
        n = t.name
        keep.append(numpy_helper.from_array(s, f"{n}.int{bits}w_scale"))
        if bits == 8:
            keep.append(numpy_helper.from_array(q.astype(np.int8), f"{n}.int8w"))
            nodes += [make_node("Cast", [f"{n}.int8w"], [f"{n}.int8w_float"], name=f"{n}.int8w_cast", to=onnx.TensorProto.FLOAT),
                      make_node("Mul", [f"{n}.int8w_float", f"{n}.int8w_scale"], [n], name=f"{n}.int8w_scale_mul")]
        else:
            u = (q + 8).astype(np.uint8)
            lo, hi = np.split(u, 2, axis=axis)
            keep += [numpy_helper.from_array((lo + 16 * hi).astype(np.uint8), f"{n}.int4w"),
                     numpy_helper.from_array(np.array(4, np.uint8), f"{n}.int4w_four"),
                     numpy_helper.from_array(np.array(8.0, np.float32), f"{n}.int4w_eight")]
            p = f"{n}.int4w"
            nodes += [*unpack4(p, f"{p}_four", p, axis),
                      make_node("Cast", [f"{p}.u"], [f"{p}_float"], name=f"{p}_cast", to=onnx.TensorProto.FLOAT),
                      make_node("Sub", [f"{p}_float", f"{p}_eight"], [f"{p}_centered"], name=f"{p}_center"),
                      make_node("Mul", [f"{p}_centered", f"{n}.int4w_scale"], [n], name=f"{p}_scale_mul")]
        done.append(n)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    old = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + old)
    return done
