"""Blocked integer weights in standard ONNX ops, kept integer at run time.

* MatMul weight W (K×N): ``DequantizeLinear(W_q, scale, [zero], axis=0, block_size=b) → MatMul``,
  opset 21 (the first with ``block_size`` and int4/uint4). onnxruntime's graph transformer
  DQMatMulToMatMulNBits fuses it into MatMulNBits (int4 and, from 1.25, int8; the DQ must have
  a single consumer, so each MatMul gets its own DQ reading the shared integers).
* Compact scales (factorize/quant.compact_scales): float16 scales (Cast) or uint8 codes times a
  float32 step per column (Cast·Mul): constant nodes onnxruntime folds at load, before its QDQ
  fusion, which then sees a constant float scale.
* Rotated int4 (factorize/rotate.py): ``MatMul(Reshape(Reshape(X, [-1, b]) · H, Shape(X)), DQ(Rᵀ·W))``;
  one X·R per activation and block size, read by all its rotated MatMuls; H is stored as int8
  ±1 and scaled by Cast·Mul (folded at load). The DQ → MatMul fuses as above.
* Low-rank pairs and residuals: ``X → DQ(A) → MatMul → DQ(B) → MatMul`` (both fuse), and
  ``MatMul(X, DQ(Q)) + MatMul(MatMul(X, DQ(L)), DQ(R))`` for W ≈ Q + L·R.
* A MatMul weight read inside If/Loop/Scan bodies (an optimum merged decoder's two branches):
  site ``body``. onnxruntime 1.32 fails to create the session when a body's DQ → MatMul reads an
  outer-scope integer initializer (its fusion looks the initializer up in the body only:
  "TransposeDQWeightsForMatMulNBits Missing required weight"), so every graph that reads the
  weight gets its own copy of the integers beside its DQ, and each copy fuses. The file holds
  one copy per reading graph (``body_copies``); memory stays integer.
* Gather tables E (V×D), blocks along D: the integer rows and their scales are gathered, and
  only the gathered rows are dequantized (Cast, Sub zero, Mul scale, Reshape), so nothing is
  folded to float at load. int4 rows are stored two per byte (low nibble: first half of a
  block) and unpacked after the Gather with BitShift/Concat: ONNX's Gather takes no int4.
* A tied table (Gather and Transpose → MatMul head): with 8 bits the head's DQ and the Gather
  read the same stored Eᵀ_q (D×V, blocks along D): the Gather takes columns (axis 1) of it and
  of its scales and dequantizes them with a blocked DQ on axis 0, then transposes. With 4 bits
  ONNX's Gather cannot read the int4 tensor, so the rows are stored a second time, packed.
  With one scale per row (block = D), any bits: the rows are stored once, the Gathers read them,
  and the head is X·Eᵀ = DynamicQuantizeLinear(X) → MatMulInteger(X_q, U) · x_scale·s_row, U the
  rows unpacked and transposed by constant nodes (folded at load to integers). Opset 11.

``upgrade_opset`` raises the default-domain opset to 21 where the model allows it: every node
(subgraphs included) must be an op whose versions between the two opsets only add types or
optional inputs/attributes with the old defaults (BatchNormalization: in inference mode), or one
we adapt exactly (Reduce* axes attribute → input at 18, Split's num_outputs at 18). Anything else
refuses with the op named, and the model is left as it was. Below opset 13 (axes attributes of
Squeeze, Unsqueeze, ReduceSum and Split become inputs there) onnx's version converter takes a
copy to 13 first (paddle2onnx exports at 12, PP-OCR's for one).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import OnnxHmfError
from ..factorize.quant import Blocked, LowRankResidual
from ..factorize.rotate import Rotated
from .index import default_opset

__all__ = ["upgrade_opset", "QDQ_OPSET", "site_kind", "body_copies", "blocked_matmul", "blocked_table", "lowrank_matmul",
           "residual_matmul", "rotated_matmul", "unpack4"]

QDQ_OPSET = 21
# ops whose versions in (17, 21] only add types, or optional inputs/attributes whose defaults keep the old meaning
COMPATIBLE = {"Cast": {19, 21}, "CastLike": {19, 21}, "Constant": {19, 21}, "ConstantOfShape": {20, 21},
              "DequantizeLinear": {19, 21}, "QuantizeLinear": {19, 21}, "Equal": {19}, "Flatten": {21},
              "Identity": {19, 21}, "If": {19, 21}, "Loop": {19, 21}, "Scan": {19, 21}, "Pad": {18, 19, 21},
              "Reshape": {14, 19, 21}, "Shape": {15, 19, 21}, "Size": {19, 21}, "Squeeze": {21}, "Unsqueeze": {21},
              "Transpose": {21}, "AveragePool": {19}, "IsInf": {20}, "IsNaN": {20}, "ScatterElements": {18},
              "ScatterND": {18}, "ReduceMax": {20}, "ReduceMin": {20},
              # 14: more integer types (and bfloat16); Pow 15: bfloat16 exponents
              "Add": {14}, "Sub": {14}, "Mul": {14}, "Div": {14}, "Relu": {14}, "Pow": {15}}
REDUCE_18 = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
             "ReduceProd", "ReduceSumSquare"}


def _versions(op: str, lo: int, hi: int) -> set[int]:
    """since_versions of the default-domain ``op`` in (lo, hi]."""
    out = set()
    for v in range(lo + 1, hi + 1):
        try:
            s = onnx.defs.get_schema(op, v, "")
        except onnx.defs.SchemaError:
            continue
        if s.since_version > lo:
            out.add(s.since_version)
    return out


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graphs(g)


def upgrade_opset(model: onnx.ModelProto, target: int = QDQ_OPSET) -> list[str]:
    """Raise the default-domain opset of ``model`` to ``target`` in place (see the module
    docstring); returns notes on what was adapted. Raises OnnxHmfError naming the first op
    that would change meaning."""
    old = default_opset(model)
    if old >= target:
        return []
    notes = []
    src = model
    if old < 13:  # Squeeze/Unsqueeze/ReduceSum/Split axes become inputs at 13: onnx's converter does that step
        model = _to_13(model, target)
        notes.append(f"opset {old} -> 13 by onnx.version_converter")
        old = 13
    work: list[tuple[onnx.GraphProto, onnx.NodeProto]] = []
    for g in _graphs(model.graph):
        for node in g.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            bumps = _versions(node.op_type, old, target)
            fine = COMPATIBLE.get(node.op_type, set())
            rest = bumps - fine
            if not rest:
                continue
            if rest == {18} and node.op_type in REDUCE_18 | {"Split"}:
                work.append((g, node))
                continue
            if node.op_type == "BatchNormalization" and rest <= {14, 15} and len(node.output) == 1 \
                    and not any(a.name == "training_mode" and a.i for a in node.attribute):
                continue  # 14 adds training_mode (default 0: inference, the old meaning), 15 relaxes types
            raise OnnxHmfError(f"cannot raise opset {old} to {target} for blocked int weights: {node.op_type} "
                               f"changes at opset {min(rest)} (node {node.name!r})")
    for g, node in work:
        notes.append(_adapt_18(g, node))
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = target
    if model is not src:
        src.CopyFrom(model)
    return [n for n in notes if n]


def _to_13(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """A copy of ``model`` at opset 13 by onnx's version converter (IR version and metadata
    kept); ``model`` itself is not changed."""
    from onnx import version_converter

    if any(t.data_location == TensorProto.EXTERNAL for g in _graphs(model.graph) for t in g.initializer):
        raise OnnxHmfError(f"cannot raise opset {default_opset(model)} to {target} for blocked int weights: "
                           "the model's weights are external data (its opset is below 13)")
    try:
        out = version_converter.convert_version(model, 13)
    except Exception as e:  # the converter's own errors are RuntimeError/ValueError/its C++ messages
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise OnnxHmfError(f"cannot raise opset {default_opset(model)} to {target} for blocked int weights: "
                           f"onnx's version converter failed ({why})") from None
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out


def _adapt_18(graph: onnx.GraphProto, node: onnx.NodeProto) -> str:
    if node.op_type == "Split":
        if len(node.input) < 2 or not node.input[1]:
            node.attribute.append(helper.make_attribute("num_outputs", len(node.output)))
            return f"{node.name}: Split gets num_outputs={len(node.output)}"
        return ""
    axes = next((a for a in node.attribute if a.name == "axes"), None)
    if axes is None:
        return ""
    name = f"{node.name or node.output[0]}.axes"
    graph.initializer.append(numpy_helper.from_array(np.array(list(axes.ints), np.int64), name))
    node.attribute.remove(axes)
    node.input.append(name)
    return f"{node.name}: {node.op_type} axes attribute → input"


# -------------------------------------------------------------------------------- sites

def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if name in n.input]


def _declares(g: onnx.GraphProto, name: str) -> bool:
    """Whether graph ``g`` defines a tensor ``name`` of its own (shadowing an outer one)."""
    return (any(t.name == name for t in g.initializer) or any(i.name == name for i in g.input)
            or any(name in n.output for n in g.node))


def _body_readers(model: onnx.ModelProto, name: str) -> list[onnx.GraphProto] | None:
    """The subgraphs that read ``name`` (from the outer scope), or None where one reads it other
    than as a MatMul's B, or declares a tensor of that name."""
    out = []
    for g in list(_graphs(model.graph))[1:]:
        users = _consumers(g, name)
        if _declares(g, name) or (users and not all(u.op_type == "MatMul" and u.input[1] == name
                                                     and u.input[0] != name for u in users)):
            return None
        if users:
            out.append(g)
    return out


def body_copies(model: onnx.ModelProto, name: str) -> int:
    """How many copies of a ``body`` weight's integers the file holds: one per reading graph."""
    bodies = _body_readers(model, name) or []
    return len(bodies) + bool(_consumers(model.graph, name))


def site_kind(model: onnx.ModelProto, name: str) -> str | None:
    """'matmul' (every reader is a MatMul's B), 'table' (every reader a Gather on axis 0),
    'tied' (Gathers and one Transpose(perm 1,0) read only by MatMuls' B), 'body' (MatMuls' B,
    some of them inside If/Loop/Scan bodies) or None."""
    if not any(t.name == name and len(t.dims) == 2 and t.data_type == TensorProto.FLOAT for t in model.graph.initializer):
        return None
    if name in {o.name for o in model.graph.output}:
        return None
    bodies = _body_readers(model, name)
    if bodies is None:
        return None
    users = _consumers(model.graph, name)
    if bodies:
        ok = all(u.op_type == "MatMul" and u.input[1] == name and u.input[0] != name for u in users)
        return "body" if ok else None
    if not users:
        return None
    if all(u.op_type == "MatMul" and u.input[1] == name and u.input[0] != name for u in users):
        return "matmul"
    gathers = [u for u in users if u.op_type == "Gather" and u.input[0] == name and _axis(u) == 0]
    heads = [u for u in users if u.op_type == "Transpose" and _perm(u) in (None, [1, 0])]
    if len(gathers) + len(heads) != len(users) or not gathers or len(heads) > 1:
        return None
    if not heads:
        return "table"
    readers = _consumers(model.graph, heads[0].output[0])
    ok = readers and all(r.op_type == "MatMul" and r.input[1] == heads[0].output[0] for r in readers)
    return "tied" if ok and heads[0].output[0] not in {o.name for o in model.graph.output} else None


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _perm(node):
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _int_tensor(values: np.ndarray, bits: int, signed: bool, name: str) -> onnx.TensorProto:
    """An INT4/UINT4 (packed two per byte) or INT8/UINT8 initializer."""
    if bits == 4:
        import ml_dtypes

        return numpy_helper.from_array(values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4), name)
    return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)


def _take(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            return model.graph.initializer.pop(i)
    raise KeyError(name)


def _store(model: onnx.ModelProto | onnx.GraphProto, bq: Blocked, base: str) -> list[str]:
    """Initializers of ``bq`` (values, scale, zero point) named after ``base``, in the main graph
    (or in graph ``model``); DQ's inputs."""
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    inits = graph.initializer
    names = [f"{base}.q{bq.bits}", f"{base}.scale"]
    inits.append(_int_tensor(bq.q, bq.bits, bq.zero is None, names[0]))
    if bq.scale_bits == 32:
        inits.append(numpy_helper.from_array(bq.scale.astype(np.float32), names[1]))
    else:  # compact scales (factorize/quant.compact_scales), rebuilt by constant nodes onnxruntime folds at load
        mk = helper.make_node
        if bq.scale_bits == 16:
            inits.append(numpy_helper.from_array(bq.scale.astype(np.float16), names[1] + "16"))
            pre = [mk("Cast", [names[1] + "16"], [names[1]], name=names[1], to=TensorProto.FLOAT)]
        else:
            codes = np.rint(bq.scale / bq.step).astype(np.uint8)
            inits.extend([numpy_helper.from_array(codes, names[1] + "8"),
                          numpy_helper.from_array(bq.step.astype(np.float16), names[1] + ".step16")])
            pre = [mk("Cast", [names[1] + "8"], [names[1] + "8f"], name=names[1] + "8f", to=TensorProto.FLOAT),
                   mk("Cast", [names[1] + ".step16"], [names[1] + ".step"], name=names[1] + ".step",
                      to=TensorProto.FLOAT),
                   mk("Mul", [names[1] + "8f", names[1] + ".step"], [names[1]], name=names[1])]
        for k, n in enumerate(pre):
            graph.node.insert(k, n)
    if bq.zero is not None:
        names.append(f"{base}.zero")
        inits.append(_int_tensor(bq.zero, bq.bits, False, names[2]))
    return names


def _dq(inputs: list[str], out: str, block: int, axis: int = 0) -> onnx.NodeProto:
    return helper.make_node("DequantizeLinear", inputs, [out], name=out, axis=axis, block_size=block)


def _need_opset(model: onnx.ModelProto) -> None:
    if default_opset(model) < QDQ_OPSET:
        raise OnnxHmfError(f"blocked DequantizeLinear needs opset {QDQ_OPSET} (the model has {default_opset(model)}): "
                           "call upgrade_opset first")


def _rebuild(model: onnx.ModelProto | onnx.GraphProto, fn) -> int:
    """Rebuild the main graph's (or graph ``model``'s) node list: ``fn(node)`` returns the nodes
    that replace ``node`` (it may edit ``node`` and include it) or None to keep it. Returns how
    many nodes fn replaced."""
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    out, hits = [], 0
    for node in graph.node:
        new = fn(node)
        hits += new is not None
        out.extend(onnx.NodeProto.FromString(n.SerializeToString()) for n in (new if new is not None else [node]))
    del graph.node[:]
    graph.node.extend(out)
    return hits


def blocked_matmul(model: onnx.ModelProto, name: str, bq: Blocked) -> int:
    """Replace the float weight ``name`` (site_kind 'matmul' or 'body') by ``bq``; each MatMul
    reads its own DQ (one consumer each, so each fuses where the integers have one reader); each
    body that reads the weight holds its own copy of the integers. Returns the number of MatMuls
    rewritten."""
    _need_opset(model)
    bodies = _body_readers(model, name) or []
    _take(model, name)
    count = iter(range(1 << 30))
    hits = 0
    for k, g in reversed(list(enumerate(bodies))):  # inner graphs first: rebuilding a graph copies its nodes
        hits += _dq_per_reader(g, name, _store(g, bq, f"{name}.body{k}"), bq.block, count)
    if _consumers(model.graph, name):
        hits += _dq_per_reader(model.graph, name, _store(model, bq, name), bq.block, count)
    return hits


def _dq_per_reader(graph: onnx.GraphProto, name: str, inputs: list[str], block: int, count) -> int:
    """Every MatMul of ``graph`` whose B is ``name`` reads its own DQ of ``inputs`` (the stored
    integers, scale and zero point), named ``name.dq<next(count)>``; returns how many."""
    def fn(u):
        if u.op_type != "MatMul" or u.input[1] != name:
            return None
        out = f"{name}.dq{next(count)}"
        u.input[1] = out
        return [_dq(inputs, out, block), u]
    return _rebuild(graph, fn)


def _rotation_matrix(model: onnx.ModelProto, rot: Rotated) -> str:
    """The float b×b rotation H (factorize/rotate.py), shared by every rotated weight: stored as
    int8 ±1 (Hadamard with the signs folded in) and scaled by 1/√b with Cast·Mul, which
    onnxruntime folds at load."""
    base = f"hmf.rot{rot.block}s{rot.seed}"
    if any(base in n.output for n in model.graph.node):
        return base
    H = rot.matrix()
    sign = np.sign(H).astype(np.int8)
    model.graph.initializer.extend([numpy_helper.from_array(sign, base + ".sign"),
                                    numpy_helper.from_array(np.array(1 / np.sqrt(rot.block), np.float32), base + ".norm")])
    model.graph.node.insert(0, helper.make_node("Mul", [base + ".signf", base + ".norm"], [base], name=base))
    model.graph.node.insert(0, helper.make_node("Cast", [base + ".sign"], [base + ".signf"], name=base + ".signf",
                                                to=TensorProto.FLOAT))
    return base


def _rotated_input(model: onnx.ModelProto, x: str, rot: Rotated) -> str:
    """X·R (R = blockdiag(H, …, H)) as Reshape(X, [-1, b]) · H → Reshape(·, Shape(X)), inserted
    once per (X, b) right after X's producer, so every MatMul reading X can read it."""
    H = _rotation_matrix(model, rot)
    out = f"{x}.rot{rot.block}s{rot.seed}"
    nodes = model.graph.node
    if any(out in n.output for n in nodes):
        return out
    flat = f"{out}.flat"
    init = model.graph.initializer
    if not any(t.name == f"hmf.rows{rot.block}" for t in init):
        init.append(numpy_helper.from_array(np.array([-1, rot.block], np.int64), f"hmf.rows{rot.block}"))
    new = [helper.make_node("Shape", [x], [out + ".shape"], name=out + ".shape"),
           helper.make_node("Reshape", [x, f"hmf.rows{rot.block}"], [flat], name=flat),
           helper.make_node("MatMul", [flat, H], [out + ".mm"], name=out + ".mm"),
           helper.make_node("Reshape", [out + ".mm", out + ".shape"], [out], name=out)]
    at = next((i + 1 for i, n in enumerate(nodes) if x in n.output), None)
    if at is None:  # a graph input or initializer: after the rotation matrix's nodes
        at = next(i + 1 for i, n in enumerate(nodes) if H in n.output)
    for k, n in enumerate(new):
        nodes.insert(at + k, n)
    return out


def rotated_matmul(model: onnx.ModelProto, name: str, rot: Rotated) -> int:
    """MatMul(X, W) → MatMul(X·R, DQ(Rᵀ·W's integers)) for every main-graph MatMul reading
    ``name`` (site 'matmul'); the DQ → MatMul still fuses to MatMulNBits. Returns the count."""
    _need_opset(model)
    _take(model, name)
    inputs = _store(model, rot.inner, name)
    readers = [u for u in model.graph.node if u.op_type == "MatMul" and u.input[1] == name]
    for u in readers:
        u.input[0] = _rotated_input(model, u.input[0], rot)
    return _dq_per_reader(model.graph, name, inputs, rot.inner.block, iter(range(1 << 30)))


def lowrank_matmul(model: onnx.ModelProto, name: str, A: Blocked, B: Blocked) -> int:
    """MatMul(X, W) → MatMul(MatMul(X, DQ(A)), DQ(B)) for every MatMul reading ``name``."""
    _need_opset(model)
    _take(model, name)
    ia, ib = _store(model, A, f"{name}.A"), _store(model, B, f"{name}.B")
    count = iter(range(1 << 30))

    def fn(u):
        if u.op_type != "MatMul" or u.input[1] != name:
            return None
        i = next(count)
        a, b, h = f"{name}.A.dq{i}", f"{name}.B.dq{i}", f"{name}.xa{i}"
        first = helper.make_node("MatMul", [u.input[0], a], [h], name=h)
        u.input[0], u.input[1] = h, b
        return [_dq(ia, a, A.block), first, _dq(ib, b, B.block), u]
    return _rebuild(model, fn)


def residual_matmul(model: onnx.ModelProto, name: str, lr: LowRankResidual) -> int:
    """MatMul(X, W) → Add(MatMul(X, DQ(Q)), MatMul(MatMul(X, DQ(L)), DQ(R)))."""
    _need_opset(model)
    _take(model, name)
    iq, il, ir = _store(model, lr.Q, name), _store(model, lr.L, f"{name}.L"), _store(model, lr.R, f"{name}.R")
    count = iter(range(1 << 30))

    def fn(u):
        if u.op_type != "MatMul" or u.input[1] != name:
            return None
        i = next(count)
        q, l, r, xl, lo, main = (f"{name}.{s}{i}" for s in ("dq", "L.dq", "R.dq", "xl", "lowrank", "main"))
        x, y = u.input[0], u.output[0]
        u.input[1], u.output[0] = q, main
        return [_dq(iq, q, lr.Q.block), _dq(il, l, lr.L.block), _dq(ir, r, lr.R.block),
                helper.make_node("MatMul", [x, l], [xl], name=xl), helper.make_node("MatMul", [xl, r], [lo], name=lo),
                u, helper.make_node("Add", [main, lo], [y], name=f"{name}.add{i}")]
    return _rebuild(model, fn)


def _index_rank(model: onnx.ModelProto, tensor: str) -> int | None:
    """Rank of ``tensor`` from the graph's inputs/value_info or shape inference (None: unknown)."""
    def look(m):
        for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
            if vi.name == tensor and vi.type.tensor_type.HasField("shape"):
                return len(vi.type.tensor_type.shape.dim)
        return None
    r = look(model)
    if r is not None:
        return r
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for t in light.graph.initializer:  # shape inference needs only the dims
        light.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del light.graph.initializer[:]
    try:
        return look(onnx.shape_inference.infer_shapes(light))
    except Exception:
        return None


def unpack4(packed: str, four: str, p: str, axis: int = -1) -> list[onnx.NodeProto]:
    """Nodes giving ``p``.u: uint8 ``packed`` (two 4-bit values a byte, low nibble first) as one
    value a byte, the low nibbles' half then the high nibbles' along ``axis``; ``four`` names a
    uint8 scalar 4. Only
    BitShift (opset 11): hi = P >> 4, lo = (P << 4) >> 4 (the left shift drops the high nibble;
    Sub on uint8 would need opset 14)."""
    mk = helper.make_node
    return [mk("BitShift", [packed, four], [p + ".hi"], name=p + ".hi", direction="RIGHT"),
            mk("BitShift", [packed, four], [p + ".lo16"], name=p + ".lo16", direction="LEFT"),
            mk("BitShift", [p + ".lo16", four], [p + ".lo"], name=p + ".lo", direction="RIGHT"),
            mk("Concat", [p + ".lo", p + ".hi"], [p + ".u"], name=p + ".u", axis=axis)]


def _gather_rows(model: onnx.ModelProto, name: str, bq: Blocked) -> tuple[list[str], callable]:
    """Store E's rows (bq quantizes Eᵀ, blocks along D) as [V, nb, b] integers (int4: packed
    [V, nb, b/2] uint8) with [V, nb, 1] scales and zeros; returns a function that, given a Gather
    node, gives the nodes computing its float rows."""
    D, V = bq.shape
    b, nb = bq.block, D // bq.block
    rows = bq.q.T.reshape(V, nb, b)
    sym = bq.zero is None
    base = f"{name}.rows{bq.bits}"
    init = model.graph.initializer
    if bq.bits == 4:
        u = (rows.astype(np.int16) + (8 if sym else 0)).astype(np.uint8)
        init.append(numpy_helper.from_array((u[..., : b // 2] + 16 * u[..., b // 2:]).astype(np.uint8), base))
        init.append(numpy_helper.from_array(np.array(4, np.uint8), f"{base}.four"))
    else:
        init.append(numpy_helper.from_array(rows.astype(np.int8 if sym else np.uint8), base))
    init.append(numpy_helper.from_array(bq.scale.T.reshape(V, nb, 1).astype(np.float32), f"{base}.scale"))
    if not sym:
        init.append(numpy_helper.from_array(bq.zero.T.reshape(V, nb, 1).astype(np.uint8), f"{base}.zero"))
    elif bq.bits == 4:
        init.append(numpy_helper.from_array(np.array(8.0, np.float32), f"{base}.eight"))
    shape = f"{base}.shape"
    made = []

    def nodes(g: onnx.NodeProto, rank: int) -> list[onnx.NodeProto]:
        if shape not in made:
            made.append(shape)
            init.append(numpy_helper.from_array(np.array([0] * rank + [D], np.int64), shape))
        ids, out, p = g.input[1], g.output[0], f"{g.output[0]}.{len(made)}"
        made.append(p)
        mk = helper.make_node
        ns = [mk("Gather", [base, ids], [p + ".q"], name=p + ".q", axis=0)]
        q = p + ".q"
        if bq.bits == 4:
            ns += unpack4(q, f"{base}.four", p)
            q = p + ".u"
        ns.append(mk("Cast", [q], [p + ".f"], name=p + ".f", to=TensorProto.FLOAT))
        x = p + ".f"
        if not sym:
            ns += [mk("Gather", [f"{base}.zero", ids], [p + ".z"], name=p + ".z", axis=0),
                   mk("Cast", [p + ".z"], [p + ".zf"], name=p + ".zf", to=TensorProto.FLOAT)]
        if not sym or bq.bits == 4:
            ns.append(mk("Sub", [x, p + ".zf" if not sym else f"{base}.eight"], [p + ".c"], name=p + ".c"))
            x = p + ".c"
        ns += [mk("Gather", [f"{base}.scale", ids], [p + ".s"], name=p + ".s", axis=0),
               mk("Mul", [x, p + ".s"], [p + ".m"], name=p + ".m"),
               mk("Reshape", [p + ".m", shape], [out], name=p + ".r")]
        return ns
    return nodes


def blocked_table(model: onnx.ModelProto, name: str, bq: Blocked) -> dict:
    """Store the Gather table ``name`` (V×D; site_kind 'table' or 'tied') as blocked integers;
    ``bq`` quantizes Eᵀ (D×V, blocks along D, which the block must divide). A tied head becomes
    DQ(Eᵀ_q) → MatMul. Returns {'gathers': n, 'head': bool, 'shared': bool (the head and the
    Gathers read the same integers)}."""
    kind = site_kind(model, name)
    D, V = bq.shape
    if kind not in ("table", "tied") or D % bq.block or bq.block % 2:
        raise OnnxHmfError(f"{name}: not a blocked-table site ({kind}, D={D}, block={bq.block})")
    gathers = [u for u in _consumers(model.graph, name) if u.op_type == "Gather"]
    ranks = {g.input[1]: _index_rank(model, g.input[1]) for g in gathers}
    if None in ranks.values():
        raise OnnxHmfError(f"{name}: the rank of a Gather's indices is unknown")
    _take(model, name)
    if kind == "tied" and bq.block == D:
        return _tied_rows(model, name, bq, ranks, len(gathers))
    shared = kind == "tied" and bq.bits == 8
    if kind == "tied":
        _need_opset(model)
        head = _store(model, bq, f"{name}.T")
    rows = None if shared else _gather_rows(model, name, bq)
    mk = helper.make_node

    def fn(u):
        if u.op_type == "Transpose" and u.input[0] == name:
            return [_dq(head, u.output[0], bq.block)]
        if u.op_type != "Gather" or u.input[0] != name:
            return None
        rank = ranks[u.input[1]]
        if rows is not None:
            return rows(u, rank)
        p, ids = f"{u.output[0]}.t", u.input[1]
        ns = [mk("Gather", [head[0], ids], [p + ".q"], name=p + ".q", axis=1),
              mk("Gather", [head[1], ids], [p + ".s"], name=p + ".s", axis=1)]
        dq_in = [p + ".q", p + ".s"]
        if len(head) > 2:
            ns.append(mk("Gather", [head[2], ids], [p + ".z"], name=p + ".z", axis=1))
            dq_in.append(p + ".z")
        return ns + [_dq(dq_in, p + ".dq", bq.block),
                     mk("Transpose", [p + ".dq"], [u.output[0]], name=p + ".tr", perm=list(range(1, rank + 1)) + [0])]
    n = _rebuild(model, fn)
    return {"gathers": len(gathers), "head": kind == "tied", "shared": shared, "nodes": n}


def _tied_rows(model: onnx.ModelProto, name: str, bq: Blocked, ranks: dict, gathers: int) -> dict:
    """A tied table with one scale per row (block = D): the Gathers and the head read the same
    stored rows. The head X·Eᵀ becomes onnxruntime's dynamic-quantization pattern,
    DynamicQuantizeLinear(X) → MatMulInteger(X_q, U, x_zero, u_zero) → Cast → ·(x_scale·s_row),
    where U (D×V, uint8 or int8) is the rows unpacked and transposed: a constant subgraph that
    onnxruntime folds at load into integers (not floats). Opset unchanged (11 suffices)."""
    D, V = bq.shape
    rows = _gather_rows(model, name, bq)
    base = f"{name}.rows{bq.bits}"
    init, mk = model.graph.initializer, helper.make_node
    sym = bq.zero is None
    init.append(numpy_helper.from_array(np.array([V, D], np.int64), f"{base}.vd"))
    init.append(numpy_helper.from_array(np.array([V], np.int64), f"{base}.v"))
    if bq.bits == 4 and sym:  # the packed rows hold q + 8
        init.append(numpy_helper.from_array(np.array(8, np.uint8), f"{base}.uzero"))
    u_zero = f"{base}.uzero" if bq.bits == 4 and sym else (f"{base}.zvec" if not sym else "")
    h = f"{name}.head"
    unpack = unpack4(base, f"{base}.four", h) if bq.bits == 4 else []
    src = h + ".u" if bq.bits == 4 else base
    const = unpack + [mk("Reshape", [src, f"{base}.vd"], [h + ".vd"], name=h + ".vd"),
                      mk("Transpose", [h + ".vd"], [h + ".q"], name=h + ".q", perm=[1, 0]),
                      mk("Reshape", [f"{base}.scale", f"{base}.v"], [h + ".s"], name=h + ".s")]
    if not sym:
        const.append(mk("Reshape", [f"{base}.zero", f"{base}.v"], [f"{base}.zvec"], name=f"{base}.zvec"))
    heads = [n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] == name]
    count = iter(range(1 << 30))

    def fn(u):
        if u.op_type == "Transpose" and u.input[0] == name:
            return const
        if u.op_type == "MatMul" and u.input[1] in heads:
            p = f"{h}{next(count)}"
            return [mk("DynamicQuantizeLinear", [u.input[0]], [p + ".xq", p + ".xs", p + ".xz"], name=p + ".dql"),
                    mk("MatMulInteger", [p + ".xq", h + ".q", p + ".xz"] + ([u_zero] if u_zero else []), [p + ".i"],
                       name=p + ".mmi"),
                    mk("Cast", [p + ".i"], [p + ".f"], name=p + ".f", to=TensorProto.FLOAT),
                    mk("Mul", [p + ".xs", h + ".s"], [p + ".sc"], name=p + ".sc"),
                    mk("Mul", [p + ".f", p + ".sc"], [u.output[0]], name=p + ".y")]
        if u.op_type == "Gather" and u.input[0] == name:
            return rows(u, ranks[u.input[1]])
        return None
    n = _rebuild(model, fn)
    return {"gathers": gathers, "head": True, "shared": True, "nodes": n}
