"""TVM backend: backend agreement (TVM == ONNX Runtime, design §5.3) and a library that reloads in a fresh
process with equal outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prune_compile.api import run
from prune_compile.backends import ort
from prune_compile.backends import tvm as tvm_backend
from prune_compile.ir import export_onnx
from prune_compile.ir.fx_importer import import_torch_module
from prune_compile.ir.onnx_importer import MAX_OPSET
from prune_compile.passes.deps import analyze
from prune_compile.passes.plan import uniform_plan
from prune_compile.passes.rewrite import pruned_copy

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "prune_compile", "data", "default_model.onnx")
RTOL = 1e-4


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_cli_compiles_for_cpu_and_tvm_agrees_with_onnx_runtime(tmp_path, ratio: float) -> None:
    out = tmp_path / "out"
    result = run(DEFAULT_MODEL, out, ratio=ratio, targets=["cpu"])
    assert sorted(os.listdir(out)) == ["model.cpu.so", "model.pruned.onnx", "plan.json", "report.html", "report.json",
                                      "timings.json"]
    assert result.report["targets"]["cpu"]["verification"]["max_relative_error"] <= RTOL
    # The library reloads in a fresh process (TVM's runtime state does not leak from the build) that has only
    # TVM's runtime, as a deployment machine does.
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = ("import json, sys, numpy as np, tvm\n"
              "assert tvm.base._RUNTIME_ONLY and 'tvm_compiler' not in tvm.base._LOADED_LIBS\n"
              "from prune_compile.backends import tvm as t\n"
              f"out = t.run_library({str(out / 'model.cpu.so')!r}, {{'image': np.load({str(tmp_path / 'x.npy')!r})}},"
              " ['image'])\n"
              "print(json.dumps(out[0].tolist()))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"})
    assert proc.returncode == 0, proc.stderr
    got = np.asarray(json.loads(proc.stdout.strip().splitlines()[-1]), dtype=np.float32)
    expected = ort.run(str(out / "model.pruned.onnx"), {"image": x})[0]
    assert ort.relative_error([expected], [got]) <= RTOL


@pytest.mark.big
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vit_b_16"])
def test_pruned_torchvision_model_tvm_equals_ort_equals_torch(tmp_path, name: str) -> None:
    import torch

    from .zoo import example_input, torchvision_model

    model = torchvision_model(name)
    x = example_input(224)
    graph = import_torch_module(model, (x,))
    with torch.no_grad():
        torch_out = model(x).numpy()
    deps = analyze(graph)
    for label, plan in (("full", None), ("pruned", uniform_plan(deps, 0.5))):
        g = graph if plan is None else pruned_copy(graph, plan, deps)
        proto = export_onnx(g)
        lib = str(tmp_path / f"{name}.{label}.so")  # dlopen caches by path: never reuse one in a process
        tvm_backend.build(proto, "cpu", lib)
        feeds = {g.inputs[0].name: x.numpy()}
        ort_out = ort.run(proto, feeds)
        assert ort.relative_error(ort_out, tvm_backend.run_library(lib, feeds, list(feeds))) <= RTOL
        if plan is None:
            assert ort.relative_error([torch_out], ort_out) <= RTOL


@pytest.mark.parametrize(("model_id", "opset"), [("ppocr_cls", None), ("ppocrv4_rec", None), ("nudenet_yolov8n", None),
                                               ("nudenet_yolov8n", MAX_OPSET), ("layout_picodet", None),
                                               ("ddddocr_det", None), ("silero_vad_v6", None)])
def test_pruned_third_party_model_tvm_equals_ort(tmp_path, model_cache_dir: str, model_id: str, opset) -> None:
    import onnx

    from prune_compile.ir import import_onnx

    from .third_party import fetch_model, realistic_feeds

    path, shapes = fetch_model(model_cache_dir, model_id)
    model = onnx.load(path)
    if opset is not None:  # the newest opset the importer takes reaches TVM's ONNX frontend as it is
        model = onnx.version_converter.convert_version(model, opset)
    graph = import_onnx(model, shapes)
    deps = analyze(graph)
    proto = export_onnx(pruned_copy(graph, uniform_plan(deps, 0.5), deps))
    lib = str(tmp_path / f"{model_id}.so")
    tvm_backend.build(proto, "cpu", lib)
    feeds = realistic_feeds(model_id, shapes)
    assert ort.relative_error(ort.run(proto, feeds), tvm_backend.run_library(lib, feeds, list(feeds))) <= RTOL


def test_nhwc_conv_layout_compiles_and_agrees_with_onnx_runtime(tmp_path) -> None:
    from prune_compile.cli import main

    out = tmp_path / "out"
    assert main([DEFAULT_MODEL, "-o", str(out), "-q", "--ratio", "0.5", "--target", "cpu",
                 "--conv-layout", "NHWC"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["targets"]["cpu"]["pipeline"].startswith("NHWC")
    assert report["targets"]["cpu"]["verification"]["max_relative_error"] <= RTOL
    assert report["targets"]["cpu"]["batch_norms_folded"] == 9
