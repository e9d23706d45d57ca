"""Round-trip oracle on the torchvision zoo: import → export with no pass reproduces the original outputs.

Path A: torch.export → IR → ONNX, compared with eager PyTorch.
Path B: torch.onnx.export → ONNX importer → IR → ONNX, compared with ONNX Runtime on the original file.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch

from prune_compile.backends import ort
from prune_compile.ir import export_onnx, import_onnx
from prune_compile.ir.fx_importer import import_torch_module

from .zoo import TORCHVISION, example_input, torchvision_model

RTOL = 1e-5
CASES = [pytest.param(name, size, marks=[pytest.mark.big] if big else [], id=name) for name, size, big in TORCHVISION]


@pytest.mark.parametrize("name,size", CASES)
def test_torch_export_path(name: str, size: int) -> None:
    model = torchvision_model(name)
    x = example_input(size)
    graph = import_torch_module(model, (x,))
    assert not [n.name for n in graph.nodes if n.opaque], "every torchvision op should be understood"
    state = model.state_dict()
    params = [v for v in graph.constants() if v.provenance.kind in ("torch_parameter", "torch_buffer")]
    assert params and all(v.name in state for v in params), "constants keep their state_dict names"
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort.run(export_onnx(graph), {graph.inputs[0].name: x.numpy()})
    assert ort.relative_error([expected], got) <= RTOL


@pytest.mark.parametrize("name,size", CASES)
def test_onnx_path(name: str, size: int) -> None:
    model = torchvision_model(name)
    x = example_input(size)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    original = onnx.load_from_string(buf.getvalue())
    graph = import_onnx(original)
    assert not [n.name for n in graph.nodes if n.opaque], "every op of the exported model should be understood"
    exported = export_onnx(graph)
    feeds = {"x": x.numpy()}
    expected = ort.run(original, feeds)
    got = ort.run(exported, feeds)
    assert ort.relative_error(expected, got) <= RTOL
    # Initializer names survive the round trip (plan.json and reports rely on them).
    before = {i.name for i in original.graph.initializer}
    after = {i.name for i in exported.graph.initializer}
    weights = {n for n in before if n.endswith(".weight")}
    assert weights and weights <= after
    assert np.isfinite(got[0]).all()
