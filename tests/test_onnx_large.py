"""Models over protobuf's 2 GiB message limit: checked and shape-inferred without their weights' data, run in ONNX
Runtime from external data, written as model + data file. Most tests lower the limit so that a small model takes
those paths; one builds a real 2 GiB model (big)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from google.protobuf.message import EncodeError
from onnx import TensorProto, helper, numpy_helper

from prune_compile.api import run
from prune_compile.backends import ort
from prune_compile.ir import export_onnx, import_onnx, onnx_io

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "prune_compile", "data", "default_model.onnx")


@pytest.fixture
def small_limit(monkeypatch) -> None:
    # The default model (~100 KB of weights) is then "large": every path below runs on it as on a 2 GiB one.
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 16 * 1024)


def test_a_large_model_is_pruned_into_a_model_and_data_file_equal_to_the_usual_output(tmp_path, small_limit,
                                                                                       monkeypatch) -> None:
    large = run(DEFAULT_MODEL, tmp_path / "large", ratio=0.5)
    assert large.report["outputs"]["onnx_data"] == "model.pruned.onnx.data"
    files = sorted(os.listdir(tmp_path / "large"))
    assert files == ["model.pruned.onnx", "model.pruned.onnx.data", "plan.json", "report.html", "report.json",
                     "timings.json"]
    model_file = tmp_path / "large" / "model.pruned.onnx"
    structure = onnx.load(model_file, load_external_data=False)  # the weights (1 KiB or more) are in the data file
    external = {t.name for t in structure.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external and all(t.name in external for t in structure.graph.initializer if len(t.raw_data) >= 1024)
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 2**31 - 1)
    usual = run(DEFAULT_MODEL, tmp_path / "usual", ratio=0.5)
    assert "onnx_data" not in usual.report["outputs"]
    assert (tmp_path / "large" / "plan.json").read_text() == (tmp_path / "usual" / "plan.json").read_text()
    assert large.report["verification"] == usual.report["verification"]
    # The same model: ONNX Runtime gives the same outputs from both files, and onnx loads the same tensors.
    feeds = ort.random_feeds(onnx.load(DEFAULT_MODEL), seed=2)
    assert ort.run(str(model_file), feeds)[0].tolist() == ort.run(usual.files["onnx"], feeds)[0].tolist()
    a, b = onnx.load(model_file), onnx.load(usual.files["onnx"])
    assert {t.name: numpy_helper.to_array(t).tolist() for t in a.graph.initializer} == {
        t.name: numpy_helper.to_array(t).tolist() for t in b.graph.initializer}
    assert large.report["outputs"]["onnx_sha256"] == onnx_io.sha256([str(model_file), str(model_file) + ".data"])


def test_a_large_model_with_external_data_is_read_and_a_later_small_output_drops_the_stale_data_file(
        tmp_path, small_limit, monkeypatch) -> None:
    first = run(DEFAULT_MODEL, tmp_path / "first", ratio=0.5)
    # The output (external data) is an input too: pruned again, into the same directory as a small model.
    moved = tmp_path / "in"
    os.makedirs(moved)
    for name in ("model.pruned.onnx", "model.pruned.onnx.data"):
        os.replace(tmp_path / "first" / name, moved / name)
    out = tmp_path / "second"
    os.makedirs(out)
    (out / "model.pruned.onnx.data").write_bytes(b"stale")
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 2**31 - 1)
    second = run(str(moved / "model.pruned.onnx"), out, ratio=0.5)
    assert "model.pruned.onnx.data" not in os.listdir(out)
    assert second.report["verification"]["exact"] and first.report["verification"]["exact"]
    assert second.report["cost"]["after"]["parameters"] < first.report["cost"]["after"]["parameters"]


def test_a_heavy_model_takes_the_memory_light_paths_to_the_same_output(tmp_path, monkeypatch) -> None:
    # Heavy (weights of 64 MiB or more) and under 2 GiB: its weights stay in the file (the job keeps their shapes),
    # the import takes the loaded proto over, shapes are inferred on a weightless view in place, and the verifier's
    # models reach ONNX Runtime as scratch files with external data written from their arrays. The default model
    # (~100 KB) takes those paths here; the output must be the usual one.
    from prune_compile.api import load_model
    from prune_compile.ir import onnx_exporter

    usual = run(DEFAULT_MODEL, tmp_path / "usual", ratio=0.5)
    unpruned = run(DEFAULT_MODEL, tmp_path / "unpruned", ratio=0.0)  # checked against the original itself
    monkeypatch.setattr(onnx_io, "HEAVY_BYTES", 16 * 1024)
    written = []
    real = onnx_exporter.export_onnx_external
    monkeypatch.setattr(onnx_exporter, "export_onnx_external", lambda g, p: written.append(p) or real(g, p))
    loaded = load_model(DEFAULT_MODEL)
    assert loaded.weights_in_file
    big = [t for t in loaded.onnx_model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert big and not any(t.raw_data for t in big)
    heavy = run(DEFAULT_MODEL, tmp_path / "heavy", ratio=0.5)
    assert len(written) == 2  # the pruned model and the zeroed original
    for name in ("model.pruned.onnx", "plan.json"):
        assert (tmp_path / "heavy" / name).read_bytes() == (tmp_path / "usual" / name).read_bytes()
    assert heavy.report["verification"] == usual.report["verification"]
    assert run(DEFAULT_MODEL, tmp_path / "heavy_unpruned", ratio=0.0).report["verification"] == \
        unpruned.report["verification"]
    model = onnx.load(DEFAULT_MODEL)
    before = model.SerializeToString()
    inferred = onnx_io.infer_shapes(model)  # not in place: a new model, this one left as it was
    assert inferred is not model and model.SerializeToString() == before and inferred.graph.value_info
    assert onnx_io.infer_shapes(model, in_place=True) is model and model.graph.value_info


def test_checker_and_shape_inference_see_the_weights_shapes_only(small_limit) -> None:
    model = onnx.load(DEFAULT_MODEL)
    light = onnx_io.weightless(model)
    assert not [t for t in light.graph.initializer if t.ByteSize() >= onnx_io.EXTERNAL_MIN_BYTES]
    onnx_io.check_model(model)
    inferred = onnx_io.infer_shapes(model, strict_mode=True, data_prop=True)
    assert inferred is model and model.graph.value_info  # in place: no copy of a large model
    usual = onnx.shape_inference.infer_shapes(onnx.load(DEFAULT_MODEL), strict_mode=True, data_prop=True)
    assert {v.name: v.type for v in model.graph.value_info} == {v.name: v.type for v in usual.graph.value_info}
    broken = onnx.load(DEFAULT_MODEL)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(onnx.checker.ValidationError, match="NoSuchOp"):
        onnx_io.check_model(broken)


def _two_gib_model() -> onnx.ModelProto:
    """Two 16384 x 16384 fp32 layers (2 x 1 GiB of weights: one byte count past what protobuf serializes)."""
    n = 16384
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32) * 0.01, name)
             for name in ("fc1.weight", "fc2.weight")]
    inits.append(numpy_helper.from_array(np.zeros(n, np.float32), "fc1.bias"))
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "fc2.weight"], ["y"], transB=1, name="fc2")]
    graph = helper.make_graph(nodes, "two_gib", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.big
@pytest.mark.serial  # ~10 GB of memory at its peak: not beside another test worker
def test_a_real_two_gib_model_imports_exports_and_runs(tmp_path) -> None:
    model = _two_gib_model()
    assert onnx_io.is_large(model)
    with pytest.raises(EncodeError):  # what failed before: protobuf cannot serialize it
        model.SerializeToString()
    graph = import_onnx(model)
    assert [n.op for n in graph.nodes] == ["linear", "relu", "linear"]
    path = tmp_path / "model.onnx"
    export_onnx(graph, path)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    assert os.path.getsize(tmp_path / "model.onnx.data") > 2**31
    x = {"x": np.random.default_rng(1).standard_normal((1, 16384)).astype(np.float32)}
    got = ort.run(str(path), x)
    del graph
    assert ort.relative_error(ort.run(model, x), got) <= 1e-6


def test_the_zeroed_original_shares_the_unchanged_weights_and_leaves_the_original_intact() -> None:
    from prune_compile.passes.deps import analyze
    from prune_compile.passes.oracle import zeroed_constants, zeroed_graph
    from prune_compile.passes.plan import uniform_plan

    graph = import_onnx(DEFAULT_MODEL)
    deps = analyze(graph)
    plan = uniform_plan(deps, 0.5)
    before = {v.name: v.data.copy() for v in graph.constants()}
    zeroed = zeroed_graph(graph, deps, plan)
    changed = set(zeroed_constants(deps, plan))
    assert changed and len(changed) < len(before)
    copies = {v.name: v.data for v in zeroed.constants()}
    for v in graph.constants():
        assert np.array_equal(v.data, before[v.name])
        assert (copies[v.name] is v.data) == (v.name not in changed)
