"""Hybrid matrix factorization (HMF): a few columns (or rows) kept dense, the rest low rank.

For W (m×n, ONNX MatMul layout in×out), a dense index set S (|S| = k) and its complement R:

    Ŵ[:, S] = D = W[:, S]          (m×k, exact)
    Ŵ[:, R] = A·B ≈ W[:, R]        (A m×r, B r×(n−k): the best rank-r fit, √σ on each factor)

    params = m·k + r·(m + n − k),     ‖W − Ŵ‖_F² = Σ_{i>r} σ_i(W[:, R])²   (Eckart–Young on the block).

"Rows" mode (axis=0) is the same on Wᵀ: k rows dense, params = k·n + r·(m − k + n). LMF is k = 0.

How ``hmf`` picks S, k and r for a parameter budget P (one spectral decomposition of W):

1. Which columns. After the rank-r fit of the whole W = U·diag(σ)·Vᵀ, column j is left with
   res_j(r) = Σ_{i>r} σ_i²·V_{j,i}² (first order, this is what making it dense saves), and it
   holds a share ℓ_j(r) = Σ_{i≤r} V_{j,i}² of the r directions (its leverage: ≈ 1 for a column that
   owns a direction, such as an outlier unit; making it dense frees that rank for σ_{r+1}). S is
   the k columns with the largest res_j(r) + ¼·ℓ_j(r)·σ_{r+1}² (ties: lower index). Weight ¼ was
   measured on MiniLM: 0 (pure residual) misses outlier columns, because they capture the top
   directions and so have small residuals; 1 over-counts on the FFN matrices; ¼ is within ~1% of
   the better of the two everywhere (tests/test_hmf.py shows the outlier case).
2. Which split. For k on a grid over [0, k_max], k_max = min(n, ⌊P/m⌋) (8 points, denser near
   0), r is the largest rank that fits what is left, r = ⌊(P − m·k)/(m + n − k)⌋. Each (k, r) is
   scored by its exact error Σ_{i>r} λ_i of the Gram matrix of W[:, R] (eigenvalues only, on the
   smaller side: G − D·Dᵀ or a principal submatrix of G). The best k is then refined by bisection
   between its grid neighbours (≤ 6 more scorings; within ~1% of the best k on a fine grid on
   MiniLM). k = 0 (plain LMF) is always scored, and the result falls back to it should the final
   fit be worse, so HMF is never worse than LMF at the same P.
3. One select/refit round on the winner: with Q the left singular vectors of the fitted
   W[:, R], re-pick S as the k columns worst fit by Q (‖W_j‖² − ‖QᵀW_j‖²) and refit. This
   never increases the error (the new rest's residuals under Q sum to no more than the old
   one's, and the refit is optimal); on MiniLM it gains ~0.1%, so one round is the default.
4. axis="auto" scores the grid for columns and rows (same decomposition), refines the better
   axis (and the other if within 2%), and keeps the better.

P ≥ m·n gives k = all (exact, Ŵ = W). All decompositions are eigendecompositions of the float64
Gram matrix on the smaller side (accumulated in chunks along the long side, so tall embedding
tables stay O(min(m,n)² + long·r) in memory): σ_i is accurate to about ε·σ_1²/σ_i, ample for
float32 weights; directions with σ_i ≤ 1e-7·σ_1 are dropped (counted as discarded), as in
svd._gram_svd. Matrices whose smaller side exceeds ``_EXACT_MAX_SIDE`` use the randomized SVD of
svd.truncated_svd instead (``seed``, top r_max + 32 directions U'), candidates are scored by an
upper bound, the best rank-r fit of W[:, R] inside span(U'): ‖W[:, R]‖² − Σ_{i≤r} λ_i(U'ᵀ·G_R·U'),
and the winner is fitted by svd.lmf.

Pure numpy/scipy: nothing here knows about ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxhmf.factorize.svd import lmf, truncated_svd

__all__ = ["HybridFactors", "hmf_params", "hmf_fixed", "hmf"]

# Smaller side up to this: exact candidate scoring via small-side Gram eigenvalues.
_EXACT_MAX_SIDE = 1536
# Long-side chunk for float64 Gram accumulation and projections.
_CHUNK = 8192
# Large matrices: directions computed beyond the largest candidate rank, for scoring.
_PAD = 32
# Singular directions with σ ≤ _TINY·σ_1 are not used (their vectors would be noise).
_TINY = 1e-7
# Fractions of k_max on the coarse grid (denser near 0, where the best k usually is).
_GRID = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
# Refinement stops when neighbouring grid points are this close (as a fraction of k_max) ...
_REFINE_RESOLUTION = 1 / 96
# ... or after this many extra evaluations.
_REFINE_MAX_EVALS = 6
# Also refine the other axis when its best grid error is within this factor of the leader's.
_REFINE_OTHER_AXIS = 0.02
# Weight of the freed-rank term in the column score (see the module docstring).
_LEVERAGE_WEIGHT = 0.25


@dataclass(frozen=True)
class HybridFactors:
    """Ŵ: ``D`` along ``axis`` at ``dense_idx``, ``A @ B`` at ``rest_idx``.

    axis=1: Ŵ[:, dense_idx] = D (m×k), Ŵ[:, rest_idx] = A·B (A m×r, B r×(n−k)).
    axis=0: Ŵ[dense_idx, :] = D (k×n), Ŵ[rest_idx, :] = A·B (A (m−k)×r, B r×n).
    D is a copy of W's entries (W's dtype, bit-exact); A, B are float64 with √σ on each.
    """

    axis: int
    dense_idx: np.ndarray  # sorted int64
    rest_idx: np.ndarray  # sorted int64 complement
    D: np.ndarray
    A: np.ndarray
    B: np.ndarray
    residual_sq: float  # ‖W − Ŵ‖_F² = discarded σ² of the low-rank block
    total_sq: float  # ‖W‖_F²

    @property
    def shape(self) -> tuple[int, int]:
        if self.axis == 1:
            return self.D.shape[0], self.dense_idx.size + self.rest_idx.size
        return self.dense_idx.size + self.rest_idx.size, self.D.shape[1]

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def k(self) -> int:
        return int(self.dense_idx.size)

    @property
    def params(self) -> int:
        return self.D.size + self.A.size + self.B.size

    @property
    def relative_error(self) -> float:
        """‖W − Ŵ‖_F / ‖W‖_F."""
        return float(np.sqrt(self.residual_sq / self.total_sq)) if self.total_sq > 0 else 0.0

    def reconstruct(self) -> np.ndarray:
        """Ŵ (m×n, float64)."""
        out = np.empty(self.shape)
        if self.axis == 1:
            out[:, self.dense_idx] = self.D
            out[:, self.rest_idx] = self.A @ self.B
        else:
            out[self.dense_idx, :] = self.D
            out[self.rest_idx, :] = self.A @ self.B
        return out


def hmf_params(m: int, n: int, k: int, r: int, axis: int = 1) -> int:
    """Parameters of an HMF: axis=1 m·k + r·(m + n − k); axis=0 k·n + r·(m − k + n)."""
    if axis == 1:
        return m * k + r * (m + n - k)
    if axis == 0:
        return k * n + r * (m - k + n)
    raise ValueError(f"axis must be 0 or 1, got {axis}")


# ----------------------------------------------------------------------------- linear algebra


def _sq_norm(Y: np.ndarray) -> float:
    """‖Y‖_F² in float64, chunked along the long side."""
    Z = Y if Y.shape[0] <= Y.shape[1] else Y.T
    return sum(float(np.sum(np.square(Z[:, j : j + _CHUNK], dtype=np.float64))) for j in range(0, max(Z.shape[1], 1), _CHUNK))


def _wide_gram(Z: np.ndarray) -> np.ndarray:
    """Z·Zᵀ in float64 for a wide Z (rows ≤ cols), accumulated over column chunks."""
    G = np.zeros((Z.shape[0], Z.shape[0]))
    for j in range(0, Z.shape[1], _CHUNK):
        c = Z[:, j : j + _CHUNK].astype(np.float64)
        G += c @ c.T
    return G


def _eigh_desc(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lam, U = np.linalg.eigh(G)
    return lam[::-1], U[:, ::-1]


def _usable(lam: np.ndarray, r: int) -> int:
    """How many of the top-r eigen-directions to use: those with σ > _TINY·σ_1."""
    if lam.size == 0 or lam[0] <= 0:
        return 0
    return int(min(r, np.sum(lam > (_TINY**2) * lam[0])))


def _fit(Y: np.ndarray, r: int, *, exact: bool, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Best rank-r Y ≈ A·B with √σ on each factor: (A, B, ‖Y − A·B‖_F²).

    exact: eigh of the small-side Gram, A = U_r·diag(√σ), B = diag(1/√σ)·U_rᵀ·Y (= diag(√σ)·V_rᵀ),
    so A·B = U_r·U_rᵀ·Y is the orthogonal projection whatever the rounding in σ. Otherwise svd.lmf.
    """
    p, c = Y.shape
    r = int(min(r, p, c))
    if r <= 0:
        return np.zeros((p, 0)), np.zeros((0, c)), _sq_norm(Y)
    if not exact:
        f = lmf(Y, r, seed=seed)
        return f.A, f.B, f.residual_sq
    if p > c:  # tall: fit Yᵀ and transpose (the √σ split is symmetric)
        A, B, res = _fit(Y.T, r, exact=True, seed=seed)
        return np.ascontiguousarray(B.T), np.ascontiguousarray(A.T), res
    lam, U = _eigh_desc(_wide_gram(Y))
    u = _usable(lam, r)
    root = np.sqrt(np.sqrt(lam[:u]))
    U = U[:, :u]
    B = np.empty((u, c))
    for j in range(0, c, _CHUNK):
        B[:, j : j + _CHUNK] = U.T @ Y[:, j : j + _CHUNK].astype(np.float64)
    B /= root[:, None]
    return U * root, B, float(np.sum(np.clip(lam[u:], 0.0, None)))


def _col_residuals(X: np.ndarray, Q: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """‖X_j‖² − ‖QᵀX_j‖² for every column j (Q orthonormal, m×r)."""
    proj = np.empty(X.shape[1])
    for j in range(0, X.shape[1], _CHUNK):
        proj[j : j + _CHUNK] = np.sum(np.square(Q.T @ X[:, j : j + _CHUNK].astype(np.float64)), axis=0)
    return energy - proj


def _top(score: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted indices of the k largest scores, sorted rest); ties go to the lower index."""
    order = np.argsort(-score, kind="stable")
    return np.sort(order[:k]).astype(np.int64), np.sort(order[k:]).astype(np.int64)


# ----------------------------------------------------------------------------- results


def _result(W: np.ndarray, axis: int, dense: np.ndarray, rest: np.ndarray, A, B, residual_sq: float, total_sq: float) -> HybridFactors:
    """Factors fitted on X = W (axis 1) or Wᵀ (axis 0), X[:, rest] ≈ A·B, in W's orientation."""
    if axis == 1:
        D = np.ascontiguousarray(W[:, dense])
    else:
        D = np.ascontiguousarray(W[dense, :])
        A, B = np.ascontiguousarray(B.T), np.ascontiguousarray(A.T)
    return HybridFactors(axis=axis, dense_idx=dense, rest_idx=rest, D=D, A=A, B=B, residual_sq=float(residual_sq), total_sq=float(total_sq))


def _as_matrix(W) -> np.ndarray:
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {W.shape}")
    if W.dtype.kind not in "fiu":
        raise ValueError(f"expected a real matrix, got dtype {W.dtype}")
    return W


def _axis_int(axis) -> int:
    if axis in (1, "columns", "cols"):
        return 1
    if axis in (0, "rows"):
        return 0
    raise ValueError(f"axis must be 1/'columns' or 0/'rows', got {axis!r}")


def hmf_fixed(W: np.ndarray, dense_idx, rank: int, axis: int = 1) -> HybridFactors:
    """HMF with a given dense set: W[:, dense_idx] kept (axis=1; rows for axis=0), rest rank ``rank``.

    E.g. the rows of an embedding table for frequent tokens. ``rank`` is capped at the rest's
    smaller side; rank 0 leaves the rest zero.
    """
    W = _as_matrix(W)
    axis = _axis_int(axis)
    if rank < 0:
        raise ValueError(f"rank must be ≥ 0, got {rank}")
    X = W if axis == 1 else W.T
    n = X.shape[1]
    idx = np.asarray(dense_idx, dtype=np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"dense_idx out of range [0, {n})")
    dense = np.unique(idx)
    if dense.size != idx.size:
        raise ValueError("dense_idx has duplicates")
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), dense)
    exact = min(X.shape[0], rest.size) <= _EXACT_MAX_SIDE
    A, B, res = _fit(X[:, rest], rank, exact=exact, seed=0)
    return _result(W, axis, dense, rest, A, B, res, _sq_norm(W))


# ----------------------------------------------------------------------------- search


class _Axis:
    """Candidate scoring for dense columns of X (X = W for axis 1, Wᵀ for axis 0)."""

    def __init__(self, X: np.ndarray, budget: int, coef: np.ndarray, sig2: np.ndarray, gram: np.ndarray | None, gram_wide: bool,
                 pivoted: bool = False):
        self.X, self.P = X, budget
        self.pivoted = pivoted  # the low-rank block is stored pivoted: r(m + n − k − r), see pivot.py
        self.m, self.n = X.shape
        self.energy = _col_energy(X)
        self.sig2 = sig2  # σ_i² of X, descending (at least coef.shape[1] of them)
        # cum[:, r] = Σ_{i≤r} σ_i² V_{j,i}²: column j's energy captured by the top-r fit of X;
        # lev[:, r] = Σ_{i≤r} V_{j,i}²: its leverage, the share of the r directions it holds.
        R = coef.shape[1]
        self.cum = np.zeros((self.n, R + 1))
        self.lev = np.zeros((self.n, R + 1))
        sq = np.square(coef, out=self.cum[:, 1:])
        np.divide(sq, sig2[:R], out=self.lev[:, 1:], where=sig2[:R] > 0)
        np.cumsum(self.lev[:, 1:], axis=1, out=self.lev[:, 1:])
        np.cumsum(sq, axis=1, out=sq)
        self.gram, self.gram_wide = gram, gram_wide  # small-side Gram of X (None: bound scoring)
        self.coef = coef if gram is None else None  # U_R'ᵀ·X, kept for bound scoring
        self.X64 = None  # float64 copy of X, made on first need (wide X: m×n with m ≤ n small)
        self.k_max = int(min(self.n, budget // self.m)) if self.m else self.n
        self.seen: dict[int, tuple[float, int, np.ndarray, np.ndarray]] = {}

    def rank(self, k: int) -> int:
        if self.pivoted:
            from .pivot import pivoted_rank_for_budget

            r = pivoted_rank_for_budget(self.m, self.n, self.P, k)
        else:
            r = (self.P - self.m * k) // (self.m + self.n - k)
        return int(max(0, min(r, self.m, self.n - k, self.cum.shape[1] - 1)))

    def score(self, k: int) -> float:
        if k not in self.seen:
            r = self.rank(k)
            res = self.energy - self.cum[:, r]
            nxt = self.sig2[r] if r < self.sig2.size else 0.0
            dense, rest = _top(res + _LEVERAGE_WEIGHT * nxt * self.lev[:, r], k)
            self.seen[k] = (self._error(dense, rest, r, res), r, dense, rest)
        return self.seen[k][0]

    def _error(self, dense, rest, r, res) -> float:
        c = rest.size
        if c == 0 or r >= min(self.m, c):
            return 0.0
        if r == 0:
            return float(np.sum(self.energy[rest]))
        if self.gram is None:  # upper bound: the best rank-r fit of the rest inside span(U_R')
            C = self.coef[dense]  # (u_iᵀ·x_j) for the dense columns: U_R'ᵀ·D
            M = np.diag(self.sig2[: C.shape[1]]) - C.T @ C  # U_R'ᵀ·(X·Xᵀ − D·Dᵀ)·U_R'
            lam = np.linalg.eigvalsh(M)
            return float(max(np.sum(self.energy[rest]) - np.sum(np.clip(lam[lam.size - r :], 0.0, None)), 0.0))
        if dense.size == 0:  # plain LMF: W's own spectrum
            return float(np.sum(np.clip(self.sig2[r:], 0.0, None)))
        if self.gram_wide:  # gram = X·Xᵀ (m×m): Gram of X[:, rest] = G − D·Dᵀ, or direct if fewer
            if self.X64 is None:
                self.X64 = self.X.astype(np.float64)
            Y = self.X64[:, dense] if dense.size <= c else self.X64[:, rest]
            G = Y @ Y.T
            if dense.size <= c:
                G = np.subtract(self.gram, G, out=G)
        else:  # gram = XᵀX (n×n): Gram of X[:, rest] is a principal submatrix
            G = self.gram[np.ix_(rest, rest)]
        lam = np.linalg.eigvalsh(G)  # ascending
        return float(np.sum(np.clip(lam[: lam.size - r], 0.0, None)))

    def coarse(self, ks=None) -> None:
        if ks is None:
            ks = sorted({int(round(f * self.k_max)) for f in _GRID})
        for k in ks:
            self.score(k)

    def refine(self) -> None:
        """Bisect between the best evaluated k and its evaluated neighbours."""
        tol = max(1, int(self.k_max * _REFINE_RESOLUTION))
        evals = 0
        while evals < _REFINE_MAX_EVALS:
            ks = sorted(self.seen)
            i = min(range(len(ks)), key=lambda j: (self.seen[ks[j]][0], ks[j]))
            mids = [(a + b) // 2 for a, b in ((ks[i - 1], ks[i]) if i > 0 else (0, 0), (ks[i], ks[i + 1]) if i + 1 < len(ks) else (0, 0)) if b - a > tol]
            mids = [k for k in mids if k not in self.seen][: _REFINE_MAX_EVALS - evals]
            if not mids:
                return
            for k in mids:
                self.score(k)
            evals += len(mids)

    def best(self) -> tuple[float, int]:
        return min((v[0], k) for k, v in self.seen.items())


def _col_energy(X: np.ndarray) -> np.ndarray:
    e = np.empty(X.shape[1])
    for j in range(0, X.shape[1], _CHUNK):
        e[j : j + _CHUNK] = np.sum(np.square(X[:, j : j + _CHUNK], dtype=np.float64), axis=0)
    return e


def _spectrum(W: np.ndarray, R: int, exact: bool, seed: int, need: tuple[int, ...]):
    """Top-R coefficients of W's columns (σ_i·V_{j,i}, n×R) and rows (σ_i·U_{j,i}, m×R), the σ_i²
    computed (descending), and on the exact path the small-side Gram and whether it is W·Wᵀ."""
    m, n = W.shape
    coef: dict[int, np.ndarray] = {}
    if not exact:  # _PAD more directions than any candidate's rank, for bound scoring
        U, s, Vt, _ = truncated_svd(W, max(R, 1) + _PAD, seed=seed)
        R = min(U.shape[1], Vt.shape[0])
        coef[1] = Vt[:R].T * s[:R]
        coef[0] = U[:, :R] * s[:R]
        return coef, s**2, None, True
    wide = m <= n
    Z = W if wide else W.T  # s×L, s = min(m, n)
    G = _wide_gram(Z)
    lam, U = _eigh_desc(G)
    R = min(R, _usable(lam, R))
    short = U[:, :R] * np.sqrt(lam[:R])  # coefficients of Z's rows
    short_axis, long_axis = (0, 1) if wide else (1, 0)  # Z's rows are W's rows iff wide
    coef[short_axis] = short
    if long_axis in need:
        long = np.empty((Z.shape[1], R))
        for j in range(0, Z.shape[1], _CHUNK):
            long[j : j + _CHUNK] = Z[:, j : j + _CHUNK].T.astype(np.float64) @ U[:, :R]
        coef[long_axis] = long
    return coef, np.clip(lam, 0.0, None), G, wide


def hmf(W: np.ndarray, budget: int, *, axis="auto", k_candidates=None, seed: int = 0, refine_rounds: int = 1,
        pivoted: bool = False) -> HybridFactors:
    """The best HMF of W with at most ``budget`` parameters (see the module docstring).

    axis: "auto" (columns and rows, keep the better), "columns"/1 or "rows"/0.
    k_candidates: the dense counts to try (per axis, infeasible ones dropped) instead of the
    refined grid. seed: randomized SVD for matrices whose smaller side exceeds _EXACT_MAX_SIDE.
    refine_rounds: select/refit rounds on the winner (0 = selection from W's own SVD only).
    pivoted: ranks are chosen for a pivoted low-rank block (cost m·k + r(m+n−k−r), pivot.py).
    """
    W = _as_matrix(W)
    m, n = W.shape
    P = int(budget)
    if P < 0:
        raise ValueError(f"budget must be ≥ 0, got {budget}")
    axes = (1, 0) if axis == "auto" else (_axis_int(axis),)
    if P >= m * n and k_candidates is None:  # everything dense: exact
        ax = axes[0]
        return hmf_fixed(W, np.arange(n if ax == 1 else m), 0, axis=ax)
    exact = min(m, n) <= _EXACT_MAX_SIDE
    total_sq = _sq_norm(W)

    # No candidate on either axis uses a rank above r(0) = ⌊P/(m+n)⌋ or min(m, n) (r(k) ≤ r(0)
    # when P ≤ m_X·(m+n), else r(0) ≥ m_X ≥ r(k)), so one decomposition of that rank serves all.
    R = min(P // (m + n), m, n)
    if pivoted:  # the pivoted cost is concave in r: the k = 0 rank is still the largest
        from .pivot import pivoted_rank_for_budget

        R = max(pivoted_rank_for_budget(m, n, P), pivoted_rank_for_budget(n, m, P))
    coef, sig2, G, gram_wide = _spectrum(W, R, exact, seed, axes)

    ctx = {}
    for ax in axes:
        X = W if ax == 1 else W.T
        wide = gram_wide if ax == 1 else not gram_wide  # is G = X·Xᵀ ?
        c = _Axis(X, P, coef[ax], sig2, G, wide, pivoted)
        if k_candidates is None:
            c.coarse()
        else:
            ks = sorted({int(k) for k in k_candidates if 0 <= int(k) <= c.k_max})
            if not ks:
                raise ValueError(f"no feasible k in k_candidates for axis {ax} (k_max = {c.k_max})")
            c.coarse(ks)
        ctx[ax] = c
    if k_candidates is None:  # refine the best axis, and the other if its grid came close
        lead = min(ctx[a].best()[0] for a in axes)
        for a in axes:
            if ctx[a].best()[0] <= lead * (1 + _REFINE_OTHER_AXIS):
                ctx[a].refine()
    ax = min(axes, key=lambda a: (ctx[a].best()[0], -a))  # ties: columns
    c = ctx[ax]
    err, k = c.best()
    _, r, dense, rest = c.seen[k]

    X = c.X
    A, B, res = _fit(X[:, rest], r, exact=exact, seed=seed)
    for _ in range(refine_rounds if 0 < k < c.n and A.shape[1] > 0 else 0):
        Q = A / np.linalg.norm(A, axis=0)  # A's columns are orthogonal with norms √σ_i
        new_dense, new_rest = _top(_col_residuals(X, Q, c.energy), k)
        if np.array_equal(new_dense, dense):
            break
        A2, B2, res2 = _fit(X[:, new_rest], r, exact=exact, seed=seed)
        if res2 >= res:
            break
        dense, rest, A, B, res = new_dense, new_rest, A2, B2, res2

    if k > 0 and 0 in c.seen and res > c.seen[0][0]:  # never worse than LMF at the same budget
        _, r, dense, rest = c.seen[0]
        A, B, res = _fit(X, r, exact=exact, seed=seed)
    return _result(W, ax, dense, rest, A, B, res, total_sq)
