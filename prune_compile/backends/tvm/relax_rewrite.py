"""The one loop every module-level Relax rewrite here shares: a copy of the module with each Relax function passed
through an expression mutator (PrimFuncs and external functions are kept as they are)."""

from __future__ import annotations


def rewritten_functions(mod, mutator):
    """A copy of `mod` with each Relax function replaced by `mutator.visit_expr(function)`."""
    from tvm import relax

    out = mod.clone()
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gvar] = mutator.visit_expr(func)
    return out
