"""The op registry: every normalized op name, its kind, its attributes and (where we have one) its shape rule.

Semantics are ONNX's (opset 18) so that both importers target one well-specified meaning, with constant
operands lifted into attributes: `reshape.shape`, `slice.starts/ends/axes/steps`, `split.split`, `pad.pads`,
`reduce_*.axes`, `clip.min/max`, `resize.scales/sizes`, `squeeze/unsqueeze.axes`, `expand.shape`, `tile.repeats`.
An op that is not here is imported as `opaque` and never understood (the passes fail closed on it).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import GraphError


class OpKind(enum.Enum):
    UNARY = "unary"  # elementwise, one tensor in
    BINARY = "binary"  # elementwise with numpy broadcasting
    WHERE = "where"
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    LINEAR = "linear"  # y = x @ W.T + b, W: [out, in] (torch layout)
    GEMM = "gemm"
    MATMUL = "matmul"
    NORM = "norm"
    SOFTMAX = "softmax"
    CONCAT = "concat"
    SPLIT = "split"
    SLICE = "slice"
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    POOL = "pool"
    GLOBAL_POOL = "global_pool"
    REDUCE = "reduce"
    PAD = "pad"
    RESIZE = "resize"
    GATHER = "gather"
    ATTENTION = "attention"
    EINSUM = "einsum"
    BROADCAST = "broadcast"  # expand / tile
    RECURRENT = "recurrent"  # LSTM / GRU / RNN, ONNX layout 0: [sequence, batch, features]
    OPAQUE = "opaque"


ShapeRule = Callable[[Any, list[tuple[int, ...]]], list[tuple[int, ...]]]


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: OpKind
    infer: ShapeRule | None = None


def _same(node, shapes):
    return [shapes[0]]


def _broadcast(node, shapes):
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0}
        dims.discard(1)
        if len(dims) > 1:
            raise GraphError(f"node '{node.name}' ({node.op}): shapes {shapes} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return [tuple(out)]


def _pool_out(size: int, k: int, s: int, p0: int, p1: int, d: int, ceil: bool) -> int:
    span = size + p0 + p1 - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    # ONNX/torch: with ceil_mode the last window must start inside the (left-padded) input.
    if ceil and (out - 1) * s >= size + p0:
        out -= 1
    return out


def _conv(node, shapes):
    x, w = shapes[0], shapes[1]
    a = node.attrs
    spatial = [
        _pool_out(x[2 + i], w[2 + i], a["strides"][i], a["pads"][i], a["pads"][i + len(w) - 2],
                  a["dilations"][i], False)
        for i in range(len(w) - 2)
    ]
    if x[1] != w[1] * a["group"]:
        raise GraphError(f"node '{node.name}' (conv): input channels {x[1]} != weight {w[1]} x group {a['group']}")
    return [(x[0], w[0], *spatial)]


def _conv_transpose(node, shapes):
    x, w = shapes[0], shapes[1]
    a = node.attrs
    n = len(w) - 2
    spatial = [
        a["strides"][i] * (x[2 + i] - 1) + a["output_padding"][i] + (w[2 + i] - 1) * a["dilations"][i] + 1
        - a["pads"][i] - a["pads"][i + n]
        for i in range(n)
    ]
    return [(x[0], w[1] * a["group"], *spatial)]


def _pool(node, shapes):
    x = shapes[0]
    a = node.attrs
    k = a["kernel_shape"]
    n = len(k)
    dil = a.get("dilations", [1] * n)
    spatial = [
        _pool_out(x[2 + i], k[i], a["strides"][i], a["pads"][i], a["pads"][i + n], dil[i], bool(a["ceil_mode"]))
        for i in range(n)
    ]
    return [(x[0], x[1], *spatial)]


def _global_pool(node, shapes):
    x = shapes[0]
    return [(x[0], x[1], *([1] * (len(x) - 2)))]


def _linear(node, shapes):
    x, w = shapes[0], shapes[1]
    if x[-1] != w[1]:
        raise GraphError(f"node '{node.name}' (linear): input features {x[-1]} != weight columns {w[1]}")
    return [(*x[:-1], w[0])]


def _matmul(node, shapes):
    a, b = shapes
    a1 = a if len(a) > 1 else (1, *a)
    b1 = b if len(b) > 1 else (*b, 1)
    if a1[-1] != b1[-2]:
        raise GraphError(f"node '{node.name}' (matmul): contracted dims {a1[-1]} != {b1[-2]}")
    batch = _broadcast(node, [a1[:-2], b1[:-2]])[0] if (len(a1) > 2 or len(b1) > 2) else ()
    out = (*batch, a1[-2], b1[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return [out]


def _gemm(node, shapes):
    a, b = shapes[0], shapes[1]
    m = a[1] if node.attrs["transA"] else a[0]
    n = b[0] if node.attrs["transB"] else b[1]
    return [(m, n)]


def _concat(node, shapes):
    axis = node.attrs["axis"] % len(shapes[0])
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    for s in shapes:
        if len(s) != len(out) or any(s[i] != out[i] for i in range(len(out)) if i != axis):
            raise GraphError(f"node '{node.name}' (concat): incompatible input shapes {shapes}")
    return [tuple(out)]


def _split(node, shapes):
    x = shapes[0]
    axis = node.attrs["axis"] % len(x)
    sizes = node.attrs["split"]
    if sum(sizes) != x[axis]:
        raise GraphError(f"node '{node.name}' (split): sizes {sizes} do not sum to dim {x[axis]}")
    return [tuple(s if i == axis else d for i, d in enumerate(x)) for s in sizes]


def _slice(node, shapes):
    out = list(shapes[0])
    a = node.attrs
    for start, end, axis, step in zip(a["starts"], a["ends"], a["axes"], a["steps"], strict=True):
        axis %= len(out)
        out[axis] = len(range(*slice(start, end, step).indices(out[axis])))
    return [tuple(out)]


def _reshape(node, shapes):
    target = tuple(node.attrs["shape"])
    if _numel(target) != _numel(shapes[0]):
        raise GraphError(f"node '{node.name}' (reshape): {shapes[0]} has a different size than {target}")
    return [target]


def _flatten(node, shapes):
    x = shapes[0]
    axis = node.attrs["axis"] % (len(x) + 1) if x else 0
    return [(_numel(x[:axis]), _numel(x[axis:]))]


def _transpose(node, shapes):
    return [tuple(shapes[0][p] for p in node.attrs["perm"])]


def _squeeze(node, shapes):
    x = shapes[0]
    axes = {a % len(x) for a in node.attrs["axes"]}
    return [tuple(d for i, d in enumerate(x) if i not in axes)]


def _unsqueeze(node, shapes):
    out = list(shapes[0])
    rank = len(out) + len(node.attrs["axes"])
    for a in sorted(a % rank for a in node.attrs["axes"]):
        out.insert(a, 1)
    return [tuple(out)]


def _reduce(node, shapes):
    x = shapes[0]
    axes = node.attrs.get("axes") or list(range(len(x)))
    axes = {a % len(x) for a in axes}
    if node.attrs.get("keepdims", 1):
        return [tuple(1 if i in axes else d for i, d in enumerate(x))]
    return [tuple(d for i, d in enumerate(x) if i not in axes)]


def _pad(node, shapes):
    x = shapes[0]
    pads = node.attrs["pads"]
    n = len(x)
    return [tuple(d + pads[i] + pads[i + n] for i, d in enumerate(x))]


def _expand(node, shapes):
    return _broadcast(node, [shapes[0], tuple(node.attrs["shape"])])


def _tile(node, shapes):
    return [tuple(d * r for d, r in zip(shapes[0], node.attrs["repeats"], strict=True))]


def _where(node, shapes):
    return _broadcast(node, shapes)


def _gather(node, shapes):
    data, indices = shapes
    axis = node.attrs["axis"] % len(data)
    return [(*data[:axis], *indices, *data[axis + 1:])]


def _attention(node, shapes):
    q, _, v = shapes[:3]
    return [(*q[:-1], v[-1])]


RECURRENT_GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # gate blocks of W's and R's rows, in ONNX's layout


def recurrent_shapes(x: Sequence[int], w: Sequence[int], hidden: int) -> list[tuple[int, ...]]:
    """A recurrent layer's outputs for input x [sequence, batch, features] and W [directions, gates*hidden,
    features]: Y [sequence, directions, batch, hidden], Y_h and (LSTM's) Y_c [directions, batch, hidden]."""
    return [(x[0], w[0], x[1], hidden), (w[0], x[1], hidden), (w[0], x[1], hidden)]


def _recurrent(node, shapes):
    x, w = shapes[0], shapes[1]
    hidden = node.attrs["hidden_size"]
    if len(x) != 3 or len(w) != 3 or w[2] != x[2] or w[1] != RECURRENT_GATES[node.op] * hidden:
        raise GraphError(f"node '{node.name}' ({node.op}): input {x} and W {w} do not fit hidden_size {hidden}")
    rows, state = RECURRENT_GATES[node.op] * hidden, (w[0], x[1], hidden)
    wants = {"R": (w[0], rows, hidden), "B": (w[0], 2 * rows), "initial_h": state, "initial_c": state,
             "P": (w[0], 3 * hidden)}
    names = ("R", "B", "sequence_lens", "initial_h", "initial_c", "P")
    for name, v in zip(names, node.inputs[2:], strict=False):  # by position: optional inputs may be absent (None)
        want = wants.get(name)
        if v is not None and want is not None and tuple(v.shape) != want:
            raise GraphError(f"node '{node.name}' ({node.op}): {name} {list(v.shape)} does not fit hidden_size "
                             f"{hidden} (expected {list(want)})")
    return recurrent_shapes(x, w, hidden)[:len(node.outputs)]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


UNARY_OPS = (
    "identity", "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "reciprocal", "neg", "abs", "erf", "floor",
    "ceil", "sin", "cos", "not", "sign", "round", "hard_sigmoid", "hard_swish", "leaky_relu", "elu", "gelu",
    "silu", "softplus", "mish", "clip", "cast",
)
BINARY_OPS = ("add", "sub", "mul", "div", "pow", "max", "min", "equal", "less", "greater", "and", "or", "mod")

_TABLE: list[OpDef] = [
    *(OpDef(name, OpKind.UNARY, _same) for name in UNARY_OPS),
    *(OpDef(name, OpKind.BINARY, _broadcast) for name in BINARY_OPS),
    OpDef("where", OpKind.WHERE, _where),
    OpDef("conv", OpKind.CONV, _conv),
    OpDef("conv_transpose", OpKind.CONV_TRANSPOSE, _conv_transpose),
    OpDef("linear", OpKind.LINEAR, _linear),
    OpDef("gemm", OpKind.GEMM, _gemm),
    OpDef("matmul", OpKind.MATMUL, _matmul),
    OpDef("batch_norm", OpKind.NORM, _same),
    OpDef("instance_norm", OpKind.NORM, _same),
    OpDef("layer_norm", OpKind.NORM, _same),
    OpDef("softmax", OpKind.SOFTMAX, _same),
    OpDef("log_softmax", OpKind.SOFTMAX, _same),
    OpDef("concat", OpKind.CONCAT, _concat),
    OpDef("split", OpKind.SPLIT, _split),
    OpDef("slice", OpKind.SLICE, _slice),
    OpDef("reshape", OpKind.RESHAPE, _reshape),
    OpDef("flatten", OpKind.RESHAPE, _flatten),
    OpDef("squeeze", OpKind.RESHAPE, _squeeze),
    OpDef("unsqueeze", OpKind.RESHAPE, _unsqueeze),
    OpDef("transpose", OpKind.TRANSPOSE, _transpose),
    OpDef("max_pool", OpKind.POOL, _pool),
    OpDef("avg_pool", OpKind.POOL, _pool),
    OpDef("global_avg_pool", OpKind.GLOBAL_POOL, _global_pool),
    OpDef("global_max_pool", OpKind.GLOBAL_POOL, _global_pool),
    *(OpDef(name, OpKind.REDUCE, _reduce) for name in
      ("reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_l2", "reduce_prod")),
    OpDef("pad", OpKind.PAD, _pad),
    OpDef("resize", OpKind.RESIZE),
    OpDef("gather", OpKind.GATHER, _gather),
    OpDef("attention", OpKind.ATTENTION, _attention),
    OpDef("einsum", OpKind.EINSUM),
    OpDef("expand", OpKind.BROADCAST, _expand),
    OpDef("tile", OpKind.BROADCAST, _tile),
    *(OpDef(name, OpKind.RECURRENT, _recurrent) for name in RECURRENT_GATES),
]

OPS: dict[str, OpDef] = {d.name: d for d in _TABLE}


def op_def(name: str) -> OpDef:
    """The registry entry for a normalized op; "opaque" and unknown names get the OPAQUE kind."""
    return OPS.get(name) or OpDef(name, OpKind.OPAQUE)
