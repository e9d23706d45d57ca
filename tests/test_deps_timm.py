"""Architectures from timm's model zoo (random weights, the timm wheel imported from its zip with no dependency
installed), through both importers: every op understood, the consumer-zeroing oracle on the exact groups, every
prunable group rewritable, and the two paths agree on the groups. The list holds the models that found bugs or
exercise a rule nothing else does; each entry says which."""

from __future__ import annotations

import pytest
import torch

from prune_compile.ir.fx_importer import import_torch_module
from prune_compile.passes.deps import analyze
from prune_compile.passes.plan import uniform_plan
from prune_compile.passes.rewrite import pruned_copy

from .oracle import exact_plan, oracle_error, torch_onnx_graph
from .third_party import fetch_wheel
from .zoo import randomize

TIMM = "timm==1.0.31"
# (model, big?, a reason string that some group must carry: frozen or inexact)
MODELS = [
    ("test_efficientnet_gn", False, ""),  # GroupNorm(C/8 groups) after depthwise convs: whole groups prune
    ("test_nfnet", False, ""),  # scaled weight standardization: the conv weights are computed from parameters
    ("test_efficientnet_evos", False, ""),  # EvoNorm: variance over groups (torch's var had no lowering)
    ("test_byobnet", False, ""),
    ("test_convnext", False, ""),
    ("test_maxvit", False, ""),
    ("test_vit_relpos", False, ""),
    ("mobilevitv2_050", True, "instance_norm statistics over this axis"),  # GroupNorm(1, C): was exact, broke
    ("poolformer_s12", True, "instance_norm statistics over this axis"),  # the oracle by 0.31 and 1.2e-4
    ("convnextv2_atto", True, "reduce_mean over this axis"),  # addcmul (global response norm)
    ("crossvit_tiny_240", True, ""),  # stack, bicubic resize
    ("gcvit_xxtiny", True, ""),  # repeat_interleave; folded position-bias tables over 1 MiB
    ("lambda_resnet26t", True, "matmul sums these channels' products of activations"),  # was exact, 0.17 off
    ("resmlp_12_224", True, "conv has no channel rule for axis 3"),  # token MLPs reach the stem conv's width
]
CASES = [pytest.param(n, r, marks=[pytest.mark.big] if big else [], id=n) for n, big, r in MODELS]


@pytest.fixture(scope="module")
def timm(model_cache_dir: str):
    import sys

    sys.path.insert(0, fetch_wheel(model_cache_dir, TIMM))
    import timm

    return timm


@pytest.mark.parametrize("name,reason", CASES)
def test_timm_architecture_on_both_paths(timm, name: str, reason: str) -> None:
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False))
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    signatures = []
    for graph in (import_torch_module(model, (x,)), torch_onnx_graph(model, x)):
        assert not [n.name for n in graph.nodes if n.op == "opaque"]
        deps = analyze(graph)
        assert deps.prunable()
        feeds = {graph.inputs[0].name: x.numpy()}
        assert oracle_error(graph, deps, exact_plan(deps, 0.5), feeds) <= 1e-4
        pruned_copy(graph, uniform_plan(deps, 0.5), deps)  # inexact groups too: shapes stay consistent
        if reason:
            assert any(reason in g.reason or reason in g.inexact_reason for g in deps.groups)
        signatures.append(sorted((g.size, g.prunable, g.exact) for g in deps.groups))
    assert signatures[0] == signatures[1]
