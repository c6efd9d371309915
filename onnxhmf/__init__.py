"""onnxhmf: make exported ONNX language models smaller and faster, offline.

    >>> import onnxhmf
    >>> model, report = onnxhmf.optimize("model.onnx", keep=0.5)
    >>> onnxhmf.save_model(model, "model.small.onnx")

The top-level names are imported on first use, so ``onnxhmf.factorize`` (the math: numpy and
scipy only) imports without onnx or onnxruntime installed.
"""
__version__ = "0.1.0"

__all__ = ["optimize", "optimize_file", "make_plan", "load_model", "save_model", "Report", "Plan", "OnnxHmfError",
           "VerificationError", "__version__"]

_WHERE = {"optimize": "api", "optimize_file": "api", "make_plan": "api", "load_model": "io", "save_model": "io",
          "Report": "report", "Plan": "plan", "OnnxHmfError": "errors", "VerificationError": "errors"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'onnxhmf' has no attribute {name!r}")
