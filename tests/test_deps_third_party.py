"""The consumer-zeroing oracle on real third-party ONNX models (trained weights, realistic inputs)."""

from __future__ import annotations

import onnx
import pytest

from prune_compile.ir import import_onnx
from prune_compile.passes.deps import analyze

from .oracle import exact_plan, oracle_error
from .third_party import MODELS, fetch_model, realistic_feeds


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_oracle_on_third_party_model(model_id: str, model_cache_dir: str) -> None:
    path, shapes = fetch_model(model_cache_dir, model_id)
    graph = import_onnx(onnx.load(path), shapes)
    deps = analyze(graph)
    feeds = realistic_feeds(model_id, shapes)
    if model_id == "magika":
        # Its dense layers read reshaped one-hot bytes; every group touches a reshape that mixes axes: frozen.
        assert not deps.prunable() and all(g.reason for g in deps.groups)
        return
    assert len(deps.prunable()) >= 20
    plan = exact_plan(deps, 0.5)
    assert plan.removed
    assert oracle_error(graph, deps, plan, feeds, compare_logits=True) <= 1e-4
