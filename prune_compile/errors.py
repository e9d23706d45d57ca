"""Exception types. Each maps to one CLI exit code, so callers (and build systems) can tell failures apart."""

from __future__ import annotations


class PruneCompileError(Exception):
    """Base class. `exit_code` is what the CLI returns for it."""

    exit_code = 1


class UsageError(PruneCompileError):
    """Bad command line or arguments: wrong file type, missing file, impossible option value (exit 2)."""

    exit_code = 2


class UnsupportedModelError(PruneCompileError):
    """The model cannot be handled: corrupt file, unknown opset domain, dynamic shape without an override (exit 3)."""

    exit_code = 3


class ModelFormatError(UnsupportedModelError):
    """The file is not a readable model of the expected format (truncated or corrupt protobuf, bad archive)."""


class GraphError(UnsupportedModelError):
    """The IR is inconsistent (broken links, shape mismatch): raised by `Graph.verify()` and IR operations."""


class BackendError(PruneCompileError):
    """A backend or toolchain failed (exit 4)."""

    exit_code = 4
