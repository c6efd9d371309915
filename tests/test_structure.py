"""The package's shape: no import cycles, no long functions, the math importable without onnx."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "onnxhmf"
MAX_FUNCTION_LINES = 80


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """onnxhmf modules ``path`` imports, at module level or inside functions."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("onnxhmf")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("onnxhmf"):
                continue
            # "from . import x" / "from .pkg import mod": a submodule, where one exists
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists() else target)
    return out


def import_graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    mods = {_module(p): p for p in files}
    return {m: {t for t in _imports(p) if t in mods and t != m} for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if t == "onnxhmf":  # the package's lazy top-level names load nothing at import
                continue
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30  # the walk saw the package
    assert "onnxhmf.executor" in graph["onnxhmf.api"]  # and its imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def function_lengths() -> list[tuple[int, str]]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{_module(p)}.{node.name}"))
    return sorted(out, reverse=True)


def test_no_function_over_the_limit():
    lengths = function_lengths()
    assert lengths and lengths[-1][0] >= 1
    long = [f"{name} ({n} lines)" for n, name in lengths if n > MAX_FUNCTION_LINES]
    assert not long, long


def test_factorize_imports_with_numpy_and_scipy_alone():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('onnx', 'onnxruntime', 'click', 'tokenizers'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pkgutil, importlib, onnxhmf.factorize as f\n"
        "names = [m.name for m in pkgutil.iter_modules(f.__path__)]\n"
        "[importlib.import_module('onnxhmf.factorize.' + n) for n in names]\n"
        "assert 'onnx' not in sys.modules\n"
        "print(len(names))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 7


if __name__ == "__main__":  # the closing note's numbers
    for n, name in function_lengths()[:5]:
        print(f"{n:4d}  {name}")
    for m, deps in sorted(import_graph().items()):
        print(m, "->", ", ".join(sorted(deps)))
