"""Calibration discovery on the real models, and the fidelity of onnxruntime's int8 peer on
the held-out part of what was discovered (the numbers a no-flags run would verify against).

For each model: which source discovery picked, how long it took, how many fit / held-out
batches it gave; then ``quantize_dynamic(per_channel=True)`` scored with onnxhmf.fidelity on
the held-out batches, and its file size as a fraction of the input's (cosine for embeddings; exp(−KL), top-1 and the perplexity ratio for
logits; a KV decoder's cached steps read each model's own cache).

    ONNXHMF_MODEL_CACHE=/work/main/models/cache python benchmarks/bench_discovery.py
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("ONNXHMF_MODEL_CACHE", ROOT / "models" / "cache"))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "models" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    from onnxruntime.quantization import quantize_dynamic

    from onnxhmf.discover import discover_calibration
    from onnxhmf.fidelity import evaluate_fidelity

    tmp = Path(tempfile.mkdtemp(prefix="bench-discovery-"))
    try:
        kv = _script("build_glassllm_kv").build_folder(tmp / "glassllm_kv")
        alone = tmp / "kv_alone"
        alone.mkdir()
        shutil.copyfile(kv / "decoder_model_merged.onnx", alone / "decoder_model_merged.onnx")
        minilm = _script("build_minilm_folder").build_folder(tmp / "minilm", source=CACHE / "minilm.onnx")
        cases = [("glassllm.onnx", ROOT / "models" / "glassllm.onnx"),
                 ("glassllm KV merged, optimum folder", kv / "decoder_model_merged.onnx"),
                 ("glassllm KV merged, no tokenizer", alone / "decoder_model_merged.onnx"),
                 ("MiniLM, optimum folder", minilm / "model.onnx")]
        rows = []
        for label, path in cases:
            t = time.perf_counter()
            d = discover_calibration(path)
            t_disc = time.perf_counter() - t
            fit, held = d.split()
            q = tmp / f"q{len(rows)}.onnx"
            quantize_dynamic(str(path), str(q), per_channel=True)
            t = time.perf_counter()
            res = evaluate_fidelity(path, q, held, kv=d.kv, logits=d.logits, vocab=d.vocab)
            t_eval = time.perf_counter() - t
            for name in res.counted:
                o = res.outputs[name]
                extra = (f"top-1 {o.top1:.3f}, ppl {o.ppl_ref:.2f} -> {o.ppl_cand:.2f} ({o.ppl_ratio:.4f}x)"
                         if o.kind == "logits" else "")
                rows.append((label, d.source, f"{t_disc:.1f}", f"{len(fit.batches)}/{len(held.batches)}",
                             f"{q.stat().st_size / path.stat().st_size:.2f}", name, o.kind, f"{o.value:.4f}", extra,
                             f"{t_eval:.1f}"))
            print(f"{label}: {d.message}", flush=True)
        head = ("model", "source", "discover s", "fit/held batches", "int8 bytes", "output", "kind", "int8 fidelity", "logit detail",
                "verify s")
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
        print()
        for r in [head, tuple("-" * w for w in widths)] + rows:
            print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
