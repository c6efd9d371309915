"""inspect, verify, bench and optimize --dry-run: on synthetic models and on glassllm/MiniLM."""
import json
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
from onnxhmf import inspect as inspect_mod
from onnxhmf.api import optimize, optimize_file
from onnxhmf.cli import main
from onnxhmf.factorize.spectrum import energy_rank, singular_values
from onnxhmf.inspect import inspect_model
from onnxhmf.verify import make_inputs, run_onnxruntime


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def direct_energy_rank(W, share):
    """Independent of spectrum.py: full SVD, first r whose cumulative σ² reaches the share."""
    s = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    c = np.cumsum(s**2)
    return int(np.argmax(c >= share * c[-1] * (1 - 1e-12)) + 1)


@pytest.fixture
def mlp(tmp_path):
    p = tmp_path / "mlp.onnx"
    onnx.save(graphs.mlp_model(32, 96), p)
    return p


def perturbed(src, dst, scale, seed=0, weight="W1"):
    """A copy of ``src`` with Gaussian noise of std ``scale`` added to ``weight``."""
    m = onnx.load(src)
    for t in m.graph.initializer:
        if t.name == weight:
            W = numpy_helper.to_array(t)
            W = W + np.random.default_rng(seed).standard_normal(W.shape).astype(np.float32) * scale
            t.CopyFrom(numpy_helper.from_array(W, weight))
            break
    else:
        raise AssertionError(f"no initializer {weight}")
    onnx.save(m, dst)
    return dst


# ------------------------------------------------------------------------------- inspect

@pytest.mark.parametrize("shape", [(300, 20), (20, 300), (48, 40), (7, 1)])
def test_singular_values_match_full_svd(shape):
    W = graphs.matrix(*shape, seed=3, decay=0.8)
    ref = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    s = singular_values(W)
    assert s.shape == ref.shape
    np.testing.assert_allclose(s, ref, rtol=1e-6, atol=1e-7 * ref[0])
    for q in (0.5, 0.9, 0.99, 1.0):
        assert energy_rank(s, q) == direct_energy_rank(W, q)


def test_energy_rank_edges():
    assert energy_rank(np.zeros(4), 0.9) == 0
    assert energy_rank(np.array([3.0, 0.0, 0.0]), 0.99) == 1
    assert energy_rank(np.array([1.0, 1.0, 1.0, 1.0]), 0.9) == 4  # 3 of 4 equal directions hold only 75%
    with pytest.raises(ValueError):
        energy_rank(np.ones(2), 1.5)


def test_inspect_json_rows(mlp, capsys):
    code, out, err = cli(capsys, "inspect", mlp, "--json")
    assert code == 0, err
    data = json.loads(out)
    model = onnx.load(mlp)
    W = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    total = sum(w.size for w in W.values())
    assert data["params"] == total
    rows = {s["weight"]: s for s in data["sites"]}
    assert set(rows) == {"W1", "W2"}
    for name, (m, n) in (("W1", (32, 96)), ("W2", (96, 32))):
        r = rows[name]
        assert r["shape"] == [m, n] and r["params"] == m * n and r["ops"] == "matmul" and r["uses"] == 1
        assert r["share"] == pytest.approx(m * n / total)
        assert r["rank90"] == direct_energy_rank(W[name], 0.90)
        assert r["rank99"] == direct_energy_rank(W[name], 0.99)
        assert r["breakeven_rank"] == (m * n - 1) // (m + n) == 23
        assert r["skipped"] == ""


def test_inspect_tied_tall_table_and_skipped(tmp_path, capsys):
    tied = tmp_path / "tied.onnx"
    onnx.save(graphs.tied_model(400, 24), tied)  # 400 ≥ 4·24: spectrum through the Gram matrix
    code, out, err = cli(capsys, "inspect", tied, "--json")
    assert code == 0, err
    (row,) = json.loads(out)["sites"]
    E = numpy_helper.to_array(next(t for t in onnx.load(tied).graph.initializer if t.name == "E"))
    assert row["ops"] == "gather+matmul" and row["uses"] == 2
    assert row["rank90"] == direct_energy_rank(E, 0.9) and row["rank99"] == direct_energy_rank(E, 0.99)

    shared = tmp_path / "shared.onnx"
    onnx.save(graphs.shared_with_add_model(), shared)
    code, out, err = cli(capsys, "inspect", shared)
    assert code == 0, err
    assert "skipped 1 site(s)" in out and "read by Add node 'add'" in out
    assert "at --keep 0.75 (lmf): 0 site(s) rewritten" in out


def test_inspect_skips_huge_spectra_unless_asked(mlp, monkeypatch):
    monkeypatch.setattr(inspect_mod, "HUGE_ELEMENTS", 3000)  # W1/W2 have 3072 elements
    fast = inspect_model(mlp)
    assert all(s.rank90 is None and "--full-spectrum" in s.spectrum_note for s in fast.sites)
    assert "note: spectrum skipped" in fast.format()
    full = inspect_model(mlp, full_spectrum=True)
    assert all(s.rank90 is not None and not s.spectrum_note for s in full.sites)


@pytest.mark.parametrize("keep", [0.3, 0.75])
def test_inspect_size_line_matches_optimize(mlp, keep):
    ins = inspect_model(mlp, keep=keep)
    _, report = optimize(str(mlp), keep=keep, verify=False)
    assert ins.plan.params_after == report.params_after
    assert f"params {report.params_before:,} -> {report.params_after:,}" in ins.format()


def test_inspect_glassllm(glassllm_path, capsys):
    code, out, err = cli(capsys, "inspect", glassllm_path, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert len(data["sites"]) == 29
    embed = next(s for s in data["sites"] if s["weight"] == "embed.weight")
    assert embed["uses"] == 2 and embed["ops"] == "gather+matmul" and embed["shape"] == [1024, 128]
    assert all(0 < s["rank90"] <= s["rank99"] <= min(s["shape"]) for s in data["sites"])
    assert data["plan"]["params_after"] < data["plan"]["params_before"] == data["params"]


# -------------------------------------------------------------------------------- verify

def verify_json(capsys, tmp_path, *args):
    rep = tmp_path / "verify.json"
    code, out, err = cli(capsys, "verify", *args, "--report", rep)
    return code, (json.loads(rep.read_text()) if rep.exists() else None), out, err


def test_verify_statistics_are_the_true_ones(mlp, tmp_path, capsys):
    cand = perturbed(mlp, tmp_path / "p.onnx", 1e-3)
    code, data, out, err = verify_json(capsys, tmp_path, mlp, cand, "--input-shapes", "X:3,5,32")
    assert code == 0, err  # no tolerance given: nothing to miss
    feeds = make_inputs(onnx.load(mlp), {"X": [3, 5, 32]}, seed=0)
    r = run_onnxruntime(mlp, feeds)["Y"].astype(np.float64)
    c = run_onnxruntime(cand, feeds)["Y"].astype(np.float64)
    d = np.abs(r - c)
    rel = d / np.abs(r)
    (s,) = data["results"]["ort"]
    assert s["shape"] == [3, 5, 32]
    assert s["max_abs"] == pytest.approx(d.max()) and s["mean_abs"] == pytest.approx(d.mean())
    assert s["median_abs"] == pytest.approx(np.median(d)) and s["quantile_abs"] == pytest.approx(np.quantile(d, 0.99))
    assert s["median_rel"] == pytest.approx(np.median(rel)) and s["quantile_rel"] == pytest.approx(np.quantile(rel, 0.99))
    assert s["snr_db"] == pytest.approx(10 * np.log10(np.sum(r**2) / np.sum(d**2)))
    assert 0.99 < s["mean_cosine"] < 1.0
    assert "p99 abs" in out and "verification: PASSED" in out


def test_verify_tolerances_and_error_stat(mlp, tmp_path, capsys):
    cand = perturbed(mlp, tmp_path / "p.onnx", 1e-3)
    _, data, _, _ = verify_json(capsys, tmp_path, mlp, cand)
    (s,) = data["results"]["ort"]
    mid = (s["mean_abs"] + s["max_abs"]) / 2  # between the mean and the max abs error
    assert s["mean_abs"] < mid < s["max_abs"]
    code, _, _, err = verify_json(capsys, tmp_path, mlp, cand, "--atol", mid)
    assert code == 1 and "elements outside atol" in err and err.count("\n") == 1
    code, _, _, err = verify_json(capsys, tmp_path, mlp, cand, "--atol", mid, "--check-error-stat", "elemwise")
    assert code == 1 and "elements outside atol" in err
    code, _, _, err = verify_json(capsys, tmp_path, mlp, cand, "--atol", mid, "--check-error-stat", "max")
    assert code == 1 and "max abs error" in err
    code, _, out, err = verify_json(capsys, tmp_path, mlp, cand, "--atol", mid, "--check-error-stat", "mean")
    assert code == 0, err
    code, _, _, err = verify_json(capsys, tmp_path, mlp, cand, "--atol", f"Y:{mid}", "--check-error-stat", "Y:median")
    assert code == 0, err
    code, _, _, err = verify_json(capsys, tmp_path, mlp, cand, "--atol", s["max_abs"] * 1.01)
    assert code == 0, err
    # Polygraphy semantics: a statistic passes if abs OR rel is within its tolerance
    code, _, _, err = verify_json(capsys, tmp_path, mlp, cand, "--atol", 0, "--rtol", s["quantile_rel"] * 1.01,
                                  "--check-error-stat", "quantile")
    assert code == 0, err
    code, _, _, err = verify_json(capsys, tmp_path, mlp, cand, "--min-cosine", 0.999999999)
    assert code == 1 and "mean cosine" in err
    code, _, _, err = verify_json(capsys, tmp_path, mlp, cand, "--atol", "nope:1")
    assert code == 2 and "unknown output" in err
    code, _, _, err = verify_json(capsys, tmp_path, mlp, cand, "--atol", "1", "--check-error-stat", "p50")
    assert code == 2 and "--check-error-stat" in err


def test_verify_golden_outputs_round_trip(mlp, tmp_path, capsys):
    cand = perturbed(mlp, tmp_path / "p.onnx", 1e-3)
    golden = tmp_path / "golden.npz"
    code, out, err = cli(capsys, "verify", mlp, "--save-outputs", golden, "--input-shapes", "X:2,3,32")
    assert code == 0, err
    assert golden.is_file()
    with np.load(golden) as g:
        assert sorted(g.files) == ["input/X", "output/Y"] and g["output/Y"].shape == (2, 3, 32)
        np.testing.assert_array_equal(g["output/Y"], run_onnxruntime(mlp, {"X": g["input/X"]})["Y"])
    _, live, _, _ = verify_json(capsys, tmp_path, mlp, cand, "--input-shapes", "X:2,3,32")
    _, saved, _, _ = verify_json(capsys, tmp_path, cand, "--load-outputs", golden)
    assert saved["inputs"] == {"X": [2, 3, 32]}
    assert saved["results"]["ort"][0]["max_abs"] == live["results"]["ort"][0]["max_abs"] > 0
    _, same, _, _ = verify_json(capsys, tmp_path, mlp, "--load-outputs", golden, "--atol", 0)
    assert same["passed"] is True and same["results"]["ort"][0]["max_abs"] == 0
    code, _, _, err = verify_json(capsys, tmp_path, mlp, cand, "--load-outputs", golden)
    assert code == 2 and "only CAND" in err
    feeds = tmp_path / "feeds.npz"
    with np.load(golden) as g:
        np.savez(feeds, X=g["input/X"])
    _, given, _, _ = verify_json(capsys, tmp_path, mlp, cand, "--inputs", feeds)
    assert given["inputs"] == {"X": [2, 3, 32]} and given["results"] == live["results"]


def test_verify_reference_runtime(mlp, tmp_path, capsys):
    ref = tmp_path / "tied.onnx"
    onnx.save(graphs.tied_model(200, 32), ref)
    cand = tmp_path / "cand.onnx"
    optimize_file(ref, cand, rank=8, keep=None, min_top1=None)
    code, data, out, err = verify_json(capsys, tmp_path, ref, cand, "--runtime", "ort", "--runtime", "reference",
                                       "--min-cosine", "0")
    assert code == 0, err
    ort_s, ref_s = data["results"]["ort"][0], data["results"]["reference"][0]
    # both runtimes see the same low-rank model: the same error against REF, to float rounding
    assert ref_s["max_abs"] == pytest.approx(ort_s["max_abs"], rel=1e-3)
    assert ort_s["top1"] is not None and ort_s["topk"] is not None and ort_s["k"] == 5
    # the same model on onnx.reference instead of onnxruntime: agrees to float rounding, and is not ORT again
    code, data, _, err = verify_json(capsys, tmp_path, mlp, mlp, "--runtime", "reference", "--atol", "1e-4")
    assert code == 0 and list(data["results"]) == ["reference"] and 0 < data["results"]["reference"][0]["max_abs"] < 1e-4
    code, _, _, err = verify_json(capsys, tmp_path, mlp, mlp, "--runtime", "reference", "--atol", "0")
    assert code == 1 and "outside atol" in err


def test_verify_calib_text_minilm(minilm_path, tmp_path, capsys):
    from tokenizers import Tokenizer

    tok = minilm_path.with_name("minilm.tokenizer.json")
    text = tmp_path / "calib.txt"
    lines = ["The quick brown fox jumps over the lazy dog.", "", "Hello world", "onnx models get smaller"]
    text.write_text("\n".join(lines))
    code, data, out, err = verify_json(capsys, tmp_path, minilm_path, minilm_path, "--calib", text, "--tokenizer", tok,
                                       "--atol", 0)
    assert code == 0, err
    t = Tokenizer.from_file(str(tok))
    t.no_padding()  # the file pads to 128; verify pads only to the longest line
    sentences = [x for x in lines if len(x.split()) >= 3]  # "Hello world" reads as a title, the blank line as nothing
    longest = max(len(t.encode(x).ids) for x in sentences)
    assert longest < 20
    assert data["inputs"] == {n: [2, longest] for n in ("input_ids", "attention_mask", "token_type_ids")}
    code, _, _, err = verify_json(capsys, tmp_path, minilm_path, minilm_path, "--calib", text)
    assert code == 2 and "--tokenizer" in err


def test_verify_glassllm_topk(glassllm_path, tmp_path, capsys):
    cand = perturbed(glassllm_path, tmp_path / "g.onnx", 0.05, weight="blocks.0.ffn.w2")
    code, data, out, err = verify_json(capsys, tmp_path, glassllm_path, cand, "--min-cosine", 0.5, "--top-k", 10)
    assert code == 0, err
    (s,) = data["results"]["ort"]
    feeds = make_inputs(onnx.load(glassllm_path), seed=0)
    r, c = run_onnxruntime(glassllm_path, feeds)["logits"], run_onnxruntime(cand, feeds)["logits"]
    top = lambda x: np.argsort(-x.reshape(-1, x.shape[-1]), axis=1)[:, :10]  # noqa: E731
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top(r), top(c))])
    top1 = np.mean(r.argmax(-1) == c.argmax(-1))
    assert s["name"] == "logits" and s["k"] == 10
    assert s["topk"] == pytest.approx(overlap) and s["top1"] == pytest.approx(top1) and overlap < 1
    code, _, _, err = verify_json(capsys, tmp_path, glassllm_path, cand, "--atol", "1e-6")
    assert code == 1 and "verification failed" in err


# --------------------------------------------------------------------------------- bench

def test_bench_same_model_twice_and_smaller(tmp_path, capsys):
    a = tmp_path / "tied.onnx"
    onnx.save(graphs.tied_model(400, 64), a)
    b = tmp_path / "small.onnx"
    optimize_file(a, b, rank=8, keep=None, min_top1=None)
    code, out, err = cli(capsys, "bench", a, a, b, "--iterations", 10, "--warmup", 2, "--threads", 1,
                         "--input-shapes", "ids:1,16", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["inputs"] == {"ids": [1, 16]} and data["iterations"] == 10 and data["threads"] == 1
    m0, m1, m2 = data["models"]
    for m in data["models"]:
        assert {"path", "bytes", "params", "p50_ms", "p90_ms", "ratio"} <= m.keys() and m["runs"] == 10
        assert 0 < m["p50_ms"] <= m["p90_ms"]
    assert m1["ratio"]["bytes"] == m1["ratio"]["params"] == 1.0
    assert 0.2 < m1["ratio"]["p50_ms"] < 5  # same model: ~1 (loose: the machine is shared)
    assert m2["bytes"] == os.path.getsize(b) and m2["ratio"]["bytes"] == pytest.approx(os.path.getsize(b) / os.path.getsize(a))
    assert m2["params"] == 8 * (400 + 64) + 64 and m2["ratio"]["params"] < 0.2
    code, out, err = cli(capsys, "bench", a, b, "--iterations", 2, "--warmup", 0)
    assert code == 0 and "p50 ms" in out and out.count("\n") == 5


def test_bench_reports_resident_memory(tmp_path, capsys):
    """The memory column is what a loaded model costs: 16 MiB of float weights show up, and a model
    that is small on disk but rebuilt as float at load (weight-only int8) does not look small."""
    from onnxhmf.quantize import weight_only

    small, big, packed = tmp_path / "s.onnx", tmp_path / "b.onnx", tmp_path / "w.onnx"
    onnx.save(graphs.mlp_model(512, 32), small)
    onnx.save(graphs.mlp_model(512, 4096), big)  # 2 x 512x4096 float32 = 16 MiB
    w = graphs.mlp_model(512, 4096)
    assert weight_only(w, [t.name for t in w.graph.initializer if len(t.dims) == 2], 8)
    onnx.save(w, packed)
    code, out, err = cli(capsys, "bench", small, big, packed, "--iterations", 2, "--warmup", 0, "--json",
                         "--input-shapes", "X:1,4,512")
    assert code == 0, err
    s, b, p = json.loads(out)["models"]
    assert b["memory"] - s["memory"] > 12 * 2**20 and b["ratio"]["memory"] > 2
    assert p["bytes"] < 0.4 * b["bytes"] and p["memory"] > 0.7 * b["memory"]  # disk only
    code, out, err = cli(capsys, "bench", small, big, "--iterations", 2, "--warmup", 0, "--no-memory", "--json")
    assert code == 0 and all(m["memory"] is None for m in json.loads(out)["models"])


def test_bench_counts_external_data(tmp_path, capsys):
    m = graphs.matmul_model(64, 48, ndim=2)
    a = tmp_path / "inline.onnx"
    onnx.save(m, a)
    b = tmp_path / "ext.onnx"
    onnx.save(m, b, save_as_external_data=True, location="ext.bin", size_threshold=0)
    code, out, err = cli(capsys, "bench", a, b, "--iterations", 2, "--warmup", 0, "--json")
    assert code == 0, err
    m0, m1 = json.loads(out)["models"]
    assert m1["bytes"] == os.path.getsize(b) + os.path.getsize(tmp_path / "ext.bin") > os.path.getsize(b)
    assert m1["params"] == m0["params"] == 64 * 48 and m1["ratio"]["bytes"] == pytest.approx(1.0, abs=0.02)


def test_bench_refuses_models_with_other_inputs(tmp_path, mlp, capsys):
    a = tmp_path / "tied.onnx"
    onnx.save(graphs.tied_model(200, 32), a)
    code, _, err = cli(capsys, "bench", a, mlp, "--iterations", 1)
    assert code == 2 and "must match" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------- dry run

@pytest.mark.parametrize("args", [("--keep", "0.5"), ("--rank", "4"), ("--keep", "0.6", "--rank-multiple", "4")])
def test_dry_run_writes_nothing_and_predicts_params(mlp, tmp_path, capsys, args):
    out, rep, plan_path = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "plan.json"
    before = sorted(os.listdir(tmp_path))
    code, plan_out, err = cli(capsys, "optimize", mlp, out, "--dry-run", "--report", rep, *args)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == before  # no model, no report, no temp file
    code, _, err = cli(capsys, "optimize", mlp, out, "--dry-run", "--save-plan", plan_path, *args)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == before + ["plan.json"]  # only the plan
    code, real_out, err = cli(capsys, "optimize", mlp, out, "--no-verify", "--report", rep, *args)
    assert code == 0, err
    plan, report = json.loads(plan_path.read_text()), json.loads(rep.read_text())
    planned = {d["weight"]: d["rank"] for d in plan["decisions"] if d["treatment"] == "lmf"}
    used = {s["weight"]: s["rank"] for s in report["sites"] if s["status"] == "rewritten"}
    assert planned and planned == used  # every planned rank is the rank optimize used
    stored = lambda d: (d["rank"] * (sum(d["shape"]) - d["rank"]) + d["index"] if d["pivot"]  # noqa: E731
                        else d["rank"] * sum(d["shape"]))  # pivoted (the default where smaller) or A·B
    after = plan["params_before"] - sum(d["shape"][0] * d["shape"][1] - stored(d)
                                        for d in plan["decisions"] if d["treatment"] == "lmf")
    assert plan["params_before"] == report["params_before"] and after == report["params_after"]


def test_dry_run_exact_for_lmf_upper_bound_for_hmf(mlp, tmp_path):
    tied = tmp_path / "tied.onnx"
    onnx.save(graphs.tied_model(300, 40), tied)
    for path in (mlp, tied):
        _, plan = optimize(str(path), keep=0.6, dry_run=True)
        _, report = optimize(str(path), keep=0.6, verify=False)
        assert plan.exact and plan.params_after == report.params_after
        assert [d.rank for d in plan.decisions if d.changes] == [s.rank for s in report.rewritten]
        assert plan.predicted_bytes == pytest.approx(report.bytes_after, rel=0.05)  # ~: names and proto overhead (tiny models)
        _, plan = optimize(str(path), method="hmf", keep=0.6, dry_run=True)
        _, report = optimize(str(path), method="hmf", keep=0.6, verify=False)
        assert not plan.exact and report.params_after <= plan.params_after
        assert [d.budget for d in plan.decisions if d.changes] == [int(0.6 * s.params_before) for s in report.rewritten]


@pytest.mark.slow
def test_dry_run_glassllm(glassllm_path, tmp_path, capsys):
    out, plan_path = tmp_path / "o.onnx", tmp_path / "p.json"
    code, text, err = cli(capsys, "optimize", glassllm_path, out, "--dry-run", "--keep", "0.6", "--save-plan", plan_path,
                          "--no-pivot")
    assert code == 0, err
    assert not out.exists() and os.listdir(tmp_path) == ["p.json"]
    model = onnx.load(glassllm_path)
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    plan = json.loads(plan_path.read_text())
    rows = [d for d in plan["decisions"] if d["treatment"] != "dense"]
    assert len(rows) == 29
    saved = 0
    for d in rows:
        m, n = shapes[d["weight"]]
        assert tuple(d["shape"]) == (m, n) and d["treatment"] == "lmf" and d["rank"] == int(0.6 * m * n / (m + n))
        saved += m * n - d["rank"] * (m + n)
    assert plan["params_before"] == total
    assert f"params: {total:,} -> {total - saved:,}" in text
    code, text, err = cli(capsys, "optimize", glassllm_path, out, "--dry-run", "--method", "hmf", "--save-plan", plan_path)
    assert code == 0, err
    assert not out.exists()
    plan = json.loads(plan_path.read_text())
    hmf = [d for d in plan["decisions"] if d["treatment"] == "hmf"]
    assert len(hmf) == 29 and all(d["budget"] == int(0.75 * d["shape"][0] * d["shape"][1] + 1e-9) for d in hmf)


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("command", [["inspect"], ["bench"], ["verify", "GOOD"], ["verify", "--save-outputs", "OUT"]])
@pytest.mark.parametrize("bad", ["missing", "empty", "random"])
def test_bad_model_one_line_exit_2(command, bad, mlp, tmp_path, capsys):
    path = tmp_path / f"{bad}.onnx"
    if bad == "empty":
        path.write_bytes(b"")
    elif bad == "random":
        path.write_bytes(np.random.default_rng(0).bytes(3000))
    args = [mlp if a == "GOOD" else tmp_path / "g.npz" if a == "OUT" else a for a in command]
    before = sorted(os.listdir(tmp_path))
    code, out, err = cli(capsys, *args, path)
    assert code == 2 and err.startswith("onnxhmf: error:") and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == before


def test_inspect_model_without_sites(tmp_path, capsys):
    p = tmp_path / "int.onnx"
    onnx.save(graphs.int_weight_model(), p)
    code, out, err = cli(capsys, "inspect", p)
    assert code == 0, err
    assert "no compressible sites" in out and "dtype INT64 is not fp32/fp16/fp64" in out
    assert "0 site(s) rewritten" in out
