"""The latency table's lowering leaves what constant folding would compute from the weights zero (unvalued_constants):
the same kernels, so the same tuning tasks and records, without an LLVM build per folded call."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")


def _two_convs():
    """A 3x3 conv (bias, relu) into a 1x1 conv: weight layout transforms, a bias reshape, Winograd's kernel
    transform where it pays, chained on constants."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (32, 16, 3, 3)), ("b1", (32,)), ("w2", (24, 32, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1] * 4, kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24, 28, 28])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _lowered_for_tuning(monkeypatch, model, weights_unused: bool):
    """The module `lower_model` hands to tuning (tuning itself stopped there)."""
    import importlib

    from prune_compile.backends.tvm.tuning import TuningOptions
    from prune_compile.errors import BackendError

    build = importlib.import_module("prune_compile.backends.tvm.build")
    captured = {}

    def stop(mod, *_args):
        captured["mod"] = mod
        raise RuntimeError("stop")

    monkeypatch.setattr(build, "tune", stop)
    with pytest.raises(BackendError, match="stop"):
        build.lower_model(model, "cpu", tuning=TuningOptions(trials=8), weights_unused=weights_unused)
    return captured["mod"]


def _constants(mod) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    found = []  # tensor constants (scalar ones hold plain numbers)
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e.value.numpy())
                                    if isinstance(e, tvm.ir.expr.Constant) and hasattr(e.value, "numpy") else None)
    return found


def test_unvalued_constants_keep_the_kernels_and_leave_folded_weights_zero(monkeypatch) -> None:
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from prune_compile.backends.tvm.targets import DEFAULT_OPTIONS, make_target

    target = make_target("cpu", DEFAULT_OPTIONS)
    model = _two_convs()
    folded = _lowered_for_tuning(monkeypatch, model, weights_unused=False)
    unvalued = _lowered_for_tuning(monkeypatch, model, weights_unused=True)

    def tasks(mod):
        return sorted((t.task_name, tvm_ffi.structural_hash(t.dispatched[0]))
                      for t in ms.relax_integration.extract_tasks(mod, target))

    assert tasks(unvalued) == tasks(folded) and any("conv2d" in name for name, _ in tasks(folded))
    computed, zero = _constants(folded), _constants(unvalued)
    assert sorted(c.shape for c in computed) == sorted(c.shape for c in zero) and len(zero) >= 3
    assert all(c.dtype == np.float32 for c in zero)
    assert all(not c.any() for c in zero) and all(c.any() for c in computed)
