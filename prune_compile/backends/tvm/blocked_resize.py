"""Upsampling resizes in blocked layouts (NCHW16c) for tuned CPU builds (`--conv-layout NCHWc`).

Why: TVM 0.27's layout rule for `resize2d` gives up on a blocked input: ConvertLayout moves each resize between
two full layout transforms (NCHW16c -> NCHW -> resize -> NCHW16c), and a concat of resized maps goes to NCHW and
back as well. In PP-OCRv4 det (pruned, 640x640) that was 4.2 M moved elements in 11 transforms around the FPN's
upsamplings, about 3 ms of a 22 ms profile; without them the tuned library went from 1.40x to 1.24x ONNX Runtime's
time (same rounds). TOPI's resize has a blocked (NCHWxc) form; only the rule is missing.

What: `resizes_as_pools(mod)`, before the layout guard and ConvertLayout, replaces each upsampling `resize2d` of a
4-d NCHW tensor with static shapes by a stand-in whose rule follows blocked layouts: a 1x1 max pool padded to the
resize's output size, marked by its dilation (the dilation of a 1x1 window changes nothing, so no real pool has
this one). `pools_as_resizes(mod, resizes)` after the conversion turns each stand-in back into its resize, in the
layout the pool was given. The stand-ins never reach legalization: `pools_as_resizes` fails loudly if one is left.
"""

from __future__ import annotations

from .relax_rewrite import rewritten_functions, static_dims

MARK = 1_000_003  # the stand-in pool's row dilation; its column dilation indexes the resizes


def resizes_as_pools(mod):
    """`(module, resizes)`: a copy of `mod` with its upsampling resizes as stand-in pools (module doc), and the
    replaced resize calls, indexed as the stand-ins' column dilation."""
    import tvm
    from tvm import relax

    resize = tvm.ir.Op.get("relax.image.resize2d")
    resizes: list = []

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != resize or not _upsampling(call):
                return call
            (h, w), (out_h, out_w) = static_dims(call.args[0].ty.shape.values[2:]), static_dims(call.args[1].values)
            resizes.append(call)
            return relax.op.nn.max_pool2d(call.args[0], pool_size=(1, 1), padding=(0, 0, out_h - h, out_w - w),
                                          dilation=(MARK, len(resizes) - 1))

    return rewritten_functions(mod, Rewriter()), resizes


def pools_as_resizes(mod, resizes: list):
    """`mod` with each stand-in pool made by `resizes_as_pools` back as the resize it stands for, in its layout."""
    import tvm
    from tvm import relax

    if not resizes:
        return mod
    pool = tvm.ir.Op.get("relax.nn.max_pool2d")

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != pool or int(call.attrs.dilation[0]) != MARK:
                return call
            original = resizes[int(call.attrs.dilation[1])]
            a = original.attrs
            return relax.op.image.resize2d(
                call.args[0], original.args[1], roi=tuple(float(r.value) for r in a.roi), layout=call.attrs.layout,
                method=a.method, coordinate_transformation_mode=a.coordinate_transformation_mode,
                rounding_method=a.rounding_method, cubic_alpha=float(a.cubic_alpha),
                cubic_exclude=int(a.cubic_exclude), extrapolation_value=float(a.extrapolation_value),
                out_dtype=a.out_dtype)

    out = rewritten_functions(mod, Rewriter())
    left = [c for c in _calls(out) if c.op == pool and int(c.attrs.dilation[0]) == MARK]
    if left:
        raise RuntimeError(f"{len(left)} resize stand-in pool(s) were not turned back into resizes")
    return out


def _upsampling(call) -> bool:
    """A resize of a static 4-d NCHW tensor to a size no smaller in rows and columns."""
    from tvm import relax

    ty, size = call.args[0].ty, call.args[1]
    if call.attrs.layout != "NCHW" or not isinstance(ty, relax.TensorType) or ty.ndim != 4 or ty.shape is None \
            or not isinstance(size, relax.ShapeExpr):
        return False
    rows_columns, out = static_dims(ty.shape.values[2:]), static_dims(size.values)
    return rows_columns is not None and out is not None and all(o >= i for o, i in zip(out, rows_columns,
                                                                                        strict=True))


def _calls(mod) -> list:
    from tvm import relax

    found: list = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found
