"""Channel rules: one place that says, for every normalized op, how the channels of its operands are coupled.

Unit of analysis: a *channel* = one index along one axis of one value (an element of a dim slot). A rule states
  - `couple(a, axis_a, b, axis_b)`: index i of one slot is removed iff index i of the other is (same size);
  - `couple_pairs(...)`: explicit index pairs (concat offsets, flatten strides, head splits, channel shuffle);
  - `role(const, axis, role)`: a parameter slot is a producer (rows), consumer (columns) or passthrough;
  - `freeze(value, axis, reason)`: nothing coupled to this slot may be removed (fail closed, with the reason);
  - `mixing(value, axis, reason)`: removal is allowed but changes statistics (LayerNorm over the axis): the group
    is marked inexact.
An op without a rule freezes every slot it touches. Rules never guess.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..ir.graph import Node, Value
from ..ir.ops import RECURRENT_GATES
from ..ir.reshape_runs import reshape_runs

PRODUCER, CONSUMER, PASSTHROUGH = "producer", "consumer", "passthrough"
RESHAPE_FREEZE = "reshape splits or merges this axis with the one that carries the channels"


class RuleSink(Protocol):
    """What a rule talks to; implemented by the dependency pass."""

    prefer_outer: bool  # attention="heads": a split block carries its outer axis (heads) before the largest

    def couple(self, a: Value, axis_a: int, b: Value, axis_b: int) -> None:
        ...

    def couple_pairs(self, a: Value, axis_a: int, ia: np.ndarray, b: Value, axis_b: int,
                     ib: np.ndarray) -> None:
        ...

    def role(self, const: Value, axis: int, role: str) -> None:
        ...

    def freeze(self, v: Value, axis: int, reason: str) -> None:
        ...

    def mixing(self, v: Value, axis: int, reason: str) -> None:
        ...

    def carrier(self, node: Node, block: int, candidates: list[tuple[Value, int]]) -> int:
        """Which of `candidates` (best first) carries the channels of a reshape block; see `reshape_couple`."""
        return 0

    def contract(self, node: Node, operands: list[tuple[Value, int]]) -> None:
        """`node` sums over these (coupled) slots, multiplying them first when there are several; see
        `passes.silencing`."""


Rule = Callable[[RuleSink, Node], None]
RULES: dict[str, Rule] = {}


def rule(*ops: str):
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def freeze_all(sink: RuleSink, node: Node, reason: str) -> None:
    for v in [*node.inputs, *node.outputs]:
        if v is not None:
            for axis in range(len(v.shape)):
                sink.freeze(v, axis, reason)


def apply_rule(sink: RuleSink, node: Node) -> None:
    fn = RULES.get(node.op)
    if node.opaque is not None or fn is None:
        what = node.opaque.op_type if node.opaque is not None else node.op
        why = node.opaque.why if node.opaque is not None else ""
        freeze_all(sink, node, f"node '{node.name}': " + (why or f"op '{what}' has no channel rule"))
        return
    fn(sink, node)


def _identity(sink: RuleSink, a: Value, b: Value) -> None:
    for axis in range(len(a.shape)):
        sink.couple(a, axis, b, axis)


def _broadcast_couple(sink: RuleSink, inputs: list[Value], out: Value) -> None:
    """Align axes from the right; an input axis of the output's size is coupled, a size-1 broadcast axis is not."""
    rank = len(out.shape)
    for v in inputs:
        offset = rank - len(v.shape)
        for axis, size in enumerate(v.shape):
            if size == out.shape[axis + offset]:
                sink.couple(v, axis, out, axis + offset)
                if v.is_constant:
                    sink.role(v, axis, PASSTHROUGH)


# -- elementwise ------------------------------------------------------------------------------------------------
@rule("identity", "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "reciprocal", "neg", "abs", "erf", "floor",
      "ceil", "sin", "cos", "not", "sign", "round", "hard_sigmoid", "hard_swish", "leaky_relu", "elu", "gelu",
      "silu", "softplus", "mish", "clip", "cast")
def _unary(sink: RuleSink, node: Node) -> None:
    _identity(sink, node.inputs[0], node.outputs[0])


@rule("add", "sub", "mul", "div", "pow", "max", "min", "equal", "less", "greater", "and", "or", "mod", "where")
def _binary(sink: RuleSink, node: Node) -> None:
    _broadcast_couple(sink, [v for v in node.inputs if v is not None], node.outputs[0])
    if node.op == "add" and len(node.inputs) == 2:
        _separate_bias(sink, *node.inputs, node.outputs[0])


def _separate_bias(sink: RuleSink, a: Value, b: Value, y: Value) -> None:
    """A constant added straight to a weight layer's output is that layer's bias, written separately (MatMul + Add
    from exporters that keep [in, out] weights, e.g. Paddle's): a producer, removed and zeroed with its rows."""
    bias, x = (a, b) if a.is_constant else (b, a)
    layer = x.producer
    if not bias.is_constant or x.is_constant or layer is None:
        return
    if layer.op in ("matmul", "linear") and layer.inputs[1].is_constant:
        channel_axis = len(y.shape) - 1
    elif layer.op in ("conv", "conv_transpose") or (layer.op == "gemm" and layer.inputs[1].is_constant):
        channel_axis = 1
    else:
        return
    axis = channel_axis - (len(y.shape) - len(bias.shape))
    if axis >= 0 and bias.shape[axis] == y.shape[channel_axis] > 1:
        sink.role(bias, axis, PRODUCER)


# -- producers and consumers -----------------------------------------------------------------------------------
def _weight_roles(sink: RuleSink, w: Value, b: Value | None, out_axis: int, in_axis: int | None) -> None:
    """Weight rows along `out_axis` (and the bias) produce channels; columns along `in_axis` consume them."""
    sink.role(w, out_axis, PRODUCER)
    if in_axis is not None:
        sink.role(w, in_axis, CONSUMER)
    if b is not None:
        sink.role(b, 0, PRODUCER)


def _freeze_kernel(sink: RuleSink, node: Node, w: Value) -> None:
    for axis in range(2, len(w.shape)):
        sink.freeze(w, axis, f"node '{node.name}': kernel axis")


@rule("conv")
def _conv(sink: RuleSink, node: Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    group = node.attrs["group"]
    cin, cout = x.shape[1], w.shape[0]
    sink.couple(x, 0, y, 0)
    sink.couple(w, 0, y, 1)
    if b is not None:
        sink.couple(b, 0, y, 1)
    if group == 1:
        sink.couple(x, 1, w, 1)
        _weight_roles(sink, w, b, 0, 1)
    elif group == cin and cout % cin == 0:
        # Depthwise (with multiplier m): output channel c*m + j reads input channel c only.
        m = cout // cin
        out_idx = np.arange(cout)
        sink.couple_pairs(x, 1, out_idx // m, y, 1, out_idx)
        _weight_roles(sink, w, b, 0, None)
    else:
        # Grouped conv: a dense grouped weight needs the same channel count in every group, so local index j
        # is removed from every group at once (ResNeXt, RegNet): input channel i ≡ weight column i mod (cin/g),
        # output channel o ≡ output channel o mod (cout/g). The group count stays.
        per_in, per_out = cin // group, cout // group
        in_idx, out_idx = np.arange(cin), np.arange(cout)
        sink.couple_pairs(x, 1, in_idx, w, 1, in_idx % per_in)
        sink.couple_pairs(y, 1, out_idx, y, 1, out_idx % per_out)
        _weight_roles(sink, w, b, 0, 1)
    _freeze_kernel(sink, node, w)


@rule("conv_transpose")
def _conv_transpose(sink: RuleSink, node: Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    group = node.attrs["group"]
    sink.couple(x, 0, y, 0)
    if b is not None:
        sink.couple(b, 0, y, 1)
    if group == 1:
        sink.couple(x, 1, w, 0)
        sink.couple(w, 1, y, 1)
        _weight_roles(sink, w, b, 1, 0)
    else:
        reason = f"node '{node.name}': grouped conv_transpose (groups={group})"
        for v, axis in ((x, 1), (y, 1), (w, 0), (w, 1)):
            sink.freeze(v, axis, reason)
        if b is not None:
            sink.freeze(b, 0, reason)
    _freeze_kernel(sink, node, w)


@rule("lstm", "gru", "rnn")
def _recurrent(sink: RuleSink, node: Node) -> None:
    """A recurrent layer reads its input features through W's columns ([directions, gates*hidden, features]): an
    input channel removed is a column removed, exactly.

    Hidden unit j is row g*hidden + j of each gate block g of W and R (and of B's 2*gates blocks, P's three
    peepholes), index j of the states' last axis (Y, Y_h, Y_c, initial_h, initial_c), and column j of R, through
    which h feeds back. The gates are elementwise per unit, so unit j reaches the other units only through R's
    column j, a consumer like any weight's column: removing the unit is exact. Weights computed at run time
    freeze the units, saying so. The directions of a bidirectional layer share the units (both go together)."""
    x, w, r = node.inputs[:3]
    operands = [*node.inputs[3:], *[None] * 5][:5]
    b, states, p = operands[0], [v for v in operands[2:4] if v is not None], operands[4]
    y = node.outputs
    sink.couple(x, 2, w, 2)
    sink.role(w, 2, CONSUMER)
    if y:
        sink.couple(x, 0, y[0], 0)
        sink.couple(x, 1, y[0], 2)
    for v in [*y[1:], *states]:
        sink.couple(x, 1, v, 1)
    if operands[1] is not None:
        sink.couple(x, 1, operands[1], 0)  # sequence_lens [batch]
    weights = [v for v in (w, r, b, p) if v is not None]
    for v in weights[1:]:
        sink.couple(w, 0, v, 0)
    for v in [*y[1:], *states]:
        sink.couple(w, 0, v, 0)
    if y:
        sink.couple(w, 0, y[0], 1)
    if w.shape[0] > 1:
        sink.freeze(w, 0, f"node '{node.name}': the directions of a bidirectional {node.op.upper()}")
    state_slots = [(y[0], 3)] if y else []
    state_slots += [(v, 2) for v in [*y[1:], *states]]
    hidden = node.attrs["hidden_size"]
    units, gates = np.arange(hidden), RECURRENT_GATES[node.op]
    for v, blocks in ((w, gates), (r, gates), (b, 2 * gates), (p, 3)):
        if v is None:
            continue
        for k in range(blocks):
            sink.couple_pairs(r, 2, units, v, 1, k * hidden + units)
        sink.role(v, 1, PRODUCER)
    sink.role(r, 2, CONSUMER)
    for v, axis in state_slots:
        sink.couple(r, 2, v, axis)
    computed = next((v for v in weights if not v.is_constant), None)
    if computed is not None:
        sink.freeze(r, 2, f"node '{node.name}': {node.op.upper()} weight '{computed.name}' is computed at run time")


@rule("linear")
def _linear(sink: RuleSink, node: Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    last = len(x.shape) - 1
    for axis in range(last):
        sink.couple(x, axis, y, axis)
    sink.couple(x, last, w, 1)
    sink.couple(w, 0, y, last)
    if b is not None:
        sink.couple(b, 0, y, last)
    _weight_roles(sink, w, b, 0, 1)


@rule("gemm")
def _gemm(sink: RuleSink, node: Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    ta, tb = node.attrs["transA"], node.attrs["transB"]
    m_axis, k_axis_a = (1, 0) if ta else (0, 1)
    k_axis_b, n_axis = (1, 0) if tb else (0, 1)
    sink.couple(a, m_axis, y, 0)
    sink.couple(a, k_axis_a, b, k_axis_b)
    sink.contract(node, [(a, k_axis_a), (b, k_axis_b)])
    sink.couple(b, n_axis, y, 1)
    if b.is_constant:
        sink.role(b, k_axis_b, CONSUMER)
        sink.role(b, n_axis, PRODUCER)
    if c is not None:
        _broadcast_couple(sink, [c], y)
        if c.is_constant and len(c.shape) >= 1 and c.shape[-1] == y.shape[1]:
            sink.role(c, len(c.shape) - 1, PRODUCER)


@rule("matmul")
def _matmul(sink: RuleSink, node: Node) -> None:
    a, b = node.inputs
    y = node.outputs[0]
    if len(a.shape) < 2 or len(b.shape) < 2:
        freeze_all(sink, node, f"node '{node.name}': matmul with a vector operand")
        return
    ra, rb, ry = len(a.shape), len(b.shape), len(y.shape)
    sink.couple(a, ra - 2, y, ry - 2)
    sink.couple(a, ra - 1, b, rb - 2)
    sink.contract(node, [(a, ra - 1), (b, rb - 2)])
    sink.couple(b, rb - 1, y, ry - 1)
    for v, r in ((a, ra), (b, rb)):
        for axis in range(r - 2):
            out_axis = axis + (ry - r)
            if v.shape[axis] == y.shape[out_axis]:
                sink.couple(v, axis, y, out_axis)
    if b.is_constant:
        sink.role(b, rb - 2, CONSUMER)
        sink.role(b, rb - 1, PRODUCER)
    if a.is_constant:
        sink.role(a, ra - 1, CONSUMER)
        sink.role(a, ra - 2, PRODUCER)


@rule("gather")
def _gather(sink: RuleSink, node: Node) -> None:
    data, indices = node.inputs
    y = node.outputs[0]
    axis = node.attrs["axis"] % len(data.shape)
    r_idx = len(indices.shape)
    for a in range(len(data.shape)):
        if a < axis:
            sink.couple(data, a, y, a)
        elif a > axis:
            sink.couple(data, a, y, a + r_idx - 1)
            if data.is_constant:
                sink.role(data, a, PRODUCER)  # embedding table columns
    for a in range(r_idx):
        sink.couple(indices, a, y, axis + a)
    idx = indices.data if indices.is_constant else None
    if idx is not None and r_idx == 1 and len(np.unique(idx)) == len(idx):
        positions = np.arange(len(idx))
        sink.couple_pairs(data, axis, np.asarray(idx, dtype=np.int64) % data.shape[axis], y, axis, positions)
    else:
        sink.freeze(data, axis, f"node '{node.name}': gather along this axis")
        for a in range(r_idx):
            sink.freeze(y, axis + a, f"node '{node.name}': gather along this axis")


# -- normalization --------------------------------------------------------------------------------------------
@rule("batch_norm", "instance_norm")
def _batch_norm(sink: RuleSink, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    _identity(sink, x, y)
    if node.op == "instance_norm":
        # Statistics over every axis after the channels: exporters write GroupNorm(1, C) as a reshape to
        # [N, 1, C*H*W] and an instance_norm, so channels can sit there (like layer_norm's).
        for axis in range(2, len(x.shape)):
            sink.mixing(x, axis, f"node '{node.name}': instance_norm statistics over this axis")
    for p in node.inputs[1:]:
        if p is not None:
            sink.couple(p, 0, y, 1)
            if p.is_constant:
                sink.role(p, 0, PASSTHROUGH)


@rule("layer_norm")
def _layer_norm(sink: RuleSink, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = len(x.shape)
    first = node.attrs["axis"] % rank
    _identity(sink, x, y)
    for axis in range(first, rank):
        sink.mixing(x, axis, f"node '{node.name}': layer_norm statistics over this axis")
    for p in node.inputs[1:]:
        if p is not None:
            offset = rank - len(p.shape)
            for axis in range(len(p.shape)):
                sink.couple(p, axis, y, axis + offset)
                if p.is_constant:
                    sink.role(p, axis, PASSTHROUGH)


@rule("softmax", "log_softmax")
def _softmax(sink: RuleSink, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    _identity(sink, x, y)
    axis = node.attrs["axis"] % len(x.shape)
    sink.freeze(x, axis, f"node '{node.name}': {node.op} over this axis")


# -- data movement --------------------------------------------------------------------------------------------
@rule("concat")
def _concat(sink: RuleSink, node: Node) -> None:
    y = node.outputs[0]
    axis = node.attrs["axis"] % len(y.shape)
    offset = 0
    for v in node.inputs:
        for a in range(len(y.shape)):
            if a != axis:
                sink.couple(v, a, y, a)
        n = v.shape[axis]
        sink.couple_pairs(v, axis, np.arange(n), y, axis, np.arange(offset, offset + n))
        offset += n


@rule("split")
def _split(sink: RuleSink, node: Node) -> None:
    x = node.inputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    offset = 0
    for v in node.outputs:
        for a in range(len(x.shape)):
            if a != axis:
                sink.couple(x, a, v, a)
        n = v.shape[axis]
        sink.couple_pairs(x, axis, np.arange(offset, offset + n), v, axis, np.arange(n))
        offset += n


@rule("slice")
def _slice(sink: RuleSink, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    a = node.attrs
    sliced = {}
    for start, axis, step in zip(a["starts"], a["axes"], a["steps"], strict=True):
        sliced[axis % len(x.shape)] = (start, step)
    for axis in range(len(x.shape)):
        if axis not in sliced:
            sink.couple(x, axis, y, axis)
            continue
        start, step = sliced[axis]
        if step != 1:
            reason = f"node '{node.name}': strided slice (step {step})"
            sink.freeze(x, axis, reason)
            sink.freeze(y, axis, reason)
            continue
        n = y.shape[axis]
        sink.couple_pairs(x, axis, np.arange(start, start + n), y, axis, np.arange(n))


@rule("transpose")
def _transpose(sink: RuleSink, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    for out_axis, in_axis in enumerate(node.attrs["perm"]):
        sink.couple(x, in_axis, y, out_axis)


@rule("squeeze", "unsqueeze", "flatten", "reshape")
def _reshape(sink: RuleSink, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    reshape_couple(sink, node, x, y)


def reshape_couple(sink: RuleSink, node: Node, x: Value, y: Value) -> None:
    """Couple the axes of a reshape block by block (blocks = runs of axes with equal products).

    A block of one axis on each side is an identity. A block that merges or splits axes carries channels on one
    axis of the split side: e.g. flatten [C,H,W]→[C·H·W] maps channel c to the H·W output indices whose C-digit is
    c; qkv [3C]→[3,C] maps output c to input {k·C + c}; a head split [C]→[h,d] maps d-index j to {k·d + j} when
    head_dim carries, or head i to [i·d, (i+1)·d) when heads carry. Every other axis of the block is frozen (its
    removals are not expressible). Candidates are tried largest first; the analysis moves a block to the next
    candidate when the carried channels end up frozen (swin_v2 normalizes q and k over head_dim: heads carry).
    """
    runs, rest_x, rest_y = reshape_runs(x.shape, y.shape)
    for block, (bx, by) in enumerate(runs):
        _couple_block(sink, node, x, bx, y, by, block)
    if rest_x or rest_y:
        _freeze_rest(sink, node, x, rest_x, y, rest_y)


def _couple_block(sink: RuleSink, node: Node, x: Value, bx: list[int], y: Value, by: list[int],
                  block: int) -> None:
    if len(bx) == 1 and len(by) == 1:
        sink.couple(x, bx[0], y, by[0])
        return
    if len(bx) > 1 and len(by) > 1:
        _couple_nested_pair(sink, node, x, bx, y, by, block)
        return
    # One side is a single axis (the merged one); the other side has several (the split ones).
    single, single_axis, multi, multi_axes = (x, bx[0], y, by) if len(bx) == 1 else (y, by[0], x, bx)
    sizes = [multi.shape[a] for a in multi_axes]
    ranked = sorted(range(len(sizes)), key=lambda k: (-sizes[k], k))
    if sink.prefer_outer:
        ranked = list(range(len(sizes)))
    carrier = ranked[sink.carrier(node, block, [(multi, multi_axes[k]) for k in ranked])]
    inner = int(np.prod(sizes[carrier + 1:], dtype=np.int64))
    flat = np.arange(single.shape[single_axis])
    digit = (flat // inner) % sizes[carrier]
    sink.couple_pairs(multi, multi_axes[carrier], digit, single, single_axis, flat)
    for k, a in enumerate(multi_axes):
        if k != carrier:
            sink.freeze(multi, a, f"node '{node.name}': {RESHAPE_FREEZE}")


def _digit_spans(xsizes: list[int], ysizes: list[int]) -> tuple[list[int], list[tuple[int, int]],
                                                                 list[tuple[int, int]]] | None:
    """The common mixed-radix digits of a block's two factorizations, as strides (stride[k] = product of digits k
    and after), and each axis of either side as its span [first, end) of digits, outermost first. None when
    there is no common refinement (e.g. [6, 4] -> [4, 6])."""
    def strides(sizes: list[int]) -> list[int]:
        return [int(np.prod(sizes[k:], dtype=np.int64)) for k in range(len(sizes) + 1)]

    sx, sy = strides(xsizes), strides(ysizes)
    bounds = sorted(set(sx) | set(sy), reverse=True)
    if any(hi % lo for hi, lo in zip(bounds[:-1], bounds[1:], strict=True)):
        return None
    pos = {b: k for k, b in enumerate(bounds)}
    return (bounds, [(pos[sx[k]], pos[sx[k + 1]]) for k in range(len(xsizes))],
            [(pos[sy[k]], pos[sy[k + 1]]) for k in range(len(ysizes))])


def _couple_nested_pair(sink: RuleSink, node: Node, x: Value, bx: list[int], y: Value, by: list[int],
                        block: int) -> None:
    """A block that splits and merges at once: GroupNorm as exporters write it, [C, H, W] -> [G, C/G*H*W],
    MobileViT's patch unfolding, or attention heads folded into the batch, [B, h*d] -> [B*h, d]. Channels ride on
    one pair of axes that share digits of the block's common mixed radix: one axis nests in the other (G's digits
    are C's outer ones: channel c <-> group c // (C/G), so whole groups go), or the two overlap (h is C's outer
    digit and B*h's inner one: a head goes with its d channels and its B batch rows). Every other axis of the
    block is frozen. Pairs are tried outermost first, where NCHW layouts keep their channels; where two axes
    overlap, most units first (ties outermost), as a split [h*d] -> [h, d] ranks them, so that with the batch
    folded in, the choice is the one made at batch 1, where the batch digit is absent (and can never carry).
    attention="heads" takes them outermost first either way (heads before head_dim)."""
    refined = _digit_spans([x.shape[a] for a in bx], [y.shape[a] for a in by])
    pairs = []  # (x position, y position, shared digits [d0, d1))
    bounds, xspans, yspans = refined or ([], [], [])
    for i, (x0, x1) in enumerate(xspans):
        for j, (y0, y1) in enumerate(yspans):
            d0, d1 = max(x0, y0), min(x1, y1)
            if d0 < d1:
                pairs.append((i, j, d0, d1))
    if not pairs:
        _freeze_rest(sink, node, x, bx, y, by)
        return
    overlapping = any(p[2:] not in (xspans[p[0]], yspans[p[1]]) for p in pairs)
    if sink.prefer_outer:
        pairs.sort(key=lambda p: p[2])
    elif overlapping:  # as a split [h*d] -> [h, d] ranks its axes: most units first, then outermost
        pairs.sort(key=lambda p: (-(bounds[p[2]] // bounds[p[3]]), p[2]))
    # A pair's candidate slot is the axis with fewer indices per unit of channels (the nested one).
    i, j, d0, d1 = pairs[sink.carrier(node, block, [(y, by[j]) if yspans[j] == (d0, d1) or xspans[i] != (d0, d1)
                                                    else (x, bx[i]) for i, j, d0, d1 in pairs])]
    # An axis's index holds the shared digits at (index // digits below them) mod their count.
    units = bounds[d0] // bounds[d1]
    xi, yi = np.arange(x.shape[bx[i]]), np.arange(y.shape[by[j]])
    x_below, y_below = bounds[d1] // bounds[xspans[i][1]], bounds[d1] // bounds[yspans[j][1]]
    x_unit, y_unit = (xi // x_below) % units, (yi // y_below) % units
    # Each index joins the first index of the other axis with its digits (an axis whose index is the digits
    # themselves needs only the other axis's links).
    if len(yi) == units:
        sink.couple_pairs(y, by[j], x_unit, x, bx[i], xi)
    elif len(xi) == units:
        sink.couple_pairs(x, bx[i], y_unit, y, by[j], yi)
    else:
        sink.couple_pairs(x, bx[i], xi, y, by[j], x_unit * y_below)
        sink.couple_pairs(y, by[j], yi, x, bx[i], y_unit * x_below)
    for k, a in enumerate(bx):
        if k != i:
            sink.freeze(x, a, f"node '{node.name}': {RESHAPE_FREEZE}")
    for k, a in enumerate(by):
        if k != j:
            sink.freeze(y, a, f"node '{node.name}': {RESHAPE_FREEZE}")


def _freeze_rest(sink: RuleSink, node: Node, x: Value, xa: list[int], y: Value, ya: list[int]) -> None:
    reason = f"node '{node.name}': reshape mixes these axes ({list(x.shape)} → {list(y.shape)})"
    for a in xa:
        sink.freeze(x, a, reason)
    for a in ya:
        sink.freeze(y, a, reason)


@rule("expand", "tile")
def _broadcast(sink: RuleSink, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    offset = len(y.shape) - len(x.shape)
    for axis, size in enumerate(x.shape):
        if size == y.shape[axis + offset]:
            sink.couple(x, axis, y, axis + offset)
        else:
            sink.freeze(y, axis + offset, f"node '{node.name}': {node.op} along this axis")


@rule("pad")
def _pad(sink: RuleSink, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    pads = node.attrs["pads"]
    rank = len(x.shape)
    for axis in range(rank):
        if pads[axis] == 0 and pads[axis + rank] == 0:
            sink.couple(x, axis, y, axis)
        else:
            sink.freeze(x, axis, f"node '{node.name}': padded axis")
            sink.freeze(y, axis, f"node '{node.name}': padded axis")


@rule("resize")
def _resize(sink: RuleSink, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    for axis in range(len(x.shape)):
        if x.shape[axis] == y.shape[axis]:
            sink.couple(x, axis, y, axis)
        else:
            sink.freeze(x, axis, f"node '{node.name}': resized axis")
            sink.freeze(y, axis, f"node '{node.name}': resized axis")


@rule("max_pool", "avg_pool", "global_avg_pool", "global_max_pool")
def _pool(sink: RuleSink, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    sink.couple(x, 0, y, 0)
    sink.couple(x, 1, y, 1)


@rule("reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_l2", "reduce_prod")
def _reduce(sink: RuleSink, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = len(x.shape)
    axes = {a % rank for a in node.attrs["axes"]}
    keep = node.attrs.get("keepdims", 1)
    out_axis = 0
    for axis in range(rank):
        if axis in axes:
            if x.shape[axis] > 1 and node.op in ("reduce_sum", "reduce_l2"):
                sink.contract(node, [(x, axis)])  # a zero channel adds nothing: exact where the channels are zero
            elif x.shape[axis] > 1:
                # A mean, max or product over the channels (RMSNorm, a global response norm, CBAM's channel
                # pooling) reads fewer of them after pruning, like layer_norm's statistics: allowed, inexact.
                sink.mixing(x, axis, f"node '{node.name}': {node.op} over this axis")
            out_axis += 1 if keep else 0
            continue
        sink.couple(x, axis, y, out_axis)
        out_axis += 1


# -- attention --------------------------------------------------------------------------------------------------
@rule("attention")
def _attention(sink: RuleSink, node: Node) -> None:
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    y = node.outputs[0]
    r = len(y.shape)
    for t in (q, k, v):
        for axis in range(len(t.shape) - 2):
            out_axis = axis + r - len(t.shape)
            if t.shape[axis] == y.shape[out_axis]:
                sink.couple(t, axis, y, out_axis)
    sink.couple(q, len(q.shape) - 2, y, r - 2)
    sink.couple(q, len(q.shape) - 1, k, len(k.shape) - 1)  # contracted head_dim
    sink.contract(node, [(q, len(q.shape) - 1), (k, len(k.shape) - 1)])
    sink.couple(v, len(v.shape) - 1, y, r - 1)
    sink.couple(k, len(k.shape) - 2, v, len(v.shape) - 2)
    sink.freeze(k, len(k.shape) - 2, f"node '{node.name}': softmax over the key axis")
    if mask is not None:
        for axis in range(len(mask.shape)):
            sink.freeze(mask, axis, f"node '{node.name}': attention mask")


@rule("einsum")
def _einsum(sink: RuleSink, node: Node) -> None:
    eq = node.attrs["equation"].replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if "." in eq or len(terms) != len(node.inputs) or not rhs:
        freeze_all(sink, node, f"node '{node.name}': einsum '{eq}' with ellipsis or implicit output")
        return
    slots: dict[str, list[tuple[Value, int]]] = {}
    for v, term in zip(node.inputs, terms, strict=True):
        for axis, letter in enumerate(term):
            slots.setdefault(letter, []).append((v, axis))
    for axis, letter in enumerate(rhs):
        slots.setdefault(letter, []).append((node.outputs[0], axis))
    for letter, members in slots.items():
        if letter not in string.ascii_letters:
            continue
        first_v, first_a = members[0]
        if letter not in rhs and len(members) == 1:
            sink.freeze(first_v, first_a, f"node '{node.name}': einsum sums over '{letter}'")
            continue
        for v, a in members[1:]:
            if v.shape[a] == first_v.shape[first_a]:
                sink.couple(first_v, first_a, v, a)
            else:
                sink.freeze(v, a, f"node '{node.name}': einsum broadcasts '{letter}'")
        if letter not in rhs:
            sink.contract(node, members)
