"""Random architectures built directly in the IR, for the property tests (design §5.6).

Blocks: conv/BN/ReLU with plain, depthwise and grouped convs, residual adds, concat branches, channel splits,
channel shuffle, squeeze-excitation, attention over spatial tokens (optionally LayerNorm'd), an op the channel
rules do not know (ONNX `Softsign`, kept opaque), and a flatten → linear or pool → linear head.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from prune_compile.ir import Graph, OpaqueInfo, Provenance, Value
from prune_compile.ir.graph import Node
from prune_compile.ir.ops import op_def

BLOCKS = ("conv", "depthwise", "grouped", "residual", "concat", "split", "shuffle", "se", "attention", "opaque")


class Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.graph = Graph(name="random")
        self.n = 0

    def _name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, shape, scale: float = 0.5, positive: bool = False) -> Value:
        data = self.rng.standard_normal(shape).astype(np.float32) * scale
        if positive:
            data = np.abs(data) + 0.5
        name = self._name("w")
        return Value(name, shape, np.float32, data=data, provenance=Provenance("onnx_initializer", name))

    def op(self, op: str, inputs: list[Value], **attrs) -> Value | list[Value]:
        node = Node(op, self._name(op), inputs, [], attrs)
        shapes = op_def(op).infer(node, [v.shape for v in inputs])
        node.detach()
        outs = [Value(self._name(f"{op}_out"), s, np.float32) for s in shapes]
        self.graph.add_node(op, inputs, outs, attrs, name=self._name(op))
        return outs if len(outs) > 1 else outs[0]

    # -- blocks --------------------------------------------------------------------------------------------
    def conv(self, x: Value, cout: int, k: int = 3, group: int = 1, bn: bool = True, act: bool = True) -> Value:
        cin = x.shape[1]
        w = self.const((cout, cin // group, k, k))
        b = self.const((cout,), 0.1)
        y = self.op("conv", [x, w, b], kernel_shape=[k, k], strides=[1, 1], pads=[k // 2] * 4, dilations=[1, 1],
                    group=group)
        if bn:
            y = self.op("batch_norm", [y, self.const((cout,), 0.2, True), self.const((cout,), 0.1),
                                       self.const((cout,), 0.1), self.const((cout,), 0.2, True)], epsilon=1e-5)
        return self.op("relu", [y]) if act else y

    def block(self, kind: str, x: Value, draw) -> Value:
        c = x.shape[1]
        if kind == "conv":
            return self.conv(x, draw(st.integers(3, 12)))
        if kind == "depthwise":
            return self.conv(x, c * draw(st.sampled_from([1, 2])), group=c)
        if kind == "grouped":
            g = draw(st.sampled_from([d for d in (2, 3, 4) if c % d == 0] or [1]))
            return self.conv(x, g * draw(st.integers(2, 4)), group=g)
        if kind == "residual":
            return self.op("add", [x, self.conv(self.conv(x, draw(st.integers(3, 10))), c, act=False)])
        if kind == "concat":
            return self.op("concat", [self.conv(x, draw(st.integers(2, 6))), self.conv(x, draw(st.integers(2, 6)), 1)],
                           axis=1)
        if kind == "split":
            if c < 4:
                return self.conv(x, 6)
            a = draw(st.integers(1, c - 1))
            left, right = self.op("split", [x], axis=1, split=[a, c - a])
            return self.op("concat", [self.conv(left, draw(st.integers(2, 6))), right], axis=1)
        if kind == "shuffle":
            if c % 2:
                x = self.conv(x, c + 1)
                c += 1
            _, _, h, w = x.shape
            y = self.op("reshape", [x], shape=[1, 2, c // 2, h, w])
            y = self.op("transpose", [y], perm=[0, 2, 1, 3, 4])
            return self.op("reshape", [y], shape=[1, c, h, w])
        if kind == "se":
            s = self.op("global_avg_pool", [x])
            s = self.conv(s, draw(st.integers(2, 4)), k=1, bn=False)
            s = self.op("sigmoid", [self.conv(s, c, k=1, bn=False, act=False)])
            return self.op("mul", [x, s])
        if kind == "attention":
            return self.attention(x, draw)
        if kind == "opaque":
            y = self.conv(x, draw(st.integers(3, 8)))
            out = Value(self._name("softsign_out"), y.shape, np.float32)
            self.graph.add_node("opaque", [y], [out], name=self._name("softsign"), opaque=OpaqueInfo("Softsign"))
            return out
        raise AssertionError(kind)

    def attention(self, x: Value, draw) -> Value:
        _, c, h, w = x.shape
        heads = draw(st.sampled_from([1, 2, 3]))
        d = draw(st.integers(2, 4))
        t = self.op("transpose", [self.op("reshape", [x], shape=[1, c, h * w])], perm=[0, 2, 1])  # [1, N, C]
        if draw(st.booleans()):
            t = self.op("layer_norm", [t, self.const((c,), 0.2, True), self.const((c,), 0.1)], axis=-1, epsilon=1e-5)
        if draw(st.booleans()):  # one fused qkv projection (ViT, Swin)
            qkv = self.op("linear", [t, self.const((3 * heads * d, c)), self.const((3 * heads * d,), 0.1)])
            qkv = self.op("reshape", [qkv], shape=[1, h * w, 3, heads, d])
            qkv = self.op("transpose", [qkv], perm=[2, 0, 3, 1, 4])  # [3, 1, heads, N, d]
            q, k, v = (self.op("squeeze", [p], axes=[0]) for p in self.op("split", [qkv], axis=0, split=[1, 1, 1]))
        else:  # separate projections, v with its own width
            dv = draw(st.integers(2, 4))
            q, k, v = (
                self.op("transpose", [self.op("reshape", [self.op("linear", [t, self.const((heads * e, c))])],
                                              shape=[1, h * w, heads, e])], perm=[0, 2, 1, 3])
                for e in (d, d, dv))
            d = dv
        o = self.op("attention", [q, k, v], scale=None, is_causal=False)  # [1, heads, N, d]
        o = self.op("reshape", [self.op("transpose", [o], perm=[0, 2, 1, 3])], shape=[1, h * w, heads * d])
        o = self.op("linear", [o, self.const((c, heads * d)), self.const((c,), 0.1)])
        o = self.op("add", [t, o])
        return self.op("reshape", [self.op("transpose", [o], perm=[0, 2, 1])], shape=[1, c, h, w])


@st.composite
def architectures(draw) -> Graph:
    b = Builder(draw(st.integers(0, 2**31 - 1)))
    hw = draw(st.sampled_from([3, 4]))
    x = Value("x", (1, draw(st.integers(2, 4)), hw, hw), np.float32)
    b.graph.inputs.append(x)
    y = b.conv(x, draw(st.integers(4, 8)))
    for _ in range(draw(st.integers(1, 5))):
        y = b.block(draw(st.sampled_from(BLOCKS)), y, draw)
    if draw(st.booleans()):
        flat = b.op("flatten", [y], axis=1)
        out = b.op("linear", [flat, b.const((5, flat.shape[1]))])
    else:
        pooled = b.op("flatten", [b.op("global_avg_pool", [y])], axis=1)
        out = b.op("linear", [pooled, b.const((5, pooled.shape[1])), b.const((5,), 0.1)])
    b.graph.outputs.append(out)
    b.graph.verify()
    return b.graph
