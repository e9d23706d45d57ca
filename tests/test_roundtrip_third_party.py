"""Round-trip oracle on real third-party ONNX models (PP-OCRv4/v5 det, rec, cls; Magika)."""

from __future__ import annotations

import onnx
import pytest

from prune_compile.backends import ort
from prune_compile.ir import export_onnx, import_onnx
from prune_compile.ir.onnx_importer import MAX_OPSET
from prune_compile.passes.deps import analyze
from prune_compile.passes.plan import uniform_plan

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


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_third_party_model_at_the_newest_opset(model_id: str, model_cache_dir: str) -> None:
    """Converted up to the newest opset ONNX Runtime loads: every op still understood, the same groups and plan,
    the original's outputs, and the opset kept with the IR version it was released with."""
    path, shapes = fetch_model(model_cache_dir, model_id)
    original = onnx.load(path)
    newest = onnx.version_converter.convert_version(original, MAX_OPSET)
    graph = import_onnx(newest, shapes)
    assert not [n.name for n in graph.nodes if n.opaque]
    exported = export_onnx(graph)
    assert {o.domain: o.version for o in exported.opset_import}[""] == MAX_OPSET
    assert exported.ir_version == 13  # opsets 25 and 26 came with IR 13 (the input's is 8 or less)
    feeds = ort.random_feeds(exported, seed=1)
    assert ort.relative_error(ort.run(original, feeds), ort.run(exported, feeds)) <= RTOL
    deps, old_deps = analyze(graph), analyze(import_onnx(original, shapes))
    assert _group_summary(deps) == _group_summary(old_deps)
    assert _removed(uniform_plan(deps, 0.5)) == _removed(uniform_plan(old_deps, 0.5))


def _removed(plan) -> dict[int, list[int]]:
    return {gid: list(map(int, idx)) for gid, idx in plan.removed.items()}


def _group_summary(deps) -> list[tuple]:
    return [(g.size, g.prunable, g.exact, sorted((m.value.name, m.axis) for m in g.members if m.is_param))
            for g in deps.groups]
