"""What a user feels at run time, measured in onnxruntime: resident memory and latency.

* :func:`resident_memory`: the resident-set growth of a fresh process that creates a session for
  the model and runs it ``runs`` times (what the loaded model costs, constant folding and
  pre-packing included; a file that is small on disk but float in memory shows here).
* :func:`latency_ratios`: latency of each model over the first, one intra-op thread, runs
  interleaved in rounds so machine noise hits all alike (median of the per-round ratios).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["resident_memory", "latency_ratios", "STEADY_MALLOC"]

# glibc with a fixed mmap threshold: large blocks are always mmapped and given back when freed, so
# the resident growth is what the session holds, not what the heap kept of load-time temporaries.
# With glibc's default (a threshold that rises as large blocks are freed) one model measures apart
# from process to process (glassllm, five processes: 31.5–32.0 MiB; MiniLM once 130.5 and 148.4);
# with this, 29.7–29.8.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}

_CHILD = r"""
import json, sys, numpy as np
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
import onnxruntime as ort
feeds = dict(np.load(sys.argv[2]))
base = rss()
so = ort.SessionOptions(); so.log_severity_level = 3; so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
for _ in range(int(sys.argv[3])):
    s.run(None, feeds)
print(json.dumps({"rss_growth": rss() - base}))
"""


def resident_memory(model_path: str | os.PathLike, feeds: dict[str, np.ndarray], runs: int = 5,
                    timeout: float = 300.0, env: dict | None = None) -> int | None:
    """Bytes of resident memory a fresh process gains by loading ``model_path`` and running it;
    None where it cannot be measured (no /proc, or the child failed). ``env``: extra environment
    of the child (STEADY_MALLOC: the figure that compares two models without allocator noise)."""
    if not Path("/proc/self/status").exists():
        return None
    with tempfile.TemporaryDirectory(prefix="onnxhmf-rss-") as d:
        npz = Path(d) / "feeds.npz"
        np.savez(npz, **feeds)
        try:
            r = subprocess.run([sys.executable, "-c", _CHILD, str(model_path), str(npz), str(runs)],
                               capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        except (OSError, subprocess.TimeoutExpired):
            return None
    if r.returncode != 0:
        return None
    try:
        return int(json.loads(r.stdout.strip().splitlines()[-1])["rss_growth"])
    except (ValueError, KeyError, IndexError):
        return None


def latency_ratios(models: list, feeds: dict[str, np.ndarray], repeats: int = 7, min_seconds: float = 0.4,
                   max_repeats: int = 400) -> list[float]:
    """Latency of each model (path, bytes or proto) over the first's: the median over rounds of
    t_i / t_0, where one round runs every model once, one intra-op thread. Pairing the runs of a
    round cancels slow drifts of the machine; the number of rounds grows (``repeats`` at least,
    ``max_repeats`` at most) until the first model has run for ``min_seconds``, so that a model
    of a few milliseconds is timed over hundreds of runs, not seven."""
    import onnx
    import onnxruntime as ort

    sessions = []
    for m in models:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        src = m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m)
        sessions.append(ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]))
    for s in sessions:
        s.run(None, feeds)
    ratios: list[list[float]] = [[] for _ in sessions]
    spent, rounds = 0.0, 0
    while rounds < repeats or (spent < min_seconds and rounds < max_repeats):
        times = []
        for s in sessions:
            t = time.perf_counter()
            s.run(None, feeds)
            times.append(time.perf_counter() - t)
        base = max(times[0], 1e-9)
        for out, t in zip(ratios, times):
            out.append(t / base)
        spent, rounds = spent + times[0], rounds + 1
    return [float(np.median(r)) for r in ratios]


@functools.cache
def matmulinteger_saturates() -> bool:
    """Whether onnxruntime's uint8 × int8 MatMulInteger is inexact on this CPU: MLAS's AVX2 and
    AVX-512BW kernels without VNNI add each adjacent pair of products in a saturating int16
    (vpmaddubsw), so full-range integers overflow (AMD EPYC, AVX2 only: 67% of a 64×64 product
    wrong). Compared with numpy on such a product, once a process."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    A = rng.integers(0, 256, (16, 64)).astype(np.uint8)
    B = rng.integers(-128, 128, (64, 16)).astype(np.int8)
    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
                          [helper.make_tensor_value_info("A", TensorProto.UINT8, [16, 64])],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, [16, 16])],
                          [numpy_helper.from_array(B, "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    y = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"A": A})[0]
    return bool((y != A.astype(np.int64) @ B.astype(np.int64)).any())
