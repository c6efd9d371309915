"""onnxhmf: make exported ONNX language models smaller and faster, offline.

    >>> import onnxhmf
    >>> model, report = onnxhmf.optimize("model.onnx", keep=0.5)
    >>> onnxhmf.save_model(model, "model.small.onnx")
"""
__version__ = "0.1.0"

from .api import optimize, optimize_file  # noqa: E402
from .errors import OnnxHmfError, VerificationError  # noqa: E402
from .io import load_model, save_model  # noqa: E402
from .report import Report  # noqa: E402

__all__ = ["optimize", "optimize_file", "load_model", "save_model", "Report", "OnnxHmfError", "VerificationError", "__version__"]
