"""IR → ONNX.

Normalized ops are written as the ONNX ops they mean (lifted attributes become constant inputs again); ops with
no single ONNX equivalent (`linear` on rank > 2, `attention`, `silu`, `gelu` below opset 20) are written as their
exact ONNX decomposition. Opaque ONNX nodes are written back unchanged. Output is deterministic: the same graph
gives byte-identical bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UnsupportedModelError
from .graph import Graph, Node, Value

DEFAULT_OPSET = 18  # for graphs that did not come from ONNX (torch.export)
# The newest IR version ONNX Runtime 1.31 loads (checked: 13 loads, 14 is refused); onnx 1.23 writes 14.
MAX_IR_VERSION = 13


def export_onnx(graph: Graph, path: str | os.PathLike | None = None) -> onnx.ModelProto:
    """Build an ONNX model from `graph`; write it atomically to `path` when given (a model over protobuf's 2 GiB
    with its weights in `path`.data: `onnx_io.save`)."""
    ctx = _emitted(graph)
    model = ctx.model()
    if path is not None:
        from . import onnx_io

        onnx_io.save(model, path)
    return model


def export_onnx_external(graph: Graph, path: str | os.PathLike) -> onnx.ModelProto:
    """Write `graph` as `path` plus `path`.data holding its tensors of onnx_io.EXTERNAL_MIN_BYTES or more, straight
    from their arrays: no copy of the weights in memory (export_onnx's proto holds one). Not atomic: for scratch
    files (an ONNX Runtime session of a large model). Returns the model written (its weights external)."""
    from . import onnx_io

    path, data_name = os.fspath(path), onnx_io.data_file_name(path)
    with open(os.path.join(os.path.dirname(path), data_name), "wb") as data:
        model = _emitted(graph).model(data, data_name)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return model


def _emitted(graph: Graph) -> _Ctx:
    ctx = _Ctx(graph, graph.opset_imports.get("", DEFAULT_OPSET))
    for node in graph.nodes:
        ctx.emit_node(node)
    return ctx


class _Ctx:
    def __init__(self, graph: Graph, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[tuple[str, np.ndarray]] = []  # written into the model last (see `model`)
        self._init_names: set[str] = set()
        self._tmp = 0

    # -- helpers used by the emitters --------------------------------------------------------------------
    def name(self, v: Value | None) -> str:
        if v is None:
            return ""
        if v.is_constant and v.name not in self._init_names:
            self._init_names.add(v.name)
            self.initializers.append((v.name, v.data))
        return v.name

    def const(self, hint: str, array: Any, dtype: Any = np.int64) -> str:
        name = self.fresh(hint)
        self._init_names.add(name)
        self.initializers.append((name, np.asarray(array, dtype=dtype)))
        return name

    def fresh(self, hint: str) -> str:
        self._tmp += 1
        return f"{hint}__{self._tmp}"

    def add(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> None:
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))

    def emit_node(self, node: Node) -> None:
        if node.opaque is not None:
            if node.opaque.source != "onnx":
                raise UnsupportedModelError(
                    f"node '{node.name}' is the torch op '{node.opaque.op_type}', which has no ONNX export")
            proto = onnx.NodeProto()
            proto.op_type = node.opaque.op_type
            proto.domain = node.opaque.domain
            proto.name = node.name
            proto.input.extend(self.name(v) for v in node.inputs)
            proto.output.extend(v.name for v in node.outputs)
            proto.attribute.extend(node.opaque.attributes)
            self.nodes.append(proto)
            return
        emitter = _EMITTERS.get(node.op)
        if emitter is None:
            raise UnsupportedModelError(f"node '{node.name}': no ONNX export for op '{node.op}'")
        emitter(self, node, [self.name(v) for v in node.inputs], [v.name for v in node.outputs])

    def model(self, data: BinaryIO | None = None, data_name: str = "") -> onnx.ModelProto:
        """The model; with `data` (an open binary file, `data_name` beside the model), its large tensors written
        there and referenced as external data."""
        from .onnx_io import EXTERNAL_MIN_BYTES, write_external

        g = self.graph
        produced = {id(v) for n in g.nodes for v in n.outputs}
        # A graph output that is directly a constant still needs to exist in ONNX: as an initializer.
        for v in g.outputs:
            if id(v) not in produced and v.is_constant:
                self.name(v)
        value_info = [
            _value_info(v) for n in g.nodes for v in n.outputs if v.shape is not None and v not in g.outputs
        ]
        opsets = dict(g.opset_imports) or {"": self.opset}
        opsets[""] = self.opset
        if any(n.domain == "com.microsoft" for n in self.nodes):
            opsets.setdefault("com.microsoft", 1)
        opset_protos = [helper.make_opsetid(d, v) for d, v in sorted(opsets.items())]
        # The input's IR version, raised to what the opset was released with, capped at what the runtime loads.
        needed = min(helper.find_min_ir_version_for([helper.make_opsetid("", self.opset)]), MAX_IR_VERSION)
        ir = max(min(g.ir_version or needed, MAX_IR_VERSION), needed)
        # Built in place: helper.make_graph and make_model would copy every weight twice more (a 1 GiB model
        # would take 4 GiB at once); here each weight is copied once, into its tensor.
        model = onnx.ModelProto(ir_version=ir, producer_name="prune-compile")
        model.opset_import.extend(opset_protos)
        graph = model.graph
        graph.name = g.name
        graph.node.extend(self.nodes)
        graph.input.extend(_value_info(v) for v in g.inputs)
        graph.output.extend(_value_info(v) for v in g.outputs)
        graph.value_info.extend(value_info)
        for name, array in self.initializers:
            array, t = np.asarray(array, order="C"), graph.initializer.add()
            raw = _little_endian(array)
            if raw is None:
                t.CopyFrom(numpy_helper.from_array(array, name))  # strings, packed types: onnx's own writer
            elif data is not None and array.nbytes >= EXTERNAL_MIN_BYTES:
                write_external(t, name, list(array.shape), helper.np_dtype_to_tensor_dtype(array.dtype),
                               memoryview(raw).cast("B"), data, data_name)
            else:
                t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
                t.dims.extend(array.shape)
                t.raw_data = raw.tobytes()
        return model


def _little_endian(array: np.ndarray) -> np.ndarray | None:
    """`array` as the raw little-endian data numpy_helper.from_array writes for bools, ints and floats (not copied
    where it is so already); None for other types, which onnx's own writer handles."""
    if array.dtype.kind not in "biuf" or array.dtype.itemsize > 8:
        return None
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


def _value_info(v: Value) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(v.name, helper.np_dtype_to_tensor_dtype(v.dtype),
                                         None if v.shape is None else list(v.shape))


# -- emitters ---------------------------------------------------------------------------------------------
Emitter = Callable[[_Ctx, Node, list[str], list[str]], None]
_EMITTERS: dict[str, Emitter] = {}


def _emitter(*ops: str):
    def register(fn: Emitter) -> Emitter:
        for op in ops:
            _EMITTERS[op] = fn
        return fn

    return register


_SIMPLE = {
    "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "log": "Log", "sqrt": "Sqrt",
    "reciprocal": "Reciprocal", "neg": "Neg", "abs": "Abs", "erf": "Erf", "floor": "Floor", "ceil": "Ceil",
    "sin": "Sin", "cos": "Cos", "not": "Not", "sign": "Sign", "round": "Round", "identity": "Identity",
    "softplus": "Softplus", "mish": "Mish", "hard_swish": "HardSwish", "add": "Add", "sub": "Sub", "mul": "Mul",
    "div": "Div", "pow": "Pow", "max": "Max", "min": "Min", "equal": "Equal", "less": "Less",
    "greater": "Greater", "and": "And", "or": "Or", "where": "Where", "matmul": "MatMul",
    "global_avg_pool": "GlobalAveragePool", "global_max_pool": "GlobalMaxPool", "gather": "Gather",
    "concat": "Concat", "flatten": "Flatten", "transpose": "Transpose", "softmax": "Softmax",
    "log_softmax": "LogSoftmax", "batch_norm": "BatchNormalization", "instance_norm": "InstanceNormalization",
    "layer_norm": "LayerNormalization", "hard_sigmoid": "HardSigmoid", "leaky_relu": "LeakyRelu", "elu": "Elu",
    "cast": "Cast", "gemm": "Gemm", "einsum": "Einsum", "conv": "Conv", "conv_transpose": "ConvTranspose",
    "max_pool": "MaxPool", "avg_pool": "AveragePool", "lstm": "LSTM", "gru": "GRU", "rnn": "RNN",
}


@_emitter(*_SIMPLE)
def _simple(ctx: _Ctx, node: Node, ins: list[str], outs: list[str]) -> None:
    ctx.add(_SIMPLE[node.op], ins, outs, node.name, **node.attrs)


@_emitter("gelu")
def _gelu(ctx, node, ins, outs):
    approximate = node.attrs.get("approximate", "none")
    if ctx.opset >= 20:
        ctx.add("Gelu", ins, outs, node.name, approximate=approximate)
        return
    x, n = ins[0], node.name
    dtype = node.inputs[0].dtype
    inner = ctx.fresh(n + "_inner")
    if approximate == "tanh":
        cube = ctx.fresh(n + "_cube")
        ctx.add("Pow", [x, ctx.const(n + "_three", 3.0, dtype)], [cube], ctx.fresh(n + "_pow"))
        scaled = ctx.fresh(n + "_scaled")
        ctx.add("Mul", [cube, ctx.const(n + "_c", 0.044715, dtype)], [scaled], ctx.fresh(n + "_mul"))
        summed = ctx.fresh(n + "_sum")
        ctx.add("Add", [x, scaled], [summed], ctx.fresh(n + "_add"))
        arg = ctx.fresh(n + "_arg")
        ctx.add("Mul", [summed, ctx.const(n + "_k", math.sqrt(2 / math.pi), dtype)], [arg], ctx.fresh(n + "_mul"))
        ctx.add("Tanh", [arg], [inner], ctx.fresh(n + "_tanh"))
    else:
        arg = ctx.fresh(n + "_arg")
        ctx.add("Div", [x, ctx.const(n + "_sqrt2", math.sqrt(2.0), dtype)], [arg], ctx.fresh(n + "_div"))
        ctx.add("Erf", [arg], [inner], ctx.fresh(n + "_erf"))
    one = ctx.fresh(n + "_one_plus")
    ctx.add("Add", [inner, ctx.const(n + "_1", 1.0, dtype)], [one], ctx.fresh(n + "_add"))
    half = ctx.fresh(n + "_half_x")
    ctx.add("Mul", [x, ctx.const(n + "_half", 0.5, dtype)], [half], ctx.fresh(n + "_mul"))
    ctx.add("Mul", [half, one], outs, n)


@_emitter("silu")
def _silu(ctx, node, ins, outs):
    sig = ctx.fresh(node.name + "_sigmoid")
    ctx.add("Sigmoid", ins, [sig], ctx.fresh(node.name + "_sig"))
    ctx.add("Mul", [ins[0], sig], outs, node.name)


@_emitter("clip")
def _clip(ctx, node, ins, outs):
    dtype = node.inputs[0].dtype
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    lo_name = "" if lo is None else ctx.const(node.name + "_min", lo, dtype)
    hi_name = "" if hi is None else ctx.const(node.name + "_max", hi, dtype)
    ctx.add("Clip", [ins[0], lo_name, hi_name], outs, node.name)


@_emitter("linear")
def _linear(ctx, node, ins, outs):
    x = node.inputs[0]
    if x.rank == 2:
        ctx.add("Gemm", ins, outs, node.name, transB=1)
        return
    wt = ctx.fresh(node.name + "_weight_t")
    ctx.add("Transpose", [ins[1]], [wt], ctx.fresh(node.name + "_transpose"), perm=[1, 0])
    if len(ins) < 3 or not ins[2]:
        ctx.add("MatMul", [ins[0], wt], outs, node.name)
        return
    mm = ctx.fresh(node.name + "_matmul")
    ctx.add("MatMul", [ins[0], wt], [mm], ctx.fresh(node.name + "_mm"))
    ctx.add("Add", [mm, ins[2]], outs, node.name)


@_emitter("split")
def _split(ctx, node, ins, outs):
    ctx.add("Split", [ins[0], ctx.const(node.name + "_split", node.attrs["split"])], outs, node.name,
            axis=node.attrs["axis"])


@_emitter("slice")
def _slice(ctx, node, ins, outs):
    a = node.attrs
    names = [ctx.const(node.name + "_" + k, a[k]) for k in ("starts", "ends", "axes", "steps")]
    ctx.add("Slice", [ins[0], *names], outs, node.name)


@_emitter("reshape", "expand", "tile")
def _with_shape_input(ctx, node, ins, outs):
    op, key = {"reshape": ("Reshape", "shape"), "expand": ("Expand", "shape"), "tile": ("Tile", "repeats")}[node.op]
    ctx.add(op, [ins[0], ctx.const(node.name + "_" + key, node.attrs[key])], outs, node.name)


@_emitter("squeeze", "unsqueeze")
def _squeeze(ctx, node, ins, outs):
    op = "Squeeze" if node.op == "squeeze" else "Unsqueeze"
    ctx.add(op, [ins[0], ctx.const(node.name + "_axes", node.attrs["axes"])], outs, node.name)


_REDUCE = {"reduce_mean": "ReduceMean", "reduce_sum": "ReduceSum", "reduce_max": "ReduceMax",
           "reduce_min": "ReduceMin", "reduce_l2": "ReduceL2", "reduce_prod": "ReduceProd"}


@_emitter(*_REDUCE)
def _reduce(ctx, node, ins, outs):
    op = _REDUCE[node.op]
    axes, keepdims = node.attrs["axes"], node.attrs.get("keepdims", 1)
    if ctx.opset >= 18 or op == "ReduceSum":
        ctx.add(op, [ins[0], ctx.const(node.name + "_axes", axes)], outs, node.name, keepdims=keepdims)
    else:
        ctx.add(op, ins[:1], outs, node.name, axes=axes, keepdims=keepdims)


@_emitter("pad")
def _pad(ctx, node, ins, outs):
    a = node.attrs
    inputs = [ins[0], ctx.const(node.name + "_pads", a["pads"])]
    if a["mode"] == "constant":
        inputs.append(ctx.const(node.name + "_value", a["value"], node.inputs[0].dtype))
    ctx.add("Pad", inputs, outs, node.name, mode=a["mode"])


@_emitter("resize")
def _resize(ctx, node, ins, outs):
    a = dict(node.attrs)
    scales, sizes = a.pop("scales", None), a.pop("sizes", None)
    if ctx.opset < 18:
        for k in ("antialias", "keep_aspect_ratio_policy"):
            a.pop(k, None)
    inputs = [ins[0], ""]
    inputs.append("" if scales is None else ctx.const(node.name + "_scales", scales, np.float32))
    if sizes is not None:
        inputs.append(ctx.const(node.name + "_sizes", sizes))
    ctx.add("Resize", inputs, outs, node.name, **a)


@_emitter("attention")
def _attention(ctx, node, ins, outs):
    """Scaled dot-product attention as MatMul → scale → mask → Softmax → MatMul (exact, any opset)."""
    q, k = node.inputs[0], node.inputs[1]
    n = node.name
    dtype = q.dtype
    scale = node.attrs.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    perm = list(range(k.rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    kt = ctx.fresh(n + "_kT")
    ctx.add("Transpose", [ins[1]], [kt], ctx.fresh(n + "_transpose"), perm=perm)
    scores = ctx.fresh(n + "_scores")
    ctx.add("MatMul", [ins[0], kt], [scores], ctx.fresh(n + "_qk"))
    scaled = ctx.fresh(n + "_scaled")
    ctx.add("Mul", [scores, ctx.const(n + "_scale", scale, dtype)], [scaled], ctx.fresh(n + "_mul"))
    mask_name = ins[3] if len(ins) > 3 and ins[3] else None
    mask_dtype = node.inputs[3].dtype if mask_name else None
    if node.attrs.get("is_causal"):
        lq, lk = q.shape[-2], k.shape[-2]
        mask_name = ctx.const(n + "_causal", np.tril(np.ones((lq, lk), dtype=bool)), np.bool_)
        mask_dtype = np.dtype(bool)
    if mask_name is not None:
        masked = ctx.fresh(n + "_masked")
        if mask_dtype == np.dtype(bool):
            ctx.add("Where", [mask_name, scaled, ctx.const(n + "_neg_inf", -np.inf, dtype)], [masked],
                    ctx.fresh(n + "_where"))
        else:
            ctx.add("Add", [scaled, mask_name], [masked], ctx.fresh(n + "_add_mask"))
        scaled = masked
    probs = ctx.fresh(n + "_probs")
    ctx.add("Softmax", [scaled], [probs], ctx.fresh(n + "_softmax"), axis=-1)
    ctx.add("MatMul", [probs, ins[2]], outs, n)

