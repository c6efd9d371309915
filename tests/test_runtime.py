"""Resident memory and latency as the result table measures them."""
import numpy as np
import onnx
import pytest

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


def test_the_saturation_probe_agrees_with_the_cpus_flags():
    """runtime.matmulinteger_saturates (conftest skips the exact_int8 tests by it) says True exactly on
    x86 CPUs with AVX2 and no VNNI (MLAS's vpmaddubsw kernels), False where VNNI adds in int32."""
    from pathlib import Path

    from onnxhmf.runtime import matmulinteger_saturates

    info = Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = set(next((line.split(":", 1)[1].split() for line in info.read_text().splitlines()
                      if line.startswith("flags")), []))
    if not flags:
        pytest.skip("no x86 flags (not x86)")
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        assert not matmulinteger_saturates()
    elif "avx2" in flags:
        assert matmulinteger_saturates()
    else:
        pytest.skip("neither AVX2 nor VNNI")


@pytest.mark.parametrize("saturates", [True, False])
def test_the_notes_say_where_matmulinteger_saturates_on_this_cpu(saturates, monkeypatch):
    """An output with MatMulInteger made on a CPU whose kernel saturates says so (its fidelity is
    of that arithmetic); elsewhere, or without MatMulInteger, nothing is said."""
    import graphs
    import onnxhmf.runtime as runtime
    from onnxhmf.api import optimize

    monkeypatch.setattr(runtime, "matmulinteger_saturates", lambda: saturates)
    _, rep = optimize(graphs.mlp_model(), quantize="int8", verify=False)
    said = [n for n in rep.notes if "saturating int16" in n]
    assert len(said) == (1 if saturates else 0)
    if saturates:
        assert said[0].startswith("2 MatMulInteger nodes")
    _, rep = optimize(graphs.mlp_model(), keep=0.5, verify=False)
    assert not any("saturating int16" in n for n in rep.notes)
