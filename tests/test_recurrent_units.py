"""Recurrent layers (LSTM, GRU, RNN): their input features are W's columns, their hidden units are W's and R's rows
in every gate block, R's columns and the states' last axis. Oracle: pruned == consumer-zeroed original."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from prune_compile.errors import GraphError
from prune_compile.ir import import_onnx
from prune_compile.ir.ops import RECURRENT_GATES
from prune_compile.passes.cost import graph_cost, node_macs
from prune_compile.passes.deps import analyze
from prune_compile.passes.plan import Plan, param_name
from prune_compile.passes.rewrite import pruned_copy

from .oracle import exact_plan, oracle_error, torch_onnx_graph


class _ConvRecurrent(nn.Module):
    """A conv front end feeding a recurrent layer, as speech models (silero-vad) are built."""

    def __init__(self, kind: str, bidirectional: bool, layers: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 12, 3, padding=1)
        self.rnn = getattr(nn, kind)(12, 8, num_layers=layers, bidirectional=bidirectional)
        self.head = nn.Linear(8 * (2 if bidirectional else 1), 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(torch.relu(self.conv(x)).permute(2, 0, 1))  # [sequence, batch, features]
        return self.head(y[-1])


@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_a_recurrent_layer_prunes_its_input_channels_and_its_hidden_units(kind, bidirectional) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5)
    graph = torch_onnx_graph(_ConvRecurrent(kind, bidirectional).eval(), x)
    (node,) = [n for n in graph.nodes if n.op == kind.lower()]
    w, r = node.inputs[1], node.inputs[2]
    deps = analyze(graph)
    (front,) = [g for g in deps.groups if any(param_name(m) == "conv.weight" and m.role == "producer"
                                              for m in g.params)]
    assert front.prunable and front.size == 12 and front.exact
    assert any(m.value is w and m.role == "consumer" and m.axis == 2 for m in front.params)  # W's columns
    # The hidden units: every gate block's row of W and R, R's column, B's 2*gates entries, and the head's columns
    # (one per direction, through the reshape that merges the two).
    (hidden,) = [g for g in deps.groups if any(m.value is r and m.axis == 2 for m in g.members)]
    assert hidden.prunable and hidden.exact and hidden.size == 8
    gates, directions = RECURRENT_GATES[kind.lower()], 2 if bidirectional else 1
    shapes = {(m.value.name, m.axis, m.role): m.indices.shape[1] for m in hidden.params}
    assert shapes[(w.name, 1, "producer")] == shapes[(r.name, 1, "producer")] == gates
    assert shapes[(r.name, 2, "consumer")] == 1
    assert shapes[(node.inputs[3].name, 1, "producer")] == 2 * gates
    assert shapes[("head.weight", 1, "consumer")] == directions
    # Unit j is row g*8 + j of each gate block.
    assert (hidden.members[[m.value for m in hidden.members].index(w)].indices
            == np.arange(8)[:, None] + 8 * np.arange(gates)).all()

    plan = exact_plan(deps, 0.5)
    assert len(plan.removed_of(hidden)) == 4
    feeds = {graph.inputs[0].name: x.numpy()}
    assert oracle_error(graph, deps, plan, feeds) <= 1e-5
    pruned = pruned_copy(graph, plan, deps)
    (slim,) = [n for n in pruned.nodes if n.op == kind.lower()]
    assert slim.attrs["hidden_size"] == 4
    assert slim.inputs[1].shape == (directions, gates * 4, 6) and slim.inputs[2].shape == (directions, gates * 4, 4)
    # MACs: every step of each direction multiplies W over the features and R over the hidden state.
    assert node_macs(node) == 5 * 2 * directions * gates * 8 * (12 + 8)
    assert node_macs(slim) == 5 * 2 * directions * gates * 4 * (6 + 4)
    assert graph_cost(pruned)["macs"] < graph_cost(graph)["macs"]


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_stacked_bidirectional_layers_prune_each_layers_hidden_units(kind) -> None:
    """Two bidirectional layers: the second reads the first's two directions merged, [2, hidden] -> [2*hidden]."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6)
    graph = torch_onnx_graph(_ConvRecurrent(kind, bidirectional=True, layers=2).eval(), x)
    rs = [n.inputs[2] for n in graph.nodes if n.op == kind.lower()]
    assert len(rs) == 2
    deps = analyze(graph)
    hidden = [g for r in rs for g in deps.groups if any(m.value is r and m.axis == 2 for m in g.members)]
    assert len(hidden) == 2 and all(g.prunable and g.exact and g.size == 8 for g in hidden)
    plan = Plan({g.id: np.arange(1, 8, 2) for g in hidden})
    assert oracle_error(graph, deps, plan, {graph.inputs[0].name: x.numpy()}) <= 1e-5


def _onnx_recurrent(op: str, directions: int, computed_r: bool = False, **attrs) -> onnx.ModelProto:
    """x [4, 3, 2] -> MatMul (5 features) -> `op` with every optional input (B, sequence_lens, initial states, and
    LSTM's peepholes) as constants -> Y and Y_h, each with the directions merged, read by a MatMul of its own."""
    rng = np.random.default_rng(0)
    seq, batch, feats, hidden = 4, 3, 5, 6
    gates = RECURRENT_GATES[op.lower()]

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name)

    inits = [weight("proj", 2, feats), weight("w", directions, gates * hidden, feats),
             weight("r", directions, gates * hidden, hidden), weight("b", directions, 2 * gates * hidden),
             numpy_helper.from_array(np.array([4, 2, 3], np.int32), "lens"),
             weight("h0", directions, batch, hidden), weight("y_head", directions * hidden, 2),
             weight("h_head", directions * hidden, 2),
             numpy_helper.from_array(np.array([0, 2, 1, 3], np.int64), "y_perm_shape"),
             numpy_helper.from_array(np.array([seq, batch, directions * hidden], np.int64), "y_shape"),
             numpy_helper.from_array(np.array([batch, directions * hidden], np.int64), "h_shape")]
    inputs = ["feats", "w", "r_used" if computed_r else "r", "b", "lens", "h0"]
    if op == "LSTM":
        inits += [weight("c0", directions, batch, hidden), weight("p", directions, 3 * hidden)]
        inputs += ["c0", "p"]
    direction = "bidirectional" if directions == 2 else "forward"
    nodes = [helper.make_node("MatMul", ["x", "proj"], ["feats"], name="proj"),
             helper.make_node(op, inputs, ["y", "y_h"], name="rnn", hidden_size=hidden, direction=direction,
                              **attrs),
             helper.make_node("Transpose", ["y"], ["y_t"], name="y_t", perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["y_t", "y_shape"], ["y_flat"], name="y_flat"),
             helper.make_node("MatMul", ["y_flat", "y_head"], ["out_y"], name="y_head"),
             helper.make_node("Transpose", ["y_h"], ["h_t"], name="h_t", perm=[1, 0, 2]),
             helper.make_node("Reshape", ["h_t", "h_shape"], ["h_flat"], name="h_flat"),
             helper.make_node("MatMul", ["h_flat", "h_head"], ["out_h"], name="h_head")]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, batch, 2])]
    if computed_r:  # R scaled by a run-time input: a weight computed at run time
        nodes.insert(0, helper.make_node("Mul", ["r", "scale"], ["r_used"], name="scale_r"))
        graph_inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]))
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("out_y", "out_h")]
    graph = helper.make_graph(nodes, "recurrent", graph_inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("directions", [1, 2], ids=["forward", "bidirectional"])
@pytest.mark.parametrize("op, attrs", [("LSTM", {}), ("LSTM", {"input_forget": 1}), ("GRU", {}),
                                       ("GRU", {"linear_before_reset": 1}), ("RNN", {})],
                         ids=["lstm", "lstm-input-forget", "gru", "gru-linear-before-reset", "rnn"])
def test_every_optional_input_follows_the_hidden_units(op, attrs, directions) -> None:
    graph = import_onnx(_onnx_recurrent(op, directions, **attrs))
    (node,) = [n for n in graph.nodes if n.op == op.lower()]
    deps = analyze(graph)
    (hidden,) = [g for g in deps.groups if any(m.value is node.inputs[2] and m.axis == 2 for m in g.members)]
    assert hidden.prunable and hidden.exact and hidden.size == 6
    members = {(m.value.name, m.axis): m.indices.shape[1] for m in hidden.members}
    gates = RECURRENT_GATES[op.lower()]
    want = {("w", 1): gates, ("r", 1): gates, ("r", 2): 1, ("b", 1): 2 * gates, ("h0", 2): 1,
            ("y_head", 0): directions, ("h_head", 0): directions}
    if op == "LSTM":
        want |= {("c0", 2): 1, ("p", 1): 3}
    assert {k: members.get(k) for k in want} == want
    (features,) = [g for g in deps.groups if any(m.value.name == "proj" and m.axis == 1 for m in g.members)]
    assert features.prunable and features.exact

    removed = np.array([0, 2, 5])
    plan = Plan({hidden.id: removed, features.id: np.array([1, 4])})
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 3, 2)).astype(np.float32)}
    assert oracle_error(graph, deps, plan, feeds) <= 1e-5
    pruned = pruned_copy(graph, plan, deps)
    (slim,) = [n for n in pruned.nodes if n.op == op.lower()]
    assert slim.attrs["hidden_size"] == 3
    shapes = {v.name: v.shape for v in slim.inputs if v is not None}
    assert shapes["h0"] == (directions, 3, 3) and shapes["b"] == (directions, 2 * gates * 3)
    if op == "LSTM":
        assert shapes["p"] == (directions, 9) and shapes["c0"] == (directions, 3, 3)
    # The rows kept are the same units in every gate block.
    kept = np.array([1, 3, 4])
    r0 = node.inputs[2].data
    rows = (np.arange(gates)[:, None] * 6 + kept).ravel()
    np.testing.assert_array_equal(slim.inputs[2].data, r0[:, rows][:, :, kept])


def test_hidden_units_behind_a_computed_weight_are_frozen_with_the_reason() -> None:
    graph = import_onnx(_onnx_recurrent("LSTM", 1, computed_r=True))
    (node,) = [n for n in graph.nodes if n.op == "lstm"]
    assert not node.inputs[2].is_constant
    deps = analyze(graph)
    (hidden,) = [g for g in deps.groups if any(m.value is node.inputs[1] and m.axis == 1 for m in g.members)]
    assert not hidden.prunable
    assert hidden.reason == "node 'rnn': LSTM weight 'r_used' is computed at run time"
    (features,) = [g for g in deps.groups if any(m.value.name == "proj" and m.axis == 1 for m in g.members)]
    assert features.prunable  # the input features are W's columns, whatever R is


def test_verify_names_a_recurrent_operand_that_does_not_fit_hidden_size() -> None:
    graph = import_onnx(_onnx_recurrent("GRU", 1))
    (node,) = [n for n in graph.nodes if n.op == "gru"]
    b = node.inputs[3]
    b.data, b.shape = b.data[:, :-3], (1, b.shape[1] - 3)
    with pytest.raises(GraphError, match=r"node 'rnn' \(gru\): B \[1, 33\] does not fit hidden_size 6 "
                                         r"\(expected \[1, 36\]\)"):
        graph.verify()


class _TorchRecurrent(nn.Module):
    """_ConvRecurrent in any layout, as the torch path sees it: torch.export's aten.lstm / gru / rnn_tanh /
    rnn_relu."""

    def __init__(self, kind: str, bidirectional: bool, layers: int, batch_first: bool, **kwargs) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.conv = nn.Conv1d(3, 12, 3, padding=1)
        self.rnn = getattr(nn, kind)(12, 8, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                                     **kwargs)
        self.head = nn.Linear(8 * (2 if bidirectional else 1), 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(x))
        y, _ = self.rnn(f.permute(0, 2, 1) if self.batch_first else f.permute(2, 0, 1))
        return self.head(y[:, -1] if self.batch_first else y[-1])


TORCH_FORMS = [("LSTM", False, 1, False, {}), ("LSTM", True, 2, False, {}), ("LSTM", True, 2, True, {}),
               ("GRU", True, 2, True, {}), ("GRU", False, 1, False, {}), ("RNN", True, 2, False, {}),
               ("RNN", False, 2, True, {"nonlinearity": "relu"}), ("LSTM", False, 1, False, {"bias": False})]


@pytest.mark.parametrize("kind, bidirectional, layers, batch_first, kwargs", TORCH_FORMS,
                         ids=["lstm", "lstm-bi-2", "lstm-bi-2-batch-first", "gru-bi-2-batch-first", "gru",
                              "rnn-bi-2", "rnn-relu-2-batch-first", "lstm-no-bias"])
def test_the_torch_path_prunes_hidden_units_and_surgery_slices_the_module(kind, bidirectional, layers, batch_first,
                                                                         kwargs) -> None:
    import copy

    from prune_compile.backends import ort
    from prune_compile.backends.torch_module import apply_plan_to_module
    from prune_compile.ir import export_onnx
    from prune_compile.ir.fx_importer import import_torch_module
    from prune_compile.passes.plan import plan_to_json, uniform_plan
    from prune_compile.pruner import module_drift

    torch.manual_seed(0)
    model = _TorchRecurrent(kind, bidirectional, layers, batch_first, **kwargs).eval()
    x = torch.randn(2, 3, 5)
    graph = import_torch_module(model, (x,))
    assert [n.op for n in graph.nodes].count(kind.lower()) == layers  # one IR node per layer
    feeds = {graph.inputs[0].name: x.numpy()}
    with torch.no_grad():
        np.testing.assert_allclose(ort.run(export_onnx(graph), feeds)[0], model(x).numpy(), rtol=1e-5, atol=1e-6)
    deps = analyze(graph)
    # Every layer's units are one group: the initial state ties them, as nn.LSTM's one hidden_size needs.
    (hidden,) = [g for g in deps.groups if g.size == 8]
    assert hidden.prunable and hidden.exact
    rs = [n.inputs[2] for n in graph.nodes if n.op == kind.lower()]
    assert all(any(m.value is r and m.axis == 2 for m in hidden.members) for r in rs)  # each layer's R columns
    plan = uniform_plan(deps, 0.5)
    assert oracle_error(graph, deps, plan, feeds) <= 1e-5
    doc = plan_to_json(deps, plan)
    gate_blocks = [s for g in doc["groups"] for m in g["members"] for s in m.get("maps", ()) if len(s) == 5]
    assert gate_blocks and all(s[0].startswith("rnn.weight_") or s[0].startswith("rnn.bias_") for s in gate_blocks)
    pruned = apply_plan_to_module(copy.deepcopy(model), doc, [x])
    assert (pruned.rnn.input_size, pruned.rnn.hidden_size) == (6, 4)
    assert module_drift(pruned, pruned_copy(graph, plan, deps), [x]) <= 1e-5
    pruned.train()
    pruned(x).square().sum().backward()  # fine-tunes: every parameter, the sliced ones included, gets a gradient
    assert all(p.grad is not None for p in pruned.parameters())


def test_the_torch_path_finds_the_groups_the_onnx_path_finds() -> None:
    from prune_compile.ir.fx_importer import import_torch_module

    torch.manual_seed(0)
    model = _TorchRecurrent("LSTM", True, 1, False).eval()
    x = torch.randn(2, 3, 5)

    def summary(graph):
        return sorted((g.size, g.prunable, g.exact) for g in analyze(graph).groups)

    assert summary(import_torch_module(model, (x,))) == summary(torch_onnx_graph(model, x))


def test_the_torch_path_keeps_a_state_the_caller_passes_and_a_projection_frozen() -> None:
    from prune_compile.ir.fx_importer import import_torch_module

    class WithState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(6, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x, h)[0])

    graph = import_torch_module(WithState().eval(), (torch.randn(5, 2, 6), torch.zeros(1, 2, 8)))
    (hidden,) = [g for g in analyze(graph).groups if g.size == 8]
    assert not hidden.prunable and hidden.reason == "graph input 'h'"

    projected = nn.LSTM(6, 8, proj_size=4).eval()
    graph = import_torch_module(projected, (torch.randn(5, 2, 6),))
    (node,) = [n for n in graph.nodes if n.opaque is not None]
    assert node.opaque.op_type == "aten.lstm.input"
