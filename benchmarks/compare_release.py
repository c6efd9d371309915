"""Does this checkout write the same models as an earlier release? And does a saved plan replay
byte for byte?

For a matrix of option sets on glassllm and MiniLM, runs ``optimize`` once with the code of
``--old`` (a git ref, checked out into a temporary worktree) and once with this checkout, each
in its own process, and compares the written models: the same graph (nodes, their names, inputs,
outputs, attributes; graph inputs/outputs; opsets) and the same initializers (names, shapes,
dtypes, values to ``--atol``). Metadata is not compared (it records the settings).

With ``--replay``, each option set is also run as ``optimize --dry-run --save-plan p.json``
followed by ``optimize --plan-file p.json``, and that file must equal the direct run's byte for
byte.

    python benchmarks/compare_release.py --old e14e19f --models glassllm,minilm [--replay] [--only NAME,...]

Prints one table row per (model, option set): same graph, max initializer difference, replay.
Exit 1 if any row differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CALIB_SAMPLES = "64"


def _configs(cal: list[str], storage: str) -> dict[str, list[str]]:
    return {
        "lmf": ["--keep", "0.5"],
        "hmf": ["--method", "hmf", "--keep", "0.5"],
        "hmf-nofold": ["--method", "hmf", "--keep", "0.5", "--no-fold"],
        "prune": ["--method", "prune", "--keep", "0.5"],
        "emb-hmf": ["--embedding-method", "hmf", "--keep", "0.6"],
        "emb-ae": ["--embedding-method", "ae", "--keep", "0.5", "--ae-epochs", "2"],
        "rank": ["--rank", "16", "--rank-multiple", "8"],
        "int8": ["--keep", "0.5", "--quantize", "int8"],
        "storage-ae": ["--storage-ae-include", storage, "--storage-ae-epochs", "2", "--keep", "0.5"],
        "calib-measured": cal + ["--keep", "0.6"],
        "calib-uniform": cal + ["--keep", "0.6", "--allocate", "uniform"],
        "calib-hmf": cal + ["--keep", "0.6", "--method", "hmf"],
        "calib-min-fidelity": cal + ["--min-fidelity", "0.9"],
        "sequential": cal + ["--keep", "0.6", "--sequential"],
        "share-bases": cal + ["--keep", "0.6", "--share-bases", "--allocate", "uniform"],
        "plan-auto": cal + ["--plan", "auto", "--target-ratio", "0.3"],
    }


def _models(names: list[str], work: Path) -> dict[str, tuple[Path, list[str], str]]:
    """{name: (model, calibration options, storage-AE regex)}: calibrated on pydoc (MiniLM: the
    text with its tokenizer; glassllm: an .npz of 128-token windows of its own tokenizer)."""
    import lm_eval
    from corpora import pydoc_topics_text

    text = pydoc_topics_text()
    out = {}
    if "glassllm" in names:
        ids = lm_eval.glassllm_token_ids(text)
        n = min(int(CALIB_SAMPLES), ids.size // 128)
        npz = work / "pydoc_windows.npz"
        np.savez(npz, input_ids=ids[: n * 128].reshape(n, 128).astype(np.int64))
        out["glassllm"] = (ROOT / "models" / "glassllm.onnx", ["--calib", npz, "--calib-samples", CALIB_SAMPLES],
                           r"attn\.w[qo]$")
    if "minilm" in names:
        cache = Path(os.environ.get("ONNXHMF_MODEL_CACHE", ROOT / "models" / "cache"))
        path = cache / "minilm.onnx"
        if not path.is_file():
            import importlib.util

            spec = importlib.util.spec_from_file_location("build_minilm", ROOT / "models" / "build_minilm.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            cache.mkdir(parents=True, exist_ok=True)
            mod.build_minilm(path)
        txt = work / "pydoc.txt"
        txt.write_text(text)
        out["minilm"] = (path, ["--calib", txt, "--tokenizer", cache / "minilm.tokenizer.json", "--calib-samples",
                                CALIB_SAMPLES], r"attention\.self\.(query|key)\.weight$")
    return out


def _run(tree: Path, args: list, log: Path) -> bool:
    env = {**os.environ, "PYTHONPATH": str(tree), "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    code = "import sys; from onnxhmf.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "optimize", *map(str, args)], env=env, cwd=str(tree),
                       capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    return r.returncode == 0


def _node_key(n: onnx.NodeProto) -> tuple:
    return (n.op_type, n.domain, n.name, tuple(n.input), tuple(n.output),
            tuple(sorted(a.SerializeToString() for a in n.attribute)))


def compare(a: Path, b: Path, atol: float) -> tuple[bool, float, str]:
    """(same graph, max |initializer difference|, what differs first)."""
    ma, mb = onnx.load(a), onnx.load(b)
    ga, gb = ma.graph, mb.graph
    if [_node_key(n) for n in ga.node] != [_node_key(n) for n in gb.node]:
        return False, float("nan"), "nodes differ"
    for field in ("input", "output"):
        if [v.SerializeToString() for v in getattr(ga, field)] != [v.SerializeToString() for v in getattr(gb, field)]:
            return False, float("nan"), f"graph {field}s differ"
    if {(o.domain, o.version) for o in ma.opset_import} != {(o.domain, o.version) for o in mb.opset_import}:
        return False, float("nan"), "opsets differ"
    ia = {t.name: numpy_helper.to_array(t) for t in ga.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in gb.initializer}
    if list(ia) != list(ib):
        return False, float("nan"), f"initializer names differ: {sorted(set(ia) ^ set(ib))[:4]}"
    worst = 0.0
    for name, x in ia.items():
        y = ib[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, float("nan"), f"{name}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}"
        if x.size and not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            diff = np.where(x64 == y64, 0.0, np.abs(x64 - y64))  # equal infinities are no difference
            worst = max(worst, float(np.nanmax(diff)) if not np.all(np.isnan(diff)) else float("inf"))
    return True, worst, "" if worst <= atol else "initializers differ"


def _replay(tree: Path, model: Path, args: list, direct: Path, d: Path) -> str:
    plan, out, dry = d / "plan.json", d / "replayed.onnx", d / "dry.onnx"
    if not _run(tree, [model, dry, *args, "--dry-run", "--save-plan", plan, "-q"], d / "dry.log"):
        return "dry-run failed: " + (d / "dry.log").read_text().strip().splitlines()[-1][:80]
    if not _run(tree, [model, out, "--plan-file", plan, "--no-verify", "-q", "--force"], d / "replay.log"):
        return "replay failed: " + (d / "replay.log").read_text().strip().splitlines()[-1][:80]
    return "identical bytes" if out.read_bytes() == direct.read_bytes() else "BYTES DIFFER"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="e14e19f", help="git ref of the earlier release")
    ap.add_argument("--models", default="glassllm,minilm")
    ap.add_argument("--only", default="", help="comma-separated option-set names (default: all)")
    ap.add_argument("--replay", action="store_true", help="also check --save-plan/--plan-file byte for byte")
    ap.add_argument("--atol", type=float, default=1e-6)
    ap.add_argument("--new-args", default="", help="options only the new code gets (e.g. --no-pivot: a later default)")
    a = ap.parse_args(argv)
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="onnxhmf-compare-") as tmp:
        tmp = Path(tmp)
        old = tmp / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), a.old], check=True)
        try:
            for mname, (model, cal, storage) in _models(a.models.split(","), tmp).items():
                configs = _configs([str(c) for c in cal], storage)
                only = [c for c in a.only.split(",") if c] or list(configs)
                for cname in only:
                    d = tmp / mname / cname
                    d.mkdir(parents=True)
                    args = configs[cname] + ["--no-verify", "-q"]
                    ok_old = _run(old, [model, d / "old.onnx", *args], d / "old.log")
                    ok_new = _run(ROOT, [model, d / "new.onnx", *args, *a.new_args.split()], d / "new.log")
                    if not (ok_old and ok_new):
                        which = "old" if not ok_old else "new"
                        msg = (d / f"{which}.log").read_text().strip().splitlines()[-1:] or [""]
                        rows.append((mname, cname, "-", "-", f"{which} failed: {msg[0][:90]}", "-"))
                        bad += 1
                        continue
                    same, worst, why = compare(d / "old.onnx", d / "new.onnx", a.atol)
                    replay = (_replay(ROOT, model, configs[cname] + a.new_args.split(), d / "new.onnx", d)
                              if a.replay else "-")
                    bad += (not same) or bool(why) or replay not in ("-", "identical bytes")
                    rows.append((mname, cname, "yes" if same else "no", f"{worst:.2g}", why or "same", replay))
                    print(" | ".join(rows[-1]), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    print()
    print("| model | options | same graph | max init diff | result | replay |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n{len(rows) - bad} of {len(rows)} identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
