"""The TIR passes CPU builds skip (backends/tvm/cpu_passes.py) leave the machine code as TVM's whole pipeline makes
it, and neither tuning's candidates nor the library run them."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from prune_compile.backends.tvm import cpu_passes, tuning
from prune_compile.backends.tvm.cpu_passes import SKIPPED
from prune_compile.errors import BackendError

build = importlib.import_module("prune_compile.backends.tvm.build")  # the package exports a function by that name


def _convs_onnx():
    """A 3x3 conv (Winograd's and direct spaces), a depthwise 3x3 and a strided 1x1, each with its epilogue."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4, kernel_shape=[3, 3], group=32),
             helper.make_node("Conv", ["c2", "w3"], ["y"], kernel_shape=[1, 1], strides=[2, 2])]
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 14, 14])],
        [weight("w1", (32, 32, 3, 3)), weight("b1", (32,)), weight("w2", (32, 1, 3, 3)), weight("w3", (64, 32, 1, 1))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _design_spaces(monkeypatch, work_dir: str) -> list:
    """Every design space of the model's tasks as a tuned cpu build lowers them (tuning stops before it runs)."""
    from tvm.s_tir import meta_schedule as ms

    spaces = []

    def take_spaces(mod, target, _target_name, _options):
        with tuning._own_handlers_only():  # as tuning configures MetaSchedule's loggers (pytest's is on them)
            contexts, _ = ms.relax_integration.extracted_tasks_to_tune_contexts(
                ms.relax_integration.extract_tasks(mod, target), work_dir)
        for context in contexts:
            spaces.extend((space.mod, target) for space in context.generate_design_space())
        raise BackendError("spaces taken")

    monkeypatch.setattr(build, "tune", take_spaces)
    with pytest.raises(BackendError, match="spaces taken"):
        build.lower_model(_convs_onnx(), "cpu", tuning=tuning.TuningOptions(trials=8))
    return spaces


def test_candidates_built_without_the_skipped_passes_are_the_same_machine_code(monkeypatch, tmp_path) -> None:
    """The oracle is the same builder with nothing skipped: TVM's whole pipeline."""
    tuning._import_tensor_intrinsics()
    spaces = _design_spaces(monkeypatch, str(tmp_path))
    assert len(spaces) >= 20
    for mod, target in spaces[::max(1, len(spaces) // 40)]:
        with monkeypatch.context() as whole_pipeline:
            whole_pipeline.setattr(cpu_passes, "SKIPPED", ())
            whole = tuning._build_candidate(mod, target, None)
        ours = tuning._build_candidate(mod, target, None)
        assert ours.inspect_source("asm") == whole.inspect_source("asm")


def _passes_run(compile_fn) -> list[str]:
    """The names of the passes `compile_fn` ran (an instrument the build's own pass contexts carry on)."""
    import tvm

    names: list[str] = []

    @tvm.instrument.pass_instrument
    class Recorder:
        def run_before_pass(self, _mod, info) -> None:
            names.append(info.name)

    with tvm.transform.PassContext(instruments=[Recorder()]):
        compile_fn()
    return names


@pytest.mark.parametrize("where", ["candidate", "library"])
def test_candidates_and_the_library_skip_the_same_passes(where) -> None:
    """What tuning measured is what ships: both skip them (and still run the rest of TVM's pipeline)."""
    import tvm
    from tvm.script import tirx as T

    if where == "candidate":
        @T.prim_func(s_tir=True)
        def copy(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
            for i in range(64):
                b[i] = a[i] + T.float32(1)

        target = tvm.target.Target({"kind": "llvm"})
        ran = _passes_run(lambda: tuning._build_candidate(tvm.IRModule({"main": copy}), target, None))
    else:
        ran = _passes_run(lambda: build.compile_model(_convs_onnx(), "cpu"))
    assert "tirx.StmtSimplify" in ran and "tirx.MakePackedAPI" in ran
    assert not [p for p in SKIPPED if p in ran], ran
