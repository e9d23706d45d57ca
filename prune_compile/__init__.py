"""prune-compile: a structural-pruning compiler (import → analyse → plan → rewrite → export/build)."""

from .errors import BackendError, ModelFormatError, PruneCompileError, UnsupportedModelError, UsageError
from .ir import Graph, export_onnx, import_onnx

__all__ = [
    "BackendError", "Graph", "ModelFormatError", "PruneCompileError", "UnsupportedModelError", "UsageError",
    "export_onnx", "import_onnx",
]
