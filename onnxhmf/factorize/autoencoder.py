"""Autoencoder compression in numpy: hand-written gradients, Adam, deterministic with a seed.

Two methods (no ONNX here; graph code is in ``graph/autoencoder.py``):

**Embedding AE.** Rows e_i of a table E (V×d) are the samples. Encoder z = e·W_e + b_e
(d→k, linear; not stored). Decoder, linear:  ê = z·D + b  (k→d), so the stored model is the
exact rank-k factorisation  Ê = C·D + 1·bᵀ  with codes C = E·W_e + 1·b_eᵀ (V×k); or
nonlinear:  ê = act(z·D₁ + b₁)·D₂ + b₂  (k→h→d). Loss, per row weights w_i (token
frequencies, or 1):

    L = w_cos · Σ_i w_i (1 − cos(ê_i, e_i)) / Σ_i w_i
      + w_mag · Σ_i w_i Σ_j s_ij^α / (d · Σ_i w_i),     s = sqrt((ê − e)² + ε²)

(s is |ê − e| smoothed by ε so the gradient α·s^(α−2)·(ê − e) stays finite for α < 1). α is
annealed linearly from α₀ to α₁ over the first ``anneal_epochs`` epochs; Adam's learning rate
is halved every ``halve_every`` epochs. Stored parameters: V·k + k·d + d (linear) or
V·k + k·h + h + h·d + d (nonlinear).

SVD initialisation starts training at the (row-weighted) PCA solution: with μ = Σ w_i e_i / Σ w_i
and V_k the top-k right singular vectors of diag(√w)(E − 1μᵀ), W_e = V_k, b_e = −μ·V_k, D = V_kᵀ,
b = μ. A nonlinear ReLU/LeakyReLU decoder starts there exactly with h = 2k:
D₁ = [I, −I]·s, D₂ = [V_kᵀ; −V_kᵀ]/(s(1+a)) (act(x) − act(−x) = (1+a)·x for LeakyReLU slope a).
Training keeps the parameters with the lowest full-table objective seen at the end of any
epoch (the initial ones included), so with SVD init the result is never worse than the SVD
solution on the training objective at the final α.

**Storage AE.** Rows x_i (length m) of the same module type stacked across layers. Encoder
m→8x→4x→x (LeakyReLU between layers), decoder x→2x→4x→m (LeakyReLU, LeakyReLU, Tanh), then
each decoded row t_i is rescaled to its stored norm n_i = ‖x_i‖:  x̂_i = n_i·t_i/‖t_i‖. Loss

    L = w_cos · mean_i(1 − cos(x̂_i, x_i)) + w_mse · sqrt(mean_ij (x̂_ij − x_ij)²)

Stored: codes (N·x), norms (N) and one shared decoder.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "MLP", "Adam", "EmbeddingAEConfig", "EmbeddingAE", "train_embedding_ae", "embedding_loss",
    "StorageAEConfig", "StorageAE", "train_storage_ae", "storage_loss", "frequency_weights",
    "embedding_ae_params", "embedding_ae_rank", "storage_ae_params", "storage_ae_width", "ACTIVATIONS",
]

ACTIVATIONS = ("linear", "relu", "leakyrelu", "tanh")
LEAKY_SLOPE = 0.01  # ONNX LeakyRelu's default alpha


def _one_blas_thread():
    """Mini-batch products are small: BLAS threads only add synchronisation (10x slower per epoch
    on a busy 2-core machine). Limit BLAS to one thread if threadpoolctl is installed (optional)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _act(name: str, u: np.ndarray) -> np.ndarray:
    if name == "linear":
        return u
    if name == "relu":
        return np.maximum(u, 0)
    if name == "leakyrelu":
        return np.where(u > 0, u, LEAKY_SLOPE * u)
    if name == "tanh":
        return np.tanh(u)
    raise ValueError(f"unknown activation {name!r}")


def _act_grad(name: str, u: np.ndarray, a: np.ndarray) -> np.ndarray:
    """d act(u) / du, given u and a = act(u)."""
    if name == "linear":
        return np.ones_like(u)
    if name == "relu":
        return (u > 0).astype(u.dtype)
    if name == "leakyrelu":
        return np.where(u > 0, 1.0, LEAKY_SLOPE).astype(u.dtype)
    if name == "tanh":
        return 1 - a * a
    raise ValueError(f"unknown activation {name!r}")


class MLP:
    """y = act_L(…act_1(x·W_1 + b_1)…·W_L + b_L); weights in ``self.params`` as [W_1, b_1, …]."""

    def __init__(self, params: list[np.ndarray], acts: list[str]):
        assert len(params) == 2 * len(acts)
        self.params, self.acts = params, acts

    @classmethod
    def random(cls, sizes: list[int], acts: list[str], rng: np.random.Generator, dtype=np.float32) -> "MLP":
        params = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            params.append((rng.standard_normal((fan_in, fan_out)) * np.sqrt(1.0 / fan_in)).astype(dtype))
            params.append(np.zeros(fan_out, dtype))
        return cls(params, acts)

    @property
    def n_params(self) -> int:
        return sum(p.size for p in self.params)

    def forward(self, x: np.ndarray, cache: list | None = None) -> np.ndarray:
        for i, name in enumerate(self.acts):
            u = x @ self.params[2 * i] + self.params[2 * i + 1]
            a = _act(name, u)
            if cache is not None:
                cache.append((x, u, a))
            x = a
        return x

    def backward(self, cache: list, g: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Gradients of the loss for every parameter, and for the input, given g = dL/dy."""
        grads: list[np.ndarray] = [None] * len(self.params)  # type: ignore[list-item]
        for i in reversed(range(len(self.acts))):
            x, u, a = cache[i]
            gu = g * _act_grad(self.acts[i], u, a)
            grads[2 * i] = x.T @ gu
            grads[2 * i + 1] = gu.sum(axis=0)
            g = gu @ self.params[2 * i].T
        return grads, g


class Adam:
    """Adam (Kingma & Ba) with bias correction; ``step`` updates the arrays in place."""

    def __init__(self, params: list[np.ndarray], b1=0.9, b2=0.999, eps=1e-8):
        self.params, self.b1, self.b2, self.eps, self.t = params, b1, b2, eps, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads: list[np.ndarray], lr: float) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * (g * g)
            p -= (lr / c1) * m / (np.sqrt(v / c2) + self.eps)


def _cos_and_grad(y: np.ndarray, x: np.ndarray, eps: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Row cosines c_i = y_i·x_i/(‖y_i‖‖x_i‖) and dc_i/dy_i = x_i/(‖y_i‖‖x_i‖) − c_i·y_i/‖y_i‖²."""
    ny = np.sqrt((y * y).sum(1)) + eps
    nx = np.sqrt((x * x).sum(1)) + eps
    c = (y * x).sum(1) / (ny * nx)
    g = x / (ny * nx)[:, None] - (c / (ny * ny))[:, None] * y
    return c, g


def frequency_weights(counts: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Row weights w_i = (count_i + 1)^power, scaled to mean 1 (unseen tokens keep weight > 0)."""
    w = (np.asarray(counts, np.float64) + 1.0) ** power
    return w / w.mean()


# ------------------------------------------------------------------------------- embedding AE
@dataclass
class EmbeddingAEConfig:
    rank: int  # k, the code width
    decoder: str = "linear"  # "linear" | "nonlinear"
    hidden: int | None = None  # h for the nonlinear decoder (default 2k)
    activation: str = "relu"  # nonlinear decoder: relu | leakyrelu | tanh
    init: str = "svd"  # "svd" | "random"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    halve_every: int = 4
    w_cos: float = 0.9975 / 5
    w_mag: float = 0.0025
    alpha_start: float = 1.0
    alpha_end: float = 0.1
    anneal_epochs: int = 20
    smooth: float = 1e-4  # ε in s = sqrt(r² + ε²)
    seed: int = 0
    dtype: type = np.float32

    def __post_init__(self):
        if self.decoder not in ("linear", "nonlinear"):
            raise ValueError(f"decoder must be linear or nonlinear, got {self.decoder!r}")
        if self.activation not in ("relu", "leakyrelu", "tanh"):
            raise ValueError(f"activation must be relu, leakyrelu or tanh, got {self.activation!r}")
        if self.init not in ("svd", "random"):
            raise ValueError(f"init must be svd or random, got {self.init!r}")
        if self.rank < 1 or self.epochs < 0 or self.batch_size < 1 or not 0 < self.lr < float("inf"):
            raise ValueError("rank, batch size and lr must be positive (lr finite) and epochs ≥ 0")
        for name in ("w_cos", "w_mag"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < float("inf")):
                raise ValueError(f"--ae-loss-weights: {name} must be a finite number ≥ 0, got {v!r}")

    @property
    def h(self) -> int:
        return self.hidden if self.hidden is not None else 2 * self.rank

    def alpha(self, epoch: int) -> float:
        t = 1.0 if self.anneal_epochs <= 0 else min(epoch / self.anneal_epochs, 1.0)
        return self.alpha_start + (self.alpha_end - self.alpha_start) * t


def embedding_ae_params(V: int, d: int, k: int, decoder: str = "linear", hidden: int | None = None) -> int:
    """Stored parameters: codes V·k plus the decoder's weights and biases."""
    if decoder == "linear":
        return V * k + k * d + d
    h = 2 * k if hidden is None else hidden
    return V * k + k * h + h + h * d + d


def embedding_ae_rank(V: int, d: int, budget: int, decoder: str = "linear", hidden: int | None = None) -> int:
    """The largest k whose stored parameters fit ``budget`` (0 if none)."""
    k = 0
    while k < d and embedding_ae_params(V, d, k + 1, decoder, hidden) <= budget:
        k += 1
    return k


def embedding_loss(E_hat: np.ndarray, E: np.ndarray, w: np.ndarray, alpha: float, cfg: EmbeddingAEConfig,
                   grad: bool = True):
    """Loss L (formula in the module docstring) and dL/dÊ for a batch of rows with weights w."""
    c, gc = _cos_and_grad(E_hat, E)
    r = E_hat - E
    s = np.sqrt(r * r + cfg.smooth ** 2)
    sa = s ** alpha
    W = w.sum()
    d = E.shape[1]
    loss = cfg.w_cos * float((w * (1 - c)).sum() / W) + cfg.w_mag * float((w[:, None] * sa).sum() / (d * W))
    if not grad:
        return loss, None
    g = -(cfg.w_cos / W) * w[:, None] * gc + (cfg.w_mag * alpha / (d * W)) * w[:, None] * (sa / (s * s)) * r
    return loss, g


@dataclass
class EmbeddingAE:
    """A trained embedding AE: the stored codes and decoder, plus what training did."""

    codes: np.ndarray  # V×k
    decoder: MLP  # k→d (linear) or k→h→d
    config: EmbeddingAEConfig
    history: list[float] = field(default_factory=list)  # full-table objective (final α) per epoch, [0] = init
    best_epoch: int = 0
    train_s: float = 0.0

    @property
    def params(self) -> int:
        return self.codes.size + self.decoder.n_params

    def reconstruct(self) -> np.ndarray:
        return self.decoder.forward(self.codes.astype(np.float64) if self.codes.dtype == np.float64 else self.codes)


def _svd_basis(E: np.ndarray, w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(μ, V_k): weighted mean and top-k right singular vectors of diag(√w)(E − μ)."""
    E64 = E.astype(np.float64)
    mu = (w[:, None] * E64).sum(0) / w.sum()
    X = np.sqrt(w)[:, None] * (E64 - mu)
    G = X.T @ X  # d×d: tall tables go through the Gram matrix
    evals, evecs = np.linalg.eigh(G)
    Vk = evecs[:, ::-1][:, :k]
    Vk = Vk * np.sign(Vk[np.argmax(np.abs(Vk), axis=0), np.arange(k)])  # deterministic signs
    return mu, Vk


def _init_embedding(E: np.ndarray, w: np.ndarray, cfg: EmbeddingAEConfig, rng) -> tuple[MLP, MLP]:
    V, d = E.shape
    k, dt = cfg.rank, cfg.dtype
    act = cfg.activation
    if cfg.init == "random":
        enc = MLP.random([d, k], ["linear"], rng, dt)
        sizes, acts = ([k, d], ["linear"]) if cfg.decoder == "linear" else ([k, cfg.h, d], [act, "linear"])
        dec = MLP.random(sizes, acts, rng, dt)
        return enc, dec
    mu, Vk = _svd_basis(E, w, k)
    enc = MLP([Vk.astype(dt), (-mu @ Vk).astype(dt)], ["linear"])
    if cfg.decoder == "linear":
        return enc, MLP([Vk.T.astype(dt), mu.astype(dt)], ["linear"])
    h = cfg.h
    z = (E.astype(np.float64) - mu) @ Vk
    s = 1.0 / max(float(np.abs(z).max()), 1e-12)  # codes scaled into [−1, 1] before the activation
    D1 = rng.standard_normal((k, h)) * (0.01 * s)
    D2 = rng.standard_normal((h, d)) * 0.01 / np.sqrt(h)
    if act in ("relu", "leakyrelu") and h >= 2 * k:  # act(x) − act(−x) = (1 + a)·x: exact PCA start
        slope = 0.0 if act == "relu" else LEAKY_SLOPE
        D1[:, :k], D1[:, k:2 * k] = s * np.eye(k), -s * np.eye(k)
        D2[:k], D2[k:2 * k] = Vk.T / (s * (1 + slope)), -Vk.T / (s * (1 + slope))
    elif act == "tanh" and h >= k:  # tanh(x) ≈ x for small x: start near PCA
        t = 0.1 * s
        D1[:, :k] = t * np.eye(k)
        D2[:k] = Vk.T / t
    dec = MLP([D1.astype(dt), np.zeros(h, dt), D2.astype(dt), mu.astype(dt)], [act, "linear"])
    return enc, dec


def _schedule_lr(cfg, epoch: int) -> float:
    return cfg.lr * 0.5 ** (epoch // cfg.halve_every) if cfg.halve_every > 0 else cfg.lr


def _fit(enc: MLP, dec: MLP, X: np.ndarray, batch_grad, objective, cfg, rng, callback) -> tuple[list[float], int]:
    """Mini-batch Adam on enc→dec over the rows of X, for cfg.epochs epochs (rows shuffled by
    ``rng``, lr by _schedule_lr). ``batch_grad(Y, idx, epoch)``: the loss gradient at the batch's
    output Y. ``objective()`` is evaluated before training and after every epoch; the
    parameters of the best evaluation are restored in place. Returns (objective history, the
    best epoch, 0 = the start)."""
    params = enc.params + dec.params
    opt = Adam(params)
    best = objective()
    history, best_params, best_epoch = [best], [p.copy() for p in params], 0
    n = X.shape[0]
    for epoch in range(cfg.epochs):
        lr = _schedule_lr(cfg, epoch)
        order = rng.permutation(n)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            c_enc, c_dec = [], []
            Y = dec.forward(enc.forward(X[idx], c_enc), c_dec)
            g_dec, gz = dec.backward(c_dec, batch_grad(Y, idx, epoch).astype(cfg.dtype))
            g_enc, _ = enc.backward(c_enc, gz)
            opt.step(g_enc + g_dec, lr)
        obj = objective()
        history.append(obj)
        if obj < best:
            best, best_epoch = obj, epoch + 1
            best_params = [p.copy() for p in params]
        if callback is not None:
            callback(epoch, obj)
    for p, b in zip(params, best_params):
        p[...] = b
    return history, best_epoch


def train_embedding_ae(E: np.ndarray, cfg: EmbeddingAEConfig, weights: np.ndarray | None = None,
                       callback=None) -> EmbeddingAE:
    """Train the embedding AE on table E (V×d); ``weights``: per-row loss weights (e.g.
    :func:`frequency_weights`), default 1. Deterministic for a given ``cfg.seed``."""
    with _one_blas_thread(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # (a huge table: the result says so)
        return _train_embedding_ae(E, cfg, weights, callback)


def _train_embedding_ae(E, cfg, weights, callback) -> EmbeddingAE:
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    V, d = E.shape
    if cfg.rank > d:
        raise ValueError(f"rank {cfg.rank} > table width {d}")
    w = np.ones(V) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (V,) or not np.all(w >= 0) or w.sum() <= 0:
        raise ValueError("weights must be V non-negative numbers, not all zero")
    X = np.asarray(E, cfg.dtype)
    wd = w.astype(cfg.dtype)
    enc, dec = _init_embedding(E, w, cfg, rng)

    def objective() -> float:  # full table, final α
        Xh = dec.forward(enc.forward(X))
        return embedding_loss(Xh.astype(np.float64), X.astype(np.float64), w, cfg.alpha_end, cfg, grad=False)[0]

    def batch_grad(Y, idx, epoch):
        return embedding_loss(Y, X[idx], wd[idx], cfg.alpha(epoch), cfg)[1]

    history, best_epoch = _fit(enc, dec, X, batch_grad, objective, cfg, rng, callback)
    return EmbeddingAE(codes=enc.forward(X), decoder=MLP(dec.params, dec.acts), config=cfg, history=history,
                       best_epoch=best_epoch, train_s=time.perf_counter() - t0)


# --------------------------------------------------------------------------------- storage AE
@dataclass
class StorageAEConfig:
    width: int  # x, the code width
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    halve_every: int = 8
    w_cos: float = 0.91
    w_mse: float = 0.09
    seed: int = 0
    dtype: type = np.float32

    def __post_init__(self):
        if self.width < 1 or self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("width, batch size and lr must be positive and epochs ≥ 0")


STORAGE_DECODER_ACTS = ["leakyrelu", "leakyrelu", "tanh"]


def storage_ae_params(N: int, m: int, x: int) -> int:
    """Stored parameters: codes N·x, norms N, decoder x→2x→4x→m with biases."""
    return N * x + N + (x * 2 * x + 2 * x) + (2 * x * 4 * x + 4 * x) + (4 * x * m + m)


def storage_ae_width(N: int, m: int, budget: int) -> int:
    """The largest code width x that fits ``budget`` (0 if none)."""
    x = 0
    while x < m and storage_ae_params(N, m, x + 1) <= budget:
        x += 1
    return x


def _rescale(t: np.ndarray, norms: np.ndarray, eps: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    nt = np.sqrt((t * t).sum(1)) + eps
    return t * (norms / nt)[:, None], nt


def storage_loss(T: np.ndarray, X: np.ndarray, norms: np.ndarray, cfg: StorageAEConfig, grad: bool = True):
    """Loss of the rescaled rows x̂ = n·t/‖t‖ against X, and dL/dT (through the rescaling)."""
    Y, nt = _rescale(T, norms)
    c, gc = _cos_and_grad(Y, X)
    r = Y - X
    N, m = X.shape
    mse = float((r * r).mean())
    rmse = np.sqrt(mse) + 1e-12
    loss = cfg.w_cos * float((1 - c).mean()) + cfg.w_mse * rmse
    if not grad:
        return loss, None
    gy = -(cfg.w_cos / N) * gc + (cfg.w_mse / (N * m * rmse)) * r
    # x̂ = n·t/‖t‖  ⇒  dL/dt = (n/‖t‖)(g − (g·t̂) t̂)
    th = T / nt[:, None]
    gt = (norms / nt)[:, None] * (gy - (gy * th).sum(1, keepdims=True) * th)
    return loss, gt


@dataclass
class StorageAE:
    codes: np.ndarray  # N×x
    norms: np.ndarray  # N
    decoder: MLP  # x→2x→4x→m (LeakyReLU, LeakyReLU, Tanh)
    config: StorageAEConfig
    history: list[float] = field(default_factory=list)
    best_epoch: int = 0
    train_s: float = 0.0

    @property
    def params(self) -> int:
        return self.codes.size + self.norms.size + self.decoder.n_params

    def reconstruct(self) -> np.ndarray:
        return _rescale(self.decoder.forward(self.codes), self.norms)[0]


def train_storage_ae(X: np.ndarray, cfg: StorageAEConfig, callback=None) -> StorageAE:
    """Train the storage AE on stacked rows X (N×m); keeps the best epoch's parameters."""
    with _one_blas_thread(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # (a huge table: the result says so)
        return _train_storage_ae(X, cfg, callback)


def _train_storage_ae(X, cfg, callback) -> StorageAE:
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    _, m = X.shape
    x = cfg.width
    Xd = np.asarray(X, cfg.dtype)
    norms = np.sqrt((Xd.astype(np.float64) ** 2).sum(1)).astype(cfg.dtype)
    enc = MLP.random([m, 8 * x, 4 * x, x], ["leakyrelu", "leakyrelu", "linear"], rng, cfg.dtype)
    dec = MLP.random([x, 2 * x, 4 * x, m], list(STORAGE_DECODER_ACTS), rng, cfg.dtype)

    def objective() -> float:
        T = dec.forward(enc.forward(Xd)).astype(np.float64)
        return storage_loss(T, Xd.astype(np.float64), norms.astype(np.float64), cfg, grad=False)[0]

    def batch_grad(T, idx, epoch):
        return storage_loss(T, Xd[idx], norms[idx], cfg)[1]

    history, best_epoch = _fit(enc, dec, Xd, batch_grad, objective, cfg, rng, callback)
    return StorageAE(codes=enc.forward(Xd), norms=norms, decoder=MLP(dec.params, dec.acts), config=cfg,
                     history=history, best_epoch=best_epoch, train_s=time.perf_counter() - t0)
