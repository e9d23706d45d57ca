"""Recurrent layers unrolled for TVM's ONNX frontend: the unrolled model computes what ONNX Runtime's LSTM, GRU and
RNN kernels compute (both run in ONNX Runtime), every form; forms not unrolled are named; TVM compiles the result."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from prune_compile.backends import ort
from prune_compile.backends.tvm.recurrent_unroll import has_recurrences, unrolled_recurrences
from prune_compile.errors import BackendError

SEQ, BATCH, FEATS, HIDDEN = 4, 3, 3, 5
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _model(op: str, direction: str = "forward", *, bias: bool = True, lens: str = "", initial: bool = True,
           peepholes: bool = True, outputs: tuple[str, ...] = ("y", "y_h", "y_c"), opset: int = 17,
           computed_r: bool = False, seq: int | str = SEQ, hidden: int = HIDDEN, **attrs) -> onnx.ModelProto:
    """x [seq, batch, features] -> one `op` node. lens: "" (none), "const" (an initializer) or "input"."""
    rng = np.random.default_rng(7)
    d = 2 if direction == "bidirectional" else 1
    rows = GATES[op] * hidden

    def weight(name: str, *shape: int, scale: float = 0.6) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    # R scaled as 1/sqrt(hidden): wide layers' gates stay off saturation, where they would hide a wrong state
    inits = [weight("w", d, rows, FEATS), weight("r", d, rows, hidden, scale=0.6 * (HIDDEN / hidden) ** 0.5)]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, BATCH, FEATS])]
    names = ["x", "w", "r_used" if computed_r else "r", "", "", "", "", ""]
    if bias:
        inits.append(weight("b", d, 2 * rows))
        names[3] = "b"
    if lens == "const":
        inits.append(numpy_helper.from_array(np.array([4, 1, 3], np.int32), "lens"))
    elif lens == "input":
        graph_inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [BATCH]))
    names[4] = "lens" if lens else ""
    if initial:
        inits.append(weight("h0", d, BATCH, hidden))
        names[5] = "h0"
        if op == "LSTM":
            inits.append(weight("c0", d, BATCH, hidden))
            names[6] = "c0"
    if peepholes and op == "LSTM":
        inits.append(weight("p", d, 3 * hidden))
        names[7] = "p"
    while not names[-1]:
        names.pop()
    outs = [o if o in outputs else "" for o in ("y", "y_h", "y_c")[:3 if op == "LSTM" else 2]]
    while not outs[-1]:
        outs.pop()
    nodes = [helper.make_node(op, names, outs, name="rnn", hidden_size=hidden, direction=direction, **attrs)]
    if computed_r:
        nodes.insert(0, helper.make_node("Mul", ["r", "scale"], ["r_used"], name="scale_r"))
        graph_inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]))
    shapes = {"y": [seq, d, BATCH, hidden], "y_h": [d, BATCH, hidden], "y_c": [d, BATCH, hidden]}
    graph = helper.make_graph(nodes, "recurrent", graph_inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[o]) for o in outs if o],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((SEQ, BATCH, FEATS)).astype(np.float32)}
    if any(i.name == "lens" for i in model.graph.input):
        feeds["lens"] = np.array([2, 4, 3], np.int32)
    return feeds


def _assert_unrolled_matches(model: onnx.ModelProto) -> onnx.ModelProto:
    unrolled = unrolled_recurrences(model)
    assert not has_recurrences(unrolled) and has_recurrences(model)
    onnx.checker.check_model(unrolled, full_check=True)
    feeds = _feeds(model)
    want, got = ort.run(model, feeds), ort.run(unrolled, feeds)
    assert [a.shape for a in got] == [a.shape for a in want]
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    return unrolled


FORMS = {
    "lstm": ("LSTM", {}),
    "lstm-no-optional-inputs": ("LSTM", {"bias": False, "initial": False, "peepholes": False}),
    "lstm-const-lens": ("LSTM", {"lens": "const"}),
    "lstm-input-lens": ("LSTM", {"lens": "input"}),
    "lstm-clip": ("LSTM", {"clip": 0.7}),
    "lstm-input-forget": ("LSTM", {"input_forget": 1}),
    "lstm-final-state-only": ("LSTM", {"outputs": ("y_h",)}),
    "lstm-activations": ("LSTM", {"activations": ["Sigmoid", "Relu", "Tanh"]}),
    "gru": ("GRU", {}),
    "gru-linear-before-reset": ("GRU", {"linear_before_reset": 1}),
    "gru-input-lens-clip": ("GRU", {"lens": "input", "clip": 0.5}),
    "gru-no-optional-inputs": ("GRU", {"bias": False, "initial": False}),
    "rnn": ("RNN", {}),
    "rnn-relu-const-lens": ("RNN", {"activations": ["Relu"], "lens": "const"}),
}


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("form", list(FORMS))
def test_unrolled_layer_computes_what_onnx_runtime_computes(form: str, direction: str) -> None:
    op, kwargs = FORMS[form]
    _assert_unrolled_matches(_model(op, direction, **_per_direction(kwargs, direction)))


def _per_direction(kwargs: dict, direction: str) -> dict:
    """`kwargs` with its activations (one direction's) given for each direction."""
    if "activations" not in kwargs:
        return kwargs
    return {**kwargs, "activations": kwargs["activations"] * (2 if direction == "bidirectional" else 1)}


@pytest.mark.parametrize("opset", [9, 11, 12])
def test_older_opsets_get_their_own_forms_of_unsqueeze_slice_and_clip(opset: int) -> None:
    unrolled = _assert_unrolled_matches(_model("LSTM", "bidirectional", opset=opset, clip=0.9))
    ops = {n.op_type: n for n in unrolled.graph.node}
    assert len(ops["Unsqueeze"].input) == 1 and [a.name for a in ops["Unsqueeze"].attribute] == ["axes"]
    assert len(ops["Clip"].input) == (1 if opset < 11 else 3)


def test_the_sequence_is_projected_once_per_direction() -> None:
    unrolled = unrolled_recurrences(_model("LSTM", "bidirectional"))
    matmuls = [n for n in unrolled.graph.node if n.op_type == "MatMul"]
    assert sum(n.input[0] == "x" for n in matmuls) == 2  # X·Wᵀ for all steps at once
    assert len(matmuls) == 2 + 2 * SEQ  # and the state by R at each step


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layout": 1}, r"node 'rnn' \(LSTM\): layout 1 \(batch first\) is not unrolled for TVM"),
    ({"computed_r": True}, r"node 'rnn' \(LSTM\): its input 'r_used' is computed at run time"),
    ({"seq": "time"}, r"node 'rnn' \(LSTM\): input 'x' needs a static \[sequence, batch, features\] shape"),
    ({"activations": ["HardSigmoid", "Tanh", "Tanh"]}, r"activations \['HardSigmoid', 'Tanh', 'Tanh'\] are not"),
    ({"activations": ["Sigmoid", "Tanh", "Tanh"], "activation_alpha": [0.5]}, "activation_alpha"),
])
def test_forms_not_unrolled_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        unrolled_recurrences(_model("LSTM", **kwargs))


def test_tvm_compiles_an_unrolled_layer_and_agrees_with_onnx_runtime(tmp_path) -> None:
    from prune_compile.backends import tvm as tvm_backend

    model = _model("LSTM", "bidirectional", lens="const")
    lib = str(tmp_path / "lstm.so")
    tvm_backend.build(model, "cpu", lib)
    feeds = _feeds(model)
    assert ort.relative_error(ort.run(model, feeds), tvm_backend.run_library(lib, feeds, ["x"])) <= 1e-4


FUSED_FORMS = {  # layers the CPU targets run as one Steps kernel (recurrent_steps.py)
    "lstm": ("LSTM", {"peepholes": False}),
    "lstm-no-optional-inputs": ("LSTM", {"bias": False, "initial": False, "peepholes": False}),
    "lstm-final-state-only": ("LSTM", {"peepholes": False, "outputs": ("y_h",)}),
    "lstm-wide": ("LSTM", {"peepholes": False, "hidden": 37}),  # 4H = 148: two 64-column passes and a tail of 20
    "gru": ("GRU", {}),
    "gru-linear-before-reset": ("GRU", {"linear_before_reset": 1}),
    "gru-wide-no-optional-inputs": ("GRU", {"hidden": 37, "bias": False, "initial": False}),  # the h gate's tail
    "gru-wide-linear-before-reset": ("GRU", {"hidden": 37, "linear_before_reset": 1, "outputs": ("y_h",)}),
    "rnn": ("RNN", {}),
    "rnn-relu-no-optional-inputs": ("RNN", {"activations": ["Relu"], "bias": False, "initial": False}),
    "rnn-sigmoid-wide": ("RNN", {"activations": ["Sigmoid"], "hidden": 70}),
}


def _fused(model: onnx.ModelProto) -> list[str]:
    from prune_compile.backends.tvm import recurrent_steps

    return [n.op_type for n in unrolled_recurrences(model, fused_steps=True).graph.node
            if n.domain == recurrent_steps.DOMAIN]


def test_only_the_forms_the_kernels_run_are_fused() -> None:
    for op, kwargs in FUSED_FORMS.values():
        assert _fused(_model(op, "bidirectional", **_per_direction(kwargs, "bidirectional"))) == [f"{op}Steps"]
    for op, kwargs in (("LSTM", {}), ("LSTM", {"peepholes": False, "lens": "const"}),
                       ("LSTM", {"peepholes": False, "clip": 0.7}), ("LSTM", {"peepholes": False, "input_forget": 1}),
                       ("LSTM", {"peepholes": False, "activations": ["Sigmoid", "Relu", "Tanh"]}),
                       ("GRU", {"lens": "input"}), ("GRU", {"clip": 0.5}),
                       ("GRU", {"activations": ["Sigmoid", "Relu"]}),
                       ("RNN", {"lens": "const"}), ("RNN", {"clip": 2.0}),
                       ("RNN", {"activations": ["Tanh", "Relu"], "direction": "bidirectional"})):
        direction = kwargs.pop("direction", "forward")
        assert _fused(_model(op, direction, **kwargs)) == [], (op, kwargs)  # lengths, clip, ...: unrolled
    unrolled = unrolled_recurrences(_model("GRU")).graph.node
    assert not any(n.domain == "prune_compile.tvm" for n in unrolled)  # off unless asked (GPU targets)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("form", list(FUSED_FORMS))
def test_tvm_runs_a_layers_steps_as_one_kernel_and_agrees_with_onnx_runtime(form: str, direction: str,
                                                                           tmp_path) -> None:
    from prune_compile.backends import tvm as tvm_backend

    op, kwargs = FUSED_FORMS[form]
    model = _model(op, direction, **_per_direction(kwargs, direction))
    lib = str(tmp_path / "steps.so")
    tvm_backend.build(model, "cpu", lib)
    assert f"{op.lower()}_steps" in open(lib, "rb").read().decode("latin-1")  # the kernel, not the unrolled steps
    feeds = _feeds(model)
    want, got = ort.run(model, feeds), tvm_backend.run_library(lib, feeds, ["x"])
    assert ort.relative_error(want, got) <= 1e-5


def test_tuning_leaves_the_hand_scheduled_kernel_alone(tmp_path) -> None:
    """MetaSchedule would take the steps kernel as a task and spend its large share of the FLOPs on re-sampling its
    one schedule (and a rebuild in which it was the only new task failed: "no valid candidate"). Its trials go to
    the tunable kernels; the tuned library still runs the kernel and agrees with ONNX Runtime."""
    from prune_compile.backends import tvm as tvm_backend

    model = _model("GRU", "bidirectional", hidden=37)
    lib = str(tmp_path / "gru.so")
    result = tvm_backend.build(model, "cpu", lib, tuning=tvm_backend.TuningOptions(trials=16,
                                                                                  database=str(tmp_path / "db")))
    tasks = [t["task"] for t in result.tuning["per_task"]]
    assert tasks and not any("steps" in t for t in tasks), tasks
    assert result.tuning["trials_valid"] >= 1
    assert "gru_steps" in open(lib, "rb").read().decode("latin-1")
    feeds = _feeds(model)
    assert ort.relative_error(ort.run(model, feeds), tvm_backend.run_library(lib, feeds, ["x"])) <= 1e-5
