"""The IR: graph, op registry, importers (ONNX, torch.export) and the ONNX exporter."""

from .graph import Graph, Node, OpaqueInfo, Provenance, Value
from .onnx_exporter import export_onnx
from .onnx_importer import import_onnx, load_onnx_model
from .ops import OPS, OpKind, op_def

__all__ = [
    "Graph", "Node", "OpaqueInfo", "Provenance", "Value", "OPS", "OpKind", "op_def",
    "export_onnx", "import_onnx", "load_onnx_model",
]
