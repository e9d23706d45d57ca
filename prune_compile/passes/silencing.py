"""Which activations of a group are zero once its producers are silenced (the consumer-zeroing oracle's model).

An exact group prunes to what the original computes with the removed channels' producer rows and consumer columns
zeroed (design §5.1). A weight consumer ends every path of a removed channel by its zeroed column. A product of two
activations that sums over the channels (q·kᵀ over head_dim, a lambda layer's content term), or a plain sum over
them, has no such column: the term of a removed channel vanishes only if one of its factors is zero there. That
holds when the factor's path from its producer maps zero to zero; a batch_norm shift, a softmax or a sigmoid on the
way makes it non-zero, and the group is then inexact (pruning still removes the channels; it just is not the zeroed
model).
"""

from __future__ import annotations

import numpy as np

from ..ir.graph import Node, Value
from .channel_rules import CONSUMER, PRODUCER

# Ops that map an all-zero channel to an all-zero channel (elementwise f(0) = 0, or moving, pooling, reducing over
# other axes; a product whose factor carries the channel on a free axis, like k's rows in k @ v).
ZERO_KEEPING = frozenset({
    "matmul", "gemm", "einsum", "attention",
    "identity", "relu", "tanh", "sqrt", "neg", "abs", "erf", "floor", "ceil", "sin", "sign", "round", "hard_swish",
    "leaky_relu", "elu", "gelu", "silu", "mish", "cast", "dropout",
    "concat", "split", "slice", "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "gather", "expand", "tile",
    "max_pool", "avg_pool", "global_avg_pool", "global_max_pool", "resize",
    "reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_l2", "reduce_prod",
})


class Silencing:
    """`silenced(v)`: whether the group's channels of `v` are all zero in the zeroed model (False when unsure)."""

    def __init__(self, members: dict[int, str | None]) -> None:
        self.members = members  # id(value) -> the group's role on it (None for activations)
        self.memo: dict[int, bool] = {}
        self.culprit: Node | None = None  # the first op met that does not keep zeros

    def silenced(self, v: Value) -> bool:
        key = id(v)
        if key not in self.memo:
            self.memo[key] = False  # a graph is acyclic; this only guards against re-entry
            self.memo[key] = self._silenced(v)
        return self.memo[key]

    def _silenced(self, v: Value) -> bool:
        if id(v) not in self.members:
            return False
        if v.is_constant:
            return self.members[id(v)] in (PRODUCER, CONSUMER)
        node = v.producer
        if node is None:
            return False
        carrying = [x for x in node.inputs if x is not None and id(x) in self.members]
        if any(x.is_constant and self.members[id(x)] == PRODUCER for x in carrying):
            return True  # the group's producer: its rows (and bias) are zeroed
        if node.op == "mul":
            return any(self.silenced(x) for x in carrying)
        if node.op == "div":
            return node.inputs[0] in carrying and self.silenced(node.inputs[0])
        activations = [x for x in carrying if not x.is_constant]
        keeps = (node.op in ZERO_KEEPING or (node.op == "clip" and _clip_keeps_zero(node))
                 or (node.op == "pad" and node.attrs.get("mode", "constant") == "constant"
                     and not node.attrs.get("value", 0.0))
                 or (node.op in ("add", "sub") and _adds_nothing(node, carrying))
                 or (node.op == "batch_norm" and _shift_is_zero(node)))
        if not keeps:
            self.culprit = self.culprit or node
            return False
        return bool(activations) and all(self.silenced(x) for x in activations)


def _clip_keeps_zero(node: Node) -> bool:
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    return (lo is None or lo <= 0) and (hi is None or hi >= 0)


def _adds_nothing(node: Node, carrying: list[Value]) -> bool:
    """Every other operand of an add/sub is a constant zero (a non-zero bias makes the channel non-zero)."""
    others = [x for x in node.inputs if x is not None and x not in carrying]
    return all(x.is_constant and not np.any(x.data) for x in others) and all(
        not x.is_constant for x in carrying)


def _shift_is_zero(node: Node) -> bool:
    """batch_norm(0) = bias - mean * scale / sqrt(var + eps): zero only without a shift."""
    params = node.inputs[1:5]
    if len(params) < 4 or any(p is None or not p.is_constant for p in params):
        return False
    scale, bias, mean, var = (np.asarray(p.data, dtype=np.float64) for p in params)
    shift = bias - mean * scale / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
    return not np.any(shift)
