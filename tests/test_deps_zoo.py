"""Dependency analysis + rewrite on the zoo, proven by the consumer-zeroing oracle (design §5.1) and by
path agreement (§5.2): torch.export and torch.onnx → ONNX give the same groups and the same pruned outputs."""

from __future__ import annotations

import json

import pytest

from prune_compile.backends import ort
from prune_compile.ir import export_onnx
from prune_compile.ir.fx_importer import import_torch_module
from prune_compile.passes.deps import analyze
from prune_compile.passes.plan import Plan, param_name, plan_from_json, plan_to_json, uniform_plan
from prune_compile.passes.rewrite import pruned_copy

from .oracle import exact_plan, group_oracle, oracle_error, sample, torch_onnx_graph
from .zoo import TORCHVISION, example_input, torchvision_model

RTOL = 1e-4
CASES = [pytest.param(n, s, marks=[pytest.mark.big] if big else [], id=n) for n, s, big in TORCHVISION]
# Where the best existing library crashes, hangs or silently skips: these must be pruned, not frozen.
MUST_PRUNE = {"shufflenet_v2_x1_0", "swin_t", "swin_v2_t", "maxvit_t", "vit_b_16"}


def _graphs(name: str, size: int, path: str):
    model = torchvision_model(name)
    x = example_input(size)
    graph = import_torch_module(model, (x,)) if path == "torch" else torch_onnx_graph(model, x)
    return graph, {graph.inputs[0].name: x.numpy()}


@pytest.mark.parametrize("path", ["torch", "onnx"])
@pytest.mark.parametrize("name,size", CASES)
def test_all_exact_groups_at_half(name: str, size: int, path: str) -> None:
    graph, feeds = _graphs(name, size, path)
    deps = analyze(graph)
    prunable = deps.prunable()
    assert prunable, "every zoo model has prunable groups"
    plan = exact_plan(deps, 0.5)
    assert oracle_error(graph, deps, plan, feeds) <= RTOL
    # Structure: pruning every prunable group (exact or not) at 0.5 removes a large share of the weights.
    pruned = pruned_copy(graph, uniform_plan(deps, 0.5), deps)
    before = sum(v.data.size for v in graph.constants())
    after = sum(v.data.size for v in pruned.constants())
    assert after < 0.75 * before
    if name in MUST_PRUNE:
        assert len(prunable) >= 10


# Transformers need their training resolution, and AlexNet/VGG's adaptive pools would upsample a small input (not
# expressible as a plain pool); other convnets give the same groups on a small input, 10x cheaper.
_FIXED_SIZE = {"vit_b_16", "swin_t", "swin_v2_t", "maxvit_t", "alexnet", "vgg11_bn"}


@pytest.mark.parametrize("name,size", CASES)
def test_each_exact_group_alone(name: str, size: int, request) -> None:
    small = size if name in _FIXED_SIZE else (96 if name == "inception_v3" else 64)
    graph, feeds = _graphs(name, small, "torch")
    deps = analyze(graph)
    groups = [g for g in deps.prunable() if g.exact]
    full = exact_plan(deps, 0.5)
    # CI (--run-big) checks up to 32 groups per model, spread over the network (every group of most models; the
    # transformers have up to 91, at 1-3 s each), the default run four. test_all_exact_groups_at_half covers all.
    picked = sample(groups, 32 if request.config.getoption("--run-big") else 4)
    plans = [Plan({k: v for k, v in full.removed.items() if k == g.id}) for g in picked]
    for g, err in zip(picked, group_oracle(graph, deps, feeds, plans), strict=True):
        assert err <= RTOL, f"group {g.id} ({[param_name(m) for m in g.producers()][:2]}): {err:.2e}"


@pytest.mark.parametrize("name,size", CASES)
def test_torch_and_onnx_paths_agree(name: str, size: int) -> None:
    g_torch, feeds = _graphs(name, size, "torch")
    g_onnx, _ = _graphs(name, size, "onnx")
    d_torch, d_onnx = analyze(g_torch), analyze(g_onnx)

    def partition(deps):  # folded weight subgraphs have importer-specific names: compare named parameters
        return sorted(sorted((param_name(m), m.axis, m.role) for m in g.params if m.value.provenance.kind != "folded")
                      for g in deps.groups)

    assert partition(d_torch) == partition(d_onnx)
    # The same plan (through plan.json) prunes both to the same function.
    plan = uniform_plan(d_torch, 0.5)
    doc = json.loads(json.dumps(plan_to_json(d_torch, plan)))
    replayed = plan_from_json(d_onnx, doc)
    assert plan_to_json(d_onnx, replayed)["groups"] and sum(map(len, replayed.removed.values())) == sum(
        map(len, plan.removed.values()))
    out_torch = ort.run(export_onnx(pruned_copy(g_torch, plan, d_torch)), feeds)
    out_onnx = ort.run(export_onnx(pruned_copy(g_onnx, replayed, d_onnx)), feeds)
    assert ort.relative_error(out_torch, out_onnx) <= RTOL


@pytest.mark.big
def test_vit_heads_and_hidden_dim_are_pruned() -> None:
    graph, feeds = _graphs("vit_b_16", 224, "torch")
    for unit, attn_size in (("head_dim", 64), ("heads", 12)):
        deps = analyze(graph, attention=unit)
        attention = [g for g in deps.prunable() if any("in_proj" in param_name(m) for m in g.producers())]
        assert len(attention) == 12 and {g.size for g in attention} == {attn_size}
        hidden = [g for g in deps.prunable() if any(param_name(m) == "conv_proj.weight" for m in g.params)]
        assert len(hidden) == 1 and hidden[0].size == 768 and not hidden[0].exact  # through every LayerNorm
        assert oracle_error(graph, deps, exact_plan(deps, 0.5), feeds) <= RTOL
