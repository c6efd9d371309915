"""Resident memory and latency as the result table measures them."""
import numpy as np
import onnx

import graphs
from onnxhmf.api import optimize
from onnxhmf.runtime import latency_ratios, resident_memory


def test_resident_memory_sees_the_loaded_weights(tmp_path):
    small, big = tmp_path / "s.onnx", tmp_path / "b.onnx"
    onnx.save(graphs.mlp_model(32, 64), small)
    onnx.save(graphs.mlp_model(512, 4096), big)  # 2 x 512x4096 float32 = 16 MiB of weights
    feeds = {"X": np.ones((2, 3, 32), np.float32)}
    ms = resident_memory(small, feeds)
    mb = resident_memory(big, {"X": np.ones((2, 3, 512), np.float32)})
    assert ms is not None and mb is not None
    assert mb - ms > 12 * 2**20  # the 16 MiB of weights show up
    r = latency_ratios([small, small], feeds, repeats=3)
    assert r[0] == 1.0 and r[1] > 0


def test_optimize_measures_when_asked(tmp_path):
    model = graphs.mlp_model(32, 96)
    _, report = optimize(model, keep=0.5, measure=True)
    rt = report.runtime
    assert rt["memory_before"] > 0 and rt["memory_after"] > 0 and rt["latency_ratio"] > 0
    text = report.format()
    assert "memory once loaded" in text and "latency (1 thread)" in text
    _, report = optimize(model, keep=0.5)
    assert report.runtime is None  # the API measures only when asked
