"""ONNX Runtime's fused ops (domain com.microsoft), as a model saved by ONNX Runtime's optimizer holds them, lowered
to the standard ops they stand for, so that the model imports like its unoptimized form: FusedConv, FusedGemm,
FusedMatMul, Gelu, BiasGelu, FastGelu, QuickGelu, SkipLayerNormalization, SkipSimplifiedLayerNormalization (RMSNorm),
BiasAdd. ONNX Runtime fuses them again when it loads the pruned model. Any other com.microsoft op, or one of these
with a form not lowered here (a skip norm whose statistics outputs are read), stays as it is and the importer names
it.

Semantics follow ONNX Runtime's contrib op schemas (defaults included); tests/test_contrib_ops.py checks every form
against ONNX Runtime's own kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import onnx_io
from .onnx_proto import FreshNames, default_opset

CONTRIB_DOMAIN = "com.microsoft"
_MAX_ROUNDS = 8  # a FusedMatMul's rank may need the ops before it lowered and their shapes inferred first


class _Lowering:
    """Fresh names, the constants made, and what shape inference knows, for one model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.fresh = FreshNames(model)
        self.consts: list[TensorProto] = []
        self.read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        self.types: dict[str, onnx.TypeProto] = {}
        self.refresh()

    def refresh(self) -> None:
        try:
            inferred = onnx_io.infer_shapes(self.model)
        except Exception:  # inference failing on a later node still leaves the shapes before it
            inferred = self.model
        self.types = {v.name: v.type for v in [*inferred.graph.input, *inferred.graph.value_info,
                                               *inferred.graph.output]}
        for t in self.model.graph.initializer:
            self.types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))

    def elem_type(self, name: str) -> int:
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None and t.tensor_type.elem_type else TensorProto.FLOAT

    def rank(self, name: str) -> int | None:
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    def scalar(self, hint: str, value: float, like: str) -> str:
        """A scalar constant of `like`'s element type."""
        dtype = helper.tensor_dtype_to_np_dtype(self.elem_type(like))
        name = self.fresh(hint)
        self.consts.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


Lowerer = Callable[[_Lowering, onnx.NodeProto], "list[onnx.NodeProto] | None"]
_LOWERERS: dict[str, Lowerer] = {}


def _lowers(*ops: str):
    def register(fn: Lowerer) -> Lowerer:
        for op in ops:
            _LOWERERS[op] = fn
        return fn
    return register


def lower_contrib_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the com.microsoft ops listed in the module docstring lowered: a copy where there is any, else
    `model` itself (the caller's proto is left as it is)."""
    if not any(n.domain == CONTRIB_DOMAIN and n.op_type in _LOWERERS for n in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    model = copy
    ctx = _Lowering(model)
    for _ in range(_MAX_ROUNDS):
        progress = False
        nodes: list[onnx.NodeProto] = []
        for n in model.graph.node:
            lowered = _LOWERERS[n.op_type](ctx, n) if n.domain == CONTRIB_DOMAIN and n.op_type in _LOWERERS else None
            nodes.extend(lowered if lowered is not None else [n])
            progress |= lowered is not None
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(ctx.consts)
        ctx.consts = []
        if not progress or not any(n.domain == CONTRIB_DOMAIN and n.op_type in _LOWERERS for n in nodes):
            break
        ctx.refresh()
    return model


def _attrs(n: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")


def _activation(ctx: _Lowering, n: onnx.NodeProto, x: str, y: str, kind: str,
                params: list[float]) -> list[onnx.NodeProto] | None:
    """`kind` (ONNX Runtime's fused activation names) from x to y; None for one not known."""
    name = f"{n.name}/{kind}"
    if kind in ("Relu", "Tanh", "Sigmoid"):
        return [helper.make_node(kind, [x], [y], name=name)]
    if kind == "LeakyRelu":
        return [helper.make_node(kind, [x], [y], name=name, alpha=params[0] if params else 0.01)]
    if kind == "HardSigmoid":
        alpha, beta = (params + [0.2, 0.5][len(params):])[:2]
        return [helper.make_node(kind, [x], [y], name=name, alpha=alpha, beta=beta)]
    if kind == "Clip" and len(params) == 2:
        low, high = ctx.scalar(f"{name}/min", params[0], x), ctx.scalar(f"{name}/max", params[1], x)
        return [helper.make_node(kind, [x, low, high], [y], name=name)]
    return None


def _then_activation(ctx: _Lowering, n: onnx.NodeProto, core: onnx.NodeProto, kind: str,
                     params: list[float]) -> list[onnx.NodeProto] | None:
    """`core` writing n's output, or into a fresh value that the activation `kind` reads."""
    if not kind:
        return [core]
    y = n.output[0]
    mid = ctx.fresh(f"{y}/pre_activation")
    del core.output[:]
    core.output.append(mid)
    act = _activation(ctx, n, mid, y, kind, params)
    return None if act is None else [core, *act]


@_lowers("FusedConv")
def _fused_conv(ctx: _Lowering, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    a = _attrs(n)
    conv_attrs = {k: v for k, v in a.items() if k not in ("activation", "activation_params")}
    inputs = list(n.input)
    conv = helper.make_node("Conv", inputs[:3], [n.output[0]], name=f"{n.name}/Conv", **conv_attrs)
    kind, params = _text(a.get("activation")), list(a.get("activation_params", []))
    if len(inputs) < 4 or not inputs[3]:
        return _then_activation(ctx, n, conv, kind, params)
    # Z: added to the conv's output before the activation.
    summed = ctx.fresh(f"{n.output[0]}/conv")
    conv.output[0] = summed
    add = helper.make_node("Add", [summed, inputs[3]], [n.output[0]], name=f"{n.name}/Add")
    rest = _then_activation(ctx, n, add, kind, params)
    return None if rest is None else [conv, *rest]


@_lowers("FusedGemm")
def _fused_gemm(ctx: _Lowering, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    a = _attrs(n)
    gemm_attrs = {k: a[k] for k in ("alpha", "beta", "transA", "transB") if k in a}
    gemm = helper.make_node("Gemm", list(n.input), [n.output[0]], name=f"{n.name}/Gemm", **gemm_attrs)
    params = [a[k] for k in ("activation_alpha", "activation_beta") if k in a]
    return _then_activation(ctx, n, gemm, _text(a.get("activation")), params)


@_lowers("FusedMatMul")
def _fused_matmul(ctx: _Lowering, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    a = _attrs(n)
    nodes, operands = [], []
    for k, (trans, batch) in enumerate(((a.get("transA", 0), a.get("transBatchA", 0)),
                                        (a.get("transB", 0), a.get("transBatchB", 0)))):
        x = n.input[k]
        if not trans and not batch:
            operands.append(x)
            continue
        rank = ctx.rank(x)
        if rank is None or rank < 2 or (batch and rank < 3):
            return None  # wait for shapes (or leave it: ONNX Runtime's kernel refuses these too)
        perm = list(range(rank))
        if batch:  # the first axis moves behind the other batch axes: [1, ..., r-2, 0, r-1]
            perm = [*perm[1:rank - 1], perm[0], perm[rank - 1]]
        if trans:
            perm[-2], perm[-1] = perm[-1], perm[-2]
        t = ctx.fresh(f"{x}/transposed")
        nodes.append(helper.make_node("Transpose", [x], [t], name=f"{n.name}/Transpose{k}", perm=perm))
        operands.append(t)
    alpha = a.get("alpha", 1.0)
    product = n.output[0] if alpha == 1.0 else ctx.fresh(f"{n.output[0]}/product")
    nodes.append(helper.make_node("MatMul", operands, [product], name=f"{n.name}/MatMul"))
    if alpha != 1.0:
        nodes.append(helper.make_node("Mul", [product, ctx.scalar(f"{n.name}/alpha", alpha, n.input[0])],
                                      [n.output[0]], name=f"{n.name}/Mul"))
    return nodes


def _erf_gelu(ctx: _Lowering, n: onnx.NodeProto, x: str, y: str) -> list[onnx.NodeProto]:
    """0.5 * x * (1 + erf(x / sqrt(2))), as exporters write GELU."""
    p = f"{n.name}/gelu"
    scaled, erf, plus, times = (ctx.fresh(f"{y}/{s}") for s in ("scaled", "erf", "plus_one", "times_x"))
    return [helper.make_node("Div", [x, ctx.scalar(f"{p}/sqrt2", math.sqrt(2.0), x)], [scaled], name=f"{p}/Div"),
            helper.make_node("Erf", [scaled], [erf], name=f"{p}/Erf"),
            helper.make_node("Add", [erf, ctx.scalar(f"{p}/one", 1.0, x)], [plus], name=f"{p}/Add"),
            helper.make_node("Mul", [x, plus], [times], name=f"{p}/Mul"),
            helper.make_node("Mul", [times, ctx.scalar(f"{p}/half", 0.5, x)], [y], name=f"{p}/Mul_half")]


def _biased(ctx: _Lowering, n: onnx.NodeProto, x: str, bias: str) -> tuple[list[onnx.NodeProto], str]:
    if not bias:
        return [], x
    summed = ctx.fresh(f"{n.output[0]}/biased")
    return [helper.make_node("Add", [x, bias], [summed], name=f"{n.name}/Add_bias")], summed


@_lowers("Gelu", "BiasGelu")
def _gelu(ctx: _Lowering, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    add, x = _biased(ctx, n, n.input[0], n.input[1] if len(n.input) > 1 else "")
    return add + _erf_gelu(ctx, n, x, n.output[0])


@_lowers("FastGelu")
def _fast_gelu(ctx: _Lowering, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """GELU's tanh approximation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
    add, x = _biased(ctx, n, n.input[0], n.input[1] if len(n.input) > 1 else "")
    y, p = n.output[0], f"{n.name}/fast_gelu"
    sq, cube, inner, outer, pre, th, plus, times = (
        ctx.fresh(f"{y}/{s}") for s in ("square", "cube", "inner", "outer", "pre_tanh", "tanh", "plus_one", "times_x"))
    return add + [
        helper.make_node("Mul", [x, x], [sq], name=f"{p}/Mul_square"),
        helper.make_node("Mul", [sq, x], [cube], name=f"{p}/Mul_cube"),
        helper.make_node("Mul", [cube, ctx.scalar(f"{p}/c", 0.044715, x)], [inner], name=f"{p}/Mul_c"),
        helper.make_node("Add", [x, inner], [outer], name=f"{p}/Add_x"),
        helper.make_node("Mul", [outer, ctx.scalar(f"{p}/k", math.sqrt(2.0 / math.pi), x)], [pre], name=f"{p}/Mul_k"),
        helper.make_node("Tanh", [pre], [th], name=f"{p}/Tanh"),
        helper.make_node("Add", [th, ctx.scalar(f"{p}/one", 1.0, x)], [plus], name=f"{p}/Add_one"),
        helper.make_node("Mul", [x, plus], [times], name=f"{p}/Mul_x"),
        helper.make_node("Mul", [times, ctx.scalar(f"{p}/half", 0.5, x)], [y], name=f"{p}/Mul_half")]


@_lowers("QuickGelu")
def _quick_gelu(ctx: _Lowering, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """x * sigmoid(alpha * x)."""
    x, y, p = n.input[0], n.output[0], f"{n.name}/quick_gelu"
    scaled, gate = ctx.fresh(f"{y}/scaled"), ctx.fresh(f"{y}/gate")
    alpha = _attrs(n).get("alpha", 1.702)
    return [helper.make_node("Mul", [x, ctx.scalar(f"{p}/alpha", alpha, x)], [scaled], name=f"{p}/Mul_alpha"),
            helper.make_node("Sigmoid", [scaled], [gate], name=f"{p}/Sigmoid"),
            helper.make_node("Mul", [x, gate], [y], name=f"{p}/Mul")]


def _skip_sum(ctx: _Lowering, n: onnx.NodeProto, bias: str) -> tuple[list[onnx.NodeProto], str] | None:
    """input + skip (+ bias), the fourth output of the skip norms; None when their statistics outputs are read."""
    outputs = list(n.output) + [""] * (4 - len(n.output))
    if any(o and o in ctx.read for o in outputs[1:3]):
        return None  # its mean and inverse standard deviation are read: not lowered
    x, skip = n.input[:2]
    summed = outputs[3] or ctx.fresh(f"{outputs[0]}/sum")
    if not bias:
        return [helper.make_node("Add", [x, skip], [summed], name=f"{n.name}/Add_skip")], summed
    partial = ctx.fresh(f"{summed}/partial")
    return [helper.make_node("Add", [x, skip], [partial], name=f"{n.name}/Add_skip"),
            helper.make_node("Add", [partial, bias], [summed], name=f"{n.name}/Add_bias")], summed


@_lowers("SkipLayerNormalization")
def _skip_layer_norm(ctx: _Lowering, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """LayerNormalization over the last axis of input + skip (+ bias); the sum is the fourth output."""
    inputs = list(n.input) + [""] * (5 - len(n.input))
    gamma, beta, bias = inputs[2:5]
    found = _skip_sum(ctx, n, bias)
    if found is None:
        return None
    nodes, summed = found
    if n.output[0]:
        eps = _attrs(n).get("epsilon", 1e-12)
        nodes.append(helper.make_node("LayerNormalization", [summed, gamma] + ([beta] if beta else []),
                                      [n.output[0]], name=f"{n.name}/LayerNormalization", axis=-1, epsilon=eps))
    return nodes


@_lowers("SkipSimplifiedLayerNormalization")
def _skip_rms_norm(ctx: _Lowering, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """RMSNorm over the last axis of input + skip (+ bias): s / sqrt(mean(s^2) + epsilon) * gamma."""
    inputs = list(n.input) + [""] * (4 - len(n.input))
    gamma, bias = inputs[2:4]
    found = _skip_sum(ctx, n, bias)
    if found is None:
        return None
    nodes, s = found
    if not n.output[0]:
        return nodes
    y, p = n.output[0], f"{n.name}/rms"
    sq, mean, shifted, root, normed = (ctx.fresh(f"{y}/{k}") for k in ("square", "mean", "plus_eps", "rms", "normed"))
    if default_opset(ctx.model) >= 18:  # axes became an input
        axes = ctx.fresh(f"{p}/axes")
        ctx.consts.append(numpy_helper.from_array(np.asarray([-1], np.int64), axes))
        reduce = helper.make_node("ReduceMean", [sq, axes], [mean], name=f"{p}/ReduceMean", keepdims=1)
    else:
        reduce = helper.make_node("ReduceMean", [sq], [mean], name=f"{p}/ReduceMean", axes=[-1], keepdims=1)
    eps = _attrs(n).get("epsilon", 1e-12)
    return nodes + [
        helper.make_node("Mul", [s, s], [sq], name=f"{p}/Mul_square"), reduce,
        helper.make_node("Add", [mean, ctx.scalar(f"{p}/epsilon", eps, s)], [shifted], name=f"{p}/Add_epsilon"),
        helper.make_node("Sqrt", [shifted], [root], name=f"{p}/Sqrt"),
        helper.make_node("Div", [s, root], [normed], name=f"{p}/Div"),
        helper.make_node("Mul", [normed, gamma], [y], name=f"{p}/Mul_gamma")]


@_lowers("BiasAdd")
def _bias_add(ctx: _Lowering, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, bias, skip = n.input[:3]
    partial = ctx.fresh(f"{n.output[0]}/biased")
    return [helper.make_node("Add", [x, bias], [partial], name=f"{n.name}/Add_bias"),
            helper.make_node("Add", [partial, skip], [n.output[0]], name=f"{n.name}/Add_skip")]
