"""Give the pruned ONNX back the input dims the original left symbolic (a batch, a sequence length).

The passes work on static shapes: `--input-shape` fixes every symbolic dim, and folding bakes the fixed sizes into
constants (a reshape to [1, 512]). A user whose original model took any batch expects the pruned one to, too. So the
job is replayed at a second size (every symbolic dim doubled: strides and pooling still divide) and the two pruned
models are compared. They must be the same graph; a constant that differs must get a form that holds at any size:
- an operand that can take the size from its input at run time: a reshape target (0 copies the input's dim at that
  index, -1 for one entry left), an expand's shape (1 where the input has the size), a slice's end (to the end);
- a constant that repeats one slice along axes sized like a symbolic input dim (a class token expanded to the
  batch): that slice, expanded at run time to Shape(input)[axis];
- otherwise the original's own nodes that computed it from shapes (a detector's anchor grid from its feature maps'
  sizes), when they read only shapes of what the pruned model has, never data (no copy of the original's layers).
Anything else keeps the model static, with the reason. The generalized model is then run at both sizes and must
reproduce each static model's outputs; only then is it written.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ..ir.onnx_proto import FreshNames, default_opset

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
               original: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto | None, str]:
    """`static` (the pruned model at the given sizes) with the symbolic input dims restored, from `other` (the same
    job at the doubled sizes); or None and why not. `original`, the ONNX model the job started from, lends the
    nodes that compute a size-dependent constant from shapes (a detector's anchor grid) where no simpler form
    does. The generalized model must reproduce both static models' outputs on seeded random inputs of their sizes
    (ONNX Runtime) within `tolerance`."""
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
    consts = {t.name: t for t in static.graph.initializer}
    replaced: dict[str, np.ndarray] = {}
    expanded: dict[str, tuple[np.ndarray, dict[int, tuple[str, int]]]] = {}
    dims = _symbolic_sizes(static, other, symbols)
    differing: set[str] = set()
    recompute: dict[str, str] = {}  # constant -> why no simpler form holds
    for t in static.graph.initializer:
        a, b = numpy_helper.to_array(t), numpy_helper.to_array(init_b[t.name])
        if a.shape == b.shape and np.array_equal(a, b):
            continue
        differing.add(t.name)
        if a.ndim == b.ndim and a.shape != b.shape:
            repeated, why = _repeated_slice(t.name, a, b, dims, users.get(t.name, []))
            if repeated is not None:
                expanded[t.name] = repeated
            else:
                recompute[t.name] = why
            continue
        target, why = _size_free_target(t.name, a, b, users.get(t.name, []), shapes_a, shapes_b, consts)
        if target is not None:
            replaced[t.name] = target
        else:
            recompute[t.name] = why
    model = onnx.ModelProto()
    model.CopyFrom(static)
    for t in model.graph.initializer:
        if t.name in replaced:
            t.CopyFrom(numpy_helper.from_array(replaced[t.name], t.name))
    if expanded:
        why = _expand_at_run_time(model, expanded)
        if why:
            return None, why
    if recompute:
        if original is None:
            return None, next(iter(recompute.values()))
        why = _recompute_from(model, original, recompute, differing)
        if why:
            return None, why
    _restore_dims(model, other, symbols)
    for seed, reference in ((0, static), (1, other)):
        feeds = ort.random_feeds(reference, seed)
        err = ort.relative_error(ort.run(reference, feeds), ort.run(model, feeds))
        if not err <= tolerance:
            return None, f"the model with symbolic dims differs from the static one ({err:.2e})"
    return model, ""


def _recompute_from(model: onnx.ModelProto, original: onnx.ModelProto, constants: Mapping[str, str],
                    differing: set[str]) -> str:
    """Replace each of `constants` by the original's nodes that compute it from shapes: back to the shapes of the
    pruned model's inputs and activations (read by Shape or Size only), its constants that do not depend on the
    size, or the original's own constants. "" or why not: the constant's own reason, and why the original's nodes
    cannot compute it so (its opset differs, they read data, control flow)."""
    def refuse(name: str, detail: str) -> str:
        return f"{constants[name]} (nor can the original's nodes compute it: {detail})"

    version, original_version = default_opset(model), default_opset(original)
    if version != original_version:
        return refuse(next(iter(constants)), f"its opset {original_version} is not the pruned model's {version}")
    producer = {o: n for n in original.graph.node for o in n.output if o}
    original_consts = {t.name: t for t in original.graph.initializer}
    kept = {t.name for t in model.graph.initializer if t.name not in differing}
    have = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output} | kept
    tensors = have - kept  # inputs and activations: only their shapes may be read
    nodes: dict[int, onnx.NodeProto] = {}  # by position in the original
    lent: dict[str, onnx.TensorProto] = {}
    index = {id(n): k for k, n in enumerate(original.graph.node)}
    for name in constants:
        stack = [(name, None)]
        while stack:
            t, reader = stack.pop()
            if t in tensors and reader is not None and reader.op_type not in ("Shape", "Size"):
                # computed from data, not from shapes: never copy the original's layers into the model
                return refuse(name, f"{reader.op_type} '{reader.name}' reads the data of '{t}'")
            if t in have or t in lent or (t in producer and index[id(producer[t])] in nodes):
                continue
            if t in producer:
                n = producer[t]
                if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                    return refuse(name, f"{n.op_type} '{n.name}' holds a subgraph")
                if any(o in tensors for o in n.output):
                    return refuse(name, f"{n.op_type} '{n.name}' writes a tensor the pruned model has")
                nodes[index[id(n)]] = n
                stack.extend((i, n) for i in n.input if i)
            elif t in original_consts and original_consts[t].data_location != onnx.TensorProto.EXTERNAL:
                lent[t] = original_consts[t]
            else:
                return refuse(name, f"'{t}' is not in the original")
    computed = {o for n in nodes.values() for o in n.output}
    inits = [t for t in model.graph.initializer if t.name not in computed]
    ordered = _topological([nodes[k] for k in sorted(nodes)] + list(model.graph.node))
    if len(ordered) != len(nodes) + len(model.graph.node):
        return refuse(next(iter(constants)), "they form a cycle with the pruned model's nodes")
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits + list(lent.values()))
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return ""


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`nodes` in an order where each comes after the producers of its inputs, earliest in the list first."""
    import heapq

    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    waiting = [len({producer[i] for i in n.input if i in producer}) for n in nodes]
    readers: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        for p in {producer[i] for i in n.input if i in producer}:
            readers.setdefault(p, []).append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        k = heapq.heappop(ready)
        out.append(nodes[k])
        for r in readers.get(k, []):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    return out


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

    inferred = onnx_io.infer_shapes(onnx_io.weightless(model))  # shapes only: the weights are not copied
    shapes = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    return shapes


def _size_free_target(name: str, a: np.ndarray, b: np.ndarray, users, shapes_a, shapes_b, consts):
    """A shape operand valid at both sizes, or None and why: a reshape target takes 0 for dims copied from its
    input and -1 for one left; an expand's shape takes 1 where its input has the size already (it broadcasts)."""
    if not users or any((n.op_type, i) not in _SHAPE_OPERANDS for n, i in users):
        what = ", ".join(sorted({f"'{n.name}' ({n.op_type})" for n, _ in users})) or "nothing"
        return None, (f"constant '{name}' depends on the input size and is read by {what}, not as a reshape "
                      "target, expanded shape or slice end")
    if a.shape != b.shape or a.ndim != 1:
        return None, f"shape operand '{name}' has a different length at another input size"
    result = None
    for n, i in users:
        target = _SHAPE_OPERANDS[(n.op_type, i)](n, a, b, shapes_a, shapes_b, consts)
        if isinstance(target, str):
            return None, target
        if result is not None and not np.array_equal(result, target):
            return None, f"shape operand '{name}' is read by nodes that would need different forms"
        result = target
    return result.astype(a.dtype), ""


def _reshape_target(n: onnx.NodeProto, a: np.ndarray, b: np.ndarray, shapes_a, shapes_b, consts) -> np.ndarray | str:
    if any(attr.name == "allowzero" and attr.i for attr in n.attribute):
        return f"reshape '{n.name}' has allowzero=1: a 0 in its target cannot copy a dim"
    dims_a, dims_b = shapes_a.get(n.input[0]), shapes_b.get(n.input[0])
    target = a.copy()
    left = []
    for k in np.flatnonzero(a != b):
        if dims_a is not None and dims_b is not None and k < len(dims_a) and (dims_a[k], dims_b[k]) == (a[k], b[k]):
            target[k] = 0
        else:
            left.append(k)
    if len(left) > 1 or (left and -1 in a):
        return f"reshape '{n.name}' targets {a.tolist()} at one size and {b.tolist()} at the other"
    for k in left:
        target[k] = -1
    return target


def _expand_shape(n: onnx.NodeProto, a: np.ndarray, b: np.ndarray, shapes_a, shapes_b, consts) -> np.ndarray | str:
    dims_a, dims_b = shapes_a.get(n.input[0]), shapes_b.get(n.input[0])
    target = a.copy()
    for k in np.flatnonzero(a != b):
        axis = k - (len(a) - len(dims_a)) if dims_a is not None and dims_b is not None else -1
        if not (0 <= axis < len(dims_a) and (dims_a[axis], dims_b[axis]) == (a[k], b[k])):
            return f"expand '{n.name}' broadcasts to {a.tolist()} at one size and {b.tolist()} at the other"
        target[k] = 1
    return target


def _slice_ends(n: onnx.NodeProto, a: np.ndarray, b: np.ndarray, shapes_a, shapes_b, consts) -> np.ndarray | str:
    dims_a, dims_b = shapes_a.get(n.input[0]), shapes_b.get(n.input[0])
    axes = np.arange(len(a))
    if len(n.input) > 3 and n.input[3]:
        axes = numpy_helper.to_array(consts[n.input[3]]) if n.input[3] in consts else None
    target = a.copy()
    for k in np.flatnonzero(a != b):
        axis = int(axes[k]) if axes is not None else -1
        if dims_a is None or dims_b is None or not -len(dims_a) <= axis < len(dims_a) \
                or (dims_a[axis], dims_b[axis]) != (a[k], b[k]):
            return f"slice '{n.name}' has ends {a.tolist()} at one size and {b.tolist()} at the other"
        target[k] = np.iinfo(np.int64).max  # to the end, whatever the size
    return target


# Operands that hold sizes, by (op, input index), and how each writes a size it can take from its input.
_SHAPE_OPERANDS = {("Reshape", 1): _reshape_target, ("Expand", 1): _expand_shape, ("Slice", 2): _slice_ends}


def _symbolic_sizes(static: onnx.ModelProto, other: onnx.ModelProto, symbols: Symbols,
                    ) -> dict[tuple[int, int], list[tuple[str, int]]]:
    """The symbolic input dims by their (size in `static`, size in `other`)."""
    out: dict[tuple[int, int], list[tuple[str, int]]] = {}
    for inp, inp_b in zip(static.graph.input, other.graph.input, strict=True):
        for axis in sorted(symbols.get(inp.name, {})):
            d, d_b = inp.type.tensor_type.shape.dim[axis], inp_b.type.tensor_type.shape.dim[axis]
            out.setdefault((d.dim_value, d_b.dim_value), []).append((inp.name, axis))
    return out


def _repeated_slice(name: str, a: np.ndarray, b: np.ndarray, dims, users):
    """For a constant whose shape follows the input size: the one slice it repeats (size 1 on those axes) and, per
    such axis, the input dim that gives its size; or None and why not."""
    readers = ", ".join(sorted({f"'{n.name}' ({n.op_type})" for n, _ in users})) or "nothing"
    sized: dict[int, tuple[str, int]] = {}
    for axis in np.flatnonzero(np.asarray(a.shape) != np.asarray(b.shape)).tolist():
        found = dims.get((a.shape[axis], b.shape[axis]), [])
        if len(found) != 1:
            which = "no" if not found else "more than one"
            return None, (f"constant '{name}' (read by {readers}) has {a.shape[axis]} entries along axis {axis}, "
                          f"which {which} symbolic input dim gives at both sizes")
        sized[axis] = found[0]
    index = tuple(slice(0, 1) if axis in sized else slice(None) for axis in range(a.ndim))
    one = a[index]
    if not (np.array_equal(b[index], one) and np.array_equal(np.broadcast_to(one, a.shape), a)
            and np.array_equal(np.broadcast_to(one, b.shape), b)):
        return None, (f"constant '{name}' depends on the input size and is read by {readers}, and is not one "
                      f"slice repeated along axes {sorted(sized)}")
    return (one, sized), ""


def _expand_at_run_time(model: onnx.ModelProto, expanded) -> str:
    """Replace each constant of `expanded` by its slice expanded to the input's sizes: Expand(slice, shape), the
    shape 1 on fixed axes and Shape(input)[axis] on the others. Nodes go first: they read only graph inputs."""
    from onnx import helper

    opset = default_opset(model)
    if opset < 8:
        return f"constant '{next(iter(expanded))}' would need Expand, which opset {opset} lacks"
    fresh = FreshNames(model)
    nodes, inits = [], []
    for name, (one, sized) in expanded.items():
        parts = []
        for axis in range(one.ndim):
            if axis not in sized:
                parts.append(fresh(f"{name}_dim{axis}"))
                inits.append(numpy_helper.from_array(np.ones(1, np.int64), parts[-1]))
                continue
            inp, inp_axis = sized[axis]
            shape, index = fresh(f"{name}_shape_of_{inp}"), fresh(f"{name}_axis{axis}")
            inits.append(numpy_helper.from_array(np.asarray([inp_axis], np.int64), index))
            parts.append(fresh(f"{name}_dim{axis}"))
            nodes += [helper.make_node("Shape", [inp], [shape], name=shape),
                      helper.make_node("Gather", [shape, index], [parts[-1]], name=parts[-1], axis=0)]
        target, small = fresh(f"{name}_target"), fresh(f"{name}_slice")
        inits.append(numpy_helper.from_array(one, small))
        nodes += [helper.make_node("Concat", parts, [target], name=target, axis=0),
                  helper.make_node("Expand", [small, target], [name], name=f"{name}_expand")]
    kept = [t for t in model.graph.initializer if t.name not in expanded]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + inits)
    old = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + old)
    return ""


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
