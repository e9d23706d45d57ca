"""Clips as Relax `maximum` / `minimum` with scalar constants, so that layout conversion sees through them.

Why: ReLU6 (MobileNet) and hard-sigmoid / hard-swish are clips. TVM's ONNX frontend lowers Clip to opaque TIR
calls (`call_tir` of topi's maximum and minimum), and `relax.clip` from the other converters has no layout
inference. ConvertLayout cannot move either into a blocked layout, so every clip ran in NCHW between two layout
transforms, unfused: on pruned mobilenet_v2 (NCHW8c) 1.5 ms per clip plus 0.6-0.9 ms per transform, tripling the
latency. Relax's elementwise `maximum(x, c)` / `minimum(x, c)` with a 0-d constant follow any layout and fuse into
the producing convolution's epilogue.

What: `clips_as_min_max(mod)` rewrites
- `call_tir(f, (x, c))` where `f` is exactly topi's broadcast maximum / minimum of `x`'s shape and a 0-d `c`
  (checked by structural equality with a freshly generated reference, not by name), and
- `relax.clip(x, lo, hi)` with constant bounds lo <= hi,
into `R.maximum` / `R.minimum`. The same arithmetic, so results are bit-identical.
"""

from __future__ import annotations

from .relax_rewrite import rewritten_functions


def clips_as_min_max(mod):
    """A copy of `mod` with its clips as Relax maximum/minimum ops (see module doc)."""
    from tvm import relax

    return relax.transform.DeadCodeElimination()(rewritten_functions(mod, _make_rewriter(mod)))


def _reference(kind: str, shape, dtype: str):
    """topi's elementwise maximum/minimum of a tensor of `shape` and a 0-d tensor, as the frontend emits it."""
    from tvm import te, topi

    x = te.placeholder(shape, dtype, name="x")
    c = te.placeholder((), dtype, name="c")
    op = topi.maximum if kind == "maximum" else topi.minimum
    return te.create_prim_func([x, c, op(x, c)])


def _make_rewriter(mod):
    import tvm
    import tvm_ffi
    from tvm import relax, tirx

    call_tir = tvm.ir.Op.get("relax.call_tir")
    clip = tvm.ir.Op.get("relax.clip")
    binary = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self) -> None:
            super().__init__()
            self.kind_of: dict = {}  # PrimFunc -> "maximum" / "minimum" / None: each compared once, not per call

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op == call_tir:
                return self._from_call_tir(call)
            if call.op == clip:
                return self._from_clip(call)
            return call

        def _from_call_tir(self, call):
            if len(call.args) != 2 or not isinstance(call.args[1], relax.Tuple) or len(call.args[1].fields) != 2:
                return call  # packed output shapes, or not a binary function
            gvar, args = call.args
            func = mod.functions.get(gvar) if isinstance(gvar, tvm.ir.GlobalVar) else None
            if not isinstance(func, tirx.PrimFunc):
                return call
            x, c = args.fields
            x_ty, c_ty = x.ty, c.ty
            if (not isinstance(x_ty, relax.TensorType) or not isinstance(c_ty, relax.TensorType)
                    or c_ty.ndim != 0 or x_ty.shape is None or x_ty.dtype != c_ty.dtype
                    or any(not isinstance(d, tirx.IntImm) for d in x_ty.shape.values)):
                return call
            if gvar not in self.kind_of:  # names are deduplicated (maximum1, ...): compare the computation
                self.kind_of[gvar] = next((kind for kind in binary if tvm_ffi.structural_equal(
                    func.body, _reference(kind, list(x_ty.shape.values), x_ty.dtype).body, map_free_vars=True)), None)
            kind = self.kind_of[gvar]
            return binary[kind](x, c) if kind else call

        def _from_clip(self, call):
            x, lo, hi = call.args
            ty = x.ty
            constant = (tirx.FloatImm, tirx.IntImm)
            if (not isinstance(ty, relax.TensorType) or not isinstance(lo, constant) or not isinstance(hi, constant)
                    or lo.value > hi.value):  # topi's clip takes the min first: the orders agree only when lo <= hi
                return call
            low = self.builder_.emit(relax.op.maximum(x, relax.const(float(lo.value), ty.dtype)))
            return relax.op.minimum(low, relax.const(float(hi.value), ty.dtype))

    return Rewriter()
