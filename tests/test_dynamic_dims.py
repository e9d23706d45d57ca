"""The pruned ONNX keeps the original's symbolic input dims (batch, image size) where a replay at doubled sizes
shows the model does not depend on them through a constant; elsewhere it stays static and says why.

Oracle: the pruned model with symbolic dims, run at a third size, equals the same job (its plan replayed) run
statically at that size."""

from __future__ import annotations

import io
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from prune_compile.api import run
from prune_compile.backends import ort
from prune_compile.passes.dynamic_dims import generalize, symbolic_input_dims

from .third_party import MODELS, fetch_model, realistic_feeds


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        y = self.features(x)
        return self.head(y.view(y.size(0), -1))  # a reshape whose target holds the batch


def _dynamic_onnx(path: str) -> str:
    model = _Net().eval()
    torch.manual_seed(0)
    for p in model.parameters():
        p.data = torch.randn_like(p)
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), buf, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}, "y": {0: "batch"}})
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def _same_job_at(tmp_path, model: str, out, shapes, **options) -> onnx.ModelProto:
    """The pruned model of the same plan, made statically at `shapes`."""
    again = run(model, tmp_path / "again", input_shapes=shapes, plan=os.path.join(out, "plan.json"), **options)
    return onnx.load(again.files["onnx"])


def test_a_dynamic_batch_and_image_size_survive_pruning(tmp_path) -> None:
    model = _dynamic_onnx(str(tmp_path / "net.onnx"))
    result = run(model, tmp_path / "out", input_shapes={"x": [1, 3, 32, 32]}, ratio=0.5)
    assert result.report["symbolic_dims"] == {"x": {"0": "batch", "2": "h", "3": "w"}}
    assert "warnings" not in result.report["pruning"]
    assert "symbolic in the pruned model: x[0] batch, x[2] h, x[3] w" in open(result.files["html"]).read()
    pruned = onnx.load(result.files["onnx"])
    assert [d.dim_param for d in pruned.graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "h", "w"]
    assert [d.dim_param or d.dim_value for d in pruned.graph.output[0].type.tensor_type.shape.dim] == ["batch", 10]
    shapes = {"x": [3, 3, 40, 48]}
    x = {"x": np.random.default_rng(5).standard_normal(shapes["x"]).astype(np.float32)}
    want = ort.run(_same_job_at(tmp_path, model, tmp_path / "out", shapes), x)
    assert ort.relative_error(want, ort.run(pruned, x)) <= 1e-5


def _batch_sized_bias_model(path: str, bias: list[onnx.NodeProto], inputs: tuple[str, ...] = ("x",),
                            opset: int = 17) -> str:
    """y = x @ w + bias, where `bias` (nodes from h = x @ w) folds into a constant of the batch's size."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 6], np.ones(24, np.float32).tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [6], np.arange(6, dtype=np.float32).tolist())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), *bias,
             helper.make_node("Add", ["h", "bias"], ["y"], name="offset")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}_batch", 4])
                                           for name in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])], [w, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8), path)
    return path


# bias = expand(b, shape(h)): a constant [batch, 6] repeating b.
_SPREAD = [helper.make_node("Shape", ["h"], ["shape"], name="shape"),
           helper.make_node("Expand", ["b", "shape"], ["bias"], name="spread")]


def test_a_constant_repeated_along_the_batch_is_expanded_at_run_time(tmp_path) -> None:
    model = _batch_sized_bias_model(str(tmp_path / "m.onnx"), _SPREAD)
    result = run(model, tmp_path / "out", input_shapes={"x": [2, 4]})
    assert result.report["symbolic_dims"] == {"x": {"0": "x_batch"}}
    assert "warnings" not in result.report["pruning"]
    pruned = onnx.load(result.files["onnx"])
    assert "Expand" in [n.op_type for n in pruned.graph.node]
    x = {"x": np.random.default_rng(7).standard_normal([5, 4]).astype(np.float32)}
    want = ort.run(_same_job_at(tmp_path, model, tmp_path / "out", {"x": [5, 4]}), x)
    assert ort.relative_error(want, ort.run(pruned, x)) <= 1e-6


def test_a_slice_end_and_an_expand_shape_of_the_batch_size_take_it_from_their_inputs(tmp_path) -> None:
    # y = h[:shape(h)[0]] + expand(max(x, axis=1), [shape(h)[0], 6]): both sizes fold into constants.
    def ints(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                              [len(values)], values))
    bias = [helper.make_node("Shape", ["h"], ["shape"], name="shape"), ints("zero", [0]), ints("one", [1]),
            ints("six", [6]), helper.make_node("Slice", ["shape", "zero", "one"], ["rows"], name="rows"),
            helper.make_node("Slice", ["h", "zero", "rows", "zero"], ["top"], name="top"),
            helper.make_node("ReduceMax", ["x"], ["col"], name="col", axes=[1], keepdims=1),
            helper.make_node("Concat", ["rows", "six"], ["spread_shape"], name="spread_shape", axis=0),
            helper.make_node("Expand", ["col", "spread_shape"], ["spread"], name="spread"),
            helper.make_node("Add", ["top", "spread"], ["bias"], name="sum")]
    model = _batch_sized_bias_model(str(tmp_path / "m.onnx"), bias)
    result = run(model, tmp_path / "out", input_shapes={"x": [2, 4]})
    assert result.report["symbolic_dims"] == {"x": {"0": "x_batch"}}
    pruned = onnx.load(result.files["onnx"])
    consts = {t.name: numpy_helper.to_array(t).tolist() for t in pruned.graph.initializer}
    slc, expand = (next(n for n in pruned.graph.node if n.op_type == op) for op in ("Slice", "Expand"))
    assert consts[slc.input[2]] == [np.iinfo(np.int64).max] and consts[expand.input[1]] == [1, 6]
    x = {"x": np.random.default_rng(8).standard_normal([5, 4]).astype(np.float32)}
    want = ort.run(_same_job_at(tmp_path, model, tmp_path / "out", {"x": [5, 4]}), x)
    assert ort.relative_error(want, ort.run(pruned, x)) <= 1e-6


# bias[i] = i + 1 in every column, a cumulative sum over ones: a constant that varies along the batch.
_COUNT = [helper.make_node("Shape", ["h"], ["shape"], name="shape"),
          helper.make_node("ConstantOfShape", ["shape"], ["ones"], name="ones",
                           value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
          helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("axis", TensorProto.INT64, [], [0])),
          helper.make_node("CumSum", ["ones", "axis"], ["bias"], name="count")]


def test_a_constant_computed_from_shapes_is_computed_by_the_originals_nodes(tmp_path) -> None:
    model = _batch_sized_bias_model(str(tmp_path / "m.onnx"), _COUNT)
    result = run(model, tmp_path / "out", input_shapes={"x": [2, 4]})
    assert result.report["symbolic_dims"] == {"x": {"0": "x_batch"}}
    pruned = onnx.load(result.files["onnx"])
    assert sorted(n.op_type for n in pruned.graph.node) == ["Add", "Constant", "ConstantOfShape", "CumSum",
                                                             "MatMul", "Shape"]
    x = {"x": np.random.default_rng(10).standard_normal([5, 4]).astype(np.float32)}
    want = ort.run(_same_job_at(tmp_path, model, tmp_path / "out", {"x": [5, 4]}), x)
    assert ort.relative_error(want, ort.run(pruned, x)) <= 1e-6


def test_the_originals_nodes_never_compute_a_constant_from_data() -> None:
    # The original sizes the count by a layer ('fc') the pruned model does not have: copying it in would run the
    # original's layer again. Static and doubled pruned models: y = relu(x) + count.
    def pruned(batch: int) -> onnx.ModelProto:
        count = np.repeat(np.arange(1, batch + 1, dtype=np.float32)[:, None], 4, axis=1)
        nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
                 helper.make_node("Add", ["r", "bias"], ["y"], name="offset")]
        graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
                                  [numpy_helper.from_array(count, "bias")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), *_COUNT,
             helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "bias"], ["y"], name="offset")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model, why = generalize(pruned(2), pruned(4), {"x": {0: "batch"}}, original=original)
    assert model is None
    assert why.endswith("(nor can the original's nodes compute it: MatMul 'fc' reads the data of 'x')")


@pytest.mark.parametrize(("bias", "inputs", "why"), [
    # The original's nodes would compute it, but the model was converted to opset 17 on import.
    (_COUNT, ("x",), "constant 'bias' depends on the input size and is read by 'offset' (Add), and is not one slice "
                     "repeated along axes [0] (nor can the original's nodes compute it: its opset 13 is not the "
                     "pruned model's 17)"),
    # Two inputs of the same sizes: whose batch the constant follows is not known.
    (_SPREAD, ("x", "z"), "constant 'bias' (read by 'offset' (Add)) has 2 entries along axis 0, which more than "
                          "one symbolic input dim gives at both sizes"),
])
def test_a_size_a_constant_depends_on_stays_static_naming_the_node(tmp_path, bias, inputs, why) -> None:
    model = _batch_sized_bias_model(str(tmp_path / "m.onnx"), bias, inputs, opset=13)
    if "z" in inputs:  # z only needs to be an input with a symbolic batch
        m = onnx.load(model)
        m.graph.node.append(helper.make_node("Identity", ["z"], ["z_out"], name="z_out"))
        m.graph.output.append(helper.make_tensor_value_info("z_out", TensorProto.FLOAT, ["z_batch", 4]))
        onnx.save(m, model)
    result = run(model, tmp_path / "out", input_shapes={name: [2, 4] for name in inputs})
    assert "symbolic_dims" not in result.report
    (warning,) = result.report["pruning"]["warnings"]
    batches = ", ".join(f"{name}[0]" for name in inputs)
    assert warning.startswith(f"the pruned model keeps --input-shape's sizes for {batches}, not symbolic: ")
    assert why in warning
    dims = onnx.load(result.files["onnx"]).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 4]


def test_unnamed_dims_get_names_of_their_own() -> None:
    # Paddle2ONNX writes "?" for any unknown dim; equal names would claim equal sizes.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 3, "?", None])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "m", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert symbolic_input_dims(helper.make_model(graph)) == {"x": {0: "x_dim0", 2: "x_dim2", 3: "x_dim3"}}


# What each third-party model keeps symbolic: YOLOv8's anchors follow its image size, the PP-OCRv4 recognizer's
# height is fixed by its architecture (48), ddddocr's detector and the layout model have static inputs already.
# Magika keeps its batch through an expand's shape and a slice's end that take it from their inputs; Silero VAD its
# number of frames (its LSTM state has a batch of 1).
KEPT = {"magika": {"bytes": [0]}, "nudenet_yolov8n": {"images": [0, 2, 3]}, "orientation_lcnet": {"x": [0]},
        "ppocr_cls": {"x": [0, 2, 3]}, "ppocrv4_det": {"x": [0, 2, 3]}, "ppocrv4_rec": {"x": [0]},
        "ppocrv5_cls": {"x": [0, 2, 3]},
        "ppocrv5_det": {"x": [0, 2, 3]}, "ppocrv5_rec": {"x": [0, 3]}, "ddddocr_det": {}, "layout_picodet": {},
        "silero_vad_v6": {"input": [0]}}


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_third_party_models_keep_the_symbolic_dims_that_hold(tmp_path, model_cache_dir: str, model_id: str) -> None:
    path, shapes = fetch_model(model_cache_dir, model_id)
    result = run(path, tmp_path / "out", input_shapes=shapes, ratio=0.5)
    kept = {name: sorted(int(a) for a in dims) for name, dims in result.report.get("symbolic_dims", {}).items()}
    assert kept == KEPT[model_id]
    symbolic = symbolic_input_dims(onnx.load(path))
    if kept != {name: sorted(dims) for name, dims in symbolic.items()}:
        assert any(w.startswith("the pruned model keeps --input-shape's sizes for")
                   for w in result.report["pruning"]["warnings"])
    if not kept:
        return
    # A third size: batch 3, each kept spatial dim 32 larger (the detectors' strides divide it).
    third = {name: [(3 if a == 0 else d + 32) if a in kept.get(name, []) else d for a, d in enumerate(dims)]
             for name, dims in shapes.items()}
    feeds = realistic_feeds(model_id, third, seed=4)
    want = ort.run(_same_job_at(tmp_path, path, tmp_path / "out", third), feeds)
    assert ort.relative_error(want, ort.run(result.files["onnx"], feeds)) <= 1e-4


def test_a_failure_while_generalizing_keeps_the_static_model_and_says_so(tmp_path, monkeypatch) -> None:
    import prune_compile.passes.dynamic_dims as dynamic_dims

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(dynamic_dims, "generalize", broken)
    model = _dynamic_onnx(str(tmp_path / "net.onnx"))
    result = run(model, tmp_path / "out", input_shapes={"x": [1, 3, 32, 32]}, ratio=0.5)
    assert "symbolic_dims" not in result.report and result.report["verification"]["exact"]
    assert result.report["pruning"]["warnings"] == [
        "the pruned model keeps --input-shape's sizes for x[0], x[2], x[3], not symbolic: checking the "
        "model with symbolic dims failed: RuntimeError: boom"]
    dims = onnx.load(result.files["onnx"]).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 32, 32]


def test_static_shapes_writes_the_given_sizes(tmp_path) -> None:
    from prune_compile.cli import main

    model = _dynamic_onnx(str(tmp_path / "net.onnx"))
    assert main([model, "-o", str(tmp_path / "out"), "--input-shape", "x=1,3,32,32", "--ratio", "0.5",
                 "--static-shapes", "-q"]) == 0
    dims = onnx.load(tmp_path / "out" / "model.pruned.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 32, 32]
    report = (tmp_path / "out" / "report.json").read_text()
    assert "symbolic_dims" not in report and "not symbolic" not in report


def test_a_torch_models_batch_and_image_size_become_symbolic_on_request(tmp_path) -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    asked = {"x": {0: "batch", 2: "h", 3: "w"}}
    result = run(net, tmp_path / "out", input_shapes={"x": [1, 3, 32, 32]}, ratio=0.5, symbolic_dims=asked)
    assert result.report["symbolic_dims"] == {"x": {"0": "batch", "2": "h", "3": "w"}}
    pruned = onnx.load(result.files["onnx"])
    assert [d.dim_param for d in pruned.graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "h", "w"]
    shapes = {"x": [3, 3, 40, 48]}
    x = {"x": np.random.default_rng(6).standard_normal(shapes["x"]).astype(np.float32)}
    want = ort.run(_same_job_at(tmp_path, net, tmp_path / "out", shapes), x)
    assert ort.relative_error(want, ort.run(pruned, x)) <= 1e-5


@pytest.mark.parametrize("unit", ["head_dim", "heads"])
@pytest.mark.parametrize("source", ["torch", "onnx"])
def test_a_vision_transformers_batch_stays_symbolic(tmp_path, source, unit) -> None:
    # torch's attention folds the batch into the heads ([tokens, batch*heads, head_dim]) and the class token is
    # expanded to the batch: the analysis at batch 2 must find batch 1's groups, the token a run-time Expand.
    # A torch module asks for its batch; torch.onnx's export (TorchScript) writes it symbolic.
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4,
                                               hidden_dim=32, mlp_dim=16, num_classes=5).eval()
    model, asked = net, {"x": {0: "batch"}}
    if source == "onnx":
        model, asked = str(tmp_path / "vit.onnx"), None
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), model, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    result = run(model, tmp_path / "out", input_shapes={"x": [1, 3, 16, 16]}, ratio=0.5, attention=unit,
                 symbolic_dims=asked)
    assert result.report["symbolic_dims"] == {"x": {"0": "batch"}}
    assert "warnings" not in result.report["pruning"]
    pruned = onnx.load(result.files["onnx"])
    x = {"x": np.random.default_rng(9).standard_normal([3, 3, 16, 16]).astype(np.float32)}
    want = ort.run(_same_job_at(tmp_path, model, tmp_path / "out", {"x": [3, 3, 16, 16]}, attention=unit), x)
    assert ort.relative_error(want, ort.run(pruned, x)) <= 1e-5


@pytest.mark.parametrize(("args", "message"), [
    (["--symbolic-dim", "image:0"], "--symbolic-dim names 'image', but the model's inputs are ['x']"),
    (["--symbolic-dim", "x:4"], "--symbolic-dim x:4: input 'x' has rank 4"),
    (["--symbolic-dim", "x"], "--symbolic-dim 'x': expected NAME:AXIS or NAME:AXIS=SYMBOL"),
    (["--symbolic-dim", "x:0", "--static-shapes"], "--static-shapes and --symbolic-dim contradict each other"),
])
def test_symbolic_dim_usage_errors_exit_2(tmp_path, capsys, args, message) -> None:
    from prune_compile.cli import main

    model = _dynamic_onnx(str(tmp_path / "net.onnx"))
    assert main([model, "-o", str(tmp_path / "out"), "--input-shape", "x=1,3,32,32", *args]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
