"""Static cost of a graph: parameters and multiply-accumulates (MACs), for reports and MACs targets."""

from __future__ import annotations

import numpy as np

from ..ir.graph import Graph, Node
from ..ir.ops import RECURRENT_GATES


def node_macs(node: Node) -> int:
    """MACs of one node (0 for ops whose cost is not multiply-accumulate dominated)."""
    op = node.op
    if op in ("conv", "conv_transpose"):
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        # Every output element (conv) or input element (transposed) multiplies one weight slice.
        per = int(np.prod(w.shape[1:])) if op == "conv" else int(np.prod(w.shape[1:]))
        n = int(np.prod(y.shape)) if op == "conv" else int(np.prod(x.shape))
        return n * per
    if op == "linear":
        return int(np.prod(node.outputs[0].shape)) * node.inputs[1].shape[1]
    if op == "matmul":
        a = node.inputs[0]
        return int(np.prod(node.outputs[0].shape)) * a.shape[-1]
    if op == "gemm":
        a = node.inputs[0]
        k = a.shape[0] if node.attrs["transA"] else a.shape[1]
        return int(np.prod(node.outputs[0].shape)) * k
    if op == "attention":
        q, k, v = node.inputs[:3]
        lk = k.shape[-2]
        return int(np.prod(q.shape)) * lk + int(np.prod(node.outputs[0].shape)) * lk
    if op in RECURRENT_GATES:  # every step of each direction: W over the features, R over the hidden state
        x, w, r = node.inputs[:3]
        return int(np.prod(x.shape[:2])) * w.shape[0] * w.shape[1] * (w.shape[2] + r.shape[2])
    if op == "einsum":
        letters: dict[str, int] = {}
        for v, term in zip(node.inputs, node.attrs["equation"].split("->")[0].split(","), strict=False):
            for letter, d in zip(term, v.shape, strict=False):
                letters[letter] = d
        return int(np.prod(list(letters.values()))) if letters else 0
    return 0


def graph_cost(graph: Graph) -> dict[str, int]:
    params = sum(int(v.data.size) for v in graph.constants() if v.dtype.kind == "f")
    return {"parameters": params, "macs": sum(node_macs(n) for n in graph.nodes)}
