"""ONNX importer: folding, provenance, opset conversion, shape overrides, opaque ops, and clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from prune_compile.backends import ort
from prune_compile.errors import ModelFormatError, UnsupportedModelError, UsageError
from prune_compile.ir import export_onnx, import_onnx
from prune_compile.ir.onnx_importer import MAX_OPSET, later_schema_change
from prune_compile.passes.deps import analyze


def _model(nodes, inputs, outputs, inits=(), opset=17, domains=()):
    graph = helper.make_graph(nodes, "m", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in domains]]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _conv_model(opset: int = 17, batch: int | str = 1):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "conv.weight")
    # A weight subgraph: the bias is ConstantOfShape(...) + Constant, which must fold into one constant.
    shape = helper.make_node("Constant", [], ["bias_shape"], value=numpy_helper.from_array(np.array([8], np.int64)))
    zeros = helper.make_node("ConstantOfShape", ["bias_shape"], ["bias_zeros"],
                             value=numpy_helper.from_array(np.array([0.5], np.float32)))
    offset = helper.make_node("Constant", [], ["bias_offset"], value=numpy_helper.from_array(np.float32(0.25)))
    bias = helper.make_node("Add", ["bias_zeros", "bias_offset"], ["conv.bias"])
    conv = helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1], name="conv")
    relu = helper.make_node("Relu", ["c"], ["y"], name="relu")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return _model([shape, zeros, offset, bias, conv, relu], [x], [y], [w], opset=opset)


def _roundtrip_error(model: onnx.ModelProto, shapes=None) -> float:
    graph = import_onnx(model, shapes)
    exported = export_onnx(graph)
    feeds = ort.random_feeds(exported)
    return ort.relative_error(ort.run(model, feeds), ort.run(exported, feeds))


def test_weight_subgraph_folds_into_a_constant_with_provenance() -> None:
    g = import_onnx(_conv_model())
    assert [n.op for n in g.nodes] == ["conv", "relu"]
    weight, bias = g.nodes[0].inputs[1], g.nodes[0].inputs[2]
    assert weight.provenance.kind == "onnx_initializer" and weight.provenance.name == "conv.weight"
    assert bias.provenance.kind == "folded"
    assert set(bias.provenance.sources) == {"bias_shape", "bias_offset"}
    np.testing.assert_allclose(bias.data, np.full(8, 0.75, np.float32))
    assert bias.provenance.computed  # an Add: torch surgery cannot just slice a source to get it
    assert _roundtrip_error(_conv_model()) <= 1e-6


@pytest.mark.parametrize("op", ["Reshape", "Mul"])
def test_a_fold_that_only_moves_elements_is_not_computed(op: str) -> None:
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    arg = numpy_helper.from_array(np.array([4, 3, 1, 1], np.int64) if op == "Reshape" else np.float32(2), "arg")
    fold = helper.make_node(op, ["w", "arg"], ["w2"])
    conv = helper.make_node("Conv", ["x", "w2"], ["y"], name="conv")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weight = import_onnx(_model([fold, conv], [x], [y], [w, arg])).nodes[0].inputs[1]
    assert weight.provenance.kind == "folded" and weight.provenance.computed == (op == "Mul")


@pytest.mark.parametrize("attrs, read", [({"start": 2, "end": 3}, "Concat"), ({"start": -1}, "Concat"),
                                         ({"start": 1}, "Gather"), ({"start": 1}, "Slice"), ({"end": 1}, "Concat")])
def test_a_shape_of_some_dims_folds_to_those_dims(attrs: dict, read: str) -> None:
    # Opset 15's Shape(start, end), read by a Gather or Slice or used as it is: onnx-graphsurgeon 0.6 folded it as
    # the whole shape (a reshape target [-1, 2, 3, 4] for [-1, 4]: the model imported wrong, or not at all).
    ints = {k: numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
            {"minus_one": [-1], "zero": 1, "one": [1], "two": [2], "axis": [0]}.items()}
    dims = {"Concat": helper.make_node("Concat", ["minus_one", "s"], ["t"], axis=0),
            "Gather": helper.make_node("Gather", ["s", "zero"], ["d"]),  # shape[1:][1] = 4
            "Slice": helper.make_node("Slice", ["s", "one", "two", "axis"], ["d"])}[read]
    nodes = [helper.make_node("Shape", ["x"], ["s"], **attrs), dims]
    if read != "Concat":
        nodes += [helper.make_node("Reshape", ["d", "one"], ["d1"]) if read == "Gather" else
                  helper.make_node("Identity", ["d"], ["d1"]),
                  helper.make_node("Concat", ["minus_one", "d1"], ["t"], axis=0)]
    nodes += [helper.make_node("Reshape", ["x", "t"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    model = _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], ints.values())
    assert _roundtrip_error(model) == 0.0


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 18, 21, 22, 23, 24, 26])
def test_opsets_9_to_26_import_and_roundtrip(opset: int) -> None:
    assert _roundtrip_error(_conv_model(opset)) <= 1e-6
    assert [n.op for n in import_onnx(_conv_model(opset)).nodes] == ["conv", "relu"]


def test_the_newest_opset_is_the_newest_onnx_runtime_loads() -> None:
    # MAX_OPSET bounds what the importer accepts because ONNX Runtime folds, verifies and serves the models.
    onnxruntime.InferenceSession(_conv_model(MAX_OPSET).SerializeToString())
    with pytest.raises(Exception, match=f"support for domain ai.onnx is till opset {MAX_OPSET}"):
        onnxruntime.InferenceSession(_conv_model(MAX_OPSET + 1).SerializeToString())
    with pytest.raises(UnsupportedModelError, match=f"opset {MAX_OPSET + 1}; supported: 7 to {MAX_OPSET}"):
        import_onnx(_conv_model(MAX_OPSET + 1))


def _conv_cast_model(opset: int, **cast_attrs):
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    cast = helper.make_node("Cast", ["c"], ["d"], to=TensorProto.FLOAT, name="cast", **cast_attrs)
    relu = helper.make_node("Relu", ["d"], ["y"], name="relu")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return _model([conv, cast, relu], [x], [y], [w], opset=opset)


def test_a_later_opsets_attribute_the_converter_does_not_know_keeps_the_node_opaque() -> None:
    # Cast gained `round_mode` at opset 24: left unset, Cast means what it meant at opset 21 and converts; set, the
    # node stays opaque (written back as it was) and freezes the conv's channels, saying why.
    assert [n.op for n in import_onnx(_conv_cast_model(24)).nodes] == ["conv", "cast", "relu"]
    model = _conv_cast_model(24, round_mode="up")
    g = import_onnx(model)
    assert [n.op for n in g.nodes] == ["conv", "opaque", "relu"]
    group, _ = analyze(g).groups  # the conv's channels and the input's
    assert not group.prunable and "node 'cast': sets 'round_mode', added to 'Cast' after opset 21" in group.reason
    assert _roundtrip_error(model) == 0.0
    cast = export_onnx(g).graph.node[1]
    assert {a.name: helper.get_attribute_value(a) for a in cast.attribute}["round_mode"] == b"up"


def test_a_later_opsets_change_to_inputs_or_attributes_is_named() -> None:
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    quantize = helper.make_node("QuantizeLinear", ["x", "s"], ["y"])
    assert later_schema_change(conv, 21) == later_schema_change(conv, 26) == ""  # Conv at 22: wider types only
    assert later_schema_change(quantize, 23) == (
        "op 'QuantizeLinear' at opset 23 changed its inputs or outputs since opset 21, which the importer maps")


def test_a_proto_passed_in_stays_as_it_is() -> None:
    model = _conv_model(batch="n")
    given = model.SerializeToString()
    for _ in range(2):  # again: the first import must not have stripped what the checker needs
        import_onnx(model, {"x": [2, 3, 8, 8]})
        assert model.SerializeToString() == given


def test_symbolic_dim_needs_an_override_and_the_error_says_so() -> None:
    model = _conv_model(batch="N")
    with pytest.raises(UnsupportedModelError, match=r"input 'x' has dynamic dim 'N' at axis 0.*--input-shape x="):
        import_onnx(model)
    g = import_onnx(model, {"x": [2, 3, 8, 8]})
    assert g.inputs[0].shape == (2, 3, 8, 8)
    assert g.outputs[0].shape == (2, 8, 8, 8)


def test_override_for_unknown_input_or_wrong_rank_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="names 'image'"):
        import_onnx(_conv_model(), {"image": [1, 3, 8, 8]})
    with pytest.raises(UsageError, match="rank 2"):
        import_onnx(_conv_model(), {"x": [1, 3]})


def test_unknown_op_becomes_opaque_and_is_written_back_unchanged() -> None:
    # `Hardmax` has no normalized form: it must survive import → export with its attributes.
    node = helper.make_node("Hardmax", ["x"], ["y"], axis=1, name="mystery")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _model([node], [x], [y])
    g = import_onnx(model)
    assert g.nodes[0].op == "opaque" and g.nodes[0].opaque.op_type == "Hardmax"
    exported = export_onnx(g)
    assert exported.graph.node[0].op_type == "Hardmax"
    assert helper.get_attribute_value(exported.graph.node[0].attribute[0]) == 1
    assert _roundtrip_error(model) == 0.0


def test_unknown_opset_domain_is_refused_with_the_node_name() -> None:
    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example.custom", name="fancy")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])
    model = _model([node], [x], [y], domains=["com.example.custom"])
    with pytest.raises(UnsupportedModelError, match="'fancy'.*'com.example.custom'"):
        import_onnx(model)


def test_a_contrib_op_without_an_inferred_shape_is_named_as_the_cause() -> None:
    # onnx's shape inference has no schema for com.microsoft ops: the error says so rather than blaming the input.
    # (A fused op the importer lowers to standard ops is no such case: tests/test_contrib_ops.py.)
    inverse = helper.make_node("Inverse", ["x"], ["g"], domain="com.microsoft", name="invert")
    relu = helper.make_node("Relu", ["g"], ["y"], name="relu")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 5])
    with pytest.raises(UnsupportedModelError, match="'invert'.*op 'Inverse' is from domain 'com.microsoft', whose "
                                                    "shapes onnx's shape inference does not know"):
        import_onnx(_model([inverse, relu], [x], [y], domains=["com.microsoft"]))


def test_truncated_and_garbage_files_are_format_errors(tmp_path) -> None:
    good = _conv_model().SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelFormatError, match="truncated.onnx"):
        import_onnx(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf at all \x00\xff" * 10)
    with pytest.raises(ModelFormatError):
        import_onnx(garbage)
    with pytest.raises(UsageError, match="does not exist"):
        import_onnx(tmp_path / "missing.onnx")


def test_model_failing_the_checker_is_a_format_error() -> None:
    node = helper.make_node("Relu", ["nowhere"], ["y"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    with pytest.raises(ModelFormatError, match="checker"):
        import_onnx(_model([node], [x], [y]))


def test_auto_pad_same_becomes_explicit_pads() -> None:
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 7, 7])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _model([conv], [x], [y], [w])
    g = import_onnx(model)
    assert g.nodes[0].attrs["pads"] == [1, 1, 1, 1]
    assert g.outputs[0].shape == (1, 4, 4, 4)
    assert _roundtrip_error(model) <= 1e-6


def test_lifted_operands_become_attributes() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4])
    y1 = helper.make_tensor_value_info("a", TensorProto.FLOAT, None)
    y2 = helper.make_tensor_value_info("b", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(np.array([2, 4], np.int64), "sizes"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "target"),
             numpy_helper.from_array(np.array([1], np.int64), "s0"),
             numpy_helper.from_array(np.array([100], np.int64), "s1"),
             numpy_helper.from_array(np.array([1], np.int64), "ax")]
    nodes = [helper.make_node("Split", ["x", "sizes"], ["p", "q"], axis=1),
             helper.make_node("Reshape", ["p", "target"], ["a"]),
             helper.make_node("Slice", ["q", "s0", "s1", "ax"], ["b"])]
    model = _model(nodes, [x], [y1, y2], inits)
    g = import_onnx(model)
    split, reshape, slc = g.nodes
    assert split.attrs == {"axis": 1, "split": [2, 4]} and len(split.inputs) == 1
    assert reshape.attrs == {"shape": [1, 8]}
    assert slc.attrs == {"starts": [1], "ends": [4], "axes": [1], "steps": [1]}
    assert _roundtrip_error(model) == 0.0


def test_scalar_axes_are_read_as_onnx_runtime_reads_them() -> None:
    # The spec asks for a 1-D axes tensor; ONNX Runtime accepts a scalar, and so do we.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _model([helper.make_node("Unsqueeze", ["x", "axis"], ["y"])], [x], [y],
                   [numpy_helper.from_array(np.array(1, np.int64), "axis")])
    (unsqueeze,) = import_onnx(model).nodes
    assert unsqueeze.attrs["axes"] == [1]
    assert _roundtrip_error(model) == 0.0


def _lstm_model(outputs: list[str], layout: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 3] if layout == 0 else [2, 5, 3])
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w", [1, 16, 3]), ("r", [1, 16, 4]))]
    lstm = helper.make_node("LSTM", ["x", "w", "r"], outputs, hidden_size=4, layout=layout, name="lstm")
    return _model([lstm], [x], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs if o],
                  inits)


def test_recurrent_layers_are_understood_in_layout_0() -> None:
    model = _lstm_model(["y", "y_h", "y_c"])
    assert [n.op for n in import_onnx(model).nodes] == ["lstm"]
    assert _roundtrip_error(model) <= 1e-6
    # batch-first (which ONNX Runtime does not run either) is not the layout the channel rule reads
    assert [n.op for n in import_onnx(_lstm_model(["y"], layout=1)).nodes] == ["opaque"]
    # Only the final state read (Y omitted before it): Y gets a name of its own.
    final_state = _lstm_model(["", "y_h"])
    (node,) = import_onnx(final_state).nodes
    assert node.op == "lstm" and [v.shape for v in node.outputs] == [(5, 1, 2, 4), (1, 2, 4)]
    assert _roundtrip_error(final_state) <= 1e-6


def test_control_flow_stays_opaque_and_its_branches_are_not_folded(capfd) -> None:
    # An If whose branch holds a foldable constant subgraph. Our IR cannot represent branches (the If is opaque), so
    # nothing inside them is folded: onnx-graphsurgeon would evaluate them with ONNX Runtime as IR-14 models it
    # rejects, printing a warning for every branch and leaving them as they were anyway.
    ones = helper.make_node("Constant", [], ["ones"], value=numpy_helper.from_array(np.ones(5, np.float32)))
    two = helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2.0)))
    twos = helper.make_node("Mul", ["ones", "two"], ["twos"])
    shifted = helper.make_node("Add", ["x", "twos"], ["then_out"])
    then_branch = helper.make_graph([ones, two, twos, shifted], "then", [],
                                    [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2, 5])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["else_out"])], "else", [],
                                    [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2, 5])])
    branch = helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch, name="branch")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    model = _model([branch], [x, c], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    g = import_onnx(model)
    assert [(n.op, n.opaque.op_type) for n in g.nodes] == [("opaque", "If")]
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    exported = export_onnx(g)
    assert [n.op_type for n in exported.graph.node[0].attribute[1].g.node] == ["Constant", "Constant", "Mul", "Add"]
    xs = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": xs, "c": np.array(cond)}
        assert ort.relative_error(ort.run(model, feeds), ort.run(exported, feeds)) == 0.0


def test_folding_a_large_constant_prints_nothing(capfd) -> None:
    # onnx-graphsurgeon warns on stdout about folded tensors over 1 MiB (vision transformers' position-bias
    # tables): stdout belongs to the CLI's report.
    from onnx_graphsurgeon.logger import G_LOGGER

    severity = G_LOGGER.severity
    shape = helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([512, 1024], np.int64)))
    table = helper.make_node("ConstantOfShape", ["shape"], ["table"],
                             value=numpy_helper.from_array(np.array([0.5], np.float32)))
    index = helper.make_node("Constant", [], ["index"], value=numpy_helper.from_array(np.array([3], np.int64)))
    row = helper.make_node("Gather", ["table", "index"], ["row"], axis=0)
    add = helper.make_node("Add", ["x", "row"], ["y"], name="add")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])
    g = import_onnx(_model([shape, table, index, row, add], [x], [y]))
    assert [n.op for n in g.nodes] == ["add"]
    assert capfd.readouterr() == ("", "")
    assert G_LOGGER.severity == severity  # the user's own onnx-graphsurgeon logging is left as it was
