"""Fold inference-mode batch_norm into the conv that feeds it: W' = W·s, b' = (b − mean)·s + beta, s = gamma/√(var+ε).

Compilers differ here: ONNX Runtime folds BN itself; TVM's Relax pipeline keeps it as a subtract/divide/multiply/add
epilogue in every conv kernel (four extra passes over the output). Folding at the IR level removes that work for
every backend. Only exact cases are folded: the conv's output feeds nothing but the BN, every BN input and the
conv weight (used by this conv alone) are constants.
"""

from __future__ import annotations

import numpy as np

from ..ir import Graph
from ..ir.graph import Node, Provenance, Value


def folded_into(graph: Graph, bn: Node) -> Node | None:
    """The conv `bn` folds into, None when it does not fold (see the module doc)."""
    if bn.op != "batch_norm" or len(bn.inputs) != 5 or not all(v is not None and v.is_constant for v in bn.inputs[1:]):
        return None
    x = bn.inputs[0]
    conv = x.producer if x is not None else None
    if conv is None or conv.op != "conv" or len(x.users) != 1 or x in graph.outputs:
        return None
    w = conv.inputs[1]
    if w is None or not w.is_constant or len(w.users) != 1:
        return None
    if len(conv.inputs) > 2 and conv.inputs[2] is not None and (not conv.inputs[2].is_constant
                                                                or len(conv.inputs[2].users) != 1):
        return None
    return conv


def fold_batch_norms(graph: Graph) -> int:
    """Fold in place; returns the number of batch_norm nodes removed."""
    folded = 0
    for bn in list(graph.nodes):
        conv = folded_into(graph, bn)
        if conv is None:
            continue
        gamma, beta, mean, var = (v.data.astype(np.float64) for v in bn.inputs[1:])
        scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        w = conv.inputs[1]
        dtype = w.data.dtype
        w.data = (w.data.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.data.ndim - 1))).astype(dtype)
        old_bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        b = old_bias.data.astype(np.float64) if old_bias is not None else np.zeros_like(mean)
        bias_data = ((b - mean) * scale + beta).astype(dtype)
        if old_bias is not None:
            old_bias.data = bias_data
        else:
            sources = tuple(v.provenance.name for v in bn.inputs[1:] if v.provenance is not None)
            bias = Value(f"{w.name}.folded_bias", bias_data.shape, dtype, bias_data,
                         Provenance("folded", "", sources, computed=True))
            conv.inputs = [conv.inputs[0], w, bias]
        y, x = bn.outputs[0], conv.outputs[0]
        graph.replace_all_uses(y, x)
        graph.remove_node(bn)
        if x in graph.outputs:  # keep the model's output names
            x.name = y.name
        folded += 1
    return folded


def folded_copy(graph: Graph) -> tuple[Graph, int]:
    """A copy of `graph` with its batch_norms folded (what every backend runs), and how many were."""
    copy = graph.clone()
    return copy, fold_batch_norms(copy)
