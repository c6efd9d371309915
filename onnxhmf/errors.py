"""Errors the CLI turns into one line on stderr and an exit code."""
from __future__ import annotations


class OnnxHmfError(Exception):
    """Bad input, bad option or an I/O problem: exit code 2."""

    exit_code = 2


class VerificationError(OnnxHmfError):
    """The optimized model is numerically outside the requested tolerances: exit code 1."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
