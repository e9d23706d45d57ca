"""Keeps blocked layouts (NCHW16c) away from the ops TVM's layout conversion gets wrong (`--conv-layout NCHWc`).

Why: Relax's ConvertLayout moves a blocked conv output into every consumer with a layout-inference rule, and in
TVM 0.27 many of those rules assume the plain 4-d layout. Found on real models (tuned cpu builds failed, exit 4):
- conv2d_transpose takes its input's layout and fails on a blocked one ("Layouts must have the same size":
  PP-OCRv4/v5 det, whose FPN ends in two ConvTransposes);
- a tensor arriving in one block (NCHW8c: a concat of two 24-channel halves on AVX-512) where a conv or an
  elementwise op wants another (NCHW16c for 48 channels) is not converted ("Invalid layout axis 16b": ddddocr's
  detector, YOLOX CSP blocks);
- `split` along the channels keeps the split points in channels while the axis now counts blocks, and `concat`
  converts every input to the first blocked input's layout, also when another cannot take it;
- group_norm, a mean over the channels, a comparison feeding `where` (a bool layout transform), and a product
  whose other operand was reduced over the channels (CBAM-style attention) fail in conversion or legalization.
TVM runs an op without a layout rule in NCHW, and `strided_slice` always (its rule gives up on a blocked input), so
one full-range slice in front of an input is a layout barrier.

What: `guarded_for_blocked_layouts(mod, output_block, input_block)` rewrites `mod` before ConvertLayout. Which block
each tensor will have is followed from the convs (`output_block(conv call)`; 0: NCHW) through the ops that are known
to carry a blocked layout correctly (elementwise ops whose operands are the output's shape, per channel or one
element; pools; reductions over rows and columns keeping dims; channel concats of one block). Every other op, and a
conv whose input arrives in another block than `input_block(conv call)` expects, gets its blocked inputs through a
barrier: it fails closed into NCHW, at the cost of one layout transform, instead of into a compiler error or a wrong
result. `tests/test_tvm_layout_guard.py` checks 58 kinds of consumer against ONNX Runtime.
- a split along the channels of a 4-d tensor becomes one `strided_slice` per part (right for any split point);
- a channel concat stays blocked when all its inputs arrive in the same block (DenseNet), else takes them in NCHW;
- conv2d_transpose keeps NCHW through `transpose_layouts`, ConvertLayout's callback (one whose kernel is its stride
  is a 1x1 conv by then: transposed_convs.py);
- an upsampling resize arrives as the pool that stands in for it (blocked_resize.py) and follows as pools do.
"""

from __future__ import annotations

from collections.abc import Callable

from .relax_rewrite import rewritten_functions

UNARY = frozenset({
    "relax.nn.relu", "relax.sigmoid", "relax.tanh", "relax.nn.silu", "relax.nn.gelu", "relax.nn.gelu_tanh",
    "relax.exp", "relax.log", "relax.negative", "relax.erf", "relax.sqrt", "relax.abs"})
BINARY = frozenset({"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
                    "relax.minimum", "relax.power"})
POOLS = frozenset({"relax.nn.max_pool2d", "relax.nn.avg_pool2d"})
SPATIAL_REDUCTIONS = frozenset({"relax.mean", "relax.variance", "relax.sum", "relax.max", "relax.min"})
UNKNOWN = -1


def guarded_for_blocked_layouts(mod, output_block: Callable[[object], int], input_block: Callable[[object], int]):
    """A copy of `mod` in which no blocked layout reaches an op that cannot take it (module doc)."""
    from tvm import relax

    rewriter = _make_rewriter(output_block, input_block)
    return relax.transform.DeadCodeElimination()(rewritten_functions(mod, rewriter))


def transpose_layouts(call) -> dict[str, list[str]]:
    """ConvertLayout's choice for a conv2d_transpose: the layouts it has (its input is converted to them)."""
    attrs = call.attrs
    return {"relax.nn.conv2d_transpose": [attrs.data_layout, attrs.kernel_layout, attrs.out_layout]}


def _channel_axis(axis, ty) -> bool:
    """Whether `axis` is the channel axis of a 4-d (NCHW) tensor of type `ty`."""
    from tvm import relax

    if not isinstance(ty, relax.TensorType) or ty.ndim != 4 or axis is None:
        return False
    return int(axis) % 4 == 1


def _shape(expr) -> tuple | None:
    """Static dims as ints, symbolic ones as their names; None for a non-tensor or an unknown shape."""
    from tvm import relax, tirx

    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    return tuple(int(d) if isinstance(d, tirx.IntImm) else str(d) for d in ty.shape.values)


def _channels(expr) -> int | None:
    from tvm import relax, tirx

    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.ndim != 4 or ty.shape is None or \
            not isinstance(ty.shape.values[1], tirx.IntImm):
        return None
    return int(ty.shape.values[1])


def _per_channel(expr, channels: int) -> bool:
    """Whether `expr` broadcasts against an NCHW tensor of `channels` channels along its channels as it is
    (1, C, ...) or (C, 1, 1), or is one element."""
    shape = _shape(expr)
    if shape is None or len(shape) > 4:
        return False
    padded = (1,) * (4 - len(shape)) + shape
    return padded[1] == channels or _one_element(expr)


def _one_element(expr) -> bool:
    shape = _shape(expr)
    return shape is not None and all(d == 1 for d in shape)


def _spatial(call) -> bool:
    """A reduction over exactly the rows and columns of a 4-d tensor that keeps the dims (global pooling)."""
    axes = call.attrs.axis
    return (_channels(call.args[0]) is not None and axes is not None and call.attrs.keepdims
            and sorted(int(a) % 4 for a in axes) == [2, 3])


def _make_rewriter(output_block: Callable[[object], int], input_block: Callable[[object], int]):
    import tvm
    from tvm import relax

    concat, split = tvm.ir.Op.get("relax.concat"), tvm.ir.Op.get("relax.split")

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def block(self, expr, depth: int = 0) -> int:
            """The channel block `expr` will have after ConvertLayout (0: NCHW), or UNKNOWN. Other ops
            produce NCHW: their blocked inputs went through a barrier."""
            if _channels(expr) is None:
                return 0
            if depth > 200:
                return UNKNOWN
            bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
            if not isinstance(bound, relax.Call) or not isinstance(bound.op, tvm.ir.Op):
                return 0
            name = bound.op.name
            if name == "relax.nn.conv2d":
                return output_block(bound)
            if bound.op.get_attr("FRelaxInferLayout") is None:
                return 0  # TVM runs it in NCHW
            if name == "relax.concat" and isinstance(bound.args[0], relax.Tuple):
                blocks = {self.block(f, depth + 1) for f in bound.args[0].fields}
                return blocks.pop() if len(blocks) == 1 else 0
            if self._follows(bound):
                blocks = {self.block(a, depth + 1) for a in bound.args if _channels(a) is not None} - {0}
                return blocks.pop() if len(blocks) == 1 else UNKNOWN if blocks else 0
            return 0

        def _follows(self, call) -> bool:
            """Whether ConvertLayout carries a blocked layout through `call` correctly (module doc)."""
            name = call.op.name
            if name in UNARY or name in POOLS:
                return True
            if name in SPATIAL_REDUCTIONS:
                return _spatial(call)
            if name in BINARY:
                channels = _channels(call)
                return channels is not None and all(
                    _per_channel(a, channels) for a in call.args if isinstance(a.ty, relax.TensorType))
            return False

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call  # a call of a function or a kernel: TVM's conversion gives it NCHW
            name = call.op.name
            if call.op == split and _channel_axis(call.attrs.axis, call.args[0].ty):
                return self._slices(call)
            if call.op == concat and isinstance(call.args[0], relax.Tuple) and call.args[0].fields and \
                    _channel_axis(call.attrs.axis, call.args[0].fields[0].ty):
                return self._guarded_concat(call)
            if name == "relax.nn.conv2d":
                # a blocked input goes to NCHW right, but not from one block to another
                want, arriving = input_block(call), self.block(call.args[0])
                if want == 0 or arriving in (0, want):
                    return call
                return relax.Call(call.op, [self._barrier(call.args[0]), *call.args[1:]], call.attrs)
            if name in BINARY and _channels(call) is not None:
                call = self._scalar_operands(call)
            if name == "relax.strided_slice" or call.op.get_attr("FRelaxInferLayout") is None:
                return call  # TVM runs these in NCHW whatever arrives
            if self._follows(call):
                blocks = {self.block(a) for a in call.args if _channels(a) is not None} - {0}
                if len(blocks) <= 1 and UNKNOWN not in blocks:
                    return call
            return self._barred(call)

        def _scalar_operands(self, call):
            """`call` with its one-element operands (a learnable scale of shape (1,)) as 0-d tensors: TVM's rule for
            elementwise ops follows a blocked operand only past 0-d ones; a (1,) scale took PP-LCNetV3's blocks (every
            PP-OCRv4/v5 model) back to NCHW and forth twice per conv."""
            if not any(isinstance(a.ty, relax.TensorType) and a.ty.ndim == 4 and not _one_element(a)
                       for a in call.args):
                return call  # no other operand has the output's rank: a 0-d operand would change it
            args = [self.builder_.emit(relax.op.reshape(a, ())) if isinstance(a.ty, relax.TensorType)
                    and 0 < a.ty.ndim <= 4 and _one_element(a) else a for a in call.args]
            if all(a.same_as(b) for a, b in zip(args, call.args, strict=True)):
                return call
            return self.builder_.normalize(relax.Call(call.op, args, call.attrs, call.ty_args))

        def _barrier(self, expr):
            return self.builder_.emit(relax.op.strided_slice(expr, axes=[1], begin=[0], end=[_channels(expr)]))

        def _barred(self, call):
            """`call` with each input (tuple fields too) that may arrive blocked taken through a barrier."""
            def guard(arg):
                if isinstance(arg, relax.Tuple):
                    fields = [guard(f) for f in arg.fields]
                    return arg if all(a.same_as(b) for a, b in zip(fields, arg.fields, strict=True)) \
                        else relax.Tuple(fields)
                if _channels(arg) is not None and self.block(arg) != 0:
                    return self._barrier(arg)
                return arg

            args = [guard(a) for a in call.args]
            if all(a.same_as(b) for a, b in zip(args, call.args, strict=True)):
                return call
            return relax.Call(call.op, args, call.attrs, call.ty_args)

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
            return self._barred(call)

    return Rewriter()
