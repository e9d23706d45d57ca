"""Recurrent layers (ONNX LSTM, GRU, RNN) as the standard ops TVM's ONNX frontend reads, unrolled over their static
sequence length.

Why: TVM's Relax ONNX frontend has no converter for them ("operators are not supported: LSTM"), so a speech or OCR
model with one could not be compiled at all, pruned or not.

What: `unrolled_recurrences(model)` returns a copy with each recurrent node replaced, per direction, by one MatMul
of the whole sequence with W (both biases added once), then per step a MatMul of the state with R, the gates
(ONNX's order: LSTM i, o, f, c; GRU z, r, h), the cell and state updates, and the outputs Y, Y_h, Y_c concatenated
in time order. Peepholes, clip, LSTM's input_forget and GRU's linear_before_reset follow the ONNX operator
definitions; sequence_lens masks the steps at or past a batch entry's length (its state is held, its Y is zero),
which also starts the reverse direction at each entry's own last step. ONNX Runtime is the reference
(tests/test_recurrent_unroll.py runs both forms there).

Forms not lowered raise BackendError naming the node: weights that are not initializers, a sequence length or batch
that is not static, layout 1, or activations other than Sigmoid, Tanh and Relu.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import BackendError
from ...ir import onnx_io
from ...ir.onnx_proto import FreshNames, default_opset
from . import recurrent_steps

RECURRENT_OPS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
_ACTIVATIONS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}


def has_recurrences(model: onnx.ModelProto) -> bool:
    return any(n.op_type in RECURRENT_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node)


def unrolled_recurrences(model: onnx.ModelProto, fused_steps: bool = False) -> onnx.ModelProto:
    """A copy of `model` whose recurrent nodes are unrolled into standard ops (see module doc). With `fused_steps`
    (CPU targets), the layers recurrent_steps.py can run keep their recurrence as one LSTMSteps, GRUSteps or RNNSteps
    node of that module's domain, after the input projection as standard ops."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    unroller = _Unroller(out, fused_steps)
    nodes = []
    for node in out.graph.node:
        if node.op_type in RECURRENT_OPS and node.domain in ("", "ai.onnx"):
            nodes.extend(unroller.lower(node))
        else:
            nodes.append(node)
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(unroller.consts)
    if unroller.fused and not any(o.domain == recurrent_steps.DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(recurrent_steps.DOMAIN, 1))
    return out


class _Unroller:
    def __init__(self, model: onnx.ModelProto, fused_steps: bool = False) -> None:
        self.model = model
        self.fused_steps, self.fused = fused_steps, 0
        self.fresh = FreshNames(model)
        self.consts: list[onnx.TensorProto] = []
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.shapes = _static_shapes(model)
        self.opset = default_opset(model)
        self.small: dict[tuple, str] = {}  # small constants (indices, axes, bounds) are made once
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = ""

    # -- building blocks ------------------------------------------------------------------------------------------
    def const(self, hint: str, value: np.ndarray) -> str:
        value = np.asarray(value, order="C")  # (not ascontiguousarray: it makes a scalar 1-d)
        key = (value.dtype.str, value.shape, value.tobytes()) if value.size <= 16 else None
        if key in self.small:
            return self.small[key]
        name = self.fresh(f"{self.prefix}/{hint}")
        self.consts.append(numpy_helper.from_array(value, name))
        if key is not None:
            self.small[key] = name
        return name

    def unsqueeze(self, x: str, axis: int, hint: str) -> str:
        if self.opset < 13:  # axes became an input at 13
            return self.op("Unsqueeze", [x], hint, axes=[axis])
        return self.op("Unsqueeze", [x, self.const(f"axis{axis}", np.asarray([axis], np.int64))], hint)

    def slice_columns(self, x: str, start: int, end: int, hint: str) -> str:
        if self.opset < 10:  # starts, ends and axes became inputs at 10
            return self.op("Slice", [x], hint, starts=[start], ends=[end], axes=[1])
        at = [self.const(f"at{k}", np.asarray([k], np.int64)) for k in (start, end)]
        return self.op("Slice", [x, *at, self.const("axis1", np.asarray([1], np.int64))], hint)

    def clip(self, x: str, bound: float, dtype, hint: str) -> str:
        if self.opset < 11:  # min and max became inputs at 11
            return self.op("Clip", [x], hint, min=-bound, max=bound)
        return self.op("Clip", [x, self.const("clip_lo", np.asarray(-bound, dtype)),
                                self.const("clip_hi", np.asarray(bound, dtype))], hint)

    def project(self, x: str, w: np.ndarray, bias: np.ndarray) -> str:
        """X·Wᵀ + bias for every step at once: [sequence, batch, gates*hidden]."""
        return self.op("Add", [self.op("MatMul", [x, self.const("W_T", w.T)], "XW"), self.const("bias", bias)],
                       "XW_bias")

    def op(self, op_type: str, inputs: list[str], hint: str = "", out: str = "", **attrs) -> str:
        name = self.fresh(f"{self.prefix}/{hint or op_type}")
        out = out or self.fresh(f"{name}_output")
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def weight(self, node: onnx.NodeProto, k: int) -> np.ndarray | None:
        name = _input(node, k)
        if not name:
            return None
        t = self.initializers.get(name)
        if t is None:
            raise BackendError(f"node '{node.name}' ({node.op_type}): its input '{name}' is computed at run time; "
                               "only initializer weights are unrolled for TVM")
        return numpy_helper.to_array(t)

    # -- one node -------------------------------------------------------------------------------------------------
    def lower(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        self.nodes, self.prefix = [], node.name or node.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        what = f"node '{node.name}' ({node.op_type})"
        if attrs.get("layout", 0) != 0:
            raise BackendError(f"{what}: layout {attrs['layout']} (batch first) is not unrolled for TVM")
        shape = self.shapes.get(node.input[0])
        if shape is None or len(shape) != 3 or not all(isinstance(d, int) for d in shape):
            raise BackendError(f"{what}: input '{node.input[0]}' needs a static [sequence, batch, features] shape "
                               f"to be unrolled for TVM (has {shape})")
        steps, batch, _ = shape
        w, r, b = self.weight(node, 1), self.weight(node, 2), self.weight(node, 3)
        p = self.weight(node, 7) if node.op_type == "LSTM" else None
        directions, hidden = w.shape[0], int(attrs["hidden_size"])
        acts = self._activations(node, attrs, directions, what)
        dtype = w.dtype
        if b is None:
            b = np.zeros((directions, 2 * w.shape[1]), dtype)
        lens = _input(node, 4)
        if lens:
            lens = self.op("Cast", [lens], "lens", to=onnx.TensorProto.INT64)
        direction = attrs.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        outs = [node.output[k] if k < len(node.output) else "" for k in range(3)]
        if self.fused_steps and self._fusable(node.op_type, attrs, acts, p, lens, dtype):
            return self._fused(node, attrs, acts, w, r, b, direction, batch, hidden, dtype, outs)
        results = []  # per direction: (Y's steps in time order, final h, final c)
        for d in range(directions):
            reverse = _walks_backwards(direction, d)
            self.prefix = f"{node.name or node.op_type}/{'reverse' if reverse else 'forward'}"
            cell = _Cell(self, node.op_type, attrs, w[d], r[d], b[d], None if p is None else p[d], acts[d], hidden)
            h = self._initial(node, 5, d, batch, hidden, dtype)
            c = self._initial(node, 6, d, batch, hidden, dtype) if node.op_type == "LSTM" else None
            steps_order = range(steps - 1, -1, -1) if reverse else range(steps)
            results.append(self._direction(cell, node.input[0], steps_order, h, c, lens, dtype))
        self.prefix = node.name or node.op_type
        if outs[0]:
            per_direction = [self.op("Concat", [self.unsqueeze(y, 0, f"y{t}_row") for t, y in enumerate(ys)],
                                     "Y_direction", axis=0) for ys, _, _ in results]
            self.op("Concat", [self.unsqueeze(y, 1, "Y_direction_axis") for y in per_direction], "Y",
                    out=outs[0], axis=1)
        for k in (1, 2):
            if outs[k]:
                self.op("Concat", [self.unsqueeze(res[k], 0, "state_row") for res in results],
                        ("Y_h", "Y_c")[k - 1], out=outs[k], axis=0)
        return self.nodes

    @staticmethod
    def _fusable(op: str, attrs: dict, acts: list[list[str]], p, lens: str, dtype) -> bool:
        """The forms recurrent_steps.py runs: float32, no lengths or clip; LSTM and GRU with their default gates
        (LSTM without peepholes or input_forget); RNN with one activation for all directions."""
        if dtype != np.float32 or lens or attrs.get("clip") is not None:
            return False
        if op == "RNN":
            return all(a == acts[0] for a in acts)
        return (all(a == list(RECURRENT_OPS[op]) for a in acts) and p is None
                and not (op == "LSTM" and attrs.get("input_forget", 0)))

    def _fused(self, node, attrs, acts, w, r, b, direction: str, batch: int, hidden: int, dtype,
               outs: list[str]) -> list[onnx.NodeProto]:
        """The input projection per direction as standard ops, then one Steps node for the recurrence."""
        op, directions, gates = node.op_type, w.shape[0], w.shape[1]
        # GRU keeps R's bias apart (linear_before_reset puts it inside the reset gate's product); the others sum it
        xw_bias = b[:, :gates] if op == "GRU" else b[:, :gates] + b[:, gates:]
        projected = [self.unsqueeze(self.project(node.input[0], w[d], xw_bias[d]), 0, "XW_direction")
                     for d in range(directions)]
        inputs = [projected[0] if directions == 1 else self.op("Concat", projected, "XW", axis=0),
                  self.const("R_T", recurrent_steps.packed_rt(r, op, attrs.get("linear_before_reset", 0)))]
        if op == "GRU":
            inputs.append(self.const("Rb", np.ascontiguousarray(b[:, gates:]).reshape(directions, 1, 1, gates)))
        inputs += [_input(node, k) or self.const("zeros", np.zeros((directions, batch, hidden), dtype))
                   for k in ((5, 6) if op == "LSTM" else (5,))]
        extra = {"linear_before_reset": int(attrs.get("linear_before_reset", 0))} if op == "GRU" else (
            {"activation": acts[0][0]} if op == "RNN" else {})
        name = self.fresh(f"{self.prefix}/{recurrent_steps.OPS[op]}")
        outputs = [out or self.fresh(f"{name}_unused{k}") for k, out in enumerate(outs[:3 if op == "LSTM" else 2])]
        self.nodes.append(helper.make_node(recurrent_steps.OPS[op], inputs, outputs, name=name,
                                           domain=recurrent_steps.DOMAIN,
                                           reverse=[int(_walks_backwards(direction, d)) for d in range(directions)],
                                           **extra))
        self.fused += 1
        return self.nodes

    def _direction(self, cell: _Cell, x: str, steps_order: range, h: str, c: str | None, lens: str,
                   dtype) -> tuple[list[str], str, str | None]:
        """One direction's steps, in `steps_order`: (Y's step values in time order, final h, final c)."""
        xw = cell.project(x)
        ys: list[str] = [""] * len(steps_order)
        for t in steps_order:
            at = self.const(f"t{t}", np.asarray(t, np.int64))
            h_new, c_new = cell.step(self.op("Gather", [xw, at], f"x{t}", axis=0), h, c, t)
            if lens:  # past an entry's length: its state is held and its Y is zero
                live = self.unsqueeze(self.op("Less", [at, lens], f"live{t}"), 1, f"live{t}_col")
                ys[t] = self.op("Where", [live, h_new, self.const("zero", np.zeros((), dtype))], f"y{t}")
                h_new = self.op("Where", [live, h_new, h], f"h{t}_held")
                if c is not None:
                    c_new = self.op("Where", [live, c_new, c], f"c{t}_held")
            else:
                ys[t] = h_new
            h, c = h_new, c_new
        return ys, h, c

    def _activations(self, node, attrs, directions: int, what: str) -> list[list[str]]:
        default = RECURRENT_OPS[node.op_type]
        names = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", list(default) *
                                                                            directions)]
        if attrs.get("activation_alpha") or attrs.get("activation_beta"):
            raise BackendError(f"{what}: activation_alpha/activation_beta are not unrolled for TVM")
        known = [_ACTIVATIONS.get(a.lower()) for a in names]
        if None in known or len(known) != len(default) * directions:
            raise BackendError(f"{what}: activations {names} are not unrolled for TVM (Sigmoid, Tanh, Relu)")
        return [known[d * len(default):(d + 1) * len(default)] for d in range(directions)]

    def _initial(self, node, k: int, d: int, batch: int, hidden: int, dtype) -> str:
        name = _input(node, k)
        if not name:
            return self.const("zeros", np.zeros((batch, hidden), dtype))
        return self.op("Gather", [name, self.const(f"d{d}", np.asarray(d, np.int64))], "initial", axis=0)


class _Cell:
    """One direction's weights, laid out for MatMul (transposed) and with the biases that can be summed summed."""

    def __init__(self, u: _Unroller, op: str, attrs: dict, w, r, b, p, acts: list[str], hidden: int) -> None:
        self.u, self.op_type, self.acts, self.hidden = u, op, acts, hidden
        gates = w.shape[0]
        wb, rb = b[:gates], b[gates:]
        self.clip, self.dtype = attrs.get("clip"), w.dtype
        self.input_forget = op == "LSTM" and bool(attrs.get("input_forget", 0))
        self.linear_before_reset = op == "GRU" and bool(attrs.get("linear_before_reset", 0))
        bias = wb + rb
        if self.linear_before_reset:  # R's h-gate bias goes inside the reset gate's product
            bias[2 * hidden:] = wb[2 * hidden:]
            self.rb_h = u.const("Rb_h", rb[2 * hidden:])
        self.w, self.bias = w, bias
        if op == "GRU":  # z and r read the state; h reads it (reset) on its own
            self.r_zr, self.r_h = u.const("R_zr_T", r[:2 * hidden].T), u.const("R_h_T", r[2 * hidden:].T)
        else:
            self.r_t = u.const("R_T", r.T)
        self.p = None if p is None else [u.const(f"P_{g}", p[k * hidden:(k + 1) * hidden])
                                         for k, g in enumerate("iof")]
        self.one = u.const("one", np.ones((), w.dtype)) if self.input_forget else ""

    def project(self, x: str) -> str:
        return self.u.project(x, self.w, self.bias)

    def _gate(self, pre: str, act: str, hint: str) -> str:
        if self.clip is not None:
            pre = self.u.clip(pre, float(self.clip), self.dtype, f"{hint}_clip")
        return self.u.op(act, [pre], hint)

    def _slice(self, x: str, k: int, count: int = 1, hint: str = "") -> str:
        """Gate blocks k .. k+count-1 of x [batch, gates*hidden]."""
        return self.u.slice_columns(x, k * self.hidden, (k + count) * self.hidden, hint)

    def step(self, x_t: str, h: str, c: str | None, t: int) -> tuple[str, str | None]:
        u, f = self.u, self.acts
        if self.op_type == "RNN":
            pre = u.op("Add", [x_t, u.op("MatMul", [h, self.r_t], f"HR{t}")], f"pre{t}")
            return self._gate(pre, f[0], f"h{t}"), None
        if self.op_type == "GRU":
            zr = u.op("Add", [self._slice(x_t, 0, 2, f"xzr{t}"), u.op("MatMul", [h, self.r_zr], f"HR_zr{t}")],
                      f"pre_zr{t}")
            z = self._gate(self._slice(zr, 0, hint=f"pre_z{t}"), f[0], f"z{t}")
            r = self._gate(self._slice(zr, 1, hint=f"pre_r{t}"), f[0], f"r{t}")
            if self.linear_before_reset:
                hr = u.op("Mul", [r, u.op("Add", [u.op("MatMul", [h, self.r_h], f"HR_h{t}"), self.rb_h])], f"rHR{t}")
            else:
                hr = u.op("MatMul", [u.op("Mul", [r, h], f"rH{t}"), self.r_h], f"rH_R{t}")
            n = self._gate(u.op("Add", [self._slice(x_t, 2, hint=f"xh{t}"), hr], f"pre_h{t}"), f[1], f"n{t}")
            # (1 - z) * n + z * h = n + z * (h - n)
            return u.op("Add", [n, u.op("Mul", [z, u.op("Sub", [h, n], f"h_minus_n{t}")], f"zd{t}")], f"h{t}"), None
        pre = u.op("Add", [x_t, u.op("MatMul", [h, self.r_t], f"HR{t}")], f"pre{t}")
        pre_i, pre_o, pre_f, pre_c = (self._slice(pre, k, hint=f"pre_{g}{t}") for k, g in enumerate("iofc"))
        if self.p is not None:
            pre_i = u.op("Add", [pre_i, u.op("Mul", [c, self.p[0]], f"Pc_i{t}")], f"pre_i{t}_p")
            pre_f = u.op("Add", [pre_f, u.op("Mul", [c, self.p[2]], f"Pc_f{t}")], f"pre_f{t}_p")
        i = self._gate(pre_i, f[0], f"i{t}")
        forget = u.op("Sub", [self.one, i], f"f{t}") if self.input_forget else self._gate(pre_f, f[0], f"f{t}")
        cell = u.op("Add", [u.op("Mul", [forget, c], f"fc{t}"),
                            u.op("Mul", [i, self._gate(pre_c, f[1], f"g{t}")], f"ig{t}")], f"c{t}")
        if self.p is not None:
            pre_o = u.op("Add", [pre_o, u.op("Mul", [cell, self.p[1]], f"Pc_o{t}")], f"pre_o{t}_p")
        o = self._gate(pre_o, f[0], f"o{t}")
        return u.op("Mul", [o, u.op(f[2], [cell], f"hc{t}")], f"h{t}"), cell


def _walks_backwards(direction: str, d: int) -> bool:
    """Whether direction d of a layer with this `direction` attribute runs from the last step to the first."""
    return direction == "reverse" or (direction == "bidirectional" and d == 1)


def _input(node: onnx.NodeProto, k: int) -> str:
    return node.input[k] if len(node.input) > k else ""


def _static_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Every value's shape the model states or ONNX's shape inference finds (dims as ints or symbol names)."""
    def dims(v) -> list:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim]

    g = model.graph
    known = {v.name: dims(v) for v in [*g.input, *g.value_info, *g.output] if v.type.tensor_type.HasField("shape")}
    wanted = {n.input[0] for n in g.node if n.op_type in RECURRENT_OPS}
    if wanted <= known.keys():
        return known
    try:
        inferred = onnx_io.infer_shapes(model).graph  # (a heavy model's on its weightless view)
    except Exception:  # an unknown op: what the model states is all there is
        return known
    return {**known, **{v.name: dims(v) for v in [*inferred.input, *inferred.value_info, *inferred.output]
                        if v.type.tensor_type.HasField("shape")}}
