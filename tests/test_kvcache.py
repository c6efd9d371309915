"""onnxhmf.kvcache: KV-cache signatures and first/cached step feeds; Calibration.group splits."""
import numpy as np
import pytest

from discovery_graphs import D, V, causal_lm, kv_merged, table
from onnxhmf.calibration import Calibration
from onnxhmf.capture import session
from onnxhmf.errors import OnnxHmfError
from onnxhmf.kvcache import chained_outputs, kv_signature, step_feeds, two_step_batches


def test_signature_of_a_merged_decoder():
    sig = kv_signature(kv_merged(layers=2))
    assert sig.ids == "input_ids" and sig.mask == "attention_mask" and sig.positions == "position_ids"
    assert sig.branch == "use_cache_branch"
    assert sig.past == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert sig.present["past_key_values.1.value"] == "present.1.value"
    assert sig.past_axis["past_key_values.0.key"] == 2 and sig.past_shape["past_key_values.0.key"] == [None, 1, None, D]


def test_no_signature_without_a_cache():
    assert kv_signature(causal_lm()) is None


def test_first_step_has_an_empty_past_and_the_branch_off():
    sig = kv_signature(kv_merged())
    f = step_feeds(sig, np.array([[5, 6, 7]]), None)
    assert f["past_key_values.0.key"].shape == (1, 1, 0, D) and f["past_key_values.0.key"].dtype == np.float32
    assert f["use_cache_branch"].tolist() == [False] and f["attention_mask"].shape == (1, 3)
    assert f["position_ids"].tolist() == [[0, 1, 2]]


def test_two_steps_feed_the_first_presents_as_the_past():
    m = kv_merged()
    sig, sess = kv_signature(m), session(m)
    ids = np.random.default_rng(0).integers(0, V, size=(2, 7))
    first, cached = two_step_batches(sess, sig, ids)
    E = table(0)
    assert first["input_ids"].shape == (2, 3) and cached["input_ids"].shape == (2, 4)
    np.testing.assert_allclose(cached["past_key_values.0.key"][:, 0], E[ids[:, :3]], rtol=1e-6)  # present = Concat(∅, h)
    assert cached["use_cache_branch"].tolist() == [True] and cached["attention_mask"].shape == (2, 7)
    assert cached["position_ids"].tolist() == [[3, 4, 5, 6]] * 2
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, cached)))
    assert out["present.0.key"].shape == (2, 1, 7, D)  # the cached branch ran: past 3 + 4 new


def test_chained_outputs_use_the_models_own_cache():
    ref, cand = kv_merged(0), kv_merged(5)  # different tables
    sig = kv_signature(ref)
    ids = np.random.default_rng(1).integers(0, V, size=(1, 6))
    batches = two_step_batches(session(ref), sig, ids)
    outs = chained_outputs(session(cand), sig, batches)
    E = table(5)
    want = (E[ids[:, 3:]] + E[ids[:, :3]].sum(1, keepdims=True)) @ E.T  # cand's cached logits, cand's own past
    np.testing.assert_allclose(outs[1]["logits"], want, rtol=1e-4, atol=1e-4)


def test_two_steps_need_two_tokens():
    m = kv_merged()
    with pytest.raises(OnnxHmfError, match="at least 2 tokens"):
        two_step_batches(session(m), kv_signature(m), np.array([[1]]))


def test_split_keeps_step_pairs_whole():
    batches = [{"x": np.full((1, 1), i)} for i in range(6)]
    fit, held = Calibration(batches, group=2).split(0.25)
    assert [int(b["x"][0, 0]) for b in held.batches] == [4, 5] and len(fit.batches) == 4 and held.group == 2
    fit, held = Calibration(batches[:3]).split(0.25)  # group 1: as before
    assert len(held.batches) == 1 and len(fit.batches) == 2
    with pytest.raises(OnnxHmfError, match="need at least 4"):
        Calibration(batches[:2], group=2).split(0.25)


def test_inlined_branches_compute_what_the_if_computes():
    import onnx

    from onnxhmf.kvcache import inline_branch

    m = kv_merged(layers=2)
    sig, sess = kv_signature(m), session(m)
    first, cached = two_step_batches(sess, sig, np.random.default_rng(2).integers(0, V, size=(2, 6)))
    for value, feeds in ((False, first), (True, cached)):
        flat = inline_branch(m, "use_cache_branch", value)
        onnx.checker.check_model(flat, full_check=True)
        assert "If" not in {n.op_type for n in flat.graph.node}
        assert "use_cache_branch" not in {i.name for i in flat.graph.input}
        want = sess.run(None, feeds)
        got = session(flat).run(None, {k: v for k, v in feeds.items() if k != "use_cache_branch"})
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w, g)
        inner = {o for n in flat.graph.node for o in n.output}
        assert ("wp_h" if value else "np_h") in inner  # a branch tensor, now reachable as an output
    with pytest.raises(OnnxHmfError, match="does not drive exactly one If"):
        inline_branch(m, "attention_mask", True)
