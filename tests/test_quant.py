"""Blocked integer math (onnxhmf/factorize/quant.py) on matrices."""
import numpy as np
import pytest

from onnxhmf.factorize import quant as Q


def _data(K=96, N=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((800, K)) * np.exp(1.5 * rng.standard_normal(K))  # outlier channels
    W = rng.standard_t(3, (K, N)) * 0.05  # heavy tails, so clipping pays
    return X, W, X.T @ X


def _oerr(W, Wh, G):
    D = W - Wh
    return float(np.einsum("kn,kl,ln->", D, G, D))


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
def test_rtn_blocks_range_and_rounding(bits, sym):
    _, W, _ = _data(K=70)  # 70 rows: the last block of 32 is partial
    bq = Q.quantize_blocked(W, bits, 32, sym)
    assert bq.scale.shape == (3, W.shape[1]) and bq.q.shape == W.shape
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    assert bq.q.min() >= lo and bq.q.max() <= hi
    s = np.repeat(bq.scale, 32, axis=0)[:70]
    err = np.abs(bq.dequantize() - W)
    assert np.all(err <= s / 2 + 1e-6)  # round to nearest, nothing clipped at ratio 1
    assert (bq.zero is None) == sym


def test_blocked_bytes():
    assert Q.blocked_bytes(64, 10, 4, 32) == 64 * 10 // 2 + 4 * 2 * 10
    assert Q.blocked_bytes(64, 10, 4, 32, symmetric=False) == 320 + 80 + 10
    assert Q.blocked_bytes(70, 10, 8, 32) == 700 + 4 * 3 * 10


def test_clip_search_beats_rtn_on_output_error():
    _, W, G = _data()
    rtn = _oerr(W, Q.quantize_blocked(W, 4, 32).dequantize(), G)
    mse = _oerr(W, Q.clip_search(W, None, 4, 32).dequantize(), G)
    gram = _oerr(W, Q.clip_search(W, G, 4, 32).dequantize(), G)
    assert gram < rtn and gram <= mse * 1.0001


def test_gptq_beats_clip_search():
    _, W, _ = _data()
    rng = np.random.default_rng(3)
    X = rng.standard_normal((800, 16)) @ rng.standard_normal((16, 96)) + 0.1 * rng.standard_normal((800, 96))
    G = X.T @ X  # correlated inputs: the error feedback has something to cancel
    clip = _oerr(W, Q.clip_search(W, G, 4, 32).dequantize(), G)
    g = Q.gptq(W, G, 4, 32)
    assert _oerr(W, g.dequantize(), G) < 0.8 * clip
    assert g.q.min() >= -8 and g.q.max() <= 7


def test_gptq_keeps_given_scales():
    _, W, G = _data()
    s = np.abs(W).max(axis=0, keepdims=True) / 127
    g = Q.gptq(W, G, 8, W.shape[0], scale=s)
    np.testing.assert_allclose(g.scale, s, rtol=1e-6)
    assert _oerr(W, g.dequantize(), G) < _oerr(W, Q.per_channel_int8(W), G)


def test_lowrank_residual_lowers_error_and_rounds_rank():
    _, W, G = _data()
    lr = Q.lowrank_residual(W, G, 20, 4, 32)
    assert lr.L.shape == (96, 32) and lr.R.shape == (32, 40)  # 20 → one block of 32
    assert _oerr(W, lr.dequantize(), G) < 0.5 * _oerr(W, Q.clip_search(W, G, 4, 32).dequantize(), G)
    assert lr.nbytes() == lr.Q.nbytes() + lr.L.nbytes() + lr.R.nbytes()


def test_lowrank_blocked_near_exact_on_low_rank():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((96, 32)) @ rng.standard_normal((32, 80))
    A, B = Q.lowrank_blocked(W, None, 30, 8, 32)
    assert A.shape == (96, 32) and B.shape == (32, 80)
    rel = np.linalg.norm(A.dequantize() @ B.dequantize() - W) / np.linalg.norm(W)
    assert rel < 0.02


def test_round_to_block():
    assert Q.round_to_block(20, 32) == 32 and Q.round_to_block(50, 32) == 64 and Q.round_to_block(100, 32, 90) == 90


def test_gptq_act_order_beats_natural_order_on_uneven_inputs():
    """Inputs of very different energy (BERT's outlier channels): visiting the strong ones first
    leaves the most rows to absorb their error."""
    rng = np.random.default_rng(5)
    K, N = 100, 48  # K not a multiple of the block: the last block is 4 rows
    X = rng.standard_normal((2000, 24)) @ rng.standard_normal((24, K)) + 0.2 * rng.standard_normal((2000, K))
    X *= np.exp(rng.uniform(-2, 2, K))
    G = X.T @ X
    W = rng.standard_normal((K, N))
    for symmetric in (True, False):
        act, nat = (Q.gptq(W, G, 4, 32, symmetric, order=o) for o in ("act", "natural"))
        assert act.scale.shape == nat.scale.shape == (4, N) and act.q.shape == (K, N)
        lo, hi = (-8, 7) if symmetric else (0, 15)
        assert act.q.min() >= lo and act.q.max() <= hi
        assert _oerr(W, act.dequantize(), G) < 0.9 * _oerr(W, nat.dequantize(), G)
    with pytest.raises(ValueError, match="order"):
        Q.gptq(W, G, 4, 32, order="random")


@pytest.mark.parametrize("scale_bits", [16, 8])
def test_compact_scales_widen_at_most_a_little(scale_bits):
    """Stored scales: float16 within 2⁻¹¹ relative; 8-bit codes c·step (c in [1, 255], step = the
    column's max/255 rounded up to a float16) never below S (the range only widens) and within
    one step of it."""
    rng = np.random.default_rng(3)
    S = rng.uniform(0.001, 0.05, (12, 7))
    S[3, 2] = 1e-7  # a nearly dead block
    got, step = Q.compact_scales(S, scale_bits)
    assert got.dtype == np.float32 and got.shape == S.shape and (got > 0).all()
    if scale_bits == 16:
        assert step is None
        ok = S > 1e-4
        assert np.all(np.abs(got[ok] - S[ok]) <= 2.0 ** -11 * S[ok])
    else:
        codes = got / step
        assert np.allclose(codes, np.rint(codes), atol=1e-3) and codes.min() >= 1 and codes.max() <= 255.001
        assert np.all(got >= S * (1 - 1e-6)) and np.all(got - S <= step * (1 + 1e-6))
        assert np.allclose(got.max(axis=0), S.max(axis=0), rtol=2.0 ** -10)
        assert np.array_equal(step.astype(np.float16).astype(np.float32), step)  # stored as float16, exactly


def test_gptq_on_compact_scales_and_their_bytes():
    """GPTQ with 8-bit scales: the stored scales are the compact ones, the fit stays close to the
    float32-scale fit, and the bytes drop by 3 per block less 4 per column."""
    rng = np.random.default_rng(4)
    K, N, b = 128, 24, 32
    W = rng.standard_normal((K, N))
    X = rng.standard_normal((400, K))
    G = X.T @ X
    f32 = Q.gptq(W, G, 4, b, False)
    f8 = Q.gptq(W, G, 4, b, False, scale_bits=8)
    assert f8.scale_bits == 8 and np.array_equal(f8.scale, Q.compact_scales(f32.scale, 8)[0])
    err = lambda f: np.linalg.norm(X @ (f.dequantize() - W))  # noqa: E731
    assert err(f8) < 1.05 * err(f32)
    assert f32.nbytes() - f8.nbytes() == 3 * (K // b) * N - 2 * N
    r = Q.with_scales(W, Q.quantize_blocked(W, 4, b, False), 16)
    assert r.scale_bits == 16 and r.scale.dtype == np.float32
    assert np.abs(r.dequantize() - W).max() <= np.repeat(r.scale, b, axis=0).max() * 1.01
    with pytest.raises(ValueError):
        Q.gptq(W, G, 4, b, False, scale_bits=8, order="natural")
