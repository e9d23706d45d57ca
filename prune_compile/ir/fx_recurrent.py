"""torch.export's recurrent layers (`aten.lstm.input`, `aten.gru.input`, `aten.rnn_tanh.input`, `aten.rnn_relu.input`:
nn.LSTM, nn.GRU, nn.RNN) as the IR's ONNX-semantics `lstm` / `gru` / `rnn` nodes, one per layer.

Each layer's weights become W [directions, gates*hidden, features], R [directions, gates*hidden, hidden] and B
[directions, 2*gates*hidden] with the gate blocks in ONNX's order (LSTM i, o, f, c from torch's i, f, g, o; GRU z, r,
h from torch's r, z, n; torch's GRU is ONNX's linear_before_reset=1). Each constant's index map says which rows of
which parameter each gate block is (an entry's fourth element is the parameter's first row), so torch surgery
slices the user's weight_ih_l0 and friends. Layers are chained as torch does, [sequence, batch, directions*hidden];
the initial state [layers*directions, batch, hidden] is sliced per layer, which ties every layer's hidden units
together as nn.LSTM's one hidden_size needs.

Forms kept as an unknown op (frozen, named): projections (proj_size), dropout between layers in training, weights
that are not parameters or buffers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .graph import Provenance, Value

aten = torch.ops.aten

# target -> (IR op, torch's gate blocks in ONNX's order, the activation when not ONNX's default)
RECURRENT_ATEN = {
    aten.lstm.input: ("lstm", (0, 3, 1, 2), None),
    aten.gru.input: ("gru", (1, 0, 2), None),
    aten.rnn_tanh.input: ("rnn", (0,), None),
    aten.rnn_relu.input: ("rnn", (0,), "Relu"),
}


def convert_recurrent(imp, node: torch.fx.Node) -> Any:
    op, order, activation = RECURRENT_ATEN[node.target]
    x = imp.v(node.args[0])
    hx, params = node.args[1], list(node.args[2])
    has_biases, layers, dropout, train, bidirectional, batch_first = node.args[3:9]
    directions = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    sources = [_source(imp, p) for p in params]
    if len(params) != layers * directions * per or (train and dropout) or None in sources:
        return imp._opaque(node)  # projections, dropout, or weights computed at run time
    states = [imp.v(h) for h in (hx if isinstance(hx, (list, tuple)) else [hx])]
    vals = node.meta["val"]
    outs = [imp._value_from_fake(f"{node.name}_{i}", t) for i, t in enumerate(vals)]
    hidden = int(vals[1].shape[-1])
    if batch_first:
        x = imp.emit_tmp(node, "transpose", [x], {"perm": [1, 0, 2]}, (x.shape[1], x.shape[0], x.shape[2]), x.dtype)
    finals: list[list[Value]] = [[] for _ in states]
    for k in range(layers):
        layer = [sources[(k * directions + d) * per:(k * directions + d + 1) * per] for d in range(directions)]
        w = _stacked(imp, node, f"l{k}_W", [s[0] for s in layer], order, hidden, x.shape[2])
        r = _stacked(imp, node, f"l{k}_R", [s[1] for s in layer], order, hidden, hidden)
        b = _biases(imp, node, f"l{k}_B", layer, order, hidden) if has_biases else None
        initial = [imp.emit_tmp(node, "slice", [s], {"starts": [k * directions], "ends": [(k + 1) * directions],
                                                     "axes": [0], "steps": [1]}, (directions, *s.shape[1:]), s.dtype)
                   for s in states]
        steps, batch = x.shape[0], x.shape[1]
        ys = [Value(imp.unique(f"{node.name}_l{k}_Y"), (steps, directions, batch, hidden), x.dtype)]
        ys += [Value(imp.unique(f"{node.name}_l{k}_Y_{s}"), (directions, batch, hidden), x.dtype)
               for s in "hc"[:len(states)]]
        attrs: dict[str, Any] = {"hidden_size": hidden,
                                 "direction": "bidirectional" if bidirectional else "forward"}
        if op == "gru":
            attrs["linear_before_reset"] = 1  # torch's GRU applies the reset gate after R's product
        if activation:
            attrs["activations"] = [activation] * directions
        ins = [x, w, r, b, None, initial[0], initial[1] if len(initial) > 1 else None]
        while ins[-1] is None:
            ins.pop()
        imp._add(op, ins, ys, attrs, node)
        for finals_s, y in zip(finals, ys[1:], strict=True):
            finals_s.append(y)
        y = imp.emit_tmp(node, "transpose", [ys[0]], {"perm": [0, 2, 1, 3]}, (steps, batch, directions, hidden),
                         x.dtype)
        merged = {"shape": [steps, batch, directions * hidden]}
        if k == layers - 1 and not batch_first:
            x = imp.emit(node, "reshape", [y], merged, out=outs[0])
        else:
            x = imp.emit_tmp(node, "reshape", [y], merged, merged["shape"], x.dtype)
    if batch_first:
        imp.emit(node, "transpose", [x], {"perm": [1, 0, 2]}, out=outs[0])
    for out, parts in zip(outs[1:], finals, strict=True):
        imp.emit(node, "concat", parts, {"axis": 0}, out=out)
    return tuple(outs)


def _source(imp, p: torch.fx.Node) -> tuple[str, np.ndarray] | None:
    """A parameter's (or buffer's) name and data; None for a tensor computed at run time or folded."""
    v = imp.env.get(p)
    if not isinstance(v, Value) or v.data is None or v.provenance is None:
        return None
    if v.provenance.kind not in ("torch_parameter", "torch_buffer"):
        return None
    return v.provenance.name, np.asarray(v.data)


def _stacked(imp, node, hint: str, sources: list[tuple[str, np.ndarray]], order, hidden: int, width: int) -> Value:
    """Per direction, the parameter's gate blocks in ONNX's order: [directions, gates*hidden, width]."""
    data = np.stack([np.concatenate([a[g * hidden:(g + 1) * hidden] for g in order]) for _, a in sources])
    index_map = tuple((name, (None, (0, i * hidden, hidden, g * hidden), (1, 0, width)))
                      for name, _ in sources for i, g in enumerate(order))
    return _const(imp, node, hint, data, [name for name, _ in sources], index_map)


def _biases(imp, node, hint: str, layer, order, hidden: int) -> Value:
    """Per direction, bias_ih's then bias_hh's gate blocks in ONNX's order: [directions, 2*gates*hidden]."""
    gates = len(order)
    data = np.stack([np.concatenate([a[g * hidden:(g + 1) * hidden] for _, a in (s[2], s[3]) for g in order])
                     for s in layer])
    index_map = tuple((name, (None, (0, (j * gates + i) * hidden, hidden, g * hidden)))
                      for s in layer for j, (name, _) in enumerate((s[2], s[3])) for i, g in enumerate(order))
    return _const(imp, node, hint, data, [n for s in layer for n, _ in (s[2], s[3])], index_map)


def _const(imp, node, hint: str, data: np.ndarray, names: list[str], index_map) -> Value:
    data = np.ascontiguousarray(data)
    prov = Provenance("folded", "", tuple(sorted(set(names))), False, index_map)
    return Value(imp.unique(f"{node.name}_{hint}"), data.shape, data.dtype, data=data, provenance=prov)
