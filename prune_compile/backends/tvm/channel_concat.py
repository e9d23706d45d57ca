"""Channel concats and splits made safe for blocked layouts before Relax's ConvertLayout (`--conv-layout NCHWc`).

Why: TVM 0.27's layout inference gets both wrong once a blocked layout (NCHW16c) reaches them:
- `split` along the channels keeps the blocked layout whenever every part is a whole number of blocks, but also
  keeps the split points in channels while the axis now counts blocks: a 32-channel tensor (2 blocks) split at 16
  became parts of 2 and 0 blocks (`relax.op.tensor.manipulate.cc`, InferLayoutSplit).
- `concat` converts every input to the first blocked input's layout, also when another input cannot take it: an
  Inception block with 16, 24 and 8 output channels (blocks 16, 8, 8 on AVX-512) failed with "Invalid layout axis
  16b" (InferLayoutConcat).
Folding BatchNorm into the convs exposed both: unfolded, each BN ran in NCHW and the blocked layout never reached
the concat. The default model's tuned cpu build failed (exit code 4).

What: `guard_channel_concat_split(mod, block_of)`, before ConvertLayout:
- a split along the channels of a 4-d tensor becomes one `strided_slice` per part; ConvertLayout runs a slice of a
  blocked tensor in NCHW (one layout transform in front), which is right for any split point;
- each input of a channel concat passes through a full-range `strided_slice` (NCHW, as above), unless every input
  is predicted to arrive in the same layout: `block_of(conv call)` is the output channel block ConvertLayout will
  give a conv (0: NCHW), followed through elementwise ops and pooling. Concats of equal blocks (DenseNet) stay
  blocked, which TVM does right.
"""

from __future__ import annotations

from collections.abc import Callable

# ops whose output takes the layout of their tensor inputs (elementwise and pooling)
POOLS = frozenset({"relax.nn.max_pool2d", "relax.nn.avg_pool2d"})
FOLLOWERS = POOLS | {
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
    "relax.nn.relu", "relax.sigmoid", "relax.tanh", "relax.nn.silu", "relax.nn.gelu", "relax.exp", "relax.negative"}
UNKNOWN = -1


def guard_channel_concat_split(mod, block_of: Callable[[object], int]):
    """A copy of `mod` whose channel splits are slices and whose mixed-layout channel concats take NCHW inputs."""
    from tvm import relax

    rewriter = _make_rewriter(block_of)
    out = mod.clone()
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gvar] = rewriter.visit_expr(func)
    return relax.transform.DeadCodeElimination()(out)


def _channel_axis(axis, ty) -> bool:
    """Whether `axis` is the channel axis of a 4-d (NCHW) tensor of type `ty`."""
    from tvm import relax

    if not isinstance(ty, relax.TensorType) or ty.ndim != 4 or axis is None:
        return False
    return int(axis) % 4 == 1


def _shape(expr) -> tuple | None:
    from tvm import relax

    ty = expr.ty
    return None if not isinstance(ty, relax.TensorType) or ty.shape is None else tuple(str(d) for d in ty.shape.values)


def _channels(expr) -> int | None:
    from tvm import relax, tirx

    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape.values[1], tirx.IntImm):
        return None
    return int(ty.shape.values[1])


def _make_rewriter(block_of: Callable[[object], int]):
    import tvm
    from tvm import relax

    concat, split = tvm.ir.Op.get("relax.concat"), tvm.ir.Op.get("relax.split")

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def block(self, expr, depth: int = 0) -> int:
            """The channel block `expr` will have after ConvertLayout (0: NCHW), or UNKNOWN."""
            if depth > 64:
                return UNKNOWN
            bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
            if not isinstance(bound, relax.Call) or not isinstance(bound.op, tvm.ir.Op):
                return UNKNOWN
            if bound.op.name == "relax.nn.conv2d":
                return block_of(bound)
            if bound.op.name not in FOLLOWERS:
                return UNKNOWN
            # a pool's output has its input's layout; an elementwise op's, that of its operands of the output's full
            # shape (broadcast ones, a bias, are transformed to it)
            full = bound.args[:1] if bound.op.name in POOLS else [
                a for a in bound.args if isinstance(a.ty, relax.TensorType) and a.ty.ndim == 4
                and _shape(a) == _shape(bound)]
            blocks = {self.block(a, depth + 1) for a in full}
            return blocks.pop() if len(blocks) == 1 else UNKNOWN

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op == split and _channel_axis(call.attrs.axis, call.args[0].ty):
                return self._slices(call)
            if call.op == concat and isinstance(call.args[0], relax.Tuple) and call.args[0].fields and \
                    _channel_axis(call.attrs.axis, call.args[0].fields[0].ty):
                return self._guarded_concat(call)
            return call

        def _slices(self, call):
            x = call.args[0]
            channels = _channels(x)
            sections = call.attrs.indices_or_sections
            if channels is None:
                return call
            if isinstance(sections, tvm.tirx.IntImm | int):
                count = int(sections)
                if count <= 0 or channels % count:
                    return call
                points = [channels // count * i for i in range(1, count)]
            else:
                points = [int(p) for p in sections]
            bounds = list(zip([0, *points], [*points, channels], strict=True))
            parts = [self.builder_.emit(relax.op.strided_slice(x, axes=[1], begin=[lo], end=[hi]))
                     for lo, hi in bounds]
            return relax.Tuple(parts)

        def _guarded_concat(self, call):
            fields = list(call.args[0].fields)
            blocks = {self.block(f) for f in fields}
            if len(blocks) == 1 and UNKNOWN not in blocks:
                return call  # every input arrives in the same layout: TVM concatenates blocks right
            guarded = []
            for f in fields:
                channels = _channels(f)
                if channels is None:
                    return call
                guarded.append(self.builder_.emit(relax.op.strided_slice(f, axes=[1], begin=[0], end=[channels])))
            return relax.op.concat(guarded, axis=call.attrs.axis)

    return Rewriter()
