"""What a user feels at run time, measured in onnxruntime: resident memory and latency.

* :func:`resident_memory`: the resident-set growth of a fresh process that creates a session for
  the model and runs it ``runs`` times (what the loaded model costs, constant folding and
  pre-packing included; a file that is small on disk but float in memory shows here).
* :func:`latency_ratios`: median latency of each model over the first, one intra-op thread,
  runs interleaved so machine noise hits all alike.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["resident_memory", "latency_ratios"]

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
                    timeout: float = 300.0) -> int | None:
    """Bytes of resident memory a fresh process gains by loading ``model_path`` and running it;
    None where it cannot be measured (no /proc, or the child failed)."""
    if not Path("/proc/self/status").exists():
        return None
    with tempfile.TemporaryDirectory(prefix="onnxhmf-rss-") as d:
        npz = Path(d) / "feeds.npz"
        np.savez(npz, **feeds)
        try:
            r = subprocess.run([sys.executable, "-c", _CHILD, str(model_path), str(npz), str(runs)],
                               capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
        except (OSError, subprocess.TimeoutExpired):
            return None
    if r.returncode != 0:
        return None
    try:
        return int(json.loads(r.stdout.strip().splitlines()[-1])["rss_growth"])
    except (ValueError, KeyError, IndexError):
        return None


def latency_ratios(models: list, feeds: dict[str, np.ndarray], repeats: int = 7) -> list[float]:
    """Median latency of each model (path, bytes or proto) over the first's."""
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
    times = [[] for _ in sessions]
    for _ in range(repeats):
        for s, out in zip(sessions, times):
            t = time.perf_counter()
            s.run(None, feeds)
            out.append(time.perf_counter() - t)
    base = max(float(np.median(times[0])), 1e-9)
    return [float(np.median(t)) / base for t in times]
