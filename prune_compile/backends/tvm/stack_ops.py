"""Stacks as concats of expanded tensors, so that Relax's layout conversion can run on models that stack.

Why: TVM 0.27's layout rule for `stack` names the new axis "S" in the output's layout, a name no other rule knows:
the next op with a rule fails ("Invalid SLayout: can't find S in source layout ABC"). Magika's file-type model
(a max over two stacked vectors) failed every tuned cpu build and every `--conv-layout NHWC` build that way.

What: `stacks_as_concats(mod)` rewrites `stack(xs, axis)` into `concat([expand_dims(x, axis) for x in xs], axis)`:
the same values, with rules that follow any layout.
"""

from __future__ import annotations

from .relax_rewrite import rewritten_functions


def stacks_as_concats(mod):
    """A copy of `mod` without `relax.stack` (see module doc)."""
    import tvm
    from tvm import relax

    stack = tvm.ir.Op.get("relax.stack")

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != stack:
                return call
            tensors = call.args[0]
            count = len(tensors.ty.fields)
            fields = tensors.fields if isinstance(tensors, relax.Tuple) else [
                self.builder_.emit(relax.TupleGetItem(tensors, i)) for i in range(count)]
            axis = 0 if call.attrs.axis is None else int(call.attrs.axis)
            expanded = [self.builder_.emit(relax.op.expand_dims(f, axis)) for f in fields]
            return relax.op.concat(expanded, axis=axis)

    return rewritten_functions(mod, Rewriter())
