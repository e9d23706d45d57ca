"""CPU builds evaluate exp, tanh, erf and the activations built on them as vector arithmetic
(backends/tvm/vector_math.py): accurate over the functions' whole float32 range, no libm call per vector lane left
in the code, and TVM == ONNX Runtime behind convolutions, untuned and tuned in the blocked layout."""

from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from prune_compile.backends import ort
from prune_compile.backends import tvm as tvm_backend

pytest.importorskip("tvm")
RTOL = 1e-4

# ONNX nodes from "x" to "y" for each activation the rewrite covers (GELU both as ONNX Runtime exporters write it,
# with Erf, and as opset 20's Gelu op in both approximations)
ACTIVATIONS = {
    "Sigmoid": [helper.make_node("Sigmoid", ["x"], ["y"])],
    "SiLU": [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])],
    "Tanh": [helper.make_node("Tanh", ["x"], ["y"])],
    "Exp": [helper.make_node("Exp", ["x"], ["y"])],
    "Erf": [helper.make_node("Erf", ["x"], ["y"])],
    "GELU via Erf": [helper.make_node("Mul", ["x", "inv_sqrt2"], ["a"]), helper.make_node("Erf", ["a"], ["e"]),
                     helper.make_node("Add", ["e", "one"], ["b"]), helper.make_node("Mul", ["x", "b"], ["c"]),
                     helper.make_node("Mul", ["c", "half"], ["y"])],
    "Gelu": [helper.make_node("Gelu", ["x"], ["y"])],
    "Gelu tanh": [helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")],
    "Softmax over channels": [helper.make_node("Softmax", ["x"], ["y"], axis=1)],
    "Softmax over the last axis": [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
}
CONSTANTS = [numpy_helper.from_array(np.array(v, np.float32), name) for name, v in
             (("inv_sqrt2", 0.5 ** 0.5), ("one", 1.0), ("half", 0.5))]


def _model(nodes, shape, conv_channels: int = 0, scale: float = 1.0):
    """`nodes` applied to the input, or to a 3x3 conv of it with `conv_channels` outputs (weights scaled so the
    activation sees values up to ~`scale`)."""
    rng = np.random.default_rng(0)
    inits = list(CONSTANTS)
    head = []
    if conv_channels:
        w = rng.standard_normal((conv_channels, shape[1], 3, 3)).astype(np.float32)
        w *= scale / (3 * np.sqrt(w[0].size))
        inits += [numpy_helper.from_array(w, "conv_w"), numpy_helper.from_array(
            rng.standard_normal(conv_channels).astype(np.float32), "conv_b")]
        head = [helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["x"], pads=[1, 1, 1, 1])]
        out_shape = [shape[0], conv_channels, *shape[2:]]
    else:
        head = [helper.make_node("Identity", ["input"], ["x"])]
        out_shape = list(shape)
    graph = helper.make_graph(head + nodes, "activation",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


def _reference(name: str, x: np.ndarray) -> np.ndarray:
    from scipy import special

    x = x.astype(np.float64)
    if name.startswith("Softmax"):
        return special.softmax(x, axis=1 if "channels" in name else -1)
    if name == "Gelu tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return {"Sigmoid": special.expit, "SiLU": lambda v: v * special.expit(v), "Tanh": np.tanh, "Exp": np.exp,
            "Erf": special.erf, "GELU via Erf": lambda v: v * 0.5 * (1 + special.erf(v / np.sqrt(2))),
            "Gelu": lambda v: v * 0.5 * (1 + special.erf(v / np.sqrt(2)))}[name](x)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_are_accurate_over_the_whole_float32_range(tmp_path, name: str) -> None:
    # every value from -88 to 88 (exp's float32 range): the range reductions and clamps at the ends, the tails of
    # sigmoid (relative precision where it is ~1e-38) and of tanh and erf (exactly ±1 far out)
    x = np.linspace(-88.0, 88.0, 4 * 16 * 64 * 65, dtype=np.float32).reshape(4, 16, 64, 65)
    lib = str(tmp_path / "m.so")
    tvm_backend.build(_model(ACTIVATIONS[name], x.shape), "cpu", lib)
    got = tvm_backend.run_library(lib, {"input": x}, ["input"])[0].astype(np.float64)
    want = _reference(name, x)
    # relative where the function's value carries it (exp, sigmoid and softmax far below 1), absolute near zeros;
    # exp is relative down to float32's smallest normal number (fast_exp flushes what lies below it to zero)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=np.finfo(np.float32).tiny if name == "Exp" else 1e-6)


def _libm_calls(executable) -> set[str]:
    """Scalar transcendental functions the compiled CPU code calls (LLVM scalarizes its vector exp intrinsics into
    one libm call per lane)."""
    found: set[str] = set()
    for module in executable.mod.imports:
        if module.kind == "llvm":
            found |= set(re.findall(r"@((?:expf|tanhf|erff|expm1f)|llvm\.(?:exp|exp2|tanh)\.[\w.]+)\b",
                                    module.inspect_source("ll")))
    return found


def chained_model(names: list[str], shape, conv_channels: int = 0, scale: float = 1.0):
    """The activations `names` one after the other (each one's input the previous one's output), behind a conv as
    in `_model`."""
    constants = {c.name for c in CONSTANTS}
    nodes = []
    for i, name in enumerate(names):
        rename = {"x": "x" if i == 0 else f"y{i - 1}", "y": f"y{i}"}
        for n in ACTIVATIONS[name]:
            node = helper.make_node(n.op_type, [rename.get(v, v if v in constants else f"{v}{i}") for v in n.input],
                                    [rename.get(v, f"{v}{i}") for v in n.output])
            node.attribute.extend(n.attribute)
            nodes.append(node)
    nodes.append(helper.make_node("Identity", [f"y{len(names) - 1}"], ["y"]))
    return _model(nodes, shape, conv_channels, scale)


def test_no_libm_call_per_vector_lane_is_left() -> None:
    model = chained_model(sorted(ACTIVATIONS), [1, 16, 8, 8], conv_channels=16)
    assert _libm_calls(tvm_backend.compile_model(model, "cpu")[0]) == set()


@pytest.mark.parametrize("name", ["SiLU", "GELU via Erf", "Softmax over channels"])
def test_activations_after_a_conv_agree_with_onnx_runtime(tmp_path, name: str) -> None:
    model = _model(ACTIVATIONS[name], [1, 8, 12, 20], conv_channels=32, scale=8.0)
    lib = str(tmp_path / "m.so")
    tvm_backend.build(model, "cpu", lib)
    x = {"input": np.random.default_rng(1).standard_normal((1, 8, 12, 20)).astype(np.float32)}
    assert ort.relative_error(ort.run(model, x), tvm_backend.run_library(lib, x, ["input"])) <= RTOL


@pytest.mark.serial  # tuning times candidates
def test_tuned_blocked_conv_with_silu_and_softmax_agrees_with_onnx_runtime(tmp_path) -> None:
    # YOLOv8's pattern: SiLU in every blocked conv's epilogue, then a softmax (its box decoding)
    nodes = ACTIVATIONS["SiLU"][:1] + [helper.make_node("Mul", ["x", "s"], ["a"]),
                                       helper.make_node("Softmax", ["a"], ["y"], axis=1)]
    model = _model(nodes, [1, 16, 14, 14], conv_channels=32, scale=8.0)
    lib = str(tmp_path / "m.so")
    result = tvm_backend.build(model, "cpu", lib, tvm_backend.TargetOptions(conv_layout="NCHWc"),
                               tvm_backend.TuningOptions(trials=24, database=str(tmp_path / "db")))
    assert result.pipeline.startswith("metaschedule, NCHW") and result.tuning["trials_valid"] > 0
    x = {"input": np.random.default_rng(2).standard_normal((1, 16, 14, 14)).astype(np.float32)}
    assert ort.relative_error(ort.run(model, x), tvm_backend.run_library(lib, x, ["input"])) <= RTOL
