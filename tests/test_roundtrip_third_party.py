"""Round-trip oracle on real third-party ONNX models (PP-OCRv4/v5 det, rec, cls; Magika)."""

from __future__ import annotations

import onnx
import pytest

from prune_compile.backends import ort
from prune_compile.ir import export_onnx, import_onnx

from .third_party import MODELS, fetch_model

RTOL = 1e-5


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_third_party_roundtrip(model_id: str, model_cache_dir: str) -> None:
    path, shapes = fetch_model(model_cache_dir, model_id)
    original = onnx.load(path)
    graph = import_onnx(original, shapes)
    assert [list(v.shape) for v in graph.inputs] == list(shapes.values())
    assert not [n.name for n in graph.nodes if n.opaque], "every op of these models should be understood"
    exported = export_onnx(graph)
    # The exporter keeps the input's IR version, capped at what ONNX Runtime accepts.
    assert exported.ir_version == max(min(original.ir_version, 13), 8)  # opset 17+ needs IR 8
    feeds = ort.random_feeds(exported, seed=1)
    assert ort.relative_error(ort.run(original, feeds), ort.run(exported, feeds)) <= RTOL
