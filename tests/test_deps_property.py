"""Property tests: on random architectures the consumer-zeroing oracle holds for every exact group, an empty
plan changes nothing, and the op the rules do not know freezes exactly what touches it."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prune_compile.backends import ort
from prune_compile.ir import export_onnx
from prune_compile.passes.deps import analyze
from prune_compile.passes.plan import Plan
from prune_compile.passes.rewrite import pruned_copy

from .oracle import exact_plan, oracle_error
from .random_arch import architectures

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feeds(graph) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {v.name: rng.standard_normal(v.shape).astype(np.float32) for v in graph.inputs}


@SETTINGS
@given(graph=architectures(), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_oracle_holds_on_random_architectures(graph, ratio) -> None:
    deps = analyze(graph)
    for g in deps.groups:
        touches_opaque = any(n.opaque for m in g.members for n in [m.value.producer, *m.value.users] if n)
        if touches_opaque:
            assert not g.prunable and "Softsign" in g.reason
    plan = exact_plan(deps, ratio)
    assert oracle_error(graph, deps, plan, _feeds(graph)) <= 1e-4


@settings(max_examples=40, deadline=None)
@given(graph=architectures())
def test_empty_plan_is_bit_identical(graph) -> None:
    feeds = _feeds(graph)
    before = ort.run(export_onnx(graph), feeds)
    after = ort.run(export_onnx(pruned_copy(graph, Plan())), feeds)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
