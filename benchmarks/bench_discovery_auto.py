"""Does calibration found by discovery carry over to text unlike it? MiniLM and glassllm through
today's ``optimize(plan={"target_fidelity": 0.99})`` (the route that works, issue 14) with the
discovered calibration instead of --calib, scored with onnxhmf.fidelity on the discovered
held-out batches and on Shakespeare and the King James Bible (benchmarks/corpora.py), next to
onnxruntime's ``quantize_dynamic(per_channel=True)``.

    ONNXHMF_MODEL_CACHE=/work/main/models/cache python benchmarks/bench_discovery_auto.py [minilm] [glassllm]
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
CACHE = Path(os.environ.get("ONNXHMF_MODEL_CACHE", ROOT / "models" / "cache"))
TEXTS = ("shakespeare", "kjv")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "models" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _text_sets(path: Path, tokenizer: Path, d) -> dict:
    """{corpus: Calibration} of unlike text: sentences for an encoder, token windows for an LM."""
    import onnx

    import corpora
    from onnxhmf.calibration import Calibration, load_calibration
    from onnxhmf.discover import _text_windows, ids_calibration
    from onnxhmf.capture import session

    model = onnx.load(str(path))
    out = {}
    for name in TEXTS:
        sents = corpora.sentences(corpora.CORPORA[name](), 256, seed=0)
        if d.logits is None:
            with tempfile.TemporaryDirectory() as tmp:
                f = Path(tmp) / "t.txt"
                f.write_text("\n\n".join(sents))
                out[name] = load_calibration(f, model, tokenizer=tokenizer, samples=256)
        else:
            ids = _text_windows(tokenizer, sents, 64, 64, min(d.vocab))
            out[name] = ids_calibration(session(model), model, d.kv, ids, 16, name)
    return out


def _row(label, variant, ratio, res_by_set, seconds):
    cells = []
    for set_name, res in res_by_set.items():
        for n in res.counted:
            o = res.outputs[n]
            s = f"{o.value:.4f}"
            if o.kind == "logits" and o.ppl_ratio is not None:
                s += f" (top-1 {o.top1:.3f}, ppl x{o.ppl_ratio:.3f})"
            cells.append(f"{set_name}/{n}: {s}")
    return (label, variant, f"{ratio:.3f}", f"{seconds:.0f}", "; ".join(cells))


def run(label: str, path: Path, tokenizer: Path, tmp: Path) -> list[tuple]:
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    from onnxhmf.api import optimize
    from onnxhmf.discover import discover_calibration
    from onnxhmf.fidelity import evaluate_fidelity

    t = time.perf_counter()
    d = discover_calibration(path)
    print(f"{label}: {d.message}", flush=True)
    _, held = d.split()
    sets = {"held-out": held} | _text_sets(path, tokenizer, d)
    m, rep = optimize(str(path), calib=d.calibration, verify=False,
                      plan={"target_size": None, "target_ratio": None, "target_fidelity": 0.99, "max_latency_ratio": None})
    t_opt = time.perf_counter() - t
    auto = tmp / f"{path.stem}.auto.onnx"
    onnx.save(m, str(auto))
    print(f"{label}: {rep.notes[0] if rep.notes else ''}", flush=True)
    q = tmp / f"{path.stem}.int8.onnx"
    t = time.perf_counter()
    quantize_dynamic(str(path), str(q), per_channel=True)
    t_q = time.perf_counter() - t
    rows = []
    for variant, cand, secs in (("plan auto 0.99 (discovered calib)", auto, t_opt), ("ort int8 per-channel", q, t_q)):
        res = {k: evaluate_fidelity(path, cand, cal, kv=d.kv, logits=d.logits, vocab=d.vocab) for k, cal in sets.items()}
        rows.append(_row(label, variant, cand.stat().st_size / path.stat().st_size, res, secs))
    return rows


def main(argv: list[str]) -> int:
    which = argv or ["minilm", "glassllm"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-discovery-auto-"))
    rows = []
    try:
        if "minilm" in which:
            folder = _script("build_minilm_folder").build_folder(tmp / "minilm", source=CACHE / "minilm.onnx")
            rows += run("MiniLM folder", folder / "model.onnx", folder / "tokenizer.json", tmp)
        if "glassllm" in which:
            kv = _script("build_glassllm_kv")
            (tmp / "glassllm").mkdir()
            shutil.copyfile(ROOT / "models" / "glassllm.onnx", tmp / "glassllm" / "glassllm.onnx")
            from importlib import resources

            with resources.as_file(resources.files("glassllm") / "weights" / "en.tokenizer.json") as src:
                (tmp / "glassllm.tokenizer.json").write_text(kv.hf_tokenizer_json(src), encoding="utf-8")
            rows += run("glassllm.onnx", tmp / "glassllm" / "glassllm.onnx", tmp / "glassllm.tokenizer.json", tmp)
        head = ("model", "variant", "bytes", "time s", "fidelity (cosine; logits: exp(-KL))")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
        print()
        for r in [head] + rows:
            print(" | ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + " | " + r[4])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
