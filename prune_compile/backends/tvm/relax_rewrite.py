"""What the module-level Relax rewrites here share: a copy of the module with each Relax function passed through an
expression mutator (PrimFuncs and external functions are kept as they are), and reading static dims."""

from __future__ import annotations


def rewritten_functions(mod, mutator):
    """A copy of `mod` with each Relax function replaced by `mutator.visit_expr(function)`."""
    from tvm import relax

    out = mod.clone()
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gvar] = mutator.visit_expr(func)
    return out


def static_dims(dims) -> tuple[int, ...] | None:
    """`dims` (a shape's values) as ints; None when one is symbolic."""
    from tvm import tirx

    return tuple(int(d) for d in dims) if all(isinstance(d, tirx.IntImm) for d in dims) else None
