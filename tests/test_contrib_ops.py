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


# Attention, MultiHeadAttention, EmbedLayerNormalization (onnxruntime.transformers.optimizer's BERT/CLIP fusions).
_B, _S, _D, _N = 3, 5, 8, 2
_INT = TensorProto.INT32


def _graph_model(op: str, inputs: list[tuple[str, int, list[int]]], consts: dict[str, np.ndarray],
                 outputs: list[tuple[str, int, list[int]]], order: list[str], **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, order, [name for name, _, _ in outputs], name=op.lower(), domain="com.microsoft",
                            **attrs)
    graph = helper.make_graph([node], "m", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs if o[0]],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _f32(*shape: int) -> np.ndarray:
    return _RNG.standard_normal(shape).astype(np.float32)


# Masks with at least one kept key in every row (a row that hides all keys is a row of padding: its output is
# rounding noise in ONNX Runtime's kernel too).
_RAW_MASK = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 1, 1, 1]], np.int32)
_RAW_MASK_CAUSAL = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]], np.int32)
_MASKS = {"raw": ([_B, _S], _RAW_MASK), "raw_3d": ([_B, _S, _S], np.tile(_RAW_MASK[:, None], (1, _S, 1))),
          "raw_causal": ([_B, _S], _RAW_MASK_CAUSAL), "lengths": ([_B], np.array([2, 5, 4], np.int32)),
          "left_padding": ([2 * _B], np.array([4, 5, 3, 1, 0, 2], np.int32))}


def _attention_case(mask: str = "", bias: bool = True, v_size: int = _D, attention_bias: bool = False,
                    **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    sizes = [_D, _D, v_size]
    consts = {"w": _f32(_D, sum(sizes))} | ({"b": _f32(sum(sizes))} if bias else {})
    inputs, feeds = [("x", TensorProto.FLOAT, [_B, _S, _D])], {"x": _f32(_B, _S, _D)}
    if mask:
        inputs.append(("mask", _INT, _MASKS[mask][0]))
        feeds["mask"] = _MASKS[mask][1]
    if attention_bias:
        inputs.append(("attention_bias", TensorProto.FLOAT, [1, _N, _S, _S]))
        feeds["attention_bias"] = _f32(1, _N, _S, _S)
    order = ["x", "w", "b" if bias else "", "mask" if mask else ""] + (["", "attention_bias"] if attention_bias else [])
    if v_size != _D:
        attrs["qkv_hidden_sizes"] = sizes
    model = _graph_model("Attention", inputs, consts, [("y", TensorProto.FLOAT, [_B, _S, v_size])], order,
                         num_heads=_N, **attrs)
    return model, feeds


def _mha_case(mask: str = "", kv_length: int = _S, v_size: int = _D, attention_bias: bool = False,
              bias: bool = True) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    sizes = [_D, _D, v_size]
    shapes = {"query": [_B, _S, _D], "key": [_B, kv_length, _D], "value": [_B, kv_length, v_size]}
    inputs = [(k, TensorProto.FLOAT, s) for k, s in shapes.items()]
    feeds = {k: _f32(*s) for k, s in shapes.items()}
    if mask:
        inputs.append(("mask", _INT, _MASKS[mask][0]))
        feeds["mask"] = _MASKS[mask][1]
    if attention_bias:
        inputs.append(("attention_bias", TensorProto.FLOAT, [_B, _N, _S, kv_length]))
        feeds["attention_bias"] = _f32(_B, _N, _S, kv_length)
    order = ["query", "key", "value", "b" if bias else "", "mask" if mask else ""]
    order += ["attention_bias"] if attention_bias else []
    model = _graph_model("MultiHeadAttention", inputs, {"b": _f32(sum(sizes))} if bias else {},
                         [("y", TensorProto.FLOAT, [_B, _S, v_size])], order, num_heads=_N)
    return model, feeds


def _embed_case(segments: bool = True, mask: bool = True, position_ids: bool = False, mask_index: bool = True,
                embedding_sum: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    vocab, hidden = 20, _D
    consts = {"words": _f32(vocab, hidden), "positions": _f32(10, hidden), "gamma": _f32(hidden),
              "beta": _f32(hidden)} | ({"segment_table": _f32(2, hidden)} if segments else {})
    feeds = {"ids": _RNG.integers(0, vocab, (_B, _S)).astype(np.int32)}
    if segments:
        feeds["segments"] = _RNG.integers(0, 2, (_B, _S)).astype(np.int32)
    if mask:
        feeds["mask"] = np.array([[1, 1, 1, 0, 0], [2, 1, 0, 0, 0], [1, 5, 1, 1, -1]], np.int32)  # counts the 1s
    if position_ids:
        feeds["position_ids"] = np.array([[3, 1, 4, 1, 5]], np.int32)
    inputs = [(k, _INT, list(v.shape)) for k, v in feeds.items()]
    order = ["ids", "segments" if segments else "", "words", "positions", "segment_table" if segments else "",
             "gamma", "beta", "mask" if mask else "", "position_ids" if position_ids else ""]
    outputs = [("y", TensorProto.FLOAT, [_B, _S, hidden]), ("mask_index" if mask_index else "", _INT, [_B])]
    outputs += [("embedding_sum", TensorProto.FLOAT, [_B, _S, hidden])] if embedding_sum else []
    return _graph_model("EmbedLayerNormalization", inputs, consts, outputs, order, epsilon=1e-5), feeds


_ATTENTION_CASES = {
    "attention": _attention_case(),
    "attention_no_bias": _attention_case(bias=False),
    **{f"attention_mask_{m}": _attention_case(m) for m in ("raw", "raw_3d", "lengths", "left_padding")},
    "attention_causal": _attention_case(unidirectional=1),
    "attention_causal_and_mask": _attention_case("raw_causal", unidirectional=1),
    "attention_scale_and_filter_value": _attention_case("lengths", scale=0.3, mask_filter_value=-50.0),
    "attention_v_size": _attention_case("raw", v_size=12),
    "attention_bias_input": _attention_case("raw", attention_bias=True),
    "mha": _mha_case(),
    "mha_no_bias": _mha_case(bias=False),
    "mha_mask_raw": _mha_case("raw"),
    "mha_mask_lengths": _mha_case("lengths"),
    "mha_cross_attention": _mha_case(kv_length=7, v_size=12),
    "mha_attention_bias": _mha_case("raw", attention_bias=True),
    "embed": _embed_case(),
    "embed_no_segments_no_mask": _embed_case(segments=False, mask=False),
    "embed_position_ids_and_sum": _embed_case(position_ids=True, embedding_sum=True),
    "embed_no_mask_index": _embed_case(mask_index=False),
}


def _zero_bias(model: onnx.ModelProto) -> onnx.ModelProto:
    """An Attention without its bias input, given a zero one: ONNX Runtime's CPU kernel crashes without it."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    columns = model.graph.initializer[0].dims[1]
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(columns, np.float32), "b"))
    model.graph.node[0].input[2] = "b"
    return model


@pytest.mark.parametrize("case", sorted(_ATTENTION_CASES))
def test_attention_and_embeddings_compute_what_onnx_runtimes_kernels_do(case: str) -> None:
    model, feeds = _ATTENTION_CASES[case]
    want = ort.run(_zero_bias(model) if case == "attention_no_bias" else model, feeds)
    lowered = lower_contrib_ops(model)
    assert not [n.op_type for n in lowered.graph.node if n.domain == "com.microsoft"]
    onnx.checker.check_model(lowered, full_check=True)
    assert ort.relative_error(want, ort.run(lowered, feeds)) <= 1e-5
    exported = export_onnx(import_onnx(model))
    assert not [n.op_type for n in exported.graph.node if n.domain == "com.microsoft"]
    assert ort.relative_error(want, ort.run(exported, feeds)) <= 1e-5


class _Bert(nn.Module):
    """BERT written as Hugging Face writes it (embeddings, post-norm layers, an additive -10000 mask), small: the
    form onnxruntime.transformers.optimizer fuses into EmbedLayerNormalization, Attention, SkipLayerNormalization."""

    def __init__(self, vocab: int = 100, hidden: int = 32, heads: int = 4, ffn: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.heads, self.hidden = heads, hidden
        self.word, self.position, self.segment = nn.Embedding(vocab, hidden), nn.Embedding(16, hidden), \
            nn.Embedding(2, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(16).expand((1, -1)))
        self.layers = nn.ModuleList(nn.ModuleDict({
            "query": nn.Linear(hidden, hidden), "key": nn.Linear(hidden, hidden), "value": nn.Linear(hidden, hidden),
            "dense": nn.Linear(hidden, hidden), "norm1": nn.LayerNorm(hidden, eps=1e-12),
            "up": nn.Linear(hidden, ffn), "down": nn.Linear(ffn, hidden), "norm2": nn.LayerNorm(hidden, eps=1e-12),
        }) for _ in range(layers))
        self.classifier = nn.Linear(hidden, 3)

    def _split(self, x):
        return x.view(x.size()[:-1] + (self.heads, self.hidden // self.heads)).permute(0, 2, 1, 3)

    def forward(self, input_ids, attention_mask, token_type_ids):
        positions = self.position_ids[:, :input_ids.size(1)]
        x = self.norm(self.word(input_ids) + self.segment(token_type_ids) + self.position(positions))
        mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
        for layer in self.layers:
            q, k, v = (self._split(layer[p](x)) for p in ("query", "key", "value"))
            scores = torch.matmul(q, k.transpose(-1, -2)) / (self.hidden // self.heads) ** 0.5 + mask
            context = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
            context = context.view(context.size()[:-2] + (self.hidden,))
            x = layer["norm1"](layer["dense"](context) + x)
            x = layer["norm2"](layer["down"](nn.functional.gelu(layer["up"](x))) + x)
        return self.classifier(x[:, 0])


def _bert_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Token ids, segments and a right-padded mask (the padding ONNX Runtime's fused mask index stands for), in the
    types the model's inputs have (the optimizer makes them int32)."""
    rng = np.random.default_rng(3)
    values = {"input_ids": rng.integers(0, 100, (2, 8)), "token_type_ids": rng.integers(0, 2, (2, 8)),
              "attention_mask": np.array([[1] * 8, [1] * 5 + [0] * 3])}
    return {i.name: values[i.name].astype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in model.graph.input}


@pytest.mark.parametrize("fusion", ["Attention", "MultiHeadAttention"])
def test_a_bert_fused_by_onnx_runtimes_transformer_optimizer_prunes_like_its_original(tmp_path, fusion: str) -> None:
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    torch.manual_seed(0)
    model = _Bert().eval()
    for p in model.parameters():
        p.data = torch.randn_like(p) * 0.1
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.int64), torch.zeros(2, 8, dtype=torch.int64))
    plain, fused = str(tmp_path / "bert.onnx"), str(tmp_path / "bert_fused.onnx")
    torch.onnx.export(model, example, plain, dynamo=False, opset_version=17, input_names=names,
                      dynamic_axes={k: {0: "batch", 1: "sequence"} for k in names})
    options = FusionOptions("bert")
    options.use_multi_head_attention = fusion == "MultiHeadAttention"  # projections stay MatMuls, bias packed
    optimizer.optimize_model(plain, model_type="bert", num_heads=4, hidden_size=32,
                             optimization_options=options).save_model_to_file(fused)
    ops = {n.op_type for n in onnx.load(fused).graph.node if n.domain == "com.microsoft"}
    assert {"EmbedLayerNormalization", fusion, "SkipLayerNormalization"} <= ops

    shapes = {k: [2, 8] for k in names}
    groups = [sorted((g.size, g.prunable) for g in analyze(import_onnx(p, shapes)).groups) for p in (plain, fused)]
    assert groups[0] == groups[1] and sum(prunable for _, prunable in groups[0]) == 7
    result = run(fused, tmp_path / "out", input_shapes=shapes, ratio=0.5)
    want = run(plain, tmp_path / "plain", input_shapes=shapes, ratio=0.5)
    assert result.report["cost"]["after"]["macs"] == want.report["cost"]["after"]["macs"]
    pruned, reference = onnx.load(result.files["onnx"]), onnx.load(want.files["onnx"])
    assert not [n for n in pruned.graph.node if n.domain == "com.microsoft"]
    assert ort.relative_error(ort.run(reference, _bert_feeds(reference)), ort.run(pruned, _bert_feeds(pruned))) <= 1e-5
    # The optimizer fuses the pruned model again (the attention written in the exporter's form), to the same function.
    fused_again = optimizer.optimize_model(result.files["onnx"], model_type="bert", num_heads=0, hidden_size=0).model
    assert {"Attention", "SkipLayerNormalization"} <= {n.op_type for n in fused_again.graph.node}
    again = ort.run(fused_again, _bert_feeds(fused_again))
    assert ort.relative_error(ort.run(pruned, _bert_feeds(pruned)), again) <= 1e-4


@pytest.mark.parametrize("form", ["attention_with_cache", "attention_rotary", "mha_causal", "attention_4d_mask"])
def test_an_attention_form_not_lowered_stays_and_is_named(form: str) -> None:
    if form.startswith("mha"):
        model, _ = _mha_case()
        model.graph.node[0].attribute.append(helper.make_attribute("unidirectional", 1))
    elif form == "attention_4d_mask":  # Megatron's [B, 1, max, max]
        model, _ = _attention_case()
        model.graph.input.append(helper.make_tensor_value_info("mask", _INT, [_B, 1, _S, _S]))
        model.graph.node[0].input.append("mask")
    else:
        model, _ = _attention_case(**({"do_rotary": 1} if form == "attention_rotary" else {}))
        if form == "attention_with_cache":
            model.graph.input.append(helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, _B, _N, 4, _D // _N]))
            model.graph.node[0].input.append("past")  # after x, w, b, mask_index
    op = model.graph.node[0].op_type
    assert [n.op_type for n in lower_contrib_ops(model).graph.node] == [op]
    with pytest.raises(UnsupportedModelError, match=f"op '{op}' is from domain 'com.microsoft'"):
        import_onnx(model)
