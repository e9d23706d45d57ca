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
            inferred = onnx_io.infer_shapes(self.model, in_place=True)  # a copy of the caller's
        except Exception:  # inference failing on a later node still leaves the shapes before it
            inferred = self.model
        self.types = {v.name: v.type for v in [*inferred.graph.input, *inferred.graph.value_info,
                                               *inferred.graph.output]}
        self.initializers = {t.name: t for t in self.model.graph.initializer}
        for t in self.initializers.values():
            self.types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))

    def elem_type(self, name: str) -> int:
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None and t.tensor_type.elem_type else TensorProto.FLOAT

    def rank(self, name: str) -> int | None:
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    def dims(self, name: str) -> list[int | str | None] | None:
        """`name`'s dims as shape inference knows them (an int, a symbol, or None), None without a shape."""
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]

    def scalar(self, hint: str, value: float, like: str) -> str:
        """A scalar constant of `like`'s element type."""
        dtype = helper.tensor_dtype_to_np_dtype(self.elem_type(like))
        return self.constant(hint, np.asarray(value, dtype=dtype))

    def constant(self, hint: str, value: np.ndarray) -> str:
        name = self.fresh(hint)
        self.consts.append(numpy_helper.from_array(value, name))
        return name

    def initializer(self, name: str) -> np.ndarray | None:
        """The data of initializer `name`; None for another value or data not at hand (external)."""
        t = self.initializers.get(name)
        try:
            return None if t is None else numpy_helper.to_array(t)
        except Exception:  # external data the lowering cannot read: the node stays and is named
            return None


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
    # The bias first, as a layer's bias comes before the residual: ONNX Runtime's fusions look for that order.
    partial = ctx.fresh(f"{summed}/biased")
    return [helper.make_node("Add", [x, bias], [partial], name=f"{n.name}/Add_bias"),
            helper.make_node("Add", [partial, skip], [summed], name=f"{n.name}/Add_skip")], summed


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
        axes = ctx.constant(f"{p}/axes", np.asarray([-1], np.int64))
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


def _split_constant(ctx: _Lowering, name: str, data: np.ndarray, sizes: list[int], axis: int) -> list[str]:
    """Initializer `name` (`data`) cut along `axis` into q's, k's and v's parts, as constants of their own (so each
    projection is a weight of its own, as in the model before fusion)."""
    bounds = np.cumsum([0, *sizes])
    return [ctx.constant(f"{name}/{role}", np.ascontiguousarray(np.take(data, np.arange(lo, hi), axis=axis)))
            for role, lo, hi in zip("qkv", bounds[:-1], bounds[1:], strict=True)]


def _packed_bias(ctx: _Lowering, bias: str, sizes: list[int]) -> list[str] | None:
    """q's, k's and v's parts of a packed bias initializer ("" each without a bias); None for a bias that is not an
    initializer of sum(sizes) entries (nothing is made then)."""
    if not bias:
        return ["", "", ""]
    data = ctx.initializer(bias)
    if data is None or data.shape != (sum(sizes),):
        return None
    return _split_constant(ctx, bias, data, sizes, 0)


def _positions(ctx: _Lowering, n: onnx.NodeProto, x: str, axis: int, hint: str) -> tuple[list[onnx.NodeProto], str]:
    """0, 1, ..., x.shape[axis] - 1 (int64), computed from x's shape so that a symbolic length stays one."""
    p = f"{n.name}/{hint}"
    shape, length, out = (ctx.fresh(f"{p}/{s}") for s in ("shape", "length", "positions"))
    index = ctx.constant(f"{p}/axis", np.asarray(axis, np.int64))
    zero, one = ctx.constant(f"{p}/zero", np.asarray(0, np.int64)), ctx.constant(f"{p}/one", np.asarray(1, np.int64))
    return [helper.make_node("Shape", [x], [shape], name=f"{p}/Shape"),
            helper.make_node("Gather", [shape, index], [length], name=f"{p}/Gather", axis=0),
            helper.make_node("Range", [zero, length, one], [out], name=f"{p}/Range")], out


def _unsqueeze(ctx: _Lowering, n: onnx.NodeProto, x: str, axes: list[int], hint: str) -> tuple[onnx.NodeProto, str]:
    out = ctx.fresh(f"{x}/unsqueezed")
    axes_name = ctx.constant(f"{n.name}/{hint}_axes", np.asarray(axes, np.int64))
    return helper.make_node("Unsqueeze", [x, axes_name], [out], name=f"{n.name}/{hint}_Unsqueeze"), out


def _mask_form(ctx: _Lowering, mask: str, query: str) -> str | None:
    """How ONNX Runtime's attention kernels read `mask`: "raw" (0/1 per key, [B, T] or [B, S, T]), "ends" (key
    lengths [B]: right padding), "ends_starts" ([2B]: lengths, then first kept keys: left padding), "" for no mask;
    None for a form not lowered (Megatron's 4D mask, GPT's [3B + 2])."""
    if not mask:
        return ""
    dims, query_dims = ctx.dims(mask), ctx.dims(query)
    if dims is None or query_dims is None:
        return None
    if len(dims) in (2, 3):
        return "raw"
    batch = query_dims[0]
    if len(dims) == 1 and batch is not None and dims[0] == batch:
        return "ends"
    if len(dims) == 1 and isinstance(batch, int) and dims[0] == 2 * batch:
        return "ends_starts"
    return None


def _mask_bias(ctx: _Lowering, n: onnx.NodeProto, mask: str, form: str, q: str, k: str, causal: bool,
               filter_value: float) -> tuple[list[onnx.NodeProto], list[str]]:
    """The additive terms ONNX Runtime's kernels put on the scores [B, N, S, T]: filter_value (default -10000)
    where the mask hides a key, and, when causal, filter_value again above the diagonal (added, as there: a key
    hidden by both gets it twice). q: [B, S, *], k: [B, T, *]. Each term is written as exporters write BERT's mask,
    (1 - keep[:, None, None, :]) * filter_value, so that ONNX Runtime's transformer optimizer fuses it again."""
    nodes: list[onnx.NodeProto] = []
    keeps: list[tuple[str, list[int]]] = []  # a boolean keep and the axes that make it broadcast to the scores
    p = f"{n.name}/mask"
    if form == "raw":
        keep = ctx.fresh(f"{p}/keep")
        nodes.append(helper.make_node("Greater", [mask, ctx.scalar(f"{p}/zero", 0, mask)], [keep],
                                      name=f"{p}/Greater"))
        keeps.append((keep, [1, 2] if len(ctx.dims(mask) or []) == 2 else [1]))
    elif form in ("ends", "ends_starts"):
        made, positions = _positions(ctx, n, k, 1, "key_positions")
        nodes += made
        lengths = ctx.fresh(f"{mask}/int64")
        nodes.append(helper.make_node("Cast", [mask], [lengths], name=f"{p}/Cast", to=TensorProto.INT64))
        bounds = [lengths]
        if form == "ends_starts":
            bounds = [ctx.fresh(f"{mask}/ends"), ctx.fresh(f"{mask}/starts")]
            nodes.append(helper.make_node("Split", [lengths], bounds, name=f"{p}/Split", axis=0))
        tests = []
        for bound, op in zip(bounds, ("Less", "GreaterOrEqual"), strict=False):
            unsqueeze, column = _unsqueeze(ctx, n, bound, [1], f"mask_{op}")
            tests.append(ctx.fresh(f"{p}/{op}"))
            nodes += [unsqueeze, helper.make_node(op, [positions, column], [tests[-1]], name=f"{p}/{op}")]
        keep = tests[0]
        if len(tests) == 2:
            keep = ctx.fresh(f"{p}/keep")
            nodes.append(helper.make_node("And", tests, [keep], name=f"{p}/And"))
        keeps.append((keep, [1, 2]))
    if causal:
        made_rows, rows = _positions(ctx, n, q, 1, "query_positions")
        made_cols, cols = _positions(ctx, n, k, 1, "causal_key_positions")
        row_node, rows = _unsqueeze(ctx, n, rows, [1], "rows")
        col_node, cols = _unsqueeze(ctx, n, cols, [0], "cols")
        keep = ctx.fresh(f"{n.name}/causal/keep")
        nodes += [*made_rows, *made_cols, row_node, col_node,
                  helper.make_node("LessOrEqual", [cols, rows], [keep], name=f"{n.name}/causal/LessOrEqual")]
        keeps.append((keep, []))
    terms = []
    like = n.input[0]  # the scores' element type
    for keep, axes in keeps:
        for axis in axes:  # one Unsqueeze per axis, as exporters write [:, None, None, :]
            unsqueeze, keep = _unsqueeze(ctx, n, keep, [axis], f"mask_{axis}")
            nodes.append(unsqueeze)
        kept, hidden, term = ctx.fresh(f"{keep}/float"), ctx.fresh(f"{keep}/hidden"), ctx.fresh(f"{keep}/bias")
        nodes += [helper.make_node("Cast", [keep], [kept], name=f"{kept}/Cast", to=ctx.elem_type(like)),
                  helper.make_node("Sub", [ctx.scalar(f"{p}/one", 1.0, like), kept], [hidden], name=f"{hidden}/Sub"),
                  helper.make_node("Mul", [hidden, ctx.scalar(f"{p}/filter", filter_value, like)], [term],
                                   name=f"{term}/Mul")]
        terms.append(term)
    return nodes, terms


def _heads(ctx: _Lowering, n: onnx.NodeProto, q: str, k: str, v: str, sizes: list[int], heads: int, attrs: dict,
           mask: str, form: str, attention_bias: str, causal: bool, y: str) -> list[onnx.NodeProto]:
    """softmax(scale * Q K^T + masks + attention_bias) V over `heads` heads, as the unfused model computes it:
    q [B, S, hq], k [B, T, hk], v [B, T, hv] -> y [B, S, hv]."""
    p = f"{n.name}/attention"
    nodes: list[onnx.NodeProto] = []
    split = []
    for x, size, perm, role in ((q, sizes[0], [0, 2, 1, 3], "q"), (k, sizes[1], [0, 2, 3, 1], "k"),
                                (v, sizes[2], [0, 2, 1, 3], "v")):
        shaped, moved = ctx.fresh(f"{x}/heads"), ctx.fresh(f"{x}/heads_moved")
        target = ctx.constant(f"{p}/{role}_heads_shape", np.asarray([0, 0, heads, size // heads], np.int64))
        nodes += [helper.make_node("Reshape", [x, target], [shaped], name=f"{p}/{role}_Reshape"),
                  helper.make_node("Transpose", [shaped], [moved], name=f"{p}/{role}_Transpose", perm=perm)]
        split.append(moved)
    scores, scaled = ctx.fresh(f"{p}/scores"), ctx.fresh(f"{p}/scaled")
    nodes.append(helper.make_node("MatMul", split[:2], [scores], name=f"{p}/MatMul_qk"))
    if attrs.get("scale", 0.0):
        nodes.append(helper.make_node("Mul", [scores, ctx.scalar(f"{p}/scale", attrs["scale"], n.input[0])],
                                      [scaled], name=f"{p}/Mul_scale"))
    else:  # the default (0 too), 1 / sqrt(head size), as exporters write it
        root = ctx.scalar(f"{p}/sqrt_head_size", math.sqrt(sizes[0] // heads), n.input[0])
        nodes.append(helper.make_node("Div", [scores, root], [scaled], name=f"{p}/Div_scale"))
    made, terms = _mask_bias(ctx, n, mask, form, q, k, causal, attrs.get("mask_filter_value", -10000.0))
    nodes += made
    for term in [*terms, *([attention_bias] if attention_bias else [])]:
        biased = ctx.fresh(f"{p}/biased")
        nodes.append(helper.make_node("Add", [scaled, term], [biased], name=f"{biased}/Add"))
        scaled = biased
    probs, context, moved = ctx.fresh(f"{p}/probs"), ctx.fresh(f"{p}/context"), ctx.fresh(f"{p}/context_moved")
    target = ctx.constant(f"{p}/merged_shape", np.asarray([0, 0, sizes[2]], np.int64))
    return nodes + [helper.make_node("Softmax", [scaled], [probs], name=f"{p}/Softmax", axis=-1),
                    helper.make_node("MatMul", [probs, split[2]], [context], name=f"{p}/MatMul_v"),
                    helper.make_node("Transpose", [context], [moved], name=f"{p}/Transpose", perm=[0, 2, 1, 3]),
                    helper.make_node("Reshape", [moved, target], [y], name=f"{p}/Reshape")]


def _project(ctx: _Lowering, n: onnx.NodeProto, x: str, weight: str, bias: str, out: str) -> list[onnx.NodeProto]:
    """x @ weight + bias into `out` (either may be absent)."""
    nodes = []
    if weight:
        product = ctx.fresh(f"{out}/product") if bias else out
        nodes.append(helper.make_node("MatMul", [x, weight], [product], name=f"{out}/MatMul"))
        x = product
    if bias:
        nodes.append(helper.make_node("Add", [x, bias], [out], name=f"{out}/Add"))
    return nodes


def _cache_or_rotary(ctx: _Lowering, n: onnx.NodeProto, cache_inputs: list[str]) -> bool:
    """A key/value cache (past in, present out) or rotary embeddings: forms not lowered."""
    return (any(cache_inputs) or bool(_attrs(n).get("do_rotary", 0))
            or any(o and o in ctx.read for o in n.output[1:]))


@_lowers("Attention")
def _attention(ctx: _Lowering, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """Packed Q/K/V projection weights [D, hq + hk + hv] (ONNX Runtime's BERT fusion) and attention."""
    a = _attrs(n)
    x, weights, bias, mask, past, attention_bias, past_length = (list(n.input) + [""] * 7)[:7]
    w = ctx.initializer(weights)
    if _cache_or_rotary(ctx, n, [past, past_length]) or w is None or w.ndim != 2 or ctx.rank(x) != 3:
        return None
    heads = a["num_heads"]
    sizes = list(a.get("qkv_hidden_sizes", [])) or [w.shape[1] // 3] * 3
    form = _mask_form(ctx, mask, x)
    if form is None or sum(sizes) != w.shape[1] or sizes[0] != sizes[1] or any(s % heads for s in sizes):
        return None
    bs = _packed_bias(ctx, bias, sizes)
    if bs is None:
        return None
    ws = _split_constant(ctx, weights, w, sizes, 1)
    qkv = [ctx.fresh(f"{n.name}/{role}") for role in "qkv"]
    nodes = [m for out, wr, br in zip(qkv, ws, bs, strict=True) for m in _project(ctx, n, x, wr, br, out)]
    return nodes + _heads(ctx, n, *qkv, sizes, heads, a, mask, form, attention_bias, bool(a.get("unidirectional", 0)),
                          n.output[0])


@_lowers("MultiHeadAttention")
def _multi_head_attention(ctx: _Lowering, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """Attention over projected query, key and value [B, *, hidden] with their packed bias (ONNX Runtime's fusion for
    CLIP, SAM, diffusion models)."""
    a = _attrs(n)
    query, key, value, bias, mask, attention_bias, *cache = (list(n.input) + [""] * 10)[:10]
    dims = [ctx.dims(t) for t in (query, key, value)] if key and value else None
    if (_cache_or_rotary(ctx, n, cache) or a.get("unidirectional", 0) or dims is None
            or any(d is None or len(d) != 3 or not isinstance(d[2], int) for d in dims)):
        return None  # packed Q/K/V, key and value already split into heads, a cache, or causal
    heads, sizes = a["num_heads"], [d[2] for d in dims]
    form = _mask_form(ctx, mask, query)
    bs = None if form is None or sizes[0] != sizes[1] or any(s % heads for s in sizes) else \
        _packed_bias(ctx, bias, sizes)
    if bs is None:
        return None
    inputs = (query, key, value)
    qkv = [ctx.fresh(f"{n.name}/{role}") if b else t for t, b, role in zip(inputs, bs, "qkv", strict=True)]
    nodes = [m for t, out, b in zip(inputs, qkv, bs, strict=True) if b for m in _project(ctx, n, t, "", b, out)]
    return nodes + _heads(ctx, n, *qkv, sizes, heads, a, mask, form, attention_bias, False, n.output[0])


@_lowers("EmbedLayerNormalization")
def _embed_layer_norm(ctx: _Lowering, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """BERT's embeddings: word + position (+ segment) rows, layer-normalized; mask_index counts each row's mask
    entries equal to 1 (zeros without a mask), as ONNX Runtime's kernel does."""
    ids, segments, words, positions, segment_table, gamma, beta, mask, position_ids = (list(n.input) + [""] * 9)[:9]
    y, mask_index, embedding_sum = (list(n.output) + [""] * 3)[:3]
    if bool(segments) != bool(segment_table):
        return None
    p = f"{n.name}/embed"
    rows = [ctx.fresh(f"{p}/{k}_rows") for k in ("word", "position", "segment")]
    nodes = [helper.make_node("Gather", [words, ids], [rows[0]], name=f"{p}/Gather_word")]
    if not position_ids:
        made, position_ids = _positions(ctx, n, ids, 1, "positions")
        nodes += made
    nodes.append(helper.make_node("Gather", [positions, position_ids], [rows[1]], name=f"{p}/Gather_position"))
    if segments:
        nodes.append(helper.make_node("Gather", [segment_table, segments], [rows[2]], name=f"{p}/Gather_segment"))
    summed = embedding_sum or ctx.fresh(f"{p}/sum")
    partial = ctx.fresh(f"{p}/word_position") if segments else summed
    nodes.append(helper.make_node("Add", rows[:2], [partial], name=f"{p}/Add_position"))
    if segments:
        nodes.append(helper.make_node("Add", [partial, rows[2]], [summed], name=f"{p}/Add_segment"))
    nodes.append(helper.make_node("LayerNormalization", [summed, gamma, beta], [y], name=f"{p}/LayerNormalization",
                                  axis=-1, epsilon=_attrs(n).get("epsilon", 1e-12)))
    if mask_index and mask:
        ones, counted = ctx.fresh(f"{mask}/is_one"), ctx.fresh(f"{mask}/is_one_int32")
        axes = ctx.constant(f"{p}/mask_axes", np.asarray([1], np.int64))
        nodes += [helper.make_node("Equal", [mask, ctx.scalar(f"{p}/one", 1, mask)], [ones], name=f"{p}/Equal"),
                  helper.make_node("Cast", [ones], [counted], name=f"{p}/Cast", to=TensorProto.INT32),
                  helper.make_node("ReduceSum", [counted, axes], [mask_index], name=f"{p}/ReduceSum", keepdims=0)]
    elif mask_index:
        batch = ctx.fresh(f"{p}/batch")
        nodes += [helper.make_node("Shape", [ids], [batch], name=f"{p}/Shape_batch", start=0, end=1),
                  helper.make_node("ConstantOfShape", [batch], [mask_index], name=f"{p}/zeros",
                                   value=numpy_helper.from_array(np.zeros(1, np.int32)))]
    return nodes
