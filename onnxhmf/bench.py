"""``onnxhmf bench``: file size, parameters, resident memory and onnxruntime CPU latency of
models, side by side.

Models are timed round-robin (one run of each per round, after ``warmup`` rounds), so slow
drifts of a shared machine hit every model alike; latency is reported as the p50 and p90 of
the per-run wall times. Memory is what a fresh process gains by loading the model and running it
on the same inputs (runtime.resident_memory): a file that is small on disk but float once loaded
shows here. Ratios are to the first model.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .graph.index import count_params
from .errors import OnnxHmfError
from .io import load_model, model_file_bytes
from .verify import make_inputs

__all__ = ["ModelBench", "Bench", "bench_models"]


@dataclass
class ModelBench:
    path: str
    bytes: int
    params: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    memory: int | None = None  # resident-set growth, bytes (None: not measured)


@dataclass
class Bench:
    models: list[ModelBench] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    warmup: int = 0
    iterations: int = 0
    threads: int | None = None

    def ratios(self, m: ModelBench) -> dict[str, float]:
        base = self.models[0]
        return {k: getattr(m, k) / getattr(base, k) if getattr(base, k) and getattr(m, k) is not None else float("nan")
                for k in ("bytes", "params", "p50_ms", "p90_ms", "memory")}

    def to_dict(self) -> dict:
        d = asdict(self)
        for m, md in zip(self.models, d["models"]):
            md["ratio"] = self.ratios(m)
        return d

    def format(self) -> str:
        from .report import _table

        rows = []
        for m in self.models:
            r = self.ratios(m)
            mem = ("-", "-") if m.memory is None else (f"{m.memory / 2**20:.1f}", f"{r['memory']:.3f}x")
            rows.append((m.path, f"{m.bytes:,}", f"{r['bytes']:.3f}x", f"{m.params:,}", f"{r['params']:.3f}x", *mem,
                         f"{m.p50_ms:.2f}", f"{r['p50_ms']:.3f}x", f"{m.p90_ms:.2f}", f"{r['p90_ms']:.3f}x"))
        head = ("model", "bytes", "ratio", "params", "ratio", "memory MiB", "ratio", "p50 ms", "ratio", "p90 ms", "ratio")
        lines = [f"inputs: " + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in self.inputs.items())
                 + f"; {self.warmup} warm-up + {self.iterations} timed runs each, round-robin; "
                 + f"threads: {self.threads or 'ort default'}"]
        return "\n".join(lines + _table(head, rows))


def bench_models(paths: list[str | os.PathLike], *, warmup: int = 5, iterations: int = 50, threads: int | None = None,
                 input_shapes: dict[str, list[int]] | None = None, seed: int = 0, memory: bool = True) -> Bench:
    """Size, parameters, latency and (``memory``) resident memory of each model on the same
    generated inputs."""
    import onnxruntime as ort

    if not paths:
        raise OnnxHmfError("give at least one model")
    if iterations < 1:
        raise OnnxHmfError(f"--iterations must be ≥ 1, got {iterations}")
    models, sessions, feeds = [], [], None
    for p in paths:
        model = load_model(p)
        if feeds is None:
            feeds = make_inputs(model, input_shapes, seed=seed)
        names = [vi.name for vi in model.graph.input if vi.name not in {t.name for t in model.graph.initializer}]
        if set(names) != set(feeds):
            raise OnnxHmfError(f"{str(p)!r} has inputs {names}, the first model {sorted(feeds)}: they must match")
        so = ort.SessionOptions()
        so.log_severity_level = 4  # failures are raised once, as one line; ORT's own log would repeat them
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        try:
            sessions.append(ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]))
        except Exception as e:
            raise OnnxHmfError(f"onnxruntime cannot load {str(p)!r}: {str(e).splitlines()[0][:300]}") from None
        models.append((str(p), model_file_bytes(p), count_params(model)))
        del model
    times = [[] for _ in sessions]
    for i in range(warmup + iterations):
        for j, sess in enumerate(sessions):
            t = time.perf_counter()
            try:
                sess.run(None, feeds)
            except Exception as e:
                hint = f"; {feeds.hint()}" if hasattr(feeds, "hint") else ""
                raise OnnxHmfError(f"onnxruntime failed on {models[j][0]!r}: {str(e).splitlines()[0][:300]}{hint}") from None
            if i >= warmup:
                times[j].append(time.perf_counter() - t)
    out = Bench(inputs={k: list(v.shape) for k, v in feeds.items()}, warmup=warmup, iterations=iterations, threads=threads)
    for (p, nbytes, params), ts in zip(models, times):
        ms = np.asarray(ts) * 1e3
        out.models.append(ModelBench(p, nbytes, params, float(np.percentile(ms, 50)), float(np.percentile(ms, 90)),
                                     float(ms.mean()), len(ms)))
    if memory:
        from .runtime import resident_memory

        del sessions
        for m in out.models:
            m.memory = resident_memory(m.path, dict(feeds), runs=max(1, min(iterations, 5)))
    return out
