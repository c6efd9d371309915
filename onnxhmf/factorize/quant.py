"""Block-wise integer weights: the math of DequantizeLinear(block_size) → MatMul, pure numpy.

A weight W (K×N, Y = X·W) is cut along K (axis 0, the MatMul's reduction axis) into blocks of
``block`` rows; each block b and column n gets a scale s_bn (and, asymmetric, an integer zero
point z_bn), and

    W′_kn = s_bn · (q_kn − z_bn),   q = clip(round(W/s) + z, lo, hi),

with q in [−2^(bits−1), 2^(bits−1)−1] symmetric (z = 0) or [0, 2^bits − 1] asymmetric. That is
the standard blocked DequantizeLinear of opset 21 (scale shape [ceil(K/block), N]), which
onnxruntime's DQMatMulToMatMulNBits turns into its MatMulNBits kernel.

Choosing the scales (``clip`` ∈ (0, 1] shrinks a block's range, trading clipping for rounding):

* round-to-nearest (RTN): s = max|W_block|/q_max (symmetric), s = (hi − lo)/(2^bits − 1) over
  [min(W,0), max(W,0)] (asymmetric).
* ``clip_search``: per block and column, the ratio of a grid that minimises the output error
  Σ_k,l Δ_k·C_kl·Δ_l over the block's rows (C = XᵀX restricted to the block's diagonal part;
  C = I gives plain MSE). Closed-form per candidate, one vectorised pass per grid point.
* ``gptq``: GPTQ's error feedback. Rows are quantized in order; each row's error e_k, divided by
  the Cholesky factor U of H⁻¹ (H = C + δ·mean(diag C)·I, δ = GPTQ_DAMP = 0.1, H⁻¹ = UᵀU), is
  pushed onto the rows not yet quantized, W_{k+1:} −= U_{k,k+1:}ᵀ·e_k/U_kk: the least-squares
  update of the remaining rows that keeps X·W unchanged. Block scales are taken when the block
  is reached (on the updated rows), optionally by clip search. ``order="act"`` (the default)
  visits the rows by decreasing H_kk (GPTQ's act order: the inputs with the most energy first,
  while the most rows are left to absorb their error) with static groups: each block's scales
  are taken once, on the original rows, so the stored integers keep the natural blocked layout.
* ``lowrank_residual``: W ≈ Q + L·R (LQER / CALDERA): alternately Q = quant(W − L·R) and L·R =
  the whitened rank-r SVD of W − Q (‖X(W − Q − LR)‖ minimised by truncating Sᵀ(W − Q),
  C + δI = S·Sᵀ, see whiten.py). L, R are stored as blocked int8 themselves (the rank is rounded
  to the block size, so R's K axis is whole blocks).
* ``lowrank_blocked``: LMF with blocked integer factors A (K×r), B (r×N), r rounded to the block.

Tables read by Gather are the same math on Eᵀ (blocks along the embedding axis D): gathering a
row of E gathers one column of every block of Eᵀ and its scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .whiten import DEFAULT_DAMP, whitener

__all__ = ["GPTQ_DAMP", "Blocked", "quantize_blocked", "blocked_bytes", "clip_search", "gptq", "lowrank_residual",
           "lowrank_blocked", "round_to_block", "per_channel_int8", "LowRankResidual", "CLIP_GRID", "compact_scales",
           "with_scales", "scale_bits_for"]

# GPTQ's damping H = C + δ·mean(diag C)·I. GPTQ's customary 0.01 fits the calibration text closely;
# on MiniLM calibrated on pydoc and judged on Shakespeare + KJV (benchmarks/bench_damp.py, every
# MatMul int4 block 128 rotated) 0.1 holds out better: cosine 0.9765 -> 0.9789 at 256 samples,
# 0.9807 -> 0.9821 at 2048 (flat within ±0.0008 from 0.05 to 0.2).
GPTQ_DAMP = 0.1

CLIP_GRID = tuple(np.round(np.linspace(1.0, 0.5, 11), 3))


@dataclass
class Blocked:
    """Blocked integers along axis 0: q (K×N, int8 holding ``bits``-bit values), scale and
    zero point ([ceil(K/block), N]; zero None when symmetric)."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    bits: int
    block: int
    scale_bits: int = 32  # how the scales are stored (compact_scales): 32 float32, 16 float16, 8 uint8 codes × step
    step: np.ndarray | None = None  # scale_bits 8: the per-column step [1, N]; scale = codes · step

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> np.ndarray:
        K = self.q.shape[0]
        s = np.repeat(self.scale, self.block, axis=0)[:K]
        z = 0 if self.zero is None else np.repeat(self.zero, self.block, axis=0)[:K].astype(np.float32)
        return ((self.q.astype(np.float32) - z) * s).astype(np.float32)

    def nbytes(self) -> int:
        return blocked_bytes(*self.shape, self.bits, self.block, self.zero is None, self.scale_bits)


def blocked_bytes(K: int, N: int, bits: int, block: int, symmetric: bool = True, scale_bits: int = 32) -> int:
    """Stored bytes: K·N·bits/8 values, scale_bits/8 per scale (8: plus a float16 step per
    column), and bits/8 per zero point."""
    nb = -(-K // block)
    scales = nb * N * scale_bits // 8 + (2 * N if scale_bits == 8 else 0)
    return (K * N * bits + 7) // 8 + scales + (0 if symmetric else (nb * N * bits + 7) // 8)


def scale_bits_for(K: int, block: int, scale_bits: int) -> int:
    """8-bit scales pay (3 bytes less a block, a float16 step and its Cast node more) from two blocks a column on."""
    return 32 if scale_bits == 8 and -(-K // block) < 2 else scale_bits


def compact_scales(S: np.ndarray, scale_bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales S ([blocks, N], positive) as they will be stored: (values, step). 32: float32;
    16: float16 (relative error ≤ 2⁻¹¹); 8: s = c·step_n with c = ⌈S/step_n⌉ ∈ [1, 255] and
    step_n = max_b S_bn/255 rounded up to a float16 (so a block's range only widens: at most 1/c
    coarser; the steps are stored as float16).
    The stored scales are folded to float32 at load (Cast, Cast·Mul), so the blocked DQ still
    fuses; the fits use exactly these values."""
    S = np.asarray(S, np.float64)
    if scale_bits == 32:
        return S.astype(np.float32), None
    if scale_bits == 16:
        return np.maximum(S, 2.0 ** -24).astype(np.float16).astype(np.float32), None
    if scale_bits != 8:
        raise ValueError(f"scale_bits must be 32, 16 or 8, got {scale_bits}")
    raw = np.minimum(S.max(axis=0, keepdims=True) / 255, 65504.0)
    half = raw.astype(np.float16)
    half = np.where(half.astype(np.float64) < raw, np.nextafter(half, np.float16(np.inf)), half)  # round up
    step = half.astype(np.float32)
    step = np.where(step > 0, step, np.float32(1.0))
    codes = np.clip(np.ceil(S / step - 1e-6), 1, 255).astype(np.float32)
    return (codes * step).astype(np.float32), step


def with_scales(W: np.ndarray, bq: Blocked, scale_bits: int) -> Blocked:
    """``bq`` (a fit of W, any method) with its scales stored in ``scale_bits`` and W rounded
    again at those scales (the zero points kept)."""
    if scale_bits == bq.scale_bits:
        return bq
    S, step = compact_scales(bq.scale, scale_bits)
    W = np.asarray(W, np.float64)
    Wb = _padded_blocks(W, bq.block)
    z = None if bq.zero is None else bq.zero.astype(np.float64)
    q = _quant(Wb, S.astype(np.float64), z, bq.bits, bq.zero is None)
    out = _pack(W, q, S, z, bq.bits, bq.block)
    out.scale_bits, out.step = scale_bits, step
    return out


def _range(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


def _padded_blocks(W: np.ndarray, block: int) -> np.ndarray:
    """W (K×N) as (blocks, block, N), zero-padded to whole blocks."""
    K, N = W.shape
    nb = -(-K // block)
    P = np.zeros((nb * block, N), np.float64)
    P[:K] = W
    return P.reshape(nb, block, N)


def _scales(Wb: np.ndarray, bits: int, symmetric: bool, ratio) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and zero points) of blocks Wb (blocks, block, N) with their ranges shrunk by ``ratio``
    (a scalar or an array broadcast to (blocks, N))."""
    lo_q, hi_q = _range(bits, symmetric)
    if symmetric:
        amax = np.abs(Wb).max(axis=1) * ratio
        s = np.where(amax > 0, amax / hi_q, 1.0)
        return s, None
    lo = np.minimum(Wb.min(axis=1), 0.0) * ratio
    hi = np.maximum(Wb.max(axis=1), 0.0) * ratio
    s = np.where(hi > lo, (hi - lo) / (hi_q - lo_q), 1.0)
    z = np.clip(np.round(-lo / s), lo_q, hi_q)
    return s, z


def _quant(Wb: np.ndarray, s: np.ndarray, z: np.ndarray | None, bits: int, symmetric: bool) -> np.ndarray:
    lo_q, hi_q = _range(bits, symmetric)
    zz = 0.0 if z is None else z[:, None, :]
    return np.clip(np.round(Wb / s[:, None, :]) + zz, lo_q, hi_q)


def _deq(q: np.ndarray, s: np.ndarray, z: np.ndarray | None) -> np.ndarray:
    return (q - (0.0 if z is None else z[:, None, :])) * s[:, None, :]


def _pack(W: np.ndarray, q: np.ndarray, s: np.ndarray, z: np.ndarray | None, bits: int, block: int) -> Blocked:
    K, N = W.shape
    return Blocked(q.reshape(-1, N)[:K].astype(np.int8 if z is None else np.uint8), s.astype(np.float32),
                   None if z is None else z.astype(np.uint8), bits, block)


def quantize_blocked(W: np.ndarray, bits: int = 4, block: int = 32, symmetric: bool = True,
                     clip: float | np.ndarray = 1.0) -> Blocked:
    """Round-to-nearest blocked quantization of W (K×N) along axis 0 (``clip``: range ratio,
    a scalar or per (block, column))."""
    W = np.asarray(W, np.float64)
    if bits not in (4, 8) or block < 1:
        raise ValueError(f"bits must be 4 or 8 and block >= 1, got {bits}, {block}")
    Wb = _padded_blocks(W, block)
    s, z = _scales(Wb, bits, symmetric, clip)
    return _pack(W, _quant(Wb, s, z, bits, symmetric), s, z, bits, block)


def _block_grams(G: np.ndarray | None, K: int, block: int) -> np.ndarray:
    """The diagonal blocks of G (K×K) as (blocks, block, block), zero-padded; identity if None."""
    nb = -(-K // block)
    if G is None:
        return np.broadcast_to(np.eye(block), (nb, block, block))
    P = np.zeros((nb * block, nb * block))
    P[:K, :K] = G
    return np.stack([P[i * block:(i + 1) * block, i * block:(i + 1) * block] for i in range(nb)])


def clip_search(W: np.ndarray, G: np.ndarray | None = None, bits: int = 4, block: int = 32, symmetric: bool = True,
                grid=CLIP_GRID) -> Blocked:
    """Blocked quantization with per (block, column) range ratios from ``grid`` chosen to minimise
    Δᵀ·G_bb·Δ, G_bb the block's diagonal block of the Gram G (None: identity, i.e. MSE)."""
    W = np.asarray(W, np.float64)
    Wb = _padded_blocks(W, block)
    Gb = None if G is None else _block_grams(G, W.shape[0], block)
    best_err = np.full((Wb.shape[0], Wb.shape[2]), np.inf)
    best = np.ones_like(best_err)
    for a in grid:
        s, z = _scales(Wb, bits, symmetric, a)
        D = Wb - _deq(_quant(Wb, s, z, bits, symmetric), s, z)
        err = (D * D).sum(axis=1) if G is None else np.einsum("bkn,bkl,bln->bn", D, Gb, D, optimize=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, a, best)
    return quantize_blocked(W, bits, block, symmetric, best)


def _damped(G: np.ndarray, damp: float) -> np.ndarray:
    G = np.asarray(G, np.float64)
    d = float(np.mean(np.diag(G))) or 1.0
    H = G + damp * d * np.eye(G.shape[0])
    dead = np.diag(G) <= 0
    H[dead, dead] = d  # inputs the data never excites: any value is exact for it
    return H


def gptq(W: np.ndarray, G: np.ndarray, bits: int = 4, block: int = 32, symmetric: bool = True,
         damp: float = GPTQ_DAMP, search: bool = True, scale: np.ndarray | None = None,
         order: str = "act", scale_bits: int = 32) -> Blocked:
    """GPTQ with blocked scales (see the module docstring); ``search``: clip-search each block's
    scales under the same Gram; ``scale`` ([blocks, N], symmetric only): keep these scales (e.g.
    the per-channel ones onnxruntime's quantizer chose, block = K); ``order``: "act" (rows by
    decreasing H_kk, scales taken up front) or "natural" (rows in order, each block's scales taken
    on its updated rows); ``scale_bits`` (act order): the scales as stored (compact_scales),
    fixed before the error feedback, which then works on the grid the file holds."""
    if order not in ("act", "natural"):
        raise ValueError(f"gptq order must be 'act' or 'natural', got {order!r}")
    W = np.array(W, np.float64)
    K, N = W.shape
    H = _damped(G, damp)
    nb = -(-K // block)
    if order == "act":
        if scale is not None:
            S, Z = np.asarray(scale, np.float64).reshape(nb, N), None
        else:
            pre = clip_search(W, H, bits, block, symmetric) if search else quantize_blocked(W, bits, block, symmetric)
            S = pre.scale.astype(np.float64)
            Z = None if symmetric else pre.zero.astype(np.float64)
        S32, step = compact_scales(S, scale_bits)
        S = S32.astype(np.float64)
        perm = np.argsort(-np.diag(H), kind="stable")
        q = np.empty((K, N))
        q[perm] = _feedback(W[perm], H[np.ix_(perm, perm)], perm // block, S, Z, bits, symmetric)
        return Blocked(q.astype(np.int8 if symmetric else np.uint8), S32,
                       None if Z is None else Z.astype(np.uint8), bits, block, scale_bits, step)
    if scale_bits != 32:
        raise ValueError("gptq: scale_bits below 32 needs order='act'")
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # H⁻¹ = UᵀU, U upper
    Q = np.zeros((nb * block, N))
    S = np.zeros((nb, N))
    Z = None if symmetric else np.zeros((nb, N))
    lo_q, hi_q = _range(bits, symmetric)
    for b in range(nb):
        i0, i1 = b * block, min((b + 1) * block, K)
        part = W[i0:i1]
        if scale is not None:
            s, z = np.asarray(scale[b], np.float64), None
        else:
            bq = clip_search(part, H[i0:i1, i0:i1], bits, block, symmetric) if search else \
                quantize_blocked(part, bits, block, symmetric)
            s = bq.scale[0].astype(np.float64)
            z = None if symmetric else bq.zero[0].astype(np.float64)
        S[b] = s
        if Z is not None:
            Z[b] = z
        E = np.zeros((i1 - i0, N))
        for i in range(i0, i1):
            q = np.clip(np.round(W[i] / s) + (0 if z is None else z), lo_q, hi_q)
            Q[i] = q
            e = (W[i] - (q - (0 if z is None else z)) * s) / U[i, i]
            W[i + 1:i1] -= np.outer(U[i, i + 1:i1], e)
            E[i - i0] = e
        W[i1:] -= U[i0:i1, i1:].T @ E
    return Blocked(Q[:K].astype(np.int8 if symmetric else np.uint8), S.astype(np.float32),
                   None if Z is None else Z.astype(np.uint8), bits, block)


def _feedback(W: np.ndarray, H: np.ndarray, group: np.ndarray, S: np.ndarray, Z: np.ndarray | None, bits: int,
              symmetric: bool, chunk: int = 128) -> np.ndarray:
    """GPTQ's error feedback over the rows of W (already in visiting order, H permuted alike) with
    fixed scales: row i uses S[group[i]] (and Z). Lazy updates: the rows past a chunk get the
    chunk's errors in one product. Returns the integers, in W's row order."""
    W = W.copy()
    K = W.shape[0]
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    lo_q, hi_q = _range(bits, symmetric)
    out = np.zeros_like(W)
    for c0 in range(0, K, chunk):
        c1 = min(c0 + chunk, K)
        E = np.zeros((c1 - c0, W.shape[1]))
        for i in range(c0, c1):
            s = S[group[i]]
            z = 0.0 if Z is None else Z[group[i]]
            q = np.clip(np.round(W[i] / s) + z, lo_q, hi_q)
            out[i] = q
            e = (W[i] - (q - z) * s) / U[i, i]
            W[i + 1:c1] -= np.outer(U[i, i + 1:c1], e)
            E[i - c0] = e
        W[c1:] -= U[c0:c1, c1:].T @ E
    return out


def round_to_block(r: int, block: int, limit: int | None = None) -> int:
    """r rounded to a multiple of ``block`` (at least one block, at most ``limit`` if given)."""
    r = max(block, int(round(r / block)) * block)
    return min(r, limit) if limit is not None else r


def _whitened_lowrank(E: np.ndarray, G, rank: int, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """L (K×r), R (r×N) minimising ‖X(E − L·R)‖ (plain SVD when G is None; G may also be a
    precomputed Whitener), √σ on each side."""
    if G is None:
        U, s, Vt = np.linalg.svd(E, full_matrices=False)
        r = min(rank, s.size)
        return U[:, :r] * np.sqrt(s[:r]), np.sqrt(s[:r])[:, None] * Vt[:r]
    w = G if hasattr(G, "apply") else whitener(G, damp)
    U, s, Vt = np.linalg.svd(w.apply(E), full_matrices=False)
    r = min(rank, s.size)
    return w.undo(U[:, :r] * np.sqrt(s[:r])), np.sqrt(s[:r])[:, None] * Vt[:r]


@dataclass
class LowRankResidual:
    """W ≈ Q + L·R with Q blocked ``bits``-bit and L (K×r), R (r×N) blocked int8."""

    Q: Blocked
    L: Blocked
    R: Blocked

    def dequantize(self) -> np.ndarray:
        return self.Q.dequantize() + self.L.dequantize() @ self.R.dequantize()

    def nbytes(self) -> int:
        return self.Q.nbytes() + self.L.nbytes() + self.R.nbytes()


def _quantizer(G, bits, block, symmetric, method):
    if method == "gptq" and G is not None:
        return lambda M: gptq(M, G, bits, block, symmetric)
    if method in ("clip", "gptq"):
        return lambda M: clip_search(M, G, bits, block, symmetric)
    return lambda M: quantize_blocked(M, bits, block, symmetric)


def lowrank_residual(W: np.ndarray, G: np.ndarray | None, rank: int, bits: int = 4, block: int = 32,
                     symmetric: bool = True, iters: int = 2, method: str = "clip",
                     damp: float = DEFAULT_DAMP) -> LowRankResidual:
    """W ≈ Q + L·R fitted alternately (module docstring); r is rounded to ``block``; ``method``:
    how Q is chosen (rtn, clip, gptq)."""
    W = np.asarray(W, np.float64)
    r = round_to_block(rank, block, min(W.shape))
    quant = _quantizer(G, bits, block, symmetric, method)
    LR = np.zeros_like(W)
    best = None
    wh = whitener(G, damp) if G is not None else None
    for _ in range(max(iters, 1)):
        Q = quant(W - LR)
        L, R = _whitened_lowrank(W - Q.dequantize(), wh, r, damp)
        Lq, Rq = clip_search(L, None, 8, block), clip_search(R, None, 8, block)
        LR = Lq.dequantize() @ Rq.dequantize()
        cand = LowRankResidual(Q, Lq, Rq)
        D = W - cand.dequantize()
        err = float(np.einsum("kn,kl,ln->", D, G, D) if G is not None else np.sum(D * D))
        if best is None or err < best[0]:
            best = (err, cand)
    return best[1]


def lowrank_blocked(W: np.ndarray, G: np.ndarray | None, rank: int, bits: int = 8, block: int = 32,
                    damp: float = DEFAULT_DAMP) -> tuple[Blocked, Blocked]:
    """LMF with blocked integer factors: A (K×r), B (r×N) from the whitened SVD, r rounded to the
    block; B is quantized after A, fitted to A's quantized value (B = argmin ‖X(W − Â·B)‖ is
    (ÂᵀCÂ)⁻¹ÂᵀC·W)."""
    W = np.asarray(W, np.float64)
    r = round_to_block(rank, block, min(W.shape))
    A, _ = _whitened_lowrank(W, G, r, damp)
    Aq = clip_search(A, None, bits, block)
    Ah = Aq.dequantize().astype(np.float64)
    C = _damped(G, damp) if G is not None else np.eye(W.shape[0])
    B = np.linalg.lstsq(Ah.T @ C @ Ah + 1e-9 * np.eye(Ah.shape[1]), Ah.T @ C @ W, rcond=None)[0]
    return Aq, clip_search(B, None, bits, block)


def per_channel_int8(W: np.ndarray) -> np.ndarray:
    """What onnxruntime's quantize_dynamic(per_channel=True) stores for a MatMul weight, rebuilt:
    symmetric int8 per output column, s_n = max_k |W_kn|/127."""
    W = np.asarray(W, np.float32)
    amax = np.abs(W).max(axis=0, keepdims=True)
    s = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    return (np.clip(np.round(W / s), -127, 127) * s).astype(np.float32)
