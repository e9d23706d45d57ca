"""Give the pruned ONNX back the input dims the original left symbolic (a batch, a sequence length).

The passes work on static shapes: `--input-shape` fixes every symbolic dim, and folding bakes the fixed sizes into
constants (a reshape to [1, 512]). A user whose original model took any batch expects the pruned one to, too. So the
job is replayed at a second size (every symbolic dim doubled: strides and pooling still divide) and the two pruned
models are compared. They must be the same graph; the only constants that may differ are reshape targets, and each
differing entry must be one a reshape can take from its input at run time: 0 (copy the input's dim at that index,
when that dim is the entry at both sizes) or, for one entry left, -1 (inferred). Anything else (a size in a slice
bound, an expand, a constant tensor) keeps the model static, with the reason. The generalized model is then run at
both sizes and must reproduce each static model's outputs; only then is it written.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

Symbols = dict[str, dict[int, str]]  # graph input → axis → symbol name


def symbolic_input_dims(model: onnx.ModelProto) -> Symbols:
    """The graph inputs' dims that are not fixed sizes (a `dim_param`, or no value), by input and axis. A dim with
    no name (or "?", as Paddle2ONNX writes) gets one of its own: equal names mean equal sizes in ONNX."""
    inits = {i.name for i in model.graph.initializer}
    out: Symbols = {}
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.tensor_type.HasField("shape"):
            continue
        dims = {axis: d.dim_param if d.dim_param not in ("", "?") else f"{inp.name}_dim{axis}"
                for axis, d in enumerate(inp.type.tensor_type.shape.dim)
                if not (d.HasField("dim_value") and d.dim_value > 0)}
        if dims:
            out[inp.name] = dims
    return out


def candidates(symbols: Symbols) -> list[Symbols]:
    """The sets of symbolic dims to try keeping, most first: all of them, then the leading (batch) dims alone (a
    detector's anchors follow its image size but not its batch)."""
    leading = {name: {0: dims[0]} for name, dims in symbols.items() if 0 in dims}
    return [symbols] + ([leading] if leading and leading != symbols else [])


def doubled_shapes(shapes: Mapping[str, list[int]], symbols: Symbols) -> dict[str, list[int]]:
    """`shapes` with every symbolic dim doubled (one symbol, one size: dims sharing a name stay equal)."""
    sizes: dict[str, int] = {}
    for name, dims in symbols.items():
        for axis, symbol in dims.items():
            sizes.setdefault(symbol, 2 * shapes[name][axis])
    return {name: [sizes[symbols[name][a]] if a in symbols.get(name, {}) else d for a, d in enumerate(dims)]
            for name, dims in shapes.items()}


def generalize(static: onnx.ModelProto, other: onnx.ModelProto, symbols: Symbols, tolerance: float = 1e-5,
               ) -> tuple[onnx.ModelProto | None, str]:
    """`static` (the pruned model at the given sizes) with the symbolic input dims restored, from `other` (the same
    job at the doubled sizes); or None and why not. The generalized model must reproduce both static models'
    outputs on seeded random inputs of their sizes (ONNX Runtime) within `tolerance`."""
    from ..backends import ort

    why = _same_graph(static, other)
    if why:
        return None, why
    shapes_a, shapes_b = _value_shapes(static), _value_shapes(other)
    init_b = {t.name: t for t in other.graph.initializer}
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in static.graph.node:
        for i, name in enumerate(n.input):
            users.setdefault(name, []).append((n, i))
    replaced: dict[str, np.ndarray] = {}
    for t in static.graph.initializer:
        a, b = numpy_helper.to_array(t), numpy_helper.to_array(init_b[t.name])
        if a.shape == b.shape and np.array_equal(a, b):
            continue
        target, why = _size_free_target(t.name, a, b, users.get(t.name, []), shapes_a, shapes_b)
        if target is None:
            return None, why
        replaced[t.name] = target
    model = onnx.ModelProto()
    model.CopyFrom(static)
    for t in model.graph.initializer:
        if t.name in replaced:
            t.CopyFrom(numpy_helper.from_array(replaced[t.name], t.name))
    _restore_dims(model, other, symbols)
    for seed, reference in ((0, static), (1, other)):
        feeds = ort.random_feeds(reference, seed)
        err = ort.relative_error(ort.run(reference, feeds), ort.run(model, feeds))
        if not err <= tolerance:
            return None, f"the model with symbolic dims differs from the static one ({err:.2e})"
    return model, ""


def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> str:
    if len(a.graph.node) != len(b.graph.node):
        return "the pruned graph has a different number of nodes at another input size"
    for x, y in zip(a.graph.node, b.graph.node, strict=True):
        if (x.op_type, x.domain, list(x.input), list(x.output)) != (y.op_type, y.domain, list(y.input), list(y.output)):
            return f"node '{x.name}' differs at another input size"
        if [p.SerializeToString() for p in x.attribute] != [p.SerializeToString() for p in y.attribute]:
            return f"node '{x.name}' ({x.op_type}) has attributes that depend on the input size"
    if [t.name for t in a.graph.initializer] != [t.name for t in b.graph.initializer]:
        return "the pruned graph has different constants at another input size"
    return ""


def _value_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    from ..ir import onnx_io

    inferred = onnx_io.infer_shapes(model)
    shapes = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    return shapes


def _size_free_target(name: str, a: np.ndarray, b: np.ndarray, users, shapes_a, shapes_b):
    """A reshape target valid at both sizes (0 for dims copied from the input, -1 for one left), or None and why."""
    if not users or any(n.op_type != "Reshape" or i != 1 for n, i in users):
        what = ", ".join(sorted({f"'{n.name}' ({n.op_type})" for n, _ in users})) or "nothing"
        return None, f"constant '{name}' depends on the input size and is read by {what}, not as a reshape target"
    if a.shape != b.shape or a.ndim != 1:
        return None, f"reshape target '{name}' has a different length at another input size"
    result = None
    for n, _ in users:
        if any(attr.name == "allowzero" and attr.i for attr in n.attribute):
            return None, f"reshape '{n.name}' has allowzero=1: a 0 in its target cannot copy a dim"
        dims_a, dims_b = shapes_a.get(n.input[0]), shapes_b.get(n.input[0])
        target = a.copy()
        left = []
        for k in np.flatnonzero(a != b):
            if dims_a is not None and dims_b is not None and k < len(dims_a) and (dims_a[k], dims_b[k]) == (a[k], b[k]):
                target[k] = 0
            else:
                left.append(k)
        if len(left) > 1 or (left and -1 in a):
            return None, f"reshape '{n.name}' targets {a.tolist()} at one size and {b.tolist()} at the other"
        for k in left:
            target[k] = -1
        if result is not None and not np.array_equal(result, target):
            return None, f"reshape target '{name}' is read by reshapes that would need different forms"
        result = target
    return result.astype(a.dtype), ""


def _restore_dims(model: onnx.ModelProto, other: onnx.ModelProto, symbols: Symbols) -> None:
    """Symbolic input dims by name; an output dim that changed with the size gets the symbol whose sizes it took,
    or none; intermediate shapes are dropped (the runtime infers them)."""
    sizes = {}
    for inp, inp_b in zip(model.graph.input, other.graph.input, strict=True):
        for axis, symbol in symbols.get(inp.name, {}).items():
            d, d_b = inp.type.tensor_type.shape.dim[axis], inp_b.type.tensor_type.shape.dim[axis]
            sizes.setdefault((d.dim_value, d_b.dim_value), symbol)
            d.Clear()
            d.dim_param = symbol
    for out, out_b in zip(model.graph.output, other.graph.output, strict=True):
        for d, d_b in zip(out.type.tensor_type.shape.dim, out_b.type.tensor_type.shape.dim, strict=True):
            if d.dim_value != d_b.dim_value:
                symbol = sizes.get((d.dim_value, d_b.dim_value))
                d.Clear()
                if symbol:
                    d.dim_param = symbol
    del model.graph.value_info[:]
