"""The README's quick start, run exactly as written."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_quick_start_block_is_found():
    cmds = quick_start_commands()
    assert len(cmds) >= 4 and all(c.startswith(".venv/bin/onnxhmf optimize ") for c in cmds)


@pytest.mark.slow
def test_quick_start_commands_run_as_written(minilm_path, tmp_path):
    (tmp_path / "models").symlink_to(ROOT / "models")
    venv = ROOT / ".venv"
    if not (venv / "bin" / "onnxhmf").exists():  # not installed the README's way: the same CLI from this checkout
        bindir = tmp_path / ".venv" / "bin"
        bindir.mkdir(parents=True)
        (bindir / "onnxhmf").write_text(f"#!/bin/sh\nexec {sys.executable} -m onnxhmf.cli \"$@\"\n")
        (bindir / "onnxhmf").chmod(0o755)
    else:
        (tmp_path / ".venv").symlink_to(venv)
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_minilm_folder", ROOT / "models" / "build_minilm_folder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.build_folder(tmp_path / "minilm_export", source=minilm_path, verify=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    for cmd in quick_start_commands():
        args = shlex.split(cmd)
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
        src, out = tmp_path / args[2], tmp_path / args[3]
        if src.is_dir():
            out = out / "model.onnx"
            src = src / "model.onnx"
        assert out.is_file(), cmd
        onnx.checker.check_model(str(out))
        assert out.stat().st_size < src.stat().st_size, cmd
