"""Transposed convolutions whose kernel equals their stride, as 1x1 convs and a pixel shuffle, for tuned CPU builds.

Why: TVM lowers conv2d_transpose by filling the input with zeros between its pixels and convolving the result
with the flipped kernel: with a 2x2 kernel at stride 2 three of every four multiplies are by zero, the zero-filled
input is four times the input, and MetaSchedule tunes the whole thing with its generic NCHW rules. PP-OCR's
detection heads upsample twice that way (16 -> 16 channels to 320x320, 16 -> 1 to 640x640 pruned): 2.3 + 1.2 ms
tuned, where ONNX Runtime takes 1.0 + 0.5.

What: when the kernel equals the stride (no padding, output padding or dilation, one group), each input pixel
writes its own s x s patch of the output: out[n, o, h*s + i, w*s + j] = sum_c x[n, c, h, w] * W[c, o, i, j]. That
is a 1x1 conv to O*s*s channels (o-major: channel o*s*s + i*s + j) followed by a pixel shuffle (reshape, permute,
reshape). The conv takes the blocked layouts and schedule of every other dense conv (conv_nchwc.py); the shuffle
is one injective kernel with the ops after it (bias, batch norm, activation). The weight is rearranged by Relax ops
on it, which constant folding evaluates at build time.
"""

from __future__ import annotations

from .relax_rewrite import rewritten_functions, static_dims


def strided_transposes_as_convs(mod):
    """A copy of `mod` with each conv2d_transpose whose kernel equals its stride as a 1x1 conv and a pixel shuffle
    (module doc); other transposed convs are left as they are."""
    import tvm
    from tvm import relax

    transpose = tvm.ir.Op.get("relax.nn.conv2d_transpose")

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != transpose or not _kernel_is_stride(call):
                return call
            x, weight = call.args
            n, c, h, w = _dims(x)
            _, o, sh, sw = _dims(weight)
            emit = self.builder_.emit
            # W[c, o, i, j] -> W1[o*sh*sw + i*sw + j, c, 0, 0]
            w1 = emit(relax.op.reshape(emit(relax.op.permute_dims(weight, [1, 2, 3, 0])), (o * sh * sw, c, 1, 1)))
            y = emit(relax.op.nn.conv2d(x, w1, out_dtype=call.attrs.out_dtype))
            patches = emit(relax.op.reshape(y, (n, o, sh, sw, h, w)))
            rows = emit(relax.op.permute_dims(patches, [0, 1, 4, 2, 5, 3]))  # (n, o, h, i, w, j)
            return relax.op.reshape(rows, (n, o, h * sh, w * sw))

    return rewritten_functions(mod, Rewriter())


def _dims(expr) -> tuple[int, ...] | None:
    from tvm import relax

    ty = expr.ty
    return static_dims(ty.shape.values) if isinstance(ty, relax.TensorType) and ty.shape is not None else None


def _kernel_is_stride(call) -> bool:
    a = call.attrs
    x, weight = (_dims(arg) for arg in call.args)
    if x is None or weight is None or len(x) != 4 or len(weight) != 4:
        return False
    return (a.data_layout == "NCHW" and a.kernel_layout == "IOHW" and a.out_layout == "NCHW" and int(a.groups) == 1
            and [int(v) for v in a.strides] == list(weight[2:]) and all(int(v) == 0 for v in a.padding)
            and all(int(v) == 0 for v in a.output_padding) and all(int(v) == 1 for v in a.dilation))
