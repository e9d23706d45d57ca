"""Architectures from timm's model zoo (random weights, the timm wheel imported from its zip with no dependency
installed), through both importers: every op understood, the consumer-zeroing oracle on the exact groups, every
prunable group rewritable, the two paths agree on the groups, and torch surgery on the module gives what the pruned
graph computes (or refuses, naming why). The list holds the models that found bugs or exercise a rule nothing else
does; each entry says which."""

from __future__ import annotations

import copy

import pytest
import torch

from prune_compile.backends.torch_module import apply_plan_to_module
from prune_compile.errors import UnsupportedModelError
from prune_compile.ir.fx_importer import import_torch_module
from prune_compile.passes.deps import analyze
from prune_compile.passes.plan import plan_to_json, uniform_plan
from prune_compile.passes.rewrite import pruned_copy
from prune_compile.pruner import DRIFT_TOLERANCE, module_drift

from .oracle import exact_plan, oracle_error, torch_onnx_graph
from .third_party import fetch_wheel
from .zoo import randomize

TIMM = "timm==1.0.31"
# (model, big?, a reason string that some group must carry: frozen or inexact, what torch surgery gives: "" the
# pruned module equals the pruned ONNX, "drift" it differs (model code computes from a pruned width), or the error)
MODELS = [
    ("test_efficientnet_gn", False, "", ""),  # GroupNorm(C/8 groups) after depthwise convs: whole groups prune
    # scaled weight standardization of gain and weight (reshaped to (1, out, -1) and back): mapped back to both, and
    # recomputed over the kept inputs
    ("test_nfnet", False, "", "drift"),
    ("test_efficientnet_evos", False, "", ""),  # EvoNorm: variance over groups; surgery updates its `groups`
    ("test_byobnet", False, "", ""),
    ("test_convnext", False, "", ""),  # layer scale gamma.reshape(1, -1, 1, 1): folded, mapped back to gamma
    ("test_maxvit", False, "", ""),  # dim_head and head-first qkv rows; fused attention's scale kept
    ("test_vit_relpos", False, "", ""),
    ("test_vit", False, "", ""),  # timm's attention reshapes to `attn_dim`
    ("convnext_atto_rms", False, "reduce_mean over this axis", ""),  # RMSNorm: its mean over the channels
    ("convnext_zepto_rms", False, "reduce_mean over this axis", "drift"),  # SimpleNorm's unbiased variance
    ("mobilevitv2_050", True, "instance_norm statistics over this axis", ""),  # GroupNorm(1, C): was exact, broke
    ("poolformer_s12", True, "instance_norm statistics over this axis", ""),  # the oracle by 0.31 and 1.2e-4
    ("convnextv2_atto", True, "reduce_mean over this axis", ""),  # addcmul, global response norm
    ("crossvit_tiny_240", True, "", ""),  # stack, bicubic resize
    ("gcvit_xxtiny", True, "", ""),  # repeat_interleave; folded position-bias tables over 1 MiB; k, v-only qkv
    # the oracle was exact, 0.17 off; surgery: the model code reshapes its output to (B, C, H, W), C the input's width
    ("lambda_resnet26t", True, "matmul sums these channels' products of activations",
     r"in 'stages.2.1.self_attn' \(LambdaLayer\): shape '\[1, 128, 16, 16\]' is invalid"),
    ("resmlp_12_224", True, "conv has no channel rule for axis 3", ""),  # token MLPs reach the stem conv's width
    # torch surgery on blocks that keep widths in attributes, found by a 119-architecture surgery sweep
    ("levit_128s", True, "", ""),  # key_dim / val_dim split each head's qkv rows
    ("pvt_v2_b0", True, "", ""),  # separate q and kv projections
    ("hiera_tiny_224", True, "", ""),  # dim_out
    ("focalnet_tiny_srf", True, "", ""),  # a list attribute: input_split [dim, dim, levels + 1]
    ("res2net50_14w_8s", True, "", ""),  # `width` of the convs in a ModuleList below the block
    ("rexnet_100", True, "", ""),  # in_channels of a partial residual
    ("mixnet_s", True, "", ""),  # split sizes of mixed convs
    ("dpn68", True, "", ""),  # residual and dense paths parted by slicing at `num_1x1_c`: the plan's slice bounds
    ("resnetv2_50x1_bit", True, "", "drift"),  # weight standardization: folded by arithmetic, recomputed
    ("coat_lite_mini", True, "",  # a shared position-encoding module; then attention assumes qkv width == input's
     r"in 'serial_blocks1.0.factoratt_crpe' \(FactorAttnConvRelPosEnc\): shape"),
    ("test_mambaout", False, "", ""),  # split_indices (hidden, hidden - conv, conv) over fc1's rows: read per segment
    ("beit_base_patch16_224", False, "", ""),  # qkv bias = cat(q_bias, k_bias buffer, v_bias), folded: mapped back
    ("xcit_nano_12_p16_224", True, "", ""),  # Fourier encoding through a 1x1 conv, folded; XCA derives head_dim
    ("fasternet_t0", True, "", ""),  # split sizes in two integer attributes (dim_conv3, dim_untouched)
    ("efficientvit_m0", True, "", ""),  # split sizes [key_dim, key_dim, d] per head, cascaded
    ("inception_next_tiny", True, "", ""),  # split_indexes (in - 3 gc, gc, gc, gc): the width map alone gets it wrong
]
SMALLER = {"beit_base_patch16_224": {"depth": 2, "embed_dim": 192, "num_heads": 3}}  # the architecture, fewer blocks
CASES = [pytest.param(n, r, s, marks=[pytest.mark.big] if big else [], id=n) for n, big, r, s in MODELS]


@pytest.fixture(scope="module")
def timm(model_cache_dir: str):
    import sys

    sys.path.insert(0, fetch_wheel(model_cache_dir, TIMM))
    import timm

    return timm


@pytest.mark.parametrize("name,reason,surgery", CASES)
def test_timm_architecture_on_both_paths(timm, name: str, reason: str, surgery: str) -> None:
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False, **SMALLER.get(name, {})))
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    signatures, pruned = [], []
    for graph in (import_torch_module(model, (x,)), torch_onnx_graph(model, x)):
        assert not [n.name for n in graph.nodes if n.op == "opaque"]
        deps = analyze(graph)
        assert deps.prunable()
        feeds = {graph.inputs[0].name: x.numpy()}
        assert oracle_error(graph, deps, exact_plan(deps, 0.5), feeds) <= 1e-4
        plan = uniform_plan(deps, 0.5)
        pruned.append((pruned_copy(graph, plan, deps), plan_to_json(deps, plan)))  # inexact groups too
        if reason:
            assert any(reason in g.reason or reason in g.inexact_reason for g in deps.groups)
        signatures.append(sorted((g.size, g.prunable, g.exact) for g in deps.groups))
    assert signatures[0] == signatures[1]
    # Torch surgery with the torch path's plan: the module the user fine-tunes computes what the pruned ONNX does.
    graph, doc = pruned[0]
    module = copy.deepcopy(model)
    if surgery not in ("", "drift"):
        with pytest.raises(UnsupportedModelError, match=surgery):
            apply_plan_to_module(module, doc, [x])
        return
    apply_plan_to_module(module, doc, [x])
    drift = module_drift(module, graph, [x])
    assert (drift > DRIFT_TOLERANCE) if surgery == "drift" else (drift <= 1e-4)
