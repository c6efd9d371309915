"""The Silero-VAD-shaped model (models/build_vad.py): all weights inside the two branches of an If
on the sample rate. Its LSTM-cell Gemms are found in both branches and rewritten there; at
rank r the model equals the original with each weight replaced by its rank-r truncation, in
onnxruntime and onnx.reference, for both sample rates."""
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxhmf import optimize
from onnxhmf.graph.index import GraphIndex
from onnxhmf.graph.sites import find_weight_groups
from onnxhmf.verify import run_onnxruntime

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import build_vad  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vad(tmp_path_factory):
    p = tmp_path_factory.mktemp("vad") / "vad.onnx"
    build_vad.build(p, random=True)
    return onnx.load(p)


def feeds(sr, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"input": (0.1 * rng.standard_normal((batch, build_vad.SAMPLES[sr]))).astype(np.float32),
            "state": (0.3 * rng.standard_normal((2, batch, 128))).astype(np.float32), "sr": np.array(sr, np.int64)}


def truncated(model, r):
    """The model with every branch Gemm weight replaced (densely) by its rank-r SVD truncation."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    (if_node,) = [n for n in m.graph.node if n.op_type == "If"]
    for a in if_node.attribute:
        for t in a.g.initializer:
            if t.name.endswith(("ih.weight", "hh.weight")):
                W = numpy_helper.to_array(t).astype(np.float64)
                U, s, Vt = np.linalg.svd(W, full_matrices=False)
                t.CopyFrom(numpy_helper.from_array(((U[:, :r] * s[:r]) @ Vt[:r]).astype(np.float32), t.name))
    return m


def test_weights_are_inside_the_branches(vad):
    assert not vad.graph.initializer
    groups = find_weight_groups(GraphIndex(vad))
    assert sorted((g.name, g.ref.scope.split(".")[-1], g.ops) for g in groups) == [
        ("b16.hh.weight", "then_branch", "gemm"), ("b16.ih.weight", "then_branch", "gemm"),
        ("b8.hh.weight", "else_branch", "gemm"), ("b8.ih.weight", "else_branch", "gemm")]
    assert all(g.skip_reason is None and g.shape == (512, 128) for g in groups)


@pytest.mark.parametrize("method", ["lmf", "hmf"])
def test_rewritten_in_both_branches_and_exact(vad, method):
    r = 48
    kw = dict(rank=r) if method == "lmf" else dict(keep=0.5, method="hmf")
    out, report = optimize(vad, inputs=feeds(16000), min_cosine=0.0, **kw)
    assert len(report.rewritten) == 4 and report.verified
    assert report.params_after < report.params_before
    onnx.checker.check_model(out, full_check=True)
    (if_node,) = [n for n in out.graph.node if n.op_type == "If"]
    for a in if_node.attribute:
        names = {t.name for t in a.g.initializer}
        assert not any(n.endswith(("ih.weight", "hh.weight")) for n in names)
        assert sum(n.endswith(f"{method}_B") for n in names) == 2
    if method == "hmf":  # HMF is not a truncation: ORT and the reference agree with each other
        for sr in (16000, 8000):
            f = feeds(sr)
            a_ort = run_onnxruntime(out, f)
            a_ref = ReferenceEvaluator(out).run(None, f)
            np.testing.assert_allclose(a_ort["output"], a_ref[0], atol=1e-5)
        return
    ref_model = truncated(vad, r)
    for sr in (16000, 8000):
        f = feeds(sr)
        want = run_onnxruntime(ref_model, f)
        got = run_onnxruntime(out, f)
        got_ref = dict(zip(["output", "stateN"], ReferenceEvaluator(out).run(None, f)))
        for k in ("output", "stateN"):
            np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(got_ref[k], want[k], atol=1e-5, rtol=1e-5)
