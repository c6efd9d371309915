"""Shared fixtures: the real models. glassllm is committed; MiniLM is built once and cached."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/graphs.py

GLASSLLM = ROOT / "models" / "glassllm.onnx"
MODEL_CACHE = Path(os.environ.get("ONNXHMF_MODEL_CACHE", ROOT / "models" / "cache"))


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "models" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def glassllm_path() -> Path:
    assert GLASSLLM.is_file(), "models/glassllm.onnx is committed; run models/build_glassllm.py to rebuild it"
    return GLASSLLM


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """all-MiniLM-L6-v2 exported by models/build_minilm.py (needs the `models` extra: torch).

    Built once into models/cache/ (or $ONNXHMF_MODEL_CACHE). Under CI a missing torch is a
    failure, not a skip: CI must build the model from scratch.
    """
    path = MODEL_CACHE / "minilm.onnx"
    if not path.is_file():
        if importlib.util.find_spec("torch") is None:
            if os.environ.get("CI"):
                pytest.fail("torch is not installed, so MiniLM cannot be built (install the `models` extra)")
            pytest.skip("torch not installed: pip install -e '.[models]' to build MiniLM")
        MODEL_CACHE.mkdir(parents=True, exist_ok=True)
        _load_script("build_minilm").build_minilm(path)
    return path


REAL_MODEL_FIXTURES = {"glassllm_path", "minilm_path"}


def pytest_collection_modifyitems(config, items):
    """Every test that builds or runs a real model is ``slow``: ``pytest -m "not slow"`` is the
    fast tier (small synthetic graphs only). Tests marked ``exact_int8`` (they compare
    MatMulInteger with the integer arithmetic, or need int8 plans to reach a tight target on tiny
    random weights) are skipped where the CPU's MatMulInteger saturates."""
    exact = [item for item in items if item.get_closest_marker("exact_int8")]
    from onnxhmf.runtime import matmulinteger_saturates

    saturates = bool(exact) and matmulinteger_saturates()
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    for item in exact if saturates else []:
        item.add_marker(pytest.mark.skip(reason="onnxruntime's MatMulInteger saturates on this CPU (x86 without VNNI: "
                                                "int16 pair sums), so integer results are not exact here"))
