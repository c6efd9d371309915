"""What each low-rank form costs at run time, beyond its stored bytes: every linear weight of a
model as one form, its resident growth measured as the default planner measures it.

The stored bytes of a factored site are its factors; at run time it also holds its intermediate
product and, pivoted, the Concat and the column Gather of its outputs. On a small model that can
outweigh what the weights save. This is why the default planner measures its plan against the
input (onnxhmf.planners.memory.InputMemory) and plans again without the heavier forms.

    python benchmarks/bench_memory_forms.py [MODEL] [--runs 5]

MODEL defaults to models/glassllm.onnx. The default planner is run once (``--save-plan``) for
its calibration and plan; then every MatMul weight that is not a Gather table is set to one
form (rank min(m, n)/2 for the factored ones) and applied with ``--plan-file``. Resident growth:
onnxhmf.runtime.resident_memory with STEADY_MALLOC (a fresh process loads the model and runs it
five times), ``--runs`` processes per model, interleaved, on the first held-out batch.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxhmf.discover import discover_calibration  # noqa: E402
from onnxhmf.runtime import STEADY_MALLOC, resident_memory  # noqa: E402

FORMS = {  # label: (treatment, pivot, factored)
    "pivoted int8 pairs (plmf-int8)": ("lmf-int8", True, True),
    "int8 A·B pairs (lmf-int8)": ("lmf-int8", False, True),
    "int8 (MatMulInteger)": ("int8", False, False),
}


def _cli(*args) -> None:
    r = subprocess.run([sys.executable, "-m", "onnxhmf.cli", "optimize", *map(str, args)], capture_output=True, text=True,
                       cwd=str(ROOT))
    if r.returncode != 0:
        raise SystemExit(f"onnxhmf optimize {' '.join(map(str, args))}: {r.stderr.strip()[-400:]}")


def one_form(plan: dict, treatment: str, pivot: bool, factored: bool) -> dict:
    out = copy.deepcopy(plan)
    for d in out["decisions"]:
        if d["ops"] != "matmul":
            continue  # tables and tied heads keep the default's choice
        m, n = d["shape"]
        d.update(treatment=treatment, pivot=pivot, index=0, rank=min(m, n) // 2 if factored else None,
                 keep=0.5 if factored else 1.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(ROOT / "models" / "glassllm.onnx"))
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    src = Path(a.model)
    with tempfile.TemporaryDirectory(prefix="bench-memory-forms-") as d:
        tmp = Path(d)
        _cli(src, tmp / "default.onnx", "-q", "--save-plan", tmp / "default.json")
        plan = json.loads((tmp / "default.json").read_text())
        paths = {"the input": src, "the default's plan": tmp / "default.onnx"}
        for i, (label, form) in enumerate(FORMS.items()):
            pf = tmp / f"form{i}.json"
            pf.write_text(json.dumps(one_form(plan, *form)))
            _cli(src, tmp / f"form{i}.onnx", "-q", "--plan-file", pf, "--no-verify")
            paths[f"every linear as {label}"] = tmp / f"form{i}.onnx"
        feeds = discover_calibration(src).split(0.25)[1].batches[0]
        got: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(a.runs):
            for k, p in paths.items():
                got[k].append(resident_memory(p, feeds, env=STEADY_MALLOC) / 2**20)
        base = float(np.median(got["the input"]))
        print(f"{src.name}, feeds {[tuple(v.shape) for v in feeds.values()]}, {a.runs} processes each, "
              f"MALLOC_MMAP_THRESHOLD_={STEADY_MALLOC['MALLOC_MMAP_THRESHOLD_']}\n")
        print("| model | file | resident growth, MiB (median; range) | against the input |")
        print("|---|---|---|---|")
        for k, p in paths.items():
            xs = got[k]
            print(f"| {k} | {p.stat().st_size / src.stat().st_size:.3f}x | {np.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f}) "
                  f"| {np.median(xs) / base:.3f}x |")


if __name__ == "__main__":
    main()
