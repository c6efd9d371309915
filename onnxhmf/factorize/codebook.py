"""Product quantization of an embedding table: uint8 codes into small codebooks, pure numpy.

E (V×D) is cut along D into S = D/d sub-vectors of ``sub`` = d values; subspace s has a codebook
C_s (k×d, k ≤ 256) and row v a code c_vs ∈ [0, k), so

    E′_v = concat_s C_s[c_vs]          (codes V×S uint8; codebooks S×k×d)

which costs V·S bytes plus S·k·d stored codebook values: 8/d bits a value (d = 4: 2 bits) plus
the codebooks, as float32, float16 or int8 (``itemsize`` 4, 2, 1; int8: C_s = q_s·a_s with one
float32 scale a_s = max|C_s|/127 per subspace, rebuilt by Cast·Mul, which onnxruntime folds at
load). Each codebook is Lloyd's k-means on that subspace's V sub-vectors (k-means++
seeds from a random subset of 4096 rows, 12 rounds; an emptied centroid is moved to the row worst served),
which minimises Σ_v ‖E_v − E′_v‖² subspace by subspace.

A gathered row is rebuilt with standard ONNX ops only (graph/codebook.py): Gather the codes, add
s·k to the code of subspace s, Gather from the flattened codebook (S·k × d), Reshape to D.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ProductQuantized", "product_quantize", "pq_bytes", "kmeans", "nearest"]

SEED_ROWS = 4096  # k-means++ seeds are drawn from at most this many rows (a random subset)


@dataclass
class ProductQuantized:
    """codes (V×S uint8) into codebooks (S×k×d float32; stored as ``itemsize``-byte floats, or
    for ``itemsize`` 1 as int8 times ``book_scale`` (S×1×1 float32), the values exactly
    q·a in float32)."""

    codes: np.ndarray
    codebooks: np.ndarray
    itemsize: int = 4
    book_scale: np.ndarray | None = None

    def int8_books(self) -> tuple[np.ndarray, np.ndarray]:
        """(q S×k×d int8, a S×1×1 float32) with codebooks == float32(q)·a (itemsize 1)."""
        a = np.asarray(self.book_scale, np.float32)
        return np.clip(np.rint(self.codebooks / a), -127, 127).astype(np.int8), a

    @property
    def shape(self) -> tuple[int, int]:
        S, _, d = self.codebooks.shape
        return (self.codes.shape[0], S * d)

    def dequantize(self) -> np.ndarray:
        """E′ (V×D): row v is concat_s codebooks[s, codes[v, s]]."""
        S, _, d = self.codebooks.shape
        books = self.codebooks.astype(np.float16 if self.itemsize == 2 else np.float32).astype(np.float32)
        return books[np.arange(S)[None, :], self.codes.astype(np.int64)].reshape(self.codes.shape[0], S * d)

    def nbytes(self) -> int:
        S, k, d = self.codebooks.shape
        return pq_bytes(self.codes.shape[0], S * d, d, k, self.itemsize)


def pq_bytes(V: int, D: int, sub: int, k: int = 256, itemsize: int = 4) -> int:
    """Stored bytes: one uint8 code per row and subspace, and the S codebooks of k×sub values
    (``itemsize`` bytes each; int8 adds a float32 scale per subspace)."""
    S = D // sub
    return V * S + S * k * sub * itemsize + (4 * S if itemsize == 1 else 0)


def kmeans(X: np.ndarray, k: int, iters: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means of the rows of X (n×d): (centroids k×d, assignment n). k ≥ n gives every
    row its own centroid (exact)."""
    X = np.asarray(X, np.float64)
    n = X.shape[0]
    if k >= n:
        C = np.zeros((k, X.shape[1]))
        C[:n] = X
        return C, np.arange(n)
    rng = np.random.default_rng(seed)
    C = _seeds(X[rng.permutation(n)[:SEED_ROWS]] if n > SEED_ROWS else X, k, rng)
    xx, X32 = (X * X).sum(1), X.astype(np.float32)
    for _ in range(iters):
        C32 = C.astype(np.float32)
        part = (C32 * C32).sum(1)[None] - 2 * (X32 @ C32.T)  # ‖x − c‖² − ‖x‖² (float32: the rounds only)
        a = part.argmin(1)
        count = np.bincount(a, minlength=k)
        sums = np.stack([np.bincount(a, weights=X[:, j], minlength=k) for j in range(X.shape[1])], axis=1)
        empty = np.flatnonzero(count == 0)
        C = np.where(count[:, None] > 0, sums / np.maximum(count, 1)[:, None], C)
        if empty.size:  # reseed emptied centroids at the rows served worst
            worst = np.argsort(part[np.arange(n), a] + xx)[::-1][: empty.size]
            C[empty] = X[worst]
    return C, nearest(X, C)


def nearest(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Index of the nearest row of C for each row of X (float64)."""
    return ((C * C).sum(1)[None] - 2 * X @ C.T).argmin(1)


def _seeds(X: np.ndarray, k: int, rng) -> np.ndarray:
    """k-means++ seeding: each next centroid drawn with probability ∝ its squared distance to the
    nearest one so far."""
    C = np.empty((k, X.shape[1]))
    C[0] = X[rng.integers(len(X))]
    near = ((X - C[0]) ** 2).sum(1)
    for j in range(1, k):
        tot = near.sum()
        i = rng.choice(len(X), p=near / tot) if tot > 0 else rng.integers(len(X))
        C[j] = X[i]
        near = np.minimum(near, ((X - C[j]) ** 2).sum(1))
    return C


def product_quantize(E: np.ndarray, sub: int = 4, k: int = 256, iters: int = 12, seed: int = 0,
                     itemsize: int = 4) -> ProductQuantized:
    """Product-quantize E (V×D) with sub-vectors of ``sub`` values (must divide D) and k ≤ 256
    centroids per subspace; ``itemsize`` 2 stores the codebooks as float16, 1 as int8 with a
    scale per subspace (their values are rounded to the stored form before the codes are chosen)."""
    E = np.asarray(E, np.float64)
    V, D = E.shape
    if sub < 1 or D % sub or not 1 <= k <= 256 or itemsize not in (1, 2, 4):
        raise ValueError(f"product_quantize: sub {sub} must divide D={D}, 1 <= k={k} <= 256, itemsize 1, 2 or 4")
    S = D // sub
    codes = np.zeros((V, S), np.uint8)
    books = np.zeros((S, k, sub), np.float32)
    scales = np.ones((S, 1, 1), np.float32)
    for s in range(S):
        X = E[:, s * sub:(s + 1) * sub]
        C, a = kmeans(X, k, iters, seed + s)
        if itemsize == 2:
            C = C.astype(np.float16).astype(np.float64)
        elif itemsize == 1:
            top = float(np.abs(C).max())
            scales[s] = np.float32(top / 127) if top > 0 else np.float32(1.0)
            C = (np.clip(np.rint(C / scales[s]), -127, 127).astype(np.float32) * scales[s]).astype(np.float64)
        if itemsize != 4:
            a = nearest(X, C)
        codes[:, s] = a
        books[s] = C
    return ProductQuantized(codes, books, itemsize, scales if itemsize == 1 else None)
