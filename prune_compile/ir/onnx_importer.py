"""ONNX → IR.

Steps: load and check the file; refuse opset domains we cannot run; fix input shapes (overrides, no symbolic dims
left); lift old opsets to 17 with onnx's version converter (so one set of op semantics applies); fold weight
subgraphs to constants with onnx-graphsurgeon; infer shapes; map every node to a normalized op, or to `opaque`
(written back unchanged by the exporter).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import GraphError, ModelFormatError, UnsupportedModelError, UsageError
from . import onnx_io, onnx_proto
from .contrib_ops import lower_contrib_ops
from .graph import Graph, OpaqueInfo, Provenance, Value
from .ops import recurrent_shapes

# Domains whose ops ONNX Runtime can run; anything else is a custom op library we do not have.
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
MIN_OPSET = 17  # older models are converted up to this (LayerNormalization, Split/Reduce forms settle here)
# The converters below follow the ops as specified up to this opset. A later opset's version of an op they convert
# is converted only when its schema differs by wider type lists or by new attributes the node leaves unset
# (`later_schema_change`); otherwise the node stays opaque and its channels freeze.
CONVERTER_OPSET = 21
MAX_OPSET = 26  # the newest opset ONNX Runtime 1.31 loads (the folding, verification and reference runtime)
SUPPORTED_OPSETS = range(7, MAX_OPSET + 1)
_MAX_FOLD_ROUNDS = 12


def load_onnx_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX file; every failure becomes a `ModelFormatError` that names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"model file '{path}' does not exist")
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf DecodeError, truncated external data, ...
        raise ModelFormatError(f"'{path}' is not a readable ONNX model: {_first_line(e)}") from e
    if not model.graph.node and not model.graph.output:
        raise ModelFormatError(f"'{path}' holds no ONNX graph (empty or not an ONNX file)")
    return model


def import_onnx(
    model: onnx.ModelProto | str | os.PathLike,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    consume: bool = False,
) -> Graph:
    """Import an ONNX model (proto or path). `input_shapes` overrides/fixes graph input shapes by name. A proto
    passed in stays as it is, except one over 2 GiB, whose input shapes are fixed in place (a copy would double the
    memory it takes), or with `consume`, where the caller gives it up: it is changed in place, not copied."""
    source = ""
    if not isinstance(model, onnx.ModelProto):
        source = os.fspath(model)
        model = load_onnx_model(model)
    elif not onnx_io.is_large(model) and not consume:
        given, model = model, onnx.ModelProto()
        model.CopyFrom(given)
    model, origins = _prepare(model, dict(input_shapes or {}), source or model.graph.name)
    return _build_graph(model, source, origins)


# -- preparation on the proto ----------------------------------------------------------------------------------
def _prepare(
    model: onnx.ModelProto, overrides: dict[str, Sequence[int]], where: str
) -> tuple[onnx.ModelProto, dict[str, str]]:
    # onnx 1.23's checker wants a shape on every graph output, which many exporters omit: let shape
    # inference fill them in first (an inference failure is reported by the checker or by the strict pass later).
    try:
        checked = onnx_io.infer_shapes(model, in_place=True)
    except Exception:
        checked = model
    try:
        onnx_io.check_model(checked)
    except onnx.checker.ValidationError as e:
        raise ModelFormatError(f"'{where}' fails the ONNX checker: {_first_line(e)}") from e
    for n in model.graph.node:
        if n.domain == "com.microsoft.nchwc":
            raise UnsupportedModelError(
                f"node '{n.name or n.op_type}' is ONNX Runtime's {n.op_type} in its blocked NCHWc layout: the model "
                "was saved at ORT_ENABLE_ALL, which writes kernels for the machine it ran on; prune the original "
                "model, or save it at ORT_ENABLE_EXTENDED (its fused ops are read)")
        if n.domain not in KNOWN_DOMAINS:
            raise UnsupportedModelError(
                f"node '{n.name or n.op_type}' uses op '{n.op_type}' from opset domain '{n.domain}', "
                f"which no runtime here implements (known domains: {sorted(d or 'ai.onnx' for d in KNOWN_DOMAINS)})"
            )
    default_opset = onnx_proto.default_opset(model)
    if default_opset not in SUPPORTED_OPSETS:
        raise UnsupportedModelError(f"'{where}' uses ONNX opset {default_opset}; supported: "
                                     f"{SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}")
    _fix_input_shapes(model, overrides)
    if default_opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:
            raise UnsupportedModelError(
                f"'{where}': cannot convert opset {default_opset} to {MIN_OPSET}: {_first_line(e)}") from e
    model = lower_contrib_ops(model)  # saved by ONNX Runtime's optimizer: its fused ops, as the ops they fuse
    model, origins = _fold_constants(model, where)
    try:
        model = onnx_io.infer_shapes(model, in_place=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise UnsupportedModelError(f"'{where}': ONNX shape inference failed: {_first_line(e)}") from e
    return model, origins


def _fix_input_shapes(model: onnx.ModelProto, overrides: dict[str, Sequence[int]]) -> None:
    init_names = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    by_name = {i.name: i for i in inputs}
    for name in overrides:
        if name not in by_name:
            raise UsageError(f"--input-shape names '{name}', but the model's inputs are {sorted(by_name)}")
    for inp in inputs:
        tt = inp.type.tensor_type
        if not tt.HasField("shape"):
            if inp.name not in overrides:
                raise UnsupportedModelError(
                    f"model input '{inp.name}' has no shape; pass --input-shape {inp.name}=d0,d1,...")
        dims = list(tt.shape.dim)
        if inp.name in overrides:
            new = [int(d) for d in overrides[inp.name]]
            if dims and len(new) != len(dims):
                raise UsageError(
                    f"--input-shape {inp.name}: rank {len(new)} given, the model's input has rank {len(dims)}")
            tt.shape.ClearField("dim")
            for d in new:
                tt.shape.dim.add().dim_value = d
            continue
        for axis, d in enumerate(dims):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                label = d.dim_param or "?"
                raise UnsupportedModelError(
                    f"model input '{inp.name}' has dynamic dim '{label}' at axis {axis}; "
                    f"pass --input-shape {inp.name}=" + ",".join(
                        str(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else "N" for x in dims))
    # Stale intermediate shapes (from a dynamic export) would conflict with the fixed ones.
    model.graph.ClearField("value_info")
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")


def _fold_constants(model: onnx.ModelProto, where: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    import onnx_graphsurgeon as gs
    import onnxruntime
    from onnx_graphsurgeon.logger import G_LOGGER

    onnxruntime.set_default_logger_severity(3)  # gs evaluates folded subgraphs with ORT, which is chatty
    # gs prints its warnings on stdout (a missing `colored` module, "large outputs" of folded position-bias
    # tables), where they would corrupt `--json`; none is actionable for our users.
    severity, G_LOGGER.severity = G_LOGGER.severity, max(G_LOGGER.severity, G_LOGGER.ERROR)
    # Folding a Shape needs its input's shape, which is known only after the subgraph before it folded and
    # shape inference ran again: iterate to a fixpoint (swin_t's ONNX export needs 5 rounds).
    folded = model
    try:
        for _ in range(_MAX_FOLD_ROUNDS):
            before = len(folded.graph.node)
            folded = onnx_io.infer_shapes(folded, in_place=True, data_prop=True)
            g = gs.import_onnx(folded)
            _whole_shapes_sliced(g)
            # Not inside If/Loop branches: our IR keeps control flow opaque, and gs would evaluate them as IR-14
            # models that ONNX Runtime rejects (a printed warning per branch, nothing folded).
            g.fold_constants(error_ok=True, recurse_subgraphs=False, should_exclude_node=_is_weight_transpose)
            g.cleanup().toposort()
            folded = gs.export_onnx(g, do_type_check=False)
            folded.graph.ClearField("value_info")
            if len(folded.graph.node) == before:
                break
    except Exception as e:
        raise UnsupportedModelError(f"'{where}': constant folding failed: {_first_line(e)}") from e
    finally:
        G_LOGGER.severity = severity
    folded.ir_version = model.ir_version
    del folded.opset_import[:]
    folded.opset_import.extend(model.opset_import)
    for out in folded.graph.output:
        out.type.tensor_type.ClearField("shape")
    return folded, _constant_origins(model, folded)


def _whole_shapes_sliced(g) -> None:
    """A Shape with opset 15's start/end becomes the whole shape and a Slice of it. onnx-graphsurgeon 0.6 folds a
    Shape as the whole shape, start/end ignored, and a Gather or Slice after it then reads the wrong dims: a
    silently wrong constant (a reshape target), where its Slice folding is right."""
    import numpy as np
    import onnx_graphsurgeon as gs

    ranged = [n for n in g.nodes if n.op == "Shape" and {"start", "end"} & n.attrs.keys()]
    if not ranged:
        return
    fresh = onnx_proto.FreshNames(taken=set(g.tensors()) | {n.name for n in g.nodes})
    for node in ranged:
        start, end = node.attrs.pop("start", 0), node.attrs.pop("end", None)
        if start == 0 and end is None:
            continue
        out = node.outputs[0]
        whole = gs.Variable(fresh(f"{out.name}/whole"), dtype=np.int64)
        node.outputs = [whole]
        bounds = [gs.Constant(fresh(f"{out.name}/{k}"), np.asarray([v], np.int64))
                  for k, v in (("start", start), ("end", np.iinfo(np.int64).max if end is None else end),
                               ("axis", 0))]
        g.nodes.append(gs.Node("Slice", name=fresh(f"{node.name or out.name}/range"), inputs=[whole, *bounds],
                               outputs=[out]))
    g.toposort()


def _is_weight_transpose(node) -> bool:
    """Transpose(W) → MatMul: how exporters write `linear` on rank > 2. Kept unfolded so that the importer can
    recover `linear(x, W, b)` with W under its own name (plan.json and path agreement rely on it)."""
    import onnx_graphsurgeon as gs

    if node.op != "Transpose" or not isinstance(node.inputs[0], gs.Constant) or len(node.inputs[0].shape) != 2:
        return False
    users = node.outputs[0].outputs
    # A MatMul whose other operand is constant too is a weight-only subgraph: let it fold.
    return bool(users) and all(u.op == "MatMul" and u.inputs[1] is node.outputs[0]
                               and not isinstance(u.inputs[0], gs.Constant) for u in users)


def _constant_origins(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, str]:
    """For each constant in `after`, which initializers / Constant nodes of `before` it derives from, and whether
    the fold did arithmetic on them ("computed:") or only moved their elements ("folded:")."""
    producer = {o: n for n in before.graph.node for o in n.output}
    inits = {i.name for i in before.graph.initializer}
    origins: dict[str, str] = {}

    computed: set[str] = set()  # folds that did arithmetic on the way, not only moved elements

    def sources(name: str, seen: set[str]) -> set[str]:
        if name in inits:
            return {name}
        n = producer.get(name)
        if n is None or name in seen:
            return set()
        seen.add(name)
        if n.op_type == "Constant":
            return {n.output[0]}
        if n.op_type not in _LAYOUT_ONLY:
            computed.add(name)
        out: set[str] = set()
        for i in n.input:
            if i:
                out |= sources(i, seen)
        return out

    for init in after.graph.initializer:
        if init.name in inits:
            continue
        n = producer.get(init.name)
        root = init.name
        while n is not None and n.op_type == "Identity" and n.input[0] not in inits:
            root = n.input[0]
            n = producer.get(root)
        if n is not None and n.op_type == "Identity" and n.input[0] in inits:
            # torch.onnx writes parameters with equal values once and the others as Identity(first): an alias.
            origins[init.name] = "alias:" + n.input[0]
        elif n is not None and n.op_type == "Constant":
            origins[init.name] = "constant_node:" + (n.name or init.name)
        else:
            computed.clear()
            names = "|".join(sorted(sources(init.name, set())))
            origins[init.name] = ("computed:" if computed else "folded:") + names
    return origins


_LAYOUT_ONLY = {"Identity", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Flatten", "Cast", "Slice",
                "Split", "Gather", "Tile"}  # folding these only moves elements


# -- building the IR ---------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self, model: onnx.ModelProto, graph: Graph) -> None:
        self.graph = graph
        self.values: dict[str, Value] = {}
        self.types: dict[str, onnx.TypeProto] = {}
        self.node_names: set[str] = set()
        self.opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 0))
        for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
            self.types[vi.name] = vi.type

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...] | None, np.dtype]:
        t = self.types.get(name)
        if t is None or not t.HasField("tensor_type"):
            return None, np.dtype(np.float32)
        tt = t.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.dtype(np.float32)
        if not tt.HasField("shape"):
            return None, dtype
        dims: list[int | str] = []
        for d in tt.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
        return tuple(dims), dtype

    def const(self, name: str) -> np.ndarray | None:
        v = self.values.get(name)
        return v.data if v is not None and v.is_constant else None


def _build_graph(model: onnx.ModelProto, source: str, origins: dict[str, str]) -> Graph:
    opsets = {(o.domain or ""): o.version for o in model.opset_import}
    g = Graph(name=model.graph.name or "model", opset_imports=opsets, ir_version=model.ir_version,
              source=source)
    ctx = _Ctx(model, g)
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        origin = origins.get(init.name)
        if origin is None:
            prov = Provenance("onnx_initializer", init.name)
        elif origin.startswith("constant_node:"):
            prov = Provenance("onnx_constant_node", origin.split(":", 1)[1])
        elif origin.startswith("alias:"):
            prov = Provenance("onnx_initializer", init.name, (origin.split(":", 1)[1],))
        else:
            kind, _, names = origin.partition(":")
            prov = Provenance("folded", init.name, tuple(s for s in names.split("|") if s), kind == "computed")
        ctx.values[init.name] = Value(init.name, arr.shape, arr.dtype, data=arr, provenance=prov)
    for inp in model.graph.input:
        if inp.name in ctx.values:
            continue
        shape, dtype = ctx.shape_dtype(inp.name)
        v = Value(inp.name, shape, dtype)
        ctx.values[inp.name] = v
        g.inputs.append(v)
    for i, n in enumerate(model.graph.node):
        _import_node(ctx, n, i)
    for out in model.graph.output:
        if out.name not in ctx.values:
            raise GraphError(f"graph output '{out.name}' is produced by no node")
        g.outputs.append(ctx.values[out.name])
    _recognize_linear(g)
    for n in g.nodes:
        for v in n.outputs:
            if v.shape is None and (v.users or v in g.outputs):
                domain = n.opaque.domain if n.opaque is not None else ""
                hint = ("check --input-shape" if domain in ("", "ai.onnx") else
                        f"op '{n.opaque.op_type}' is from domain '{domain}', whose shapes onnx's shape inference "
                        "does not know")
                raise UnsupportedModelError(
                    f"no static shape could be inferred for '{v.name}' (output of node '{n.name}', {n.origin}); "
                    + hint)
    g.verify()
    return g


def _recognize_linear(g: Graph) -> None:
    """matmul(x, transpose(W)) [+ b] → linear(x, W, b), W and b constants (W: [out, in], b: [out])."""
    for t in list(g.nodes):
        if t.op != "transpose" or t.attrs["perm"] != [1, 0] or not t.inputs[0].is_constant:
            continue
        wt = t.outputs[0]
        if not wt.users or any(u.op != "matmul" or u.inputs[1] is not wt for u in wt.users):
            continue
        w = t.inputs[0]
        for mm in list(wt.users):
            out = mm.outputs[0]
            inputs = [mm.inputs[0], w]
            add = out.users[0] if len(out.users) == 1 and out not in g.outputs else None
            if add is not None and add.op == "add":
                bias = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
                if bias.is_constant and bias.shape == (w.shape[0],):
                    inputs.append(bias)
                    final = add.outputs[0]
                    add.detach()
                    g.nodes.remove(add)
                    mm.outputs = [final]
                    out = final
            mm.op, mm.attrs = "linear", {}
            mm.inputs = inputs
        t.detach()
        g.nodes.remove(t)


def _import_node(ctx: _Ctx, n: onnx.NodeProto, index: int) -> None:
    name = n.name or f"{n.op_type}_{index}"
    while name in ctx.node_names:
        name = f"{name}_{index}"
    ctx.node_names.add(name)
    inputs = [ctx.values.get(i) if i else None for i in n.input]
    for i, v in zip(n.input, inputs, strict=True):
        if i and v is None:
            raise GraphError(f"node '{name}' reads '{i}', which no node produces")
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    converted = None
    why = ""
    if n.domain in ("", "ai.onnx") and n.op_type in _CONVERTERS:
        why = later_schema_change(n, ctx.opset)
        if not why:
            converted = _CONVERTERS[n.op_type](ctx, n, attrs, inputs)
    if converted is None:
        names = list(n.output)
        while names and not names[-1]:
            names.pop()  # trailing omitted optional outputs are positional no-ops
        outputs = [_new_value(ctx, o) for o in names]
        ctx.graph.add_node("opaque", inputs, [o for o in outputs if o is not None], name=name, origin=name,
                           opaque=OpaqueInfo(n.op_type, n.domain, tuple(n.attribute), why=why))
        if any(o is None for o in outputs):
            # An omitted optional output in the middle: keep names aligned by materializing it.
            raise UnsupportedModelError(f"node '{name}' ({n.op_type}) has an omitted optional output")
        return
    op, new_attrs, new_inputs, n_outputs = converted
    outputs = [_new_value(ctx, o) for o in n.output[:n_outputs]]
    ctx.graph.add_node(op, new_inputs, outputs, new_attrs, name=name, origin=name)


def later_schema_change(n: onnx.NodeProto, opset: int) -> str:
    """Why node `n` of a model at `opset` cannot take the converter written for CONVERTER_OPSET's op ("" if it can)."""
    if opset <= CONVERTER_OPSET:
        return ""
    changed, added = _schema_change(n.op_type, opset)
    if changed:
        return f"op '{n.op_type}' at opset {opset} {changed} since opset {CONVERTER_OPSET}, which the importer maps"
    used = sorted(a.name for a in n.attribute if a.name in added)
    if used:
        return (f"sets {', '.join(repr(a) for a in used)}, added to '{n.op_type}' after opset {CONVERTER_OPSET}, "
                "which the importer maps")
    return ""


@functools.cache
def _schema_change(op_type: str, opset: int) -> tuple[str, frozenset[str]]:
    """How `op_type` at `opset` differs from CONVERTER_OPSET's: a description of a change in anything but wider type
    lists and new optional attributes ("" if none), and the names of those new attributes."""
    new = onnx.defs.get_schema(op_type, opset)
    if new.since_version <= CONVERTER_OPSET:
        return "", frozenset()
    old = onnx.defs.get_schema(op_type, CONVERTER_OPSET)

    def params(schema):
        return [(p.name, p.option, p.type_str, p.is_homogeneous) for p in [*schema.inputs, *schema.outputs]]

    def types(schema):
        return {t.type_param_str: set(t.allowed_type_strs) for t in schema.type_constraints}

    kept = {k: (a.type, a.required, a.default_value.SerializeToString()) for k, a in old.attributes.items()}
    now = {k: (a.type, a.required, a.default_value.SerializeToString()) for k, a in new.attributes.items()}
    added = frozenset(k for k in now.keys() - kept.keys() if not new.attributes[k].required)
    old_types, new_types = types(old), types(new)
    if params(old) != params(new) or old_types.keys() != new_types.keys():
        return "changed its inputs or outputs", added
    if any(not old_types[k] <= new_types[k] for k in old_types):
        return "dropped input or output types", added
    if any(now.get(k) != v for k, v in kept.items()) or len(now) - len(kept) != len(added):
        return "changed its attributes", added
    return "", added


def _new_value(ctx: _Ctx, name: str) -> Value | None:
    if not name:
        return None
    shape, dtype = ctx.shape_dtype(name)
    v = Value(name, shape, dtype)
    ctx.values[name] = v
    return v


# -- converters: ONNX node → (normalized op, attrs, inputs, number of outputs kept) ---------------------------
def _ints(v: Value) -> list[int]:
    """A constant operand's entries (axes, sizes, bounds); a scalar is one entry, as ONNX Runtime reads it."""
    return [int(d) for d in np.ravel(v.data)]


Converted = tuple[str, dict[str, Any], list[Value | None], int] | None
Converter = Callable[[_Ctx, onnx.NodeProto, dict[str, Any], list[Value | None]], Converted]
_CONVERTERS: dict[str, Converter] = {}


def _converter(*op_types: str):
    def register(fn: Converter) -> Converter:
        for t in op_types:
            _CONVERTERS[t] = fn
        return fn

    return register


_UNARY = {
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
    "Reciprocal": "reciprocal", "Neg": "neg", "Abs": "abs", "Erf": "erf", "Floor": "floor", "Ceil": "ceil",
    "Sin": "sin", "Cos": "cos", "Not": "not", "Sign": "sign", "Round": "round", "Identity": "identity",
    "Softplus": "softplus", "Mish": "mish", "HardSwish": "hard_swish",
}
_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Max": "max", "Min": "min",
    "Equal": "equal", "Less": "less", "Greater": "greater", "And": "and", "Or": "or",
}


@_converter(*_UNARY)
def _unary(ctx, n, attrs, inputs):
    return _UNARY[n.op_type], {}, inputs, 1


@_converter(*_BINARY)
def _binary(ctx, n, attrs, inputs):
    if len(inputs) != 2:
        return None
    return _BINARY[n.op_type], {}, inputs, 1


@_converter("HardSigmoid")
def _hard_sigmoid(ctx, n, attrs, inputs):
    return "hard_sigmoid", {"alpha": attrs.get("alpha", 0.2), "beta": attrs.get("beta", 0.5)}, inputs, 1


@_converter("LeakyRelu")
def _leaky_relu(ctx, n, attrs, inputs):
    return "leaky_relu", {"alpha": attrs.get("alpha", 0.01)}, inputs, 1


@_converter("Elu")
def _elu(ctx, n, attrs, inputs):
    return "elu", {"alpha": attrs.get("alpha", 1.0)}, inputs, 1


@_converter("Gelu")
def _gelu(ctx, n, attrs, inputs):
    return "gelu", {"approximate": _str(attrs.get("approximate", "none"))}, inputs, 1


@_converter("Clip")
def _clip(ctx, n, attrs, inputs):
    bounds = []
    for v in inputs[1:3]:
        if v is None:
            bounds.append(None)
        elif v.is_constant:
            bounds.append(float(v.data))
        else:
            return None
    bounds += [None] * (2 - len(bounds))
    return "clip", {"min": bounds[0], "max": bounds[1]}, inputs[:1], 1


@_converter("Cast")
def _cast(ctx, n, attrs, inputs):
    if attrs.get("saturate", 1) != 1:
        return None
    return "cast", {"to": int(attrs["to"])}, inputs, 1


@_converter("Dropout")
def _dropout(ctx, n, attrs, inputs):
    training = inputs[2] if len(inputs) > 2 else None
    if training is not None and (not training.is_constant or bool(training.data)):
        return None
    if len(n.output) > 1 and n.output[1]:
        return None  # the mask is read
    return "identity", {}, inputs[:1], 1


@_converter("Where")
def _where(ctx, n, attrs, inputs):
    return "where", {}, inputs, 1


def _explicit_pads(ctx: _Ctx, attrs, x: Value, kernel: Sequence[int], strides, dilations) -> list[int] | None:
    auto_pad = _str(attrs.get("auto_pad", "NOTSET"))
    nsp = len(kernel)
    if auto_pad == "NOTSET":
        return list(attrs.get("pads", [0] * (2 * nsp)))
    if auto_pad == "VALID":
        return [0] * (2 * nsp)
    if x.shape is None or not all(isinstance(d, int) for d in x.shape):
        return None
    begin, end = [], []
    for i in range(nsp):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return begin + end


@_converter("Conv")
def _conv(ctx, n, attrs, inputs):
    x, w = inputs[0], inputs[1]
    if w.shape is None:
        return None
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    nsp = len(kernel)
    strides = list(attrs.get("strides", [1] * nsp))
    dilations = list(attrs.get("dilations", [1] * nsp))
    pads = _explicit_pads(ctx, attrs, x, kernel, strides, dilations)
    if pads is None:
        return None
    new = {"kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dilations,
           "group": int(attrs.get("group", 1))}
    return "conv", new, inputs, 1


@_converter("ConvTranspose")
def _conv_transpose(ctx, n, attrs, inputs):
    w = inputs[1]
    if w.shape is None or "output_shape" in attrs or _str(attrs.get("auto_pad", "NOTSET")) != "NOTSET":
        return None
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    nsp = len(kernel)
    new = {"kernel_shape": kernel, "strides": list(attrs.get("strides", [1] * nsp)),
           "pads": list(attrs.get("pads", [0] * (2 * nsp))), "dilations": list(attrs.get("dilations", [1] * nsp)),
           "group": int(attrs.get("group", 1)), "output_padding": list(attrs.get("output_padding", [0] * nsp))}
    return "conv_transpose", new, inputs, 1


@_converter("Gemm")
def _gemm(ctx, n, attrs, inputs):
    a = {"alpha": float(attrs.get("alpha", 1.0)), "beta": float(attrs.get("beta", 1.0)),
         "transA": int(attrs.get("transA", 0)), "transB": int(attrs.get("transB", 0))}
    w = inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    plain = a == {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1}
    if plain and w.is_constant and (c is None or (c.is_constant and c.shape == (w.shape[0],))):
        return "linear", {}, inputs, 1
    return "gemm", a, inputs, 1


@_converter("MatMul")
def _matmul(ctx, n, attrs, inputs):
    return "matmul", {}, inputs, 1


@_converter("BatchNormalization")
def _batch_norm(ctx, n, attrs, inputs):
    if attrs.get("training_mode", 0):
        return None
    return "batch_norm", {"epsilon": float(attrs.get("epsilon", 1e-5))}, inputs, 1


@_converter("InstanceNormalization")
def _instance_norm(ctx, n, attrs, inputs):
    return "instance_norm", {"epsilon": float(attrs.get("epsilon", 1e-5))}, inputs, 1


@_converter("LayerNormalization")
def _layer_norm(ctx, n, attrs, inputs):
    if any(o for o in n.output[1:]) or attrs.get("stash_type", 1) != 1:
        return None
    return "layer_norm", {"axis": int(attrs.get("axis", -1)), "epsilon": float(attrs.get("epsilon", 1e-5))}, inputs, 1


@_converter("LSTM", "GRU", "RNN")
def _recurrent(ctx, n, attrs, inputs):
    """Kept as they are; the IR knows them so that their input features are channels W's columns consume."""
    x, w = inputs[0], inputs[1]
    if attrs.get("layout", 0) != 0 or not w.is_constant or x.shape is None or len(x.shape) != 3:
        return None  # batch-first layout, or weights computed at run time
    names = list(n.output)
    while names and not names[-1]:
        names.pop()
    # An output omitted before a read one (Y, when only the final state is read) gets a name: the IR's outputs
    # are positional. ONNX Runtime then writes it too.
    shapes = recurrent_shapes(x.shape, w.shape, int(attrs["hidden_size"]))
    for k, name in enumerate(names):
        if not name:
            fresh = f"{n.name or n.op_type}/{('Y', 'Y_h', 'Y_c')[k]}"
            while fresh in ctx.types or fresh in ctx.values:
                fresh += "_"
            ctx.types[fresh] = helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(x.dtype), shapes[k])
            n.output[k] = fresh
    return n.op_type.lower(), dict(attrs), inputs, len(names)


@_converter("Softmax", "LogSoftmax")
def _softmax(ctx, n, attrs, inputs):
    op = "softmax" if n.op_type == "Softmax" else "log_softmax"
    return op, {"axis": int(attrs.get("axis", -1))}, inputs, 1


@_converter("Concat")
def _concat(ctx, n, attrs, inputs):
    return "concat", {"axis": int(attrs["axis"])}, inputs, 1


@_converter("Split")
def _split(ctx, n, attrs, inputs):
    x = inputs[0]
    axis = int(attrs.get("axis", 0))
    if len(inputs) > 1 and inputs[1] is not None:
        if not inputs[1].is_constant:
            return None
        sizes = _ints(inputs[1])
    elif "split" in attrs:
        sizes = [int(s) for s in attrs["split"]]
    else:
        if x.shape is None or not isinstance(x.shape[axis], int):
            return None
        k = len(n.output)
        dim = x.shape[axis]
        chunk = -(-dim // k)
        sizes = [chunk] * (k - 1) + [dim - chunk * (k - 1)]
    if any(not o for o in n.output):
        return None
    return "split", {"axis": axis, "split": sizes}, inputs[:1], len(n.output)


@_converter("Slice")
def _slice(ctx, n, attrs, inputs):
    x = inputs[0]
    ops = [v for v in inputs[1:]]
    if any(v is not None and not v.is_constant for v in ops) or x.shape is None:
        return None
    starts = _ints(inputs[1])
    ends = _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    axes = [a % len(x.shape) for a in axes]
    # Clamp to the static dims, so rewrite sees plain ranges and the exporter writes exact bounds.
    starts2, ends2 = [], []
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        dim = x.shape[a]
        if not isinstance(dim, int):
            return None
        s2, e2, _ = slice(s, e, st).indices(dim)
        if st < 0 and e2 < 0:
            e2 = -dim - 1  # "before the first element" for a reversed slice
        starts2.append(s2)
        ends2.append(e2)
    return "slice", {"starts": starts2, "ends": ends2, "axes": axes, "steps": steps}, inputs[:1], 1


@_converter("Reshape")
def _reshape(ctx, n, attrs, inputs):
    out_shape, _ = ctx.shape_dtype(n.output[0])
    if not inputs[1].is_constant or out_shape is None or not all(isinstance(d, int) for d in out_shape):
        return None
    return "reshape", {"shape": [int(d) for d in out_shape]}, inputs[:1], 1


@_converter("Flatten")
def _flatten(ctx, n, attrs, inputs):
    return "flatten", {"axis": int(attrs.get("axis", 1))}, inputs, 1


@_converter("Squeeze", "Unsqueeze")
def _squeeze(ctx, n, attrs, inputs):
    x = inputs[0]
    if len(inputs) > 1 and inputs[1] is not None:
        if not inputs[1].is_constant:
            return None
        axes = _ints(inputs[1])
    elif "axes" in attrs:
        axes = list(attrs["axes"])
    elif n.op_type == "Squeeze" and x.shape is not None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    else:
        return None
    return n.op_type.lower(), {"axes": axes}, inputs[:1], 1


@_converter("Transpose")
def _transpose(ctx, n, attrs, inputs):
    x = inputs[0]
    if "perm" in attrs:
        perm = list(attrs["perm"])
    elif x.shape is not None:
        perm = list(range(len(x.shape)))[::-1]
    else:
        return None
    return "transpose", {"perm": perm}, inputs, 1


@_converter("MaxPool", "AveragePool")
def _pool(ctx, n, attrs, inputs):
    if len(n.output) > 1 and n.output[1]:
        return None  # indices output is read
    if attrs.get("storage_order", 0):
        return None
    kernel = list(attrs["kernel_shape"])
    nsp = len(kernel)
    strides = list(attrs.get("strides", [1] * nsp))
    dilations = list(attrs.get("dilations", [1] * nsp))
    pads = _explicit_pads(ctx, attrs, inputs[0], kernel, strides, dilations)
    if pads is None:
        return None
    new = {"kernel_shape": kernel, "strides": strides, "pads": pads, "ceil_mode": int(attrs.get("ceil_mode", 0))}
    if n.op_type == "MaxPool":
        new["dilations"] = dilations
        return "max_pool", new, inputs, 1
    if any(d != 1 for d in dilations):
        return None
    new["count_include_pad"] = int(attrs.get("count_include_pad", 0))
    return "avg_pool", new, inputs, 1


@_converter("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(ctx, n, attrs, inputs):
    return ("global_avg_pool" if n.op_type == "GlobalAveragePool" else "global_max_pool"), {}, inputs, 1


_REDUCE = {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max",
           "ReduceMin": "reduce_min", "ReduceL2": "reduce_l2", "ReduceProd": "reduce_prod"}


@_converter(*_REDUCE)
def _reduce(ctx, n, attrs, inputs):
    x = inputs[0]
    if len(inputs) > 1 and inputs[1] is not None:
        if not inputs[1].is_constant:
            return None
        axes = _ints(inputs[1])
    else:
        axes = list(attrs.get("axes", []))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0) or x.shape is None:
            return None
        axes = list(range(len(x.shape)))
    return _REDUCE[n.op_type], {"axes": axes, "keepdims": int(attrs.get("keepdims", 1))}, inputs[:1], 1


@_converter("Pad")
def _pad(ctx, n, attrs, inputs):
    x = inputs[0]
    if any(v is not None and not v.is_constant for v in inputs[1:]) or x.shape is None:
        return None
    pads = _ints(inputs[1])
    value = float(inputs[2].data) if len(inputs) > 2 and inputs[2] is not None else 0.0
    if len(inputs) > 3 and inputs[3] is not None:
        axes = [a % len(x.shape) for a in _ints(inputs[3])]
        full = [0] * (2 * len(x.shape))
        for i, a in enumerate(axes):
            full[a], full[a + len(x.shape)] = pads[i], pads[i + len(axes)]
        pads = full
    return "pad", {"pads": pads, "mode": _str(attrs.get("mode", "constant")), "value": value}, inputs[:1], 1


_RESIZE_DEFAULTS = {
    "mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_floor",
    "cubic_coeff_a": -0.75, "exclude_outside": 0, "extrapolation_value": 0.0, "antialias": 0,
    "keep_aspect_ratio_policy": "stretch",
}


@_converter("Resize")
def _resize(ctx, n, attrs, inputs):
    x = inputs[0]
    if any(v is not None and not v.is_constant for v in inputs[1:]) or "axes" in attrs:
        return None
    roi = inputs[1] if len(inputs) > 1 else None
    mode = _str(attrs.get("coordinate_transformation_mode", ""))
    if roi is not None and roi.data.size and mode == "tf_crop_and_resize":
        return None
    new: dict[str, Any] = {k: _str(attrs.get(k, d)) for k, d in _RESIZE_DEFAULTS.items()}
    scales = inputs[2] if len(inputs) > 2 else None
    sizes = inputs[3] if len(inputs) > 3 else None
    out_shape, _ = ctx.shape_dtype(n.output[0])
    if sizes is not None and sizes.data.size:
        new["sizes"] = [int(s) for s in sizes.data]
    elif scales is not None and scales.data.size:
        new["scales"] = [float(s) for s in scales.data]
    else:
        return None
    if x.shape is None or out_shape is None:
        return None
    return "resize", new, inputs[:1], 1


@_converter("Gather")
def _gather(ctx, n, attrs, inputs):
    return "gather", {"axis": int(attrs.get("axis", 0))}, inputs, 1


@_converter("Expand")
def _expand(ctx, n, attrs, inputs):
    if not inputs[1].is_constant:
        return None
    return "expand", {"shape": _ints(inputs[1])}, inputs[:1], 1


@_converter("Tile")
def _tile(ctx, n, attrs, inputs):
    if not inputs[1].is_constant:
        return None
    return "tile", {"repeats": _ints(inputs[1])}, inputs[:1], 1


@_converter("Einsum")
def _einsum(ctx, n, attrs, inputs):
    return "einsum", {"equation": _str(attrs["equation"])}, inputs, 1


def _str(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
