"""Constant-only kernel calls as zero constants of their result's shape, not computed: for models whose weights are
never run (the latency table's one-layer models).

Why: Relax's FoldConstant computes every `call_tir` whose inputs are constants by building the kernel with LLVM and
running it: a latency-table conv's weight layout transform, Winograd's kernel transform and the bias's reshape and
layout, four builds of ~30 ms each, 0.16 s of a 0.29 s lowering, repeated for each of the 300-450 layer shapes a
resnet18 latency search tunes. The table reads what tuning measured for the layer's kernels, which MetaSchedule runs
on random arguments: the folded values are never used. A constant of the same shape and dtype leaves the module's
kernels, and so its tuning tasks, as folding would.
"""

from __future__ import annotations

from .relax_rewrite import rewritten_functions


def unvalued_constants(mod):
    """A copy of `mod` in which each `call_tir` whose inputs are all constants (directly, or through bindings this
    rewrite made constant) is a zero constant of its result's type; the calls it replaces are dropped."""
    from tvm import relax

    return relax.transform.DeadCodeElimination()(rewritten_functions(mod, _rewriter()))


def _rewriter():
    import numpy as np
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def _constant(self, expr) -> bool:
            if isinstance(expr, relax.Var):
                expr = self.lookup_binding(expr)
            return isinstance(expr, tvm.ir.expr.Constant)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != call_tir or not isinstance(call.args[1], relax.Tuple):
                return call
            ty = call.ty_args[0] if call.ty_args else None
            if (not isinstance(ty, relax.TensorType) or ty.shape is None
                    or not all(isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values)
                    or len(call.args) > 2 or not all(self._constant(a) for a in call.args[1].fields)):
                return call  # symbolic shapes or packed integers: folded as before
            shape = [int(d) for d in ty.shape.values]
            return relax.const(np.zeros(shape, dtype=str(ty.dtype)), str(ty.dtype))

    return Rewriter()
