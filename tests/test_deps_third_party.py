"""The consumer-zeroing oracle on real third-party ONNX models (trained weights, realistic inputs)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from prune_compile.backends import ort
from prune_compile.ir import export_onnx, import_onnx
from prune_compile.passes.deps import analyze
from prune_compile.passes.plan import Plan, uniform_plan
from prune_compile.passes.rewrite import pruned_copy

from .oracle import exact_plan, oracle_error
from .third_party import MODELS, fetch_model, realistic_feeds


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_oracle_on_third_party_model(model_id: str, model_cache_dir: str) -> None:
    path, shapes = fetch_model(model_cache_dir, model_id)
    graph = import_onnx(onnx.load(path), shapes)
    deps = analyze(graph)
    feeds = realistic_feeds(model_id, shapes)
    if model_id == "magika":
        # Its first dense layer's 64 features per byte reach the conv as [512 positions, 4 bytes x 64]: the
        # features carry (the same feature of each of the 4 bytes), exact. The conv's 512 filters reach a LayerNorm
        # that JAX writes as Sum, Square, Sub: prunable, inexact (its statistics read fewer channels), and the
        # pruned model runs with the original's outputs.
        assert all(g.reason for g in deps.groups if not g.prunable)
        dense, conv = sorted(deps.prunable(), key=lambda g: g.size)
        assert dense.size == 64 and dense.exact
        assert {m.indices.shape[1] for m in dense.members if m.value.is_constant} == {1, 4}
        assert oracle_error(graph, deps, Plan({dense.id: np.arange(0, 64, 2)}), feeds) <= 1e-4
        assert conv.size == 512 and not conv.exact and "LayerNorm_1/Sum': reduce_sum" in conv.inexact_reason
        pruned = export_onnx(pruned_copy(graph, uniform_plan(deps, 0.5), deps))
        want = ort.run(export_onnx(graph), feeds)
        got = ort.run(pruned, feeds)
        assert [a.shape for a in got] == [a.shape for a in want]
        assert sum(i.dims[0] for i in pruned.graph.initializer if len(i.dims) == 4) == 256
        return
    # PP-LCNet's 19 groups: all but the input's and the classes' (softmax), which stay frozen. Silero VAD's 9: all
    # but its fixed STFT conv's (no producer) and the LSTM's hidden units (its state is an input and an output).
    least = {"orientation_lcnet": 17, "silero_vad_v6": 7}
    assert len(deps.prunable()) >= least.get(model_id, 20)
    plan = exact_plan(deps, 0.5)
    assert plan.removed
    assert oracle_error(graph, deps, plan, feeds, compare_logits=True) <= 1e-4
