"""Run-time integer treatments, each a small object the planner (or a script) can call.

An :class:`IntTreatment` says how one weight is stored; for a planner it gives

* ``nbytes(shape, site)``: the bytes it stores (values, scales, zero points, factors);
* ``weight(W, gram, site)``: what the weight becomes, as a float numpy array (for loss probes);
* :func:`apply_treatments` (model, {weight: treatment}, calibration): the rewritten model.

Kinds (``site`` is 'matmul', 'table', 'tied' or 'body', see graph/qdq.site_kind):

  int4b / int8b   blocked DequantizeLinear(block_size, axis 0) → MatMul (fused by onnxruntime
                  into MatMulNBits); tables: gathered integer rows, dequantized after the Gather.
                  ``method``: rtn (round to nearest), clip (per-block clipping search on the
                  activation Gram), gptq (error feedback with the Gram; clip search per block).
                  ``rotate`` b (MatMuls only): the input side rotated by a block Hadamard first
                  (factorize/rotate.py), X·R computed at run time (graph/qdq.rotated_matmul).
                  ``scale_bits`` 16 or 8 (MatMuls): compact scales (factorize/quant.compact_scales),
                  folded to float at load; the fits use the stored values.
  lqer            W ≈ Q + L·R: Q blocked ``bits``, L·R rank ``rank`` (rounded to the block) in
                  blocked int8, fitted on the Gram (matmul sites).
  lmf-b           W ≈ A·B, both blocked int (``bits``), rank rounded to the block (matmul sites).
  pq              tables only: product quantization (factorize/codebook.py), uint8 codes of
                  sub-vectors of ``block`` values into 2^``bits`` (≤ 256) centroids per subspace;
                  ``method`` f32 or f16 (codebook storage); gathered codes → codebook Gather
                  (graph/codebook.py), opset unchanged. block 4: 2 bits a value.
  int8pc          onnxruntime's dynamic per-channel int8 (DynamicQuantizeLinear → MatMulInteger,
                  any opset ≥ 11); ``method`` gptq refits the stored integers with the Gram at the
                  quantizer's own scales; ``smooth``: SmoothQuant scales first (passes/smooth.py).
                  On a plain table: the quantizer's Gather (uint8 rows, one scale, DequantizeLinear).

A tied table (Gather and a Transpose → MatMul head) with block = D (one scale per row) stores
its rows once: the Gathers read them and the head is DynamicQuantizeLinear → MatMulInteger on the
same integers (graph/qdq._tied_rows). With smaller blocks the head is a blocked DQ → MatMul.

Blocked MatMul weights (and a tied table's head below block = D) need opset 21; plain tables
(integer rows gathered, then Cast/BitShift/Mul), per-row tied tables and int8pc need only 11. :func:`apply_treatments` raises the
opset only when a treatment applied needs it and the model passes graph/qdq.upgrade_opset's
check, else it skips those and says why. (An earlier bench_runtime.py run had MiniLM 1.15x slower
in float at opset 21; remeasured interleaved, upgrade_opset alone: 1.001x, onnx's version
converter: 1.01-1.04x, so the opset itself costs little.)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import numpy_helper

from ..capture import capture_stats
from ..errors import OnnxHmfError
from ..factorize import quant as Q
from ..factorize import rotate as R
from ..factorize.rotate import Rotated
from ..factorize.codebook import ProductQuantized, pq_bytes, product_quantize
from ..graph import qdq
from ..graph.codebook import codebook_table
from ..graph.index import default_opset
from ..quantize import int8_weight

__all__ = ["IntTreatment", "apply_treatments", "weight_grams", "parse_treatment", "planner_options", "apply_planned",
           "can_upgrade"]

_PQ_ITEMSIZE = {"f32": 4, "f16": 2, "i8": 1}  # pq codebooks: float32, float16, int8 with a scale per subspace


@dataclass(frozen=True)
class IntTreatment:
    kind: str  # int4b | int8b | lqer | lmf-b | int8pc | pq
    bits: int = 4
    block: int = 32
    symmetric: bool = True
    method: str = "rtn"  # rtn | clip | gptq
    rank: int = 0
    smooth: bool = False  # int8pc: SmoothQuant scales first (passes/smooth.py), which needs calibration data
    rotate: int = 0  # int4b/int8b on MatMuls: block Hadamard rotation of the input side, at most this block (factorize/rotate.py)
    scale_bits: int = 32  # int4b/int8b on MatMuls: how the block scales are stored (factorize/quant.compact_scales)
    damp: float = Q.GPTQ_DAMP  # method gptq: the Hessian's damping δ (factorize/quant.gptq)

    @property
    def name(self) -> str:
        if self.kind == "pq":
            return f"pq{self.block}k{2 ** self.bits}-{self.method}"
        core = {"int8pc": "int8pc", "lqer": f"lqer{self.bits}r{self.rank}-b", "lmf-b": f"lmf{self.bits}r{self.rank}-b"}
        base = core.get(self.kind, f"int{self.bits}b")
        blk = "" if self.kind == "int8pc" else f"{self.block}{'s' if self.symmetric else 'a'}"
        return f"{base}{blk}-{self.method}{'-smooth' if self.smooth else ''}{f'-rot{self.rotate}' if self.rotate else ''}" \
            f"{f'-s{self.scale_bits}' if self.scale_bits != 32 else ''}{f'-d{self.damp:g}' if self.damp != Q.GPTQ_DAMP else ''}"

    def opset(self, site: str = "matmul", shape: tuple[int, ...] | None = None) -> int:
        """The opset the treatment needs on ``site`` (a V×D table: ``shape``): blocked DQ needs 21;
        gathered table rows (Cast, BitShift, Mul), product-quantized tables and MatMulInteger need
        only 11, and so does a tied table with one scale per row (block = D: its head is MatMulInteger)."""
        rows = site == "tied" and shape is not None and self.block == shape[-1]
        return 11 if self.kind in ("int8pc", "pq") or site == "table" or rows else qdq.QDQ_OPSET

    def sites(self) -> tuple[str, ...]:
        if self.kind == "pq":
            return ("table",)
        if self.rotate:
            return ("matmul",)
        return ("matmul", "table", "tied", "body") if self.kind in ("int4b", "int8b") else \
            ("matmul", "table") if self.kind == "int8pc" else ("matmul",)

    def fit(self, W: np.ndarray, G: np.ndarray | None = None, site: str = "matmul"):
        """The stored form: Blocked (of Eᵀ for tables), LowRankResidual, (A, B), or the float weight (int8pc)."""
        W = np.asarray(W, np.float64)
        if self.kind == "pq":
            return product_quantize(W, self.block, 2 ** self.bits, itemsize=_PQ_ITEMSIZE[self.method])
        if site == "table" and self.kind == "int8pc":  # the quantizer's Gather: uint8 rows, one scale and zero point
            return int8_weight(W, table=True)
        if site not in ("matmul", "body"):
            M, G = W.T, (None if site == "table" or G is None else G / max(np.mean(np.diag(G)), 1e-30) + np.eye(len(G)))
            return Q.clip_search(M, G, self.bits, self.block, self.symmetric) if self.method != "rtn" else \
                Q.quantize_blocked(M, self.bits, self.block, self.symmetric)
        if self.kind == "int8pc":
            if self.method == "gptq" and G is not None:
                s = np.abs(W).max(axis=0, keepdims=True) / 127.0
                return Q.gptq(W, G, 8, W.shape[0], True, damp=self.damp, scale=np.where(s > 0, s, 1.0))
            return Q.per_channel_int8(W)
        if self.kind == "lqer":
            return Q.lowrank_residual(W, G, self.rank, self.bits, self.block, self.symmetric,
                                      method=self.method if G is not None else "rtn")
        if self.kind == "lmf-b":
            return Q.lowrank_blocked(W, G, self.rank, self.bits, self.block)
        if self.rotate:
            return self._rotated(W, G)
        sb = Q.scale_bits_for(W.shape[0], self.block, self.scale_bits)
        if self.method == "gptq" and G is not None:
            return Q.gptq(W, G, self.bits, self.block, self.symmetric, damp=self.damp, scale_bits=sb)
        if self.method in ("clip", "gptq"):
            return Q.with_scales(W, Q.clip_search(W, G, self.bits, self.block, self.symmetric), sb)
        return Q.with_scales(W, Q.quantize_blocked(W, self.bits, self.block, self.symmetric), sb)

    def _rotated(self, W: np.ndarray, G: np.ndarray | None):
        """Rotated(blocked Rᵀ·W) fitted against Rᵀ·G·R; W itself where K has no power-of-two
        block of at least 16 (the treatment without the rotation)."""
        plain = replace(self, rotate=0)
        b = R.rotation_block(W.shape[0], self.rotate)
        if not b:
            return plain.fit(W, G)
        H = R.rotation(b)
        return R.Rotated(plain.fit(R.rotate_rows(W, H), None if G is None else R.rotate_gram(G, H)), b)

    def weight(self, W: np.ndarray, G: np.ndarray | None = None, site: str = "matmul") -> np.ndarray:
        """What W (K×N for MatMul B; V×D for tables) becomes, as float32."""
        return _as_weight(self.fit(W, G, site), site)

    def nbytes(self, shape: tuple[int, int], site: str = "matmul", copies: int = 1, padded: bool = False) -> int:
        """Stored bytes; ``copies``: a body weight's integers are stored once per reading graph;
        ``padded``: a MatMul's K rounded up to whole blocks (MatMulNBits' layout, graph/nbits.py)."""
        if site == "body":
            return copies * self.nbytes(shape, padded=padded)
        if self.kind == "pq":
            return pq_bytes(shape[0], shape[1], self.block, 2 ** self.bits, _PQ_ITEMSIZE[self.method])
        K, N = shape if site == "matmul" else shape[::-1]
        if padded and site == "matmul" and self.kind in ("int4b", "int8b", "lqer", "lmf-b"):
            K = -(-K // self.block) * self.block
        if self.kind == "int8pc":
            return K * N + (5 * N if site == "matmul" else 16)
        if self.kind in ("lqer", "lmf-b"):
            r = Q.round_to_block(self.rank, self.block, min(K, N))
            lr = Q.blocked_bytes(K, r, 8 if self.kind == "lqer" else self.bits, self.block) + \
                Q.blocked_bytes(r, N, 8 if self.kind == "lqer" else self.bits, self.block)
            return lr + (Q.blocked_bytes(K, N, self.bits, self.block, self.symmetric) if self.kind == "lqer" else 0)
        # (MatMulNBits, --kernels onnxruntime, stores float32 scales whatever the DQ form's)
        sb = Q.scale_bits_for(K, self.block, self.scale_bits) if site == "matmul" and not padded else 32
        one = Q.blocked_bytes(K, N, self.bits, self.block, self.symmetric, sb)
        # int4 tied with blocks below D: the head's int4 and the packed rows (one scale per row: shared)
        return 2 * one if site == "tied" and self.bits == 4 and self.block < K else one


def parse_treatment(text: str) -> IntTreatment:
    """'int4b:32:s:clip', 'int8b:128:a:rtn', 'int4b:64:a:gptq:rot128:s8' (MatMuls: rotated
    inputs, blocks ≤ 128; scales stored in 8 bits), 'lqer:4:32:r32:clip', 'lmf-b:8:32:r96', 'int8pc[:gptq][:smooth]',
    'pq:4[:f16|:i8]' (sub-vectors of 4 values, 256 centroids; float16 or int8 codebooks)."""
    p = text.split(":")
    try:
        if p[0] == "pq" and len(p) in (2, 3) and (len(p) == 2 or p[2] in _PQ_ITEMSIZE):
            return IntTreatment("pq", 8, int(p[1]), True, p[2] if len(p) == 3 else "f32")
        if p[0] in ("int4b", "int8b") and all(x.startswith(("rot", "s")) for x in p[4:]):
            rot = next((int(x[3:]) for x in p[4:] if x.startswith("rot")), 0)
            sb = next((int(x[1:]) for x in p[4:] if x.startswith("s")), 32)
            if (rot and (rot < 16 or rot & (rot - 1))) or sb not in (8, 16, 32) or len(p) > 4 + bool(rot) + (sb != 32):
                raise ValueError
            return IntTreatment(p[0], int(p[0][3]), int(p[1]), p[2] == "s", p[3] if len(p) > 3 else "rtn", rotate=rot,
                                scale_bits=sb)
        if p[0] in ("lqer", "lmf-b"):
            return IntTreatment(p[0], int(p[1]), int(p[2]), True, p[4] if len(p) > 4 else "clip", int(p[3].lstrip("r")))
        if p[0] == "int8pc" and all(x in ("rtn", "gptq", "smooth") for x in p[1:]) and p.count("smooth") <= 1:
            method = next((x for x in p[1:] if x != "smooth"), "rtn")
            return IntTreatment("int8pc", 8, 0, True, method, smooth="smooth" in p)
    except (IndexError, ValueError):
        pass
    raise OnnxHmfError(f"bad integer treatment {text!r}")


def _activation(model: onnx.ModelProto, name: str, site: str) -> str | None:
    """The tensor whose Gram the weight's fit uses: its (first) MatMul's input, or the tied head's."""
    read = name
    if site == "tied":
        read = next(n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] == name)
    elif site == "table":
        return None
    return next((n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == read), None)


def weight_grams(model: onnx.ModelProto, weights: list[str], calib) -> dict[str, np.ndarray]:
    """{weight: XᵀX of the activation it multiplies} over ``calib`` (one onnxruntime pass)."""
    acts = {w: _activation(model, w, qdq.site_kind(model, w)) for w in weights}
    acts = {w: a for w, a in acts.items() if a}
    if not acts or calib is None:
        return {}
    stats = capture_stats(model, calib, sorted(set(acts.values())))
    return {w: stats.grams[a] for w, a in acts.items() if a in stats.grams}


def apply_treatments(model: onnx.ModelProto, plan: dict[str, IntTreatment], calib=None,
                     grams: dict[str, np.ndarray] | None = None, fitted: dict | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with each weight of ``plan`` stored by its treatment; notes list what
    was skipped and why, and the opset change. ``calib`` (a Calibration) gives the Grams of the
    methods that use them (or pass ``grams``); ``fitted``: {(weight, treatment): t.fit(...)} already
    computed (integer_plan's probes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    notes: list[str] = []
    sites = {w: qdq.site_kind(out, w) for w in plan}
    todo = {}
    for w, t in plan.items():
        if sites[w] not in t.sites():
            notes.append(f"{w}: {t.name} skipped ({sites[w] or 'not a plain MatMul/Gather weight'})")
        else:
            todo[w] = t
    dims = {t.name: tuple(t.dims) for t in out.graph.initializer if t.name in todo}
    if any(t.opset(sites[w], dims[w]) > default_opset(out) for w, t in todo.items()):
        old = default_opset(out)
        try:
            notes += qdq.upgrade_opset(out)
            notes.append(f"opset {old} -> {qdq.QDQ_OPSET} (blocked DequantizeLinear)")
        except OnnxHmfError as e:
            notes.append(f"blocked treatments skipped: {e}")
            todo = {w: t for w, t in todo.items() if t.opset(sites[w], dims[w]) <= old}
    need = [w for w, t in todo.items() if t.method != "rtn" or t.kind in ("lqer", "lmf-b")]
    if grams is None:
        grams = weight_grams(model, need, calib)
    out, grams = _smooth(out, todo, calib, grams, notes)
    arrays = {t.name: t for t in out.graph.initializer if t.name in todo}
    pc = []
    for w, t in todo.items():
        W = numpy_helper.to_array(arrays[w]).astype(np.float64)
        f = (fitted or {}).get((w, t))
        if f is None:
            f = t.fit(W, grams.get(w), sites[w])
            if fitted is not None:  # a planner's trial builds share the fits
                fitted[(w, t)] = f
        if t.kind == "int8pc":
            pc.append((w, f))
        elif t.kind == "pq":
            codebook_table(out, w, f)
        elif isinstance(f, Rotated):
            qdq.rotated_matmul(out, w, f)
        elif sites[w] == "body":
            qdq.blocked_matmul(out, w, f)
        elif sites[w] != "matmul":
            qdq.blocked_table(out, w, f)
        elif t.kind == "lqer":
            qdq.residual_matmul(out, w, f)
        elif t.kind == "lmf-b":
            qdq.lowrank_matmul(out, w, *f)
        else:
            qdq.blocked_matmul(out, w, f)
    if pc:
        out = _per_channel(out, pc)
    return out, notes


def _smooth(model: onnx.ModelProto, todo: dict[str, IntTreatment], calib, grams: dict[str, np.ndarray],
            notes: list[str]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """SmoothQuant (passes/smooth.py) for the int8pc weights asking for it: the smoothed model,
    and the Grams of their new inputs X/s (G → G / s·sᵀ)."""
    want = {w for w, t in todo.items() if t.kind == "int8pc" and t.smooth}
    if not want:
        return model, grams
    if calib is None or not calib.batches:
        notes.append(f"smooth: {len(want)} int8pc weights not smoothed (needs calibration data)")
        return model, grams
    from .smooth import smooth_for_int8

    out, res = smooth_for_int8(model, calib, weights=want)
    notes += res.notes
    grams = dict(grams)
    for w, s in res.scales.items():
        if w in grams:
            grams[w] = grams[w] / np.outer(s, s)
    return out, grams


def _per_channel(model: onnx.ModelProto, fitted: list[tuple[str, object]]) -> onnx.ModelProto:
    """onnxruntime's per-channel MatMulInteger on the weights; GPTQ-refitted integers replace its own."""
    from ..quantize import quantize_int8

    q, done = quantize_int8(model, [w for w, _ in fitted], per_channel=True)
    refit = {f"{w}_quantized": f for w, f in fitted if w in done and isinstance(f, Q.Blocked)}
    for i, t in enumerate(q.graph.initializer):
        if t.name in refit:
            q.graph.initializer[i].CopyFrom(numpy_helper.from_array(refit[t.name].q.astype(np.int8), t.name))
    return q


# -------------------------------------------------------------------------- planner hook

# the planner's treatments (plan.TREATMENTS names them; executor.BLOCKED_STORES lists the keys)
# (int4 on MatMuls: scales in 8 bits, compact_scales; on MiniLM's linears the same cosine as float32 scales)
PLANNED = {"int4b": IntTreatment("int4b", 4, 32, False, "gptq", scale_bits=8),
           "int8b": IntTreatment("int8b", 8, 128, True, "clip"),
           "int4b128": IntTreatment("int4b", 4, 128, False, "gptq", scale_bits=8),
           "int4b256": IntTreatment("int4b", 4, 256, False, "gptq", scale_bits=8),
           **{f"int4b{b}r": IntTreatment("int4b", 4, b, False, "gptq", rotate=32, scale_bits=8) for b in (32, 64, 128, 256)},
           "pq4": IntTreatment("pq", 8, 4, True, "i8")}


def can_upgrade(model: onnx.ModelProto) -> bool:
    """Whether the blocked treatments (opset 21) may be planned for ``model``."""
    if default_opset(model) >= qdq.QDQ_OPSET:
        return True
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    # the check only reads nodes; below opset 13 onnx's converter runs too and wants every input
    # defined, so the weights become graph inputs of their type and shape
    have = {i.name for i in probe.graph.input}
    probe.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in probe.graph.initializer if t.name not in have)
    del probe.graph.initializer[:]
    try:
        qdq.upgrade_opset(probe)
        return True
    except OnnxHmfError:
        return False


def planner_options(model: onnx.ModelProto, name: str, W: np.ndarray, grams: dict[str, np.ndarray], loss_with,
                    make_option, overhead: int = 0, fitted: dict | None = None, padded: bool = False,
                    rotate: bool = False) -> list:
    """Options (bytes, measured loss, (kind name, 1.0)) for the planned integer treatments of the
    weight ``name`` (W as stored: K×N, or V×D for tables). ``grams``: {activation: XᵀX} (a
    capture's ActivationStats.grams); ``loss_with(name, W′)``: the planner's probe;
    ``make_option(bytes, loss, tag)`` builds its Option; ``padded``: priced as MatMulNBits
    stores them (--kernels onnxruntime); ``rotate``: the rotated options (int4bNr) too."""
    site = qdq.site_kind(model, name)
    if site is None:
        return []
    act = _activation(model, name, site)
    G = grams.get(act) if act else None
    out = []
    for key, t in PLANNED.items():
        if (t.rotate and not rotate) or site not in t.sites() or (site not in ("matmul", "body") and t.block and W.shape[1] % t.block):
            continue
        if site in ("matmul", "body") and t.kind == "int4b" and t.block // 2 >= W.shape[0]:
            continue  # one block per column already at half this block: the same fit as the smaller option
        f = t.fit(W, G, site)
        if fitted is not None:  # the executor's trial builds reuse it (apply_treatments)
            fitted[(name, t)] = f
        nbytes = t.nbytes(W.shape, site, qdq.body_copies(model, name) if site == "body" else 1, padded)
        out.append(make_option(nbytes + overhead, loss_with(name, _as_weight(f, site)), (key, 1.0)))
    return out


def apply_planned(model: onnx.ModelProto, tags: dict[str, str], grams: dict[str, np.ndarray],
                  fitted: dict | None = None, rows: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Apply the planner's choice {weight: PLANNED key} (other treatments ignored); ``fitted``:
    fits to reuse, and where new ones are kept. ``rows``: {weight: perm} for weights whose rows
    were permuted (W[perm]) after the Grams were captured and the fits made (a pivoted or hybrid
    producer's column order folded into them): their Gram is G[perm][:, perm] (the activation is
    permuted alike) and their fits are their own, kept under (weight, treatment, perm), never the
    unpermuted weight's."""
    plan = {w: PLANNED[k] for w, k in tags.items() if k in PLANNED}
    if not plan:
        return model
    rows = {w: np.asarray(p) for w, p in (rows or {}).items() if w in plan}
    per_weight = {}
    for w in plan:
        site = qdq.site_kind(model, w)
        act = _activation(model, w, site) if site else None
        if act in grams:
            per_weight[w] = grams[act][np.ix_(rows[w], rows[w])] if w in rows else grams[act]
    key = lambda w, t: (w, t, rows[w].tobytes()) if w in rows else (w, t)  # noqa: E731
    own = None if fitted is None else {(w, t): fitted[key(w, t)] for w, t in plan.items() if key(w, t) in fitted}
    out, _ = apply_treatments(model, plan, grams=per_weight, fitted=own)
    if fitted is not None:
        fitted.update({key(w, t): f for (w, t), f in own.items()})
    return out


def _as_weight(f, site: str) -> np.ndarray:
    """The float weight a fit stands for (W's own orientation)."""
    if isinstance(f, np.ndarray):
        return f.astype(np.float32)
    if isinstance(f, ProductQuantized):  # already V×D
        return f.dequantize()
    if isinstance(f, tuple):
        return (f[0].dequantize() @ f[1].dequantize()).astype(np.float32)
    out = f.dequantize()
    return (out.T if site not in ("matmul", "body") else out).astype(np.float32)

