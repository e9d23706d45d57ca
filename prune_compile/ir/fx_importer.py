"""torch.export (ATen FX graph) → IR.

Parameters, buffers and lifted constants become constant values named by their `state_dict` keys. A node whose
tensor inputs are all constant (weight-only subgraphs such as Swin's relative-position bias or its shifted-window
mask) is evaluated here and becomes one folded constant, as the ONNX importer's constant folding does, so both
paths see the same graph. Every other ATen op maps to normalized ops (`ATEN` table) or to a torch `opaque` node.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx

from ..errors import UnsupportedModelError
from .fold_index_map import IndexMap, fold_index_map, identity_map
from .fx_recurrent import RECURRENT_ATEN, convert_recurrent
from .graph import Graph, OpaqueInfo, Provenance, Value

aten = torch.ops.aten
_getitem = operator.getitem

# Ops whose result depends only on the input's shape and dtype, never on its values: always foldable.
_METADATA_ONLY = {
    aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.new_empty.default,
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default,
}
# Folding these only moves a tensor's elements: a constant folded from one parameter through them is that
# parameter, which torch surgery can slice (any other op makes the fold `computed`).
_LAYOUT_ONLY = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.permute.default, aten.transpose.int,
    aten.t.default, aten.clone.default, aten.detach.default, aten.alias.default, aten.contiguous.default,
    aten.lift_fresh_copy.default, aten._to_copy.default, aten.flatten.using_ints, aten.split.Tensor,
    aten.split_with_sizes.default, aten.unbind.int, aten.slice.Tensor, aten.select.int, aten.chunk.default,
    aten.cat.default, aten.stack.default,
}
# Nondeterministic ops are never folded.
_RANDOM = {aten.rand.default, aten.randn.default, aten.rand_like.default, aten.randn_like.default,
           aten.bernoulli.default, aten.dropout.default, aten.native_dropout.default}
# Ops that assert or record metadata and produce nothing the graph reads.
_SKIP = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}


def import_torch_module(
    module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], name: str | None = None
) -> Graph:
    """Export `module` (in eval mode) with torch.export on static example inputs and import it."""
    module = module.eval()
    try:
        ep = torch.export.export(module, tuple(example_inputs))
    except Exception as e:
        raise UnsupportedModelError(f"torch.export failed for {type(module).__name__}: {_first_line(e)}") from e
    return import_exported_program(ep, name=name or type(module).__name__)


def import_exported_program(ep: torch.export.ExportedProgram, name: str = "model") -> Graph:
    """Import an ExportedProgram. Decompositions are limited to functionalization so high-level ops survive."""
    ep = ep.run_decompositions({})
    return _Importer(ep, name).run()


class _Importer:
    def __init__(self, ep: torch.export.ExportedProgram, name: str) -> None:
        self.ep = ep
        self.graph = Graph(name=name, source="torch.export")
        self.env: dict[torch.fx.Node, Any] = {}  # fx node → Value | tuple of Values | python scalar
        self.real: dict[torch.fx.Node, Any] = {}  # fx node → real torch tensor(s), for constant ones
        self.tuple_prov: dict[torch.fx.Node, Provenance] = {}  # folded nodes with several outputs
        self.names: set[str] = set()  # value names
        self.node_names: set[str] = set()

    # -- driver ------------------------------------------------------------------------------------------
    def run(self) -> Graph:
        sig = self.ep.graph_signature
        kinds: dict[str, tuple[str, str]] = {}
        for spec in sig.input_specs:
            kinds[spec.arg.name] = (spec.kind.name, spec.target or "")
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node, *kinds.get(node.name, ("USER_INPUT", "")))
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                for out in node.args[0]:
                    v = self.env.get(out)
                    if not isinstance(v, Value):
                        raise UnsupportedModelError(f"graph output '{out}' is not a tensor")
                    self.graph.outputs.append(v)
        # Constant outputs that nothing else reads are legal; everything else must be reachable.
        self.graph.cleanup()
        self.graph.verify()
        return self.graph

    def _placeholder(self, node: torch.fx.Node, kind: str, target: str) -> None:
        if kind == "USER_INPUT":
            v = self._value_from_meta(node.name, node)
            self.graph.inputs.append(v)
            self.env[node] = v
            return
        if kind == "PARAMETER":
            tensor, prov = self.ep.state_dict[target], Provenance("torch_parameter", target)
        elif kind == "BUFFER":
            tensor = self.ep.state_dict[target] if target in self.ep.state_dict else self.ep.constants[target]
            prov = Provenance("torch_buffer", target)
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            tensor, prov = self.ep.constants[target], Provenance("torch_constant", target)
        else:
            raise UnsupportedModelError(f"input '{node.name}' of kind {kind} is not supported")
        if not isinstance(tensor, torch.Tensor):
            raise UnsupportedModelError(f"input '{target}' ({kind}) is not a tensor")
        tensor = tensor.detach()
        self.real[node] = tensor
        self.env[node] = self._const(target, tensor, prov)

    def _call(self, node: torch.fx.Node) -> None:
        target = node.target
        if target is _getitem:
            src, idx = node.args
            if src in self.real:
                self.real[node] = self.real[src][idx]
                prov = self._folded_prov([src])
                if idx == 0 and src in self.tuple_prov:
                    prov = dataclasses.replace(prov, index_map=self.tuple_prov[src].index_map)
                self.env[node] = self._const(node.name, self.real[node], prov)
                return
            parts = self.env[src]
            if not isinstance(parts, tuple) or parts[idx] is None:
                raise UnsupportedModelError(f"node '{node.name}' reads output {idx} of '{src}', which is not kept")
            self.env[node] = parts[idx]
            return
        if target in _SKIP:
            return
        tensor_inputs = [n for n in node.all_input_nodes]
        foldable = target not in _RANDOM and (
            target in _METADATA_ONLY or all(n in self.real for n in tensor_inputs)
        )
        if foldable:
            self._fold(node)
            return
        conv = ATEN.get(target)
        if conv is None:
            self._opaque(node)
            return
        self.env[node] = conv(self, node)

    def _fold(self, node: torch.fx.Node) -> None:
        def real(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                if a in self.real:
                    return self.real[a]
                val = a.meta["val"]  # metadata-only op: any tensor of the right shape and dtype will do
                return torch.zeros(val.shape, dtype=val.dtype)
            if isinstance(a, (list, tuple)):
                return type(a)(real(x) for x in a)
            return a

        args = real(list(node.args))
        kwargs = {k: real(v) for k, v in node.kwargs.items()}
        with torch.no_grad():
            result = node.target(*args, **kwargs)
        self.real[node] = result
        sources = [n for n in node.all_input_nodes if n in self.real]
        prov = self._folded_prov(sources, computed=node.target not in _LAYOUT_ONLY)
        index_map = self._fold_index_map(node, result, prov.sources)
        if isinstance(result, torch.Tensor):
            self.env[node] = self._const(node.name, result, dataclasses.replace(prov, index_map=index_map))
        else:  # a tuple (batch_norm in training mode: weight standardization): its items name these sources
            self.tuple_prov[node] = dataclasses.replace(prov, index_map=index_map)  # the map of item 0

    def _folded_prov(self, sources: Sequence[torch.fx.Node], computed: bool = False) -> Provenance:
        names: set[str] = set()
        for s in sources:
            v = self.env.get(s)
            prov = self.tuple_prov.get(s) or (v.provenance if isinstance(v, Value) else None)
            if prov is not None:
                names.update(prov.sources if prov.kind == "folded" else (prov.name,))
                computed = computed or prov.computed
        return Provenance("folded", "", tuple(sorted(names)), computed)

    def _fold_index_map(self, node: torch.fx.Node, result: Any, sources: Sequence[str]) -> IndexMap | None:
        """The index map of a folded result (of its first item, for a tuple)."""
        first = result[0] if isinstance(result, (tuple, list)) and result else result
        if not isinstance(first, torch.Tensor):
            return None
        if node.target in _METADATA_ONLY:
            return ()
        index_map = fold_index_map(
            node.target, node.args, first.shape, self._index_map,
            lambda n: tuple(self.real[n].shape) if n in self.real else tuple(n.meta["val"].shape),
            lambda a: isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor))
        if index_map is not None and {name for name, _ in index_map} != set(sources):
            return None  # a map must account for every source, or surgery would leave one unsliced
        return index_map

    def _index_map(self, node: torch.fx.Node) -> IndexMap | None:
        v = self.env.get(node)
        prov = v.provenance if isinstance(v, Value) and node not in self.tuple_prov else None
        if prov is None:
            return None
        if prov.kind == "folded":
            return prov.index_map
        return identity_map(prov.name, v.shape)

    def _opaque(self, node: torch.fx.Node) -> Any:
        """Keep `node` as a torch opaque op (analysis freezes it; ONNX export refuses it, naming it)."""
        ins = [self.env[n] for n in node.all_input_nodes if isinstance(self.env.get(n), Value)]
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            outs = tuple(self._value_from_fake(f"{node.name}_{i}", t) for i, t in enumerate(val))
            self._add("opaque", ins, list(outs), {}, node, OpaqueInfo(str(node.target), source="torch"))
            self.env[node] = outs
        else:
            out = self._value_from_meta(node.name, node)
            self._add("opaque", ins, [out], {}, node, OpaqueInfo(str(node.target), source="torch"))
            self.env[node] = out
        return self.env[node]

    # -- helpers for converters ----------------------------------------------------------------------------
    def unique(self, name: str) -> str:
        base, i = name, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def _const(self, name: str, tensor: torch.Tensor, prov: Provenance) -> Value:
        arr = tensor.detach().cpu().contiguous().numpy().copy()
        return Value(self.unique(name), arr.shape, arr.dtype, data=arr, provenance=prov)

    def scalar(self, node: torch.fx.Node, value: float | int | bool, like: Value) -> Value:
        arr = np.asarray(value, dtype=like.dtype)
        return Value(self.unique(f"{node.name}_scalar"), (), arr.dtype, data=arr,
                     provenance=Provenance("torch_constant", f"{node.name}:scalar"))

    def array(self, node: torch.fx.Node, hint: str, arr: np.ndarray) -> Value:
        return Value(self.unique(f"{node.name}_{hint}"), arr.shape, arr.dtype, data=arr,
                     provenance=Provenance("torch_constant", f"{node.name}:{hint}"))

    def _value_from_meta(self, name: str, node: torch.fx.Node) -> Value:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise UnsupportedModelError(f"node '{node.name}' has no tensor metadata (got {type(val).__name__})")
        return self._value_from_fake(name, val)

    def _value_from_fake(self, name: str, val: torch.Tensor) -> Value:
        shape = []
        for d in val.shape:
            if not isinstance(d, int):
                raise UnsupportedModelError(f"value '{name}' has a symbolic dim {d}; export with static shapes")
            shape.append(int(d))
        return Value(self.unique(name), shape, _np_dtype(val.dtype))

    def out(self, node: torch.fx.Node) -> Value:
        """A fresh value for `node`'s (single) result."""
        return self._value_from_meta(node.name, node)

    def _add(self, op, ins, outs, attrs, node, opaque=None):
        name, i = node.name, 0
        while name in self.node_names:
            i += 1
            name = f"{node.name}_{i}"
        self.node_names.add(name)
        stack = list(node.meta.get("nn_module_stack", {}).values())
        scope = stack[-1][0] if stack and isinstance(stack[-1][0], str) else ""
        return self.graph.add_node(op, ins, outs, attrs, name=name, origin=node.name, opaque=opaque, scope=scope)

    def emit(self, node: torch.fx.Node, op: str, ins: Sequence[Value | None], attrs: dict[str, Any] | None = None,
             out: Value | None = None) -> Value:
        """Add one normalized node; its single output is `out` or the FX node's own value."""
        out = out or self.out(node)
        self._add(op, list(ins), [out], attrs or {}, node)
        return out

    def emit_tmp(self, node: torch.fx.Node, op: str, ins: Sequence[Value | None], attrs: dict[str, Any],
                 shape: Sequence[int], dtype: np.dtype) -> Value:
        """Add an intermediate node (part of a multi-node lowering) with an explicit output shape."""
        out = Value(self.unique(f"{node.name}_{op}"), tuple(shape), dtype)
        self._add(op, list(ins), [out], attrs, node)
        return out

    def v(self, a: Any) -> Value:
        value = self.env[a]
        if not isinstance(value, Value):
            raise UnsupportedModelError(f"expected a tensor for '{a}'")
        return value


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


# -- ATen → normalized ops ---------------------------------------------------------------------------------
Converter = Callable[[_Importer, torch.fx.Node], Any]
ATEN: dict[Any, Converter] = {}


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _aten(*targets: Any):
    def register(fn: Converter) -> Converter:
        for t in targets:
            ATEN[t] = fn
        return fn

    return register


def _unary(op: str, **attrs: Any) -> Converter:
    def convert(imp: _Importer, node: torch.fx.Node) -> Value:
        return imp.emit(node, op, [imp.v(node.args[0])], dict(attrs))

    return convert


for _t, _op in [
    (aten.relu.default, "relu"), (aten.sigmoid.default, "sigmoid"), (aten.tanh.default, "tanh"),
    (aten.exp.default, "exp"), (aten.log.default, "log"), (aten.sqrt.default, "sqrt"), (aten.neg.default, "neg"),
    (aten.abs.default, "abs"), (aten.erf.default, "erf"), (aten.silu.default, "silu"),
    (aten.hardswish.default, "hard_swish"), (aten.reciprocal.default, "reciprocal"), (aten.sin.default, "sin"),
    (aten.cos.default, "cos"), (aten.floor.default, "floor"), (aten.ceil.default, "ceil"),
    (aten.mish.default, "mish"), (aten.clone.default, "identity"), (aten.alias.default, "identity"),
    (aten.detach.default, "identity"), (aten.lift_fresh_copy.default, "identity"),
]:
    ATEN[_t] = _unary(_op)
ATEN[aten.hardsigmoid.default] = _unary("hard_sigmoid", alpha=1.0 / 6.0, beta=0.5)
ATEN[aten.relu6.default] = _unary("clip", min=0.0, max=6.0)
ATEN.update(dict.fromkeys(RECURRENT_ATEN, convert_recurrent))  # nn.LSTM, nn.GRU, nn.RNN: fx_recurrent.py


@_aten(aten.rsqrt.default)
def _rsqrt(imp, node):
    """1 / sqrt(x), as ONNX writes it (it has no Rsqrt): timm's RmsNorm2d and fast norm paths."""
    x = imp.v(node.args[0])
    root = imp.emit_tmp(node, "sqrt", [x], {}, x.shape, x.dtype)
    return imp.emit(node, "reciprocal", [root])


@_aten(aten.contiguous.default, aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default)
def _passthrough(imp, node):
    return imp.emit(node, "identity", [imp.v(node.args[0])])


@_aten(aten._to_copy.default, aten.to.dtype, aten.type_as.default)
def _to_copy(imp, node):
    x = imp.v(node.args[0])
    out = imp.out(node)
    if out.dtype == x.dtype:
        return imp.emit(node, "identity", [x], out=out)
    from onnx import helper

    return imp.emit(node, "cast", [x], {"to": int(helper.np_dtype_to_tensor_dtype(out.dtype))}, out=out)


@_aten(aten.gelu.default)
def _gelu(imp, node):
    return imp.emit(node, "gelu", [imp.v(node.args[0])], {"approximate": node.kwargs.get("approximate", "none")})


@_aten(aten.leaky_relu.default)
def _leaky_relu(imp, node):
    return imp.emit(node, "leaky_relu", [imp.v(node.args[0])], {"alpha": float(_arg(node, 1, "negative_slope", 0.01))})


@_aten(aten.elu.default)
def _elu(imp, node):
    if _arg(node, 2, "scale", 1) != 1 or _arg(node, 3, "input_scale", 1) != 1:
        return imp._opaque(node)
    return imp.emit(node, "elu", [imp.v(node.args[0])], {"alpha": float(_arg(node, 1, "alpha", 1.0))})


@_aten(aten.clamp.default, aten.hardtanh.default, aten.clamp_min.default, aten.clamp_max.default)
def _clamp(imp, node):
    if node.target is aten.clamp_min.default:
        lo, hi = node.args[1], None
    elif node.target is aten.clamp_max.default:
        lo, hi = None, node.args[1]
    elif node.target is aten.hardtanh.default:
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    else:
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    return imp.emit(node, "clip", [imp.v(node.args[0])],
                    {"min": None if lo is None else float(lo), "max": None if hi is None else float(hi)})


_BINARY = {
    aten.add.Tensor: "add", aten.sub.Tensor: "sub", aten.mul.Tensor: "mul", aten.div.Tensor: "div",
    aten.add.Scalar: "add", aten.sub.Scalar: "sub", aten.mul.Scalar: "mul", aten.div.Scalar: "div",
    aten.pow.Tensor_Scalar: "pow", aten.pow.Tensor_Tensor: "pow", aten.maximum.default: "max",
    aten.minimum.default: "min", aten.eq.Tensor: "equal", aten.eq.Scalar: "equal", aten.lt.Tensor: "less",
    aten.lt.Scalar: "less", aten.gt.Tensor: "greater", aten.gt.Scalar: "greater",
    aten.logical_and.default: "and", aten.logical_or.default: "or",
}


@_aten(*_BINARY)
def _binary(imp, node):
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("rounding_mode") is not None:
        return imp._opaque(node)
    out = imp.out(node)
    like = imp.v(a) if isinstance(a, torch.fx.Node) else imp.v(b)
    operand_dtype = like.dtype if out.dtype.kind == "b" else out.dtype

    def operand(x: Any) -> Value:
        if isinstance(x, torch.fx.Node):
            v = imp.v(x)
            if v.dtype != operand_dtype and out.dtype.kind != "b":
                from onnx import helper

                v = imp.emit_tmp(node, "cast", [v], {"to": int(helper.np_dtype_to_tensor_dtype(operand_dtype))},
                                 v.shape, operand_dtype)
            return v
        arr = np.asarray(x, dtype=operand_dtype)
        return Value(imp.unique(f"{node.name}_scalar"), (), arr.dtype, data=arr,
                     provenance=Provenance("torch_constant", f"{node.name}:scalar"))

    va, vb = operand(a), operand(b)
    alpha = node.kwargs.get("alpha", 1)
    if alpha != 1:
        vb = imp.emit_tmp(node, "mul", [vb, operand(alpha)], {}, vb.shape, vb.dtype)
    return imp.emit(node, _BINARY[node.target], [va, vb], out=out)


@_aten(aten.rsub.Scalar)
def _rsub(imp, node):
    x = imp.v(node.args[0])
    return imp.emit(node, "sub", [imp.scalar(node, node.args[1], x), x])


@_aten(aten.where.self)
def _where(imp, node):
    return imp.emit(node, "where", [imp.v(a) for a in node.args[:3]])


@_aten(aten.masked_fill.Scalar)
def _masked_fill(imp, node):
    x, mask, value = imp.v(node.args[0]), imp.v(node.args[1]), node.args[2]
    return imp.emit(node, "where", [mask, imp.scalar(node, value, x), x])


def _conv_like(imp, node, x, w, b, stride, padding, dilation, groups, transposed=False, output_padding=None):
    nsp = len(w.shape) - 2
    stride = _expand(stride, nsp)
    dilation = _expand(dilation, nsp)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [0] * (2 * nsp)
        else:  # "same": torch pads the extra element at the end
            total = [dilation[i] * (w.shape[2 + i] - 1) for i in range(nsp)]
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        p = _expand(padding, nsp)
        pads = p + p
    attrs = {"kernel_shape": list(w.shape[2:]), "strides": stride, "pads": pads, "dilations": dilation,
             "group": int(groups)}
    ins = [x, w] + ([b] if b is not None else [])
    if transposed:
        attrs["output_padding"] = _expand(output_padding or 0, nsp)
        return imp.emit(node, "conv_transpose", ins, attrs)
    return imp.emit(node, "conv", ins, attrs)


@_aten(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding,
       aten.conv3d.padding)
def _conv(imp, node):
    x, w = imp.v(node.args[0]), imp.v(node.args[1])
    b = _arg(node, 2, "bias")
    return _conv_like(imp, node, x, w, None if b is None else imp.v(b), _arg(node, 3, "stride", 1),
                      _arg(node, 4, "padding", 0), _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1))


@_aten(aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
def _conv_transpose(imp, node):
    x, w = imp.v(node.args[0]), imp.v(node.args[1])
    b = _arg(node, 2, "bias")
    return _conv_like(imp, node, x, w, None if b is None else imp.v(b), _arg(node, 3, "stride", 1),
                      _arg(node, 4, "padding", 0), _arg(node, 7, "dilation", 1), _arg(node, 6, "groups", 1),
                      transposed=True, output_padding=_arg(node, 5, "output_padding", 0))


@_aten(aten.convolution.default)
def _convolution(imp, node):
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = node.args[:9]
    return _conv_like(imp, node, imp.v(x), imp.v(w), None if b is None else imp.v(b), stride, padding, dilation,
                      groups, transposed=bool(transposed), output_padding=output_padding)


@_aten(aten.linear.default)
def _linear(imp, node):
    b = _arg(node, 2, "bias")
    ins = [imp.v(node.args[0]), imp.v(node.args[1])] + ([imp.v(b)] if b is not None else [])
    return imp.emit(node, "linear", ins)


@_aten(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(imp, node):
    return imp.emit(node, "matmul", [imp.v(node.args[0]), imp.v(node.args[1])])


@_aten(aten.addmm.default)
def _addmm(imp, node):
    bias, a, b = (imp.v(x) for x in node.args[:3])
    if _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
        return imp._opaque(node)
    out = imp.out(node)
    mm = imp.emit_tmp(node, "matmul", [a, b], {}, out.shape, out.dtype)
    return imp.emit(node, "add", [mm, bias], out=out)


def _affine_or_default(imp, node, arg: Any, channels: int, fill: float, hint: str, dtype: np.dtype) -> Value:
    if arg is not None:
        return imp.v(arg)
    return imp.array(node, hint, np.full((channels,), fill, dtype=dtype))


@_aten(aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default,
       aten.native_batch_norm.default, aten._native_batch_norm_legit.default,
       aten._native_batch_norm_legit_functional.default)
def _batch_norm(imp, node):
    x = imp.v(node.args[0])
    if node.target is aten._native_batch_norm_legit_no_training.default:
        weight, bias, mean, var, _momentum, eps = node.args[1:7]
    elif node.target is aten.batch_norm.default:
        weight, bias, mean, var, training, _momentum, eps = node.args[1:8]
        if training:
            raise UnsupportedModelError(f"node '{node.name}': batch_norm in training mode; call model.eval()")
    else:
        raise UnsupportedModelError(f"node '{node.name}': batch_norm in training mode; call model.eval()")
    c = x.shape[1]
    ins = [x, _affine_or_default(imp, node, weight, c, 1.0, "weight", x.dtype),
           _affine_or_default(imp, node, bias, c, 0.0, "bias", x.dtype), imp.v(mean), imp.v(var)]
    val = node.meta["val"]
    out = imp._value_from_fake(f"{node.name}", val[0] if isinstance(val, (tuple, list)) else val)
    imp.emit(node, "batch_norm", ins, {"epsilon": float(eps)}, out=out)
    return (out, None, None) if isinstance(val, (tuple, list)) else out


@_aten(aten.group_norm.default, aten.native_group_norm.default)
def _group_norm(imp, node):
    """Lowered as ONNX exporters write it: reshape [N, C, ...] to [N, G, C/G*...], instance_norm, reshape back,
    then the per-channel affine. Both importers give one graph, and the dependency pass sees the groups: whole
    groups prune (the reshape's G follows), and G = 1 normalizes over the channels (an inexact group)."""
    x = imp.v(node.args[0])
    if node.target is aten.native_group_norm.default:
        weight, bias, groups, eps = node.args[1], node.args[2], int(node.args[6]), float(node.args[7])
    else:
        groups = int(node.args[1])
        weight, bias, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), float(_arg(node, 4, "eps", 1e-5))
    n, c = x.shape[:2]
    val = node.meta["val"]
    out = imp._value_from_fake(node.name, val[0] if isinstance(val, (tuple, list)) else val)
    per_group = c // groups * int(np.prod(x.shape[2:], dtype=np.int64))
    grouped = imp.emit_tmp(node, "reshape", [x], {"shape": [n, groups, per_group]}, (n, groups, per_group), x.dtype)
    scale = imp.array(node, "group_scale", np.ones(groups, dtype=x.dtype))
    shift = imp.array(node, "group_shift", np.zeros(groups, dtype=x.dtype))
    normed = imp.emit_tmp(node, "instance_norm", [grouped, scale, shift], {"epsilon": eps}, grouped.shape, x.dtype)
    steps = [(op, imp.v(p)) for op, p in (("mul", weight), ("add", bias)) if p is not None]
    y = (imp.emit_tmp(node, "reshape", [normed], {"shape": list(x.shape)}, x.shape, x.dtype) if steps
         else imp.emit(node, "reshape", [normed], {"shape": list(x.shape)}, out=out))
    per_channel = [c] + [1] * (x.rank - 2)
    for k, (op, p) in enumerate(steps):
        p = imp.emit_tmp(node, "reshape", [p], {"shape": per_channel}, per_channel, p.dtype)
        y = (imp.emit(node, op, [y, p], out=out) if k == len(steps) - 1
             else imp.emit_tmp(node, op, [y, p], {}, x.shape, x.dtype))
    return (out, None, None) if isinstance(val, (tuple, list)) else out


@_aten(aten.addcmul.default)
def _addcmul(imp, node):
    """input + value * t1 * t2 (ConvNeXt-V2's global response norm)."""
    x, t1, t2 = (imp.v(a) for a in node.args[:3])
    value = float(_arg(node, 3, "value", 1.0))
    out = imp.out(node)
    prod_shape = np.broadcast_shapes(t1.shape, t2.shape)
    y = imp.emit_tmp(node, "mul", [t1, t2], {}, prod_shape, out.dtype)
    if value != 1.0:
        y = imp.emit_tmp(node, "mul", [y, imp.array(node, "value", np.asarray(value, dtype=out.dtype))], {},
                         prod_shape, out.dtype)
    return imp.emit(node, "add", [x, y], out=out)


@_aten(aten.layer_norm.default)
def _layer_norm(imp, node):
    x = imp.v(node.args[0])
    shape = list(node.args[1])
    weight, bias, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
    n = int(np.prod(shape))
    w = _affine_or_default(imp, node, weight, n, 1.0, "weight", x.dtype)
    if len(shape) > 1 and weight is None:
        w = imp.array(node, "weight_nd", np.ones(shape, dtype=x.dtype))
    ins = [x, w] + ([imp.v(bias)] if bias is not None else [])
    return imp.emit(node, "layer_norm", ins, {"axis": -len(shape), "epsilon": float(eps)})


@_aten(aten.rms_norm.default)
def _rms_norm(imp, node):
    """x / sqrt(mean(x^2) + eps) * weight, as ONNX exporters before opset 23 write it, so both importers give the
    same graph (the mean over the channels makes their group inexact, like layer_norm's statistics)."""
    x = imp.v(node.args[0])
    shape = list(node.args[1])
    weight, eps = _arg(node, 2, "weight"), _arg(node, 3, "eps")
    eps = float(torch.finfo(torch.float32).eps) if eps is None else float(eps)
    dims = list(range(x.rank - len(shape), x.rank))
    kept = _keepdims_shape(x.shape, dims)
    squared = imp.emit_tmp(node, "mul", [x, x], {}, x.shape, x.dtype)
    mean = imp.emit_tmp(node, "reduce_mean", [squared], {"axes": dims, "keepdims": 1}, kept, x.dtype)
    shifted = imp.emit_tmp(node, "add", [mean, imp.array(node, "eps", np.asarray(eps, dtype=x.dtype))], {}, kept,
                           x.dtype)
    rms = imp.emit_tmp(node, "sqrt", [shifted], {}, kept, x.dtype)
    out = imp.out(node)
    if weight is None:
        return imp.emit(node, "div", [x, rms], out=out)
    normed = imp.emit_tmp(node, "div", [x, rms], {}, x.shape, x.dtype)
    return imp.emit(node, "mul", [normed, imp.v(weight)], out=out)


def _keepdims_shape(shape: Sequence[int], dims: Sequence[int]) -> tuple[int, ...]:
    """The shape of a reduction over `dims` with keepdims."""
    return tuple(1 if a in dims else d for a, d in enumerate(shape))


@_aten(aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int)
def _softmax(imp, node):
    op = "softmax" if "softmax" in str(node.target) and "log" not in str(node.target) else "log_softmax"
    return imp.emit(node, op, [imp.v(node.args[0])], {"axis": int(node.args[1])})


@_aten(aten.scaled_dot_product_attention.default)
def _sdpa(imp, node):
    q, k, v = (imp.v(a) for a in node.args[:3])
    mask = _arg(node, 3, "attn_mask")
    if float(_arg(node, 4, "dropout_p", 0.0)) != 0.0 or _arg(node, 7, "enable_gqa", False):
        return imp._opaque(node)
    ins = [q, k, v] + ([imp.v(mask)] if mask is not None else [])
    scale = _arg(node, 6, "scale")
    return imp.emit(node, "attention", ins, {"scale": None if scale is None else float(scale),
                                             "is_causal": bool(_arg(node, 5, "is_causal", False))})


@_aten(aten.einsum.default)
def _einsum(imp, node):
    return imp.emit(node, "einsum", [imp.v(a) for a in node.args[1]], {"equation": node.args[0].replace(" ", "")})


@_aten(aten.cat.default)
def _cat(imp, node):
    ins = [imp.v(a) for a in node.args[0]]
    rank = len(node.meta["val"].shape)
    return imp.emit(node, "concat", ins, {"axis": int(_arg(node, 1, "dim", 0)) % rank})


@_aten(aten.stack.default)
def _stack(imp, node):
    """stack → each input unsqueezed at `dim`, then concat."""
    ins = [imp.v(a) for a in node.args[0]]
    out = imp.out(node)
    dim = int(_arg(node, 1, "dim", 0)) % out.rank
    parts = [imp.emit_tmp(node, "unsqueeze", [v], {"axes": [dim]}, v.shape[:dim] + (1,) + v.shape[dim:], v.dtype)
             for v in ins]
    return imp.emit(node, "concat", parts, {"axis": dim}, out=out)


@_aten(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)
def _split(imp, node):
    """split/chunk → split; unbind → split into size-1 pieces, each squeezed."""
    x = imp.v(node.args[0])
    vals = node.meta["val"]
    unbind = node.target is aten.unbind.int
    dim = int(_arg(node, 1 if unbind else 2, "dim", 0)) % x.rank
    pieces = [tuple(1 if a == dim else d for a, d in enumerate(x.shape)) if unbind else tuple(t.shape) for t in vals]
    outs = [Value(imp.unique(f"{node.name}_{i}"), shape, x.dtype) for i, shape in enumerate(pieces)]
    imp._add("split", [x], outs, {"axis": dim, "split": [p[dim] for p in pieces]}, node)
    if not unbind:
        return tuple(outs)
    squeezed = []
    for i, (piece, t) in enumerate(zip(outs, vals, strict=True)):
        sq = Value(imp.unique(f"{node.name}_sq{i}"), tuple(t.shape), x.dtype)
        imp._add("squeeze", [piece], [sq], {"axes": [dim]}, node)
        squeezed.append(sq)
    return tuple(squeezed)


@_aten(aten.slice.Tensor)
def _slice(imp, node):
    x = imp.v(node.args[0])
    dim = int(_arg(node, 1, "dim", 0)) % x.rank
    start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
    s, e, st = slice(start, end, step).indices(x.shape[dim])
    if (s, e, st) == (0, x.shape[dim], 1):
        return imp.emit(node, "identity", [x])
    return imp.emit(node, "slice", [x], {"starts": [s], "ends": [e], "axes": [dim], "steps": [st]})


@_aten(aten.select.int)
def _select(imp, node):
    x = imp.v(node.args[0])
    dim, index = int(node.args[1]) % x.rank, int(node.args[2])
    index %= x.shape[dim]
    out = imp.out(node)
    sliced = imp.emit_tmp(node, "slice", [x], {"starts": [index], "ends": [index + 1], "axes": [dim], "steps": [1]},
                          tuple(1 if a == dim else d for a, d in enumerate(x.shape)), x.dtype)
    return imp.emit(node, "squeeze", [sliced], {"axes": [dim]}, out=out)


@_aten(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
       aten.view_as.default)
def _reshape(imp, node):
    x = imp.v(node.args[0])
    out = imp.out(node)
    if out.shape == x.shape:
        return imp.emit(node, "identity", [x], out=out)
    return imp.emit(node, "reshape", [x], {"shape": list(out.shape)}, out=out)


@_aten(aten.permute.default)
def _permute(imp, node):
    x = imp.v(node.args[0])
    return imp.emit(node, "transpose", [x], {"perm": [int(d) % x.rank for d in node.args[1]]})


@_aten(aten.transpose.int, aten.t.default)
def _transpose(imp, node):
    x = imp.v(node.args[0])
    perm = list(range(x.rank))
    if node.target is aten.t.default:
        perm = perm[::-1]
    else:
        a, b = int(node.args[1]) % x.rank, int(node.args[2]) % x.rank
        perm[a], perm[b] = perm[b], perm[a]
    return imp.emit(node, "transpose", [x], {"perm": perm})


@_aten(aten.unsqueeze.default)
def _unsqueeze(imp, node):
    x = imp.v(node.args[0])
    return imp.emit(node, "unsqueeze", [x], {"axes": [int(node.args[1]) % (x.rank + 1)]})


@_aten(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(imp, node):
    x = imp.v(node.args[0])
    if node.target is aten.squeeze.default:
        dims = list(range(x.rank))
    elif node.target is aten.squeeze.dim:
        dims = [int(node.args[1])]
    else:
        dims = [int(d) for d in node.args[1]]
    axes = sorted({d % x.rank for d in dims if x.shape[d % x.rank] == 1})
    if not axes:
        return imp.emit(node, "identity", [x])
    return imp.emit(node, "squeeze", [x], {"axes": axes})


@_aten(aten.expand.default, aten.expand_as.default)
def _expand(imp, node):
    x = imp.v(node.args[0])
    out = imp.out(node)
    if out.shape == x.shape:
        return imp.emit(node, "identity", [x], out=out)
    return imp.emit(node, "expand", [x], {"shape": list(out.shape)}, out=out)


@_aten(aten.repeat.default)
def _repeat(imp, node):
    x = imp.v(node.args[0])
    repeats = [int(r) for r in node.args[1]]
    if len(repeats) != x.rank:
        return imp._opaque(node)
    return imp.emit(node, "tile", [x], {"repeats": repeats})


@_aten(aten.repeat_interleave.self_int)
def _repeat_interleave(imp, node):
    """x.repeat_interleave(r, dim) with an int r: unsqueeze after `dim`, tile r times, merge the two axes."""
    x = imp.v(node.args[0])
    repeats, dim = int(node.args[1]), _arg(node, 2, "dim")
    if dim is None:
        return imp._opaque(node)  # flattens first; not seen in models
    dim = int(dim) % x.rank
    wide = x.shape[:dim + 1] + (1,) + x.shape[dim + 1:]
    y = imp.emit_tmp(node, "unsqueeze", [x], {"axes": [dim + 1]}, wide, x.dtype)
    tiled = wide[:dim + 1] + (repeats,) + wide[dim + 2:]
    y = imp.emit_tmp(node, "tile", [y], {"repeats": [repeats if a == dim + 1 else 1 for a in range(len(wide))]},
                     tiled, x.dtype)
    out = imp.out(node)
    return imp.emit(node, "reshape", [y], {"shape": list(out.shape)}, out=out)


@_aten(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default)
def _reduce(imp, node):
    x = imp.v(node.args[0])
    dims = _arg(node, 1, "dim")
    dims = list(range(x.rank)) if dims is None or dims == [] else [int(d) % x.rank for d in _listify(dims)]
    op = {aten.mean.dim: "reduce_mean", aten.sum.dim_IntList: "reduce_sum", aten.amax.default: "reduce_max",
          aten.amin.default: "reduce_min"}[node.target]
    return imp.emit(node, op, [x], {"axes": dims, "keepdims": int(bool(_arg(node, 2, "keepdim", False)))})


@_aten(aten.linalg_vector_norm.default)
def _vector_norm(imp, node):
    x = imp.v(node.args[0])
    if float(_arg(node, 1, "ord", 2)) != 2.0 or node.kwargs.get("dtype") is not None:
        return imp._opaque(node)
    dims = _arg(node, 2, "dim")
    dims = list(range(x.rank)) if dims is None else [int(d) % x.rank for d in _listify(dims)]
    return imp.emit(node, "reduce_l2", [x], {"axes": dims, "keepdims": int(bool(_arg(node, 3, "keepdim", False)))})


@_aten(aten.var.dim, aten.var.correction)
def _var(imp, node):
    """var(x, dims) = mean((x - mean(x))^2) * n / (n - correction) (EvoNorm's group statistics)."""
    x = imp.v(node.args[0])
    dims = _arg(node, 1, "dim")
    dims = list(range(x.rank)) if dims is None else [int(d) % x.rank for d in _listify(dims)]
    if node.target is aten.var.dim:
        correction = 1 if _arg(node, 2, "unbiased", True) else 0
        keep = bool(_arg(node, 3, "keepdim", False))
    else:
        correction = node.kwargs.get("correction")
        correction = 1 if correction is None else float(correction)
        keep = bool(node.kwargs.get("keepdim", False))
    n = int(np.prod([x.shape[d] for d in dims], dtype=np.int64))
    kept = _keepdims_shape(x.shape, dims)
    mean = imp.emit_tmp(node, "reduce_mean", [x], {"axes": dims, "keepdims": 1}, kept, x.dtype)
    centered = imp.emit_tmp(node, "sub", [x, mean], {}, x.shape, x.dtype)
    squared = imp.emit_tmp(node, "mul", [centered, centered], {}, x.shape, x.dtype)
    out = imp.out(node)
    if correction == 0:
        return imp.emit(node, "reduce_mean", [squared], {"axes": dims, "keepdims": int(keep)}, out=out)
    biased = imp.emit_tmp(node, "reduce_mean", [squared], {"axes": dims, "keepdims": int(keep)}, out.shape, x.dtype)
    scale = imp.array(node, "correction", np.asarray(n / max(n - correction, 1), dtype=x.dtype))
    return imp.emit(node, "mul", [biased, scale], out=out)


@_aten(aten.max_pool2d.default, aten.max_pool1d.default, aten.max_pool3d.default)
def _max_pool(imp, node):
    x = imp.v(node.args[0])
    nsp = x.rank - 2
    kernel = _expand(node.args[1], nsp)
    stride = _expand(_arg(node, 2, "stride", None) or kernel, nsp)
    pad = _expand(_arg(node, 3, "padding", 0), nsp)
    attrs = {"kernel_shape": kernel, "strides": stride, "pads": pad + pad,
             "dilations": _expand(_arg(node, 4, "dilation", 1), nsp),
             "ceil_mode": int(bool(_arg(node, 5, "ceil_mode", False)))}
    return imp.emit(node, "max_pool", [x], attrs)


@_aten(aten.avg_pool2d.default, aten.avg_pool1d.default, aten.avg_pool3d.default)
def _avg_pool(imp, node):
    x = imp.v(node.args[0])
    nsp = x.rank - 2
    kernel = _expand(node.args[1], nsp)
    stride = _expand(_arg(node, 2, "stride", None) or kernel, nsp)
    pad = _expand(_arg(node, 3, "padding", 0), nsp)
    if _arg(node, 6, "divisor_override") is not None:
        return imp._opaque(node)
    attrs = {"kernel_shape": kernel, "strides": stride, "pads": pad + pad,
             "ceil_mode": int(bool(_arg(node, 4, "ceil_mode", False))),
             "count_include_pad": int(bool(_arg(node, 5, "count_include_pad", True)))}
    return imp.emit(node, "avg_pool", [x], attrs)


@_aten(aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default, aten._adaptive_avg_pool2d.default)
def _adaptive_avg_pool(imp, node):
    x = imp.v(node.args[0])
    k = _adaptive_window(x, node.args[1])
    if k is None:
        return imp._opaque(node)
    if k == list(x.shape[2:]):
        return imp.emit(node, "global_avg_pool", [x])
    if all(d == 1 for d in k):
        return imp.emit(node, "identity", [x])
    return imp.emit(node, "avg_pool", [x], {"kernel_shape": k, "strides": k, "pads": [0] * (2 * len(k)),
                                            "ceil_mode": 0, "count_include_pad": 0})


@_aten(aten.adaptive_max_pool2d.default, aten.adaptive_max_pool1d.default)
def _adaptive_max_pool(imp, node):
    """Its values as a global or regular max pool (BAT's attention pooling); the argmax indices have no lowering."""
    x = imp.v(node.args[0])
    k = _adaptive_window(x, node.args[1])
    if k is None or any(u.target is operator.getitem and u.args[1] == 1 for u in node.users):
        return imp._opaque(node)
    out = imp._value_from_fake(node.name, node.meta["val"][0])
    if k == list(x.shape[2:]):
        return imp.emit(node, "global_max_pool", [x], out=out), None
    attrs = {"kernel_shape": k, "strides": k, "pads": [0] * (2 * len(k)), "dilations": [1] * len(k), "ceil_mode": 0}
    return imp.emit(node, "max_pool", [x], attrs, out=out), None


def _adaptive_window(x: Value, output_size: Any) -> list[int] | None:
    """The window (and stride) of an adaptive pool of `x` to `output_size`, when the input divides evenly."""
    out_size = _expand(output_size, x.rank - 2)
    if any(i % o for o, i in zip(out_size, x.shape[2:], strict=True)):
        return None
    return [i // o for o, i in zip(out_size, x.shape[2:], strict=True)]


@_aten(aten.pad.default, aten.constant_pad_nd.default)
def _pad(imp, node):
    x = imp.v(node.args[0])
    torch_pads = [int(p) for p in node.args[1]]
    mode = _arg(node, 2, "mode", "constant") if node.target is aten.pad.default else "constant"
    value = _arg(node, 3, "value", None) if node.target is aten.pad.default else _arg(node, 2, "value", 0)
    onnx_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.get(mode)
    if onnx_mode is None:
        return imp._opaque(node)
    begins, ends = [0] * x.rank, [0] * x.rank
    for i in range(len(torch_pads) // 2):
        axis = x.rank - 1 - i
        begins[axis], ends[axis] = torch_pads[2 * i], torch_pads[2 * i + 1]
    return imp.emit(node, "pad", [x], {"pads": begins + ends, "mode": onnx_mode, "value": float(value or 0.0)})


@_aten(aten.roll.default)
def _roll(imp, node):
    x = imp.v(node.args[0])
    shifts, dims = _listify(node.args[1]), _listify(_arg(node, 2, "dims", []))
    if len(shifts) != len(dims):
        return imp._opaque(node)
    cur = x
    for i, (shift, dim) in enumerate(zip(shifts, dims, strict=True)):
        dim %= x.rank
        size = x.shape[dim]
        shift %= size
        if shift == 0:
            continue
        head_shape = tuple(shift if a == dim else d for a, d in enumerate(x.shape))
        tail_shape = tuple(size - shift if a == dim else d for a, d in enumerate(x.shape))
        tail = imp.emit_tmp(node, "slice", [cur], {"starts": [size - shift], "ends": [size], "axes": [dim],
                                                   "steps": [1]}, head_shape, x.dtype)
        head = imp.emit_tmp(node, "slice", [cur], {"starts": [0], "ends": [size - shift], "axes": [dim],
                                                   "steps": [1]}, tail_shape, x.dtype)
        last = i == len(shifts) - 1 or all(s % x.shape[d % x.rank] == 0 for s, d in
                                           zip(shifts[i + 1:], dims[i + 1:], strict=True))
        if last:
            return imp.emit(node, "concat", [tail, head], {"axis": dim})
        cur = imp.emit_tmp(node, "concat", [tail, head], {"axis": dim}, x.shape, x.dtype)
    return imp.emit(node, "identity", [cur])


@_aten(aten.index.Tensor)
def _index(imp, node):
    x = imp.v(node.args[0])
    indices = node.args[1]
    used = [(axis, idx) for axis, idx in enumerate(indices) if idx is not None]
    if len(used) == 1 and used[0][1] in imp.real:
        axis, idx = used[0]
        return imp.emit(node, "gather", [x, imp.v(idx)], {"axis": axis})
    return imp._opaque(node)


def _expand(v: Any, n: int) -> list[int]:
    vals = _listify(v)
    if len(vals) == 1:
        vals = vals * n
    return [int(x) for x in vals]


def _listify(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


@_aten(aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default)
def _upsample_nearest(imp, node):
    x = imp.v(node.args[0])
    out = imp.out(node)
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor",
             "cubic_coeff_a": -0.75, "exclude_outside": 0, "extrapolation_value": 0.0, "antialias": 0,
             "keep_aspect_ratio_policy": "stretch", "sizes": list(out.shape)}
    return imp.emit(node, "resize", [x], attrs, out=out)


@_aten(aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default, aten.upsample_bicubic2d.vec,
       aten.upsample_bicubic2d.default)
def _upsample_bilinear(imp, node):
    x = imp.v(node.args[0])
    out = imp.out(node)
    align = bool(_arg(node, 2, "align_corners", False))
    cubic = node.target in (aten.upsample_bicubic2d.vec, aten.upsample_bicubic2d.default)
    attrs = {"mode": "cubic" if cubic else "linear",
             "coordinate_transformation_mode": "align_corners" if align else "pytorch_half_pixel",
             "nearest_mode": "round_prefer_floor", "cubic_coeff_a": -0.75, "exclude_outside": 0,
             "extrapolation_value": 0.0, "antialias": 0, "keep_aspect_ratio_policy": "stretch",
             "sizes": list(out.shape)}
    return imp.emit(node, "resize", [x], attrs, out=out)
