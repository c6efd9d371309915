"""Issue 14's table: ``onnxhmf optimize model.onnx out.onnx`` with no flags, as a new user runs
it, on models laid out as exporters write them, beside onnxruntime's int8.

Models: MiniLM in the optimum folder layout (models/build_minilm_folder.py), glassllm as a bare
file (no Hugging Face tokenizer beside it: calibrated on samples from itself), and glassllm as
an optimum KV-cache merged decoder (models/build_glassllm_kv.py). Each optimized model is
scored with onnxhmf.fidelity on the held-out part of the calibration the tool found, and on
Shakespeare and the King James Bible (text unlike pydoc): cosine for embeddings; for logits
exp(−KL), top-1 and the perplexity ratio; a KV-cache decoder is run as a first step with an
empty past and a cached step fed its own presents.

    ONNXHMF_MODEL_CACHE=models/cache OPENBLAS_NUM_THREADS=1 python benchmarks/bench_default.py [minilm] [glassllm] [kv]
        [--no-pivot-too] [--allow-slower-too]

``--no-pivot-too``: also the default run with ``--no-pivot`` (A·B low-rank storage), beside it;
``--allow-slower-too``: also ``--allow-slower`` (the smallest plan whatever its latency).
Each onnxhmf run also prints resident memory (onnxhmf.runtime.resident_memory: RSS growth of a
fresh process that loads the model and runs it five times) of the input and the output, and the
interleaved latency ratio at one thread (runtime.latency_ratios), on the first held-out batch.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_discovery_auto import CACHE, _row, _script, _text_sets  # noqa: E402


def _cli(args: list) -> tuple[int, float, str]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "onnxhmf.cli", "optimize", *map(str, args)], capture_output=True,
                       text=True, cwd=str(ROOT))
    return r.returncode, time.perf_counter() - t, r.stdout + r.stderr


def run(label: str, path: Path, tokenizer: Path, tmp: Path, no_pivot_too: bool = False, slower_too: bool = False) -> list[tuple]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxhmf.discover import discover_calibration
    from onnxhmf.fidelity import evaluate_fidelity
    from onnxhmf.runtime import latency_ratios, resident_memory

    d = discover_calibration(path)
    _, held = d.split()
    sets = {"held-out": held} | _text_sets(path, tokenizer, d)
    rows = []
    for extra, variant in [([], "onnxhmf, no flags")] + ([(["--no-pivot"], "onnxhmf, --no-pivot")] if no_pivot_too else []) \
            + ([(["--allow-slower"], "onnxhmf, --allow-slower")] if slower_too else []):
        out = tmp / f"{label.replace(' ', '_')}.default{''.join('.' + x.strip('-') for x in extra)}.onnx"
        code, secs, log = _cli([path, out, "-q", *extra])
        if code != 0:
            print(f"{label}: the {variant} run failed ({code}): {log.strip().splitlines()[-1]}", flush=True)
        else:
            rows.append((out, variant, secs))
            feeds = held.batches[0]  # resident growth of fresh processes (load, five runs), interleaved latency
            before, after = resident_memory(path, feeds), resident_memory(out, feeds)
            ratio = latency_ratios([path, out], feeds)[1]
            mem = f"{after / 2**20:.1f} MiB against {before / 2**20:.1f} ({after / before:.2f}x)" if before and after \
                else "not measured"
            print(f"{label} | {variant} | memory once loaded {mem} | latency {ratio:.2f}x the input's at 1 thread",
                  flush=True)
    for per_channel in (False, True):
        q = tmp / f"{label.replace(' ', '_')}.int8{'pc' if per_channel else ''}.onnx"
        t = time.perf_counter()
        quantize_dynamic(str(path), str(q), per_channel=per_channel, weight_type=QuantType.QInt8)
        rows.append((q, f"ort int8 {'per-channel' if per_channel else 'per-tensor'}", time.perf_counter() - t))
    table = []
    for cand, variant, secs in rows:
        res = {k: evaluate_fidelity(path, cand, cal, kv=d.kv, logits=d.logits, vocab=d.vocab) for k, cal in sets.items()}
        table.append(_row(label, variant, cand.stat().st_size / path.stat().st_size, res, secs))
        print(" | ".join(table[-1]), flush=True)
    return table


def main(argv: list[str]) -> int:
    no_pivot_too, slower_too = "--no-pivot-too" in argv, "--allow-slower-too" in argv
    which = [a for a in argv if a not in ("--no-pivot-too", "--allow-slower-too")] or ["minilm", "glassllm", "kv"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-default-"))
    rows = []
    try:
        kvmod = _script("build_glassllm_kv")
        with resources.as_file(resources.files("glassllm") / "weights" / "en.tokenizer.json") as src:
            hf_tok = kvmod.hf_tokenizer_json(src)
        (tmp / "glassllm.tokenizer.json").write_text(hf_tok, encoding="utf-8")
        if "minilm" in which:
            folder = _script("build_minilm_folder").build_folder(tmp / "minilm", source=CACHE / "minilm.onnx")
            rows += run("MiniLM folder", folder / "model.onnx", folder / "tokenizer.json", tmp, no_pivot_too, slower_too)
        if "glassllm" in which:
            (tmp / "glassllm").mkdir()
            shutil.copyfile(ROOT / "models" / "glassllm.onnx", tmp / "glassllm" / "glassllm.onnx")
            rows += run("glassllm.onnx", tmp / "glassllm" / "glassllm.onnx", tmp / "glassllm.tokenizer.json", tmp, no_pivot_too, slower_too)
        if "kv" in which:
            kv_dir = tmp / "glassllm_kv"
            subprocess.run([sys.executable, str(ROOT / "models" / "build_glassllm_kv.py"), "--out", str(kv_dir)],
                           check=True, capture_output=True)
            rows += run("glassllm KV folder", kv_dir / "decoder_model_merged.onnx", kv_dir / "tokenizer.json", tmp, no_pivot_too, slower_too)
        head = ("model", "variant", "bytes", "time s", "fidelity (cosine; logits: exp(-KL), top-1, perplexity ratio)")
        print()
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
