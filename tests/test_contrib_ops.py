"""Models saved by ONNX Runtime's optimizer: its fused com.microsoft ops are lowered to the standard ops they fuse.

Oracles: every lowered form computes what ONNX Runtime's own contrib kernel computes; an optimized model analyses into
the groups of the model it was optimized from, and prunes with the usual verification."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from prune_compile.api import run
from prune_compile.backends import ort
from prune_compile.errors import UnsupportedModelError
from prune_compile.ir import export_onnx, import_onnx
from prune_compile.ir.contrib_ops import lower_contrib_ops
from prune_compile.passes.deps import analyze


def _contrib(op: str, inputs: list[tuple[str, list[int]]], consts: dict[str, np.ndarray], out: list[int],
             order: list[str] | None = None, opset: int = 17, **attrs) -> onnx.ModelProto:
    """One com.microsoft node reading graph inputs and constants (inputs first, or in `order`), writing y of shape
    `out`."""
    names = order or [n for n, _ in inputs] + list(consts)
    node = helper.make_node(op, names, ["y"], name=op.lower(), domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items()])
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


_RNG = np.random.default_rng(0)
_W = _RNG.standard_normal((6, 3, 3, 3))
_CONV = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
_CASES = {
    **{f"fused_conv_{act or 'plain'}": _contrib("FusedConv", [("x", [1, 3, 8, 8])],
                                                  {"w": _W, "b": _RNG.standard_normal(6)}, [1, 6, 8, 8], **_CONV,
                                                  **({"activation": act} if act else {}),
                                                  **({"activation_params": params} if params else {}))
       for act, params in [("", None), ("Relu", None), ("Tanh", None), ("Sigmoid", None), ("LeakyRelu", [0.1]),
                           ("HardSigmoid", [0.3, 0.6]), ("Clip", [-0.5, 0.7])]},
    "fused_conv_sum_relu": _contrib("FusedConv", [("x", [1, 3, 8, 8]), ("z", [1, 6, 8, 8])], {"w": _W},
                                    [1, 6, 8, 8], order=["x", "w", "", "z"], **_CONV, activation="Relu"),
    "fused_gemm_leaky": _contrib("FusedGemm", [("a", [4, 5])], {"b": _RNG.standard_normal((7, 5)),
                                                                 "c": _RNG.standard_normal(7)},
                                 [4, 7], transB=1, alpha=0.5, beta=2.0, activation="LeakyRelu", activation_alpha=0.2),
    "fused_gemm_relu": _contrib("FusedGemm", [("a", [5, 4])], {"b": _RNG.standard_normal((5, 7))}, [4, 7],
                                transA=1, activation="Relu"),
    "fused_matmul_trans_a": _contrib("FusedMatMul", [("a", [5, 4]), ("b", [5, 6])], {}, [4, 6], transA=1),
    "fused_matmul_trans_b_alpha": _contrib("FusedMatMul", [("a", [2, 4, 5]), ("b", [2, 6, 5])], {}, [2, 4, 6],
                                           transB=1, alpha=0.25),
    "fused_matmul_trans_batch_a": _contrib("FusedMatMul", [("a", [3, 2, 4, 5]), ("b", [2, 4, 5, 6])], {},
                                           [2, 4, 3, 6], transBatchA=1),
    "fused_matmul_trans_batch_b": _contrib("FusedMatMul", [("a", [2, 4, 3, 5]), ("b", [6, 2, 4, 5])], {},
                                           [2, 4, 3, 6], transBatchB=1, transB=1, alpha=0.5),
    "gelu": _contrib("Gelu", [("x", [2, 9])], {}, [2, 9]),
    "bias_gelu": _contrib("BiasGelu", [("x", [2, 9])], {"bias": _RNG.standard_normal(9)}, [2, 9]),
    "fast_gelu": _contrib("FastGelu", [("x", [2, 9])], {}, [2, 9]),
    "fast_gelu_bias": _contrib("FastGelu", [("x", [2, 9])], {"bias": _RNG.standard_normal(9)}, [2, 9]),
    "quick_gelu": _contrib("QuickGelu", [("x", [2, 9])], {}, [2, 9]),
    "quick_gelu_alpha": _contrib("QuickGelu", [("x", [2, 9])], {}, [2, 9], alpha=1.0),
    "skip_layer_norm": _contrib("SkipLayerNormalization", [("x", [2, 3, 8]), ("skip", [2, 3, 8])],
                                {"gamma": _RNG.standard_normal(8), "beta": _RNG.standard_normal(8),
                                 "bias": _RNG.standard_normal(8)}, [2, 3, 8], epsilon=1e-5),
    "skip_rms_norm": _contrib("SkipSimplifiedLayerNormalization", [("x", [2, 3, 8]), ("skip", [2, 3, 8])],
                              {"gamma": _RNG.standard_normal(8), "bias": _RNG.standard_normal(8)}, [2, 3, 8],
                              epsilon=1e-5),
    "skip_rms_norm_opset_18": _contrib("SkipSimplifiedLayerNormalization", [("x", [2, 3, 8]), ("skip", [2, 3, 8])],
                                       {"gamma": _RNG.standard_normal(8)}, [2, 3, 8], opset=18),  # axes as input
    "skip_rms_norm_no_bias": _contrib("SkipSimplifiedLayerNormalization", [("x", [2, 3, 8]), ("skip", [2, 3, 8])],
                                      {"gamma": _RNG.standard_normal(8)}, [2, 3, 8]),
    "skip_layer_norm_no_beta": _contrib("SkipLayerNormalization", [("x", [2, 3, 8]), ("skip", [2, 3, 8])],
                                        {"gamma": _RNG.standard_normal(8)}, [2, 3, 8]),
}


def _with_sum_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """The SkipLayerNormalization case with its fourth output (input + skip + bias) read as well."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    node = model.graph.node[0]
    node.output.extend(["", "", "sum"])
    model.graph.output.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, [2, 3, 8]))
    return model


_CASES["skip_layer_norm_sum_output"] = _with_sum_output(_CASES["skip_layer_norm"])
_CASES["skip_rms_norm_sum_output"] = _with_sum_output(_CASES["skip_rms_norm"])


@pytest.mark.parametrize("case", sorted(_CASES))
def test_each_lowered_op_computes_what_onnx_runtimes_kernel_does(case: str) -> None:
    model = _CASES[case]
    lowered = lower_contrib_ops(model)
    assert lowered is not model and model.graph.node[0].domain == "com.microsoft"  # the caller's proto stays
    assert not [n.op_type for n in lowered.graph.node if n.domain == "com.microsoft"]
    onnx.checker.check_model(lowered, full_check=True)
    feeds = ort.random_feeds(model, seed=1)
    want = ort.run(model, feeds)
    assert ort.relative_error(want, ort.run(lowered, feeds)) <= 1e-5
    # and through the importer: standard ops in the graph, the same outputs written back
    exported = export_onnx(import_onnx(model))
    assert not [n.op_type for n in exported.graph.node if n.domain == "com.microsoft"]
    assert ort.relative_error(want, ort.run(exported, feeds)) <= 1e-5


def test_bias_add_adds_both() -> None:
    # ONNX Runtime has this kernel only for GPUs: checked against its definition, Y = X + bias + skip.
    bias = _RNG.standard_normal(8).astype(np.float32)
    model = _contrib("BiasAdd", [("x", [2, 3, 8]), ("skip", [2, 3, 8])], {"bias": bias}, [2, 3, 8],
                     order=["x", "bias", "skip"])
    feeds = ort.random_feeds(model, seed=1)
    (got,) = ort.run(export_onnx(import_onnx(model)), feeds)
    np.testing.assert_allclose(got, feeds["x"] + bias + feeds["skip"], rtol=1e-6)


def test_a_form_not_lowered_stays_and_is_named() -> None:
    # SkipLayerNormalization's mean output is read: no standard op writes it, so the node stays.
    model = _CASES["skip_layer_norm"]
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.node[0].output.append("mean")
    model.graph.output.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, [2, 3, 1]))
    assert [n.op_type for n in lower_contrib_ops(model).graph.node] == ["SkipLayerNormalization"]
    with pytest.raises(UnsupportedModelError, match="op 'SkipLayerNormalization' is from domain 'com.microsoft'"):
        import_onnx(model)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.encoder(x))


def _models():
    import torchvision

    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                               mlp_dim=64, num_classes=10)
    return {"resnet18": (torchvision.models.resnet18(num_classes=10), [1, 3, 64, 64]),
            "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small(num_classes=10), [1, 3, 64, 64]),
            "vit": (vit, [1, 3, 32, 32]), "encoder": (_Encoder(), [1, 7, 32])}


def _optimized(name: str, tmp_path) -> tuple[str, str]:
    """The model exported by torch.onnx with random weights (untrained layers share zero biases, which ONNX
    Runtime's optimizer would merge into one constant), and ONNX Runtime's optimized save of it."""
    model, shape = _models()[name]
    torch.manual_seed(0)
    for p in model.parameters():
        p.data = torch.randn_like(p) * 0.1
    buf = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.randn(shape),), buf, dynamo=False, opset_version=17, input_names=["x"])
    plain, optimized = str(tmp_path / f"{name}.onnx"), str(tmp_path / f"{name}_optimized.onnx")
    with open(plain, "wb") as f:
        f.write(buf.getvalue())
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = optimized
    onnxruntime.InferenceSession(plain, options, providers=["CPUExecutionProvider"])
    return plain, optimized


def _groups(path: str) -> list[tuple[int, bool]]:
    return sorted((g.size, g.prunable) for g in analyze(import_onnx(path)).groups)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vit", "encoder"])
def test_an_onnx_runtime_optimized_model_prunes_like_its_original(tmp_path, name: str) -> None:
    plain, optimized = _optimized(name, tmp_path)
    ops = {n.op_type for n in onnx.load(optimized).graph.node if n.domain == "com.microsoft"}
    assert ops, "ONNX Runtime fused nothing: the test would not test the lowering"
    assert _groups(optimized) == _groups(plain)
    # The same plan on both: the pruned models compute the same function with the same MACs.
    result, want = run(optimized, tmp_path / "out", ratio=0.5), run(plain, tmp_path / "plain", ratio=0.5)
    pruned = onnx.load(result.files["onnx"])
    assert not [n for n in pruned.graph.node if n.domain == "com.microsoft"]
    assert result.report["cost"]["after"]["macs"] == want.report["cost"]["after"]["macs"]
    feeds = ort.random_feeds(pruned, seed=2)
    assert ort.relative_error(ort.run(want.files["onnx"], feeds), ort.run(pruned, feeds)) <= 1e-5


def test_a_model_saved_with_the_nchwc_layout_is_refused_naming_the_level() -> None:
    # What ORT_ENABLE_ALL writes on x86: convolutions over channel blocks, for this machine's vector width.
    model = _contrib("FusedConv", [("x", [1, 3, 8, 8])], {"w": _W}, [1, 6, 8, 8], **_CONV, activation="Relu")
    model.graph.node[0].domain = "com.microsoft.nchwc"
    model.graph.node[0].op_type = "Conv"
    model.opset_import.append(helper.make_opsetid("com.microsoft.nchwc", 1))
    with pytest.raises(UnsupportedModelError, match="saved at ORT_ENABLE_ALL.*ORT_ENABLE_EXTENDED"):
        import_onnx(model)
