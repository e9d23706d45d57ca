"""Torch surgery agrees with the IR rewrite: the same plan gives a pruned nn.Module, a pruned ONNX model and a
consumer-zeroed original with equal outputs (rtol 1e-4), on the torchvision list; the pruned module trains."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from prune_compile.backends import ort
from prune_compile.backends.torch_module import apply_plan_to_module
from prune_compile.errors import UnsupportedModelError
from prune_compile.ir import export_onnx
from prune_compile.ir.fx_importer import import_torch_module
from prune_compile.passes.deps import analyze
from prune_compile.passes.oracle import zeroed_graph
from prune_compile.passes.plan import param_name, plan_to_json, uniform_plan
from prune_compile.passes.rewrite import pruned_copy
from prune_compile.pruner import module_drift

from .test_deps_zoo import _FIXED_SIZE
from .zoo import TORCHVISION, example_input, torchvision_model

RTOL = 1e-4
CASES = [pytest.param(n, s, marks=[pytest.mark.big] if big else [], id=n) for n, s, big in TORCHVISION]
# Plans the IR applies but Python model code cannot express: surgery must refuse with a clear error.
# shufflenet: chunk(2) on a concat needs equal halves, the plan keeps unequal ones (the IR uses split sizes).
# swin_v2_t: its per-head position bias is an MLP over coordinates, folded into one constant from five tensors.
REFUSED = {"shufflenet_v2_x1_0": "does not run", "swin_v2_t": "cannot map it back"}


def _pruned_at_half(model, x, graph=None, deps=None):
    """The uniform 0.5 plan of the torch path applied to a copy of `model`: the pruned module, and how far it is from
    the pruned graph (module_drift)."""
    graph = graph if graph is not None else import_torch_module(model, (x,))
    deps = deps if deps is not None else analyze(graph)
    plan = uniform_plan(deps, 0.5)
    pruned = apply_plan_to_module(copy.deepcopy(model), plan_to_json(deps, plan), [x])
    return pruned, module_drift(pruned, pruned_copy(graph, plan, deps), [x])


@pytest.mark.parametrize("name,size", CASES)
def test_pruned_module_equals_pruned_onnx_and_zeroed_original(name: str, size: int) -> None:
    size = size if name in _FIXED_SIZE else (96 if name == "inception_v3" else 64)
    model = torchvision_model(name)
    x = example_input(size)
    graph = import_torch_module(model, (x,))
    deps = analyze(graph)
    plan = uniform_plan(deps, 0.5)
    doc = plan_to_json(deps, plan)
    if name in REFUSED:
        with pytest.raises(UnsupportedModelError, match=REFUSED[name]):
            apply_plan_to_module(copy.deepcopy(model), doc, [x])
        return
    pruned_module = apply_plan_to_module(copy.deepcopy(model), doc, [x])
    assert sum(p.numel() for p in pruned_module.parameters()) < 0.75 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        got = pruned_module(x).numpy()
    feeds = {graph.inputs[0].name: x.numpy()}
    pruned_onnx = ort.run(export_onnx(pruned_copy(graph, plan, deps)), feeds)
    assert ort.relative_error(pruned_onnx, [got]) <= RTOL
    # The zeroing oracle holds when every pruned group is exact. Where LayerNorm couples the residual stream
    # (transformers) the pruned model legitimately differs from the zeroed one, and pruning only the exact groups
    # (attention internals without the residual width) is not expressible in their Python code.
    if all(g.exact for g in deps.groups if len(plan.removed_of(g))):
        zeroed = ort.run(export_onnx(zeroed_graph(graph, deps, plan)), feeds)
        assert ort.relative_error(zeroed, [got]) <= RTOL
    else:
        assert name in {"vit_b_16", "swin_t", "swin_v2_t", "maxvit_t", "convnext_tiny"}, "unexpected inexact groups"

    # It trains: one optimizer step, no shape errors, the loss changes.
    pruned_module.train()
    batch = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, got.shape[-1], (2,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(pruned_module.parameters(), lr=0.05)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(pruned_module(batch), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and losses[0] != losses[1]


def test_plan_for_another_model_is_rejected() -> None:
    a, b = torchvision_model("resnet18"), torchvision_model("mobilenet_v2")
    x = example_input(64)
    graph = import_torch_module(a, (x,))
    deps = analyze(graph)
    with pytest.raises(UnsupportedModelError, match="different model"):
        apply_plan_to_module(b, plan_to_json(deps, uniform_plan(deps, 0.5)), [x])


def test_attention_with_unequal_widths_fails_naming_the_module() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0] + x

    block = Block().eval()
    x = torch.randn(1, 5, 16)
    graph = import_torch_module(block, (x,))
    deps = analyze(graph)
    plan = uniform_plan(deps, 0.5)
    # Prune only the attention's inner width, not the residual stream: MHA cannot represent that.
    inner = [g for g in deps.prunable()
             if all(param_name(m).startswith(("attn.in_proj", "attn.out_proj.weight")) for m in g.params)]
    assert inner, "the attention's inner width is a group of its own"
    only_inner = type(plan)({g.id: plan.removed[g.id] for g in inner if g.id in plan.removed})
    with pytest.raises(UnsupportedModelError, match="attn"):
        apply_plan_to_module(block, plan_to_json(deps, only_inner), [x])


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_group_norm_keeps_its_group_width(groups: int) -> None:
    from .test_deps import _group_normed

    model, x = _group_normed(groups), torch.randn(1, 3, 6, 6)
    pruned, drift = _pruned_at_half(model, x)
    norm = pruned[1]
    assert norm.num_channels == 4 and norm.num_groups == {1: 1, 2: 1, 8: 4}[groups]
    assert drift <= RTOL


def test_group_norm_without_affine_on_a_pruned_width_fails_naming_the_module() -> None:
    # Nothing in the plan names its groups; one group takes any width, several cannot be guessed.
    for groups, error in ((1, None), (2, r"'1': GroupNorm\(affine=False\) built for 8 channels receives 4")):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(groups, 8, affine=False),
                                    torch.nn.Conv2d(8, 4, 1)).eval()
        x = torch.randn(1, 3, 6, 6)
        deps = analyze(import_torch_module(model, (x,)))
        doc = plan_to_json(deps, uniform_plan(deps, 0.5))
        if error is None:
            assert apply_plan_to_module(model, doc, [x])[1].num_channels == 4
        else:
            with pytest.raises(UnsupportedModelError, match=error):
                apply_plan_to_module(model, doc, [x])


class _PreNormBlock(torch.nn.Module):
    """An LLM-style residual stream: embed, then x + mlp(norm(x)), then a normed head."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        make = {"rms": lambda: torch.nn.RMSNorm(16),
                "rms_plain": lambda: torch.nn.RMSNorm(16, elementwise_affine=False),
                "layer_plain": lambda: torch.nn.LayerNorm(16, elementwise_affine=False)}[norm]
        self.embed, self.norm, self.final = torch.nn.Linear(6, 16), make(), make()
        self.up, self.down, self.head = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 3)
        if norm == "rms":
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.final.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.down(torch.nn.functional.silu(self.up(self.norm(h))))
        return self.head(self.final(h))


@pytest.mark.parametrize("norm", ["rms", "rms_plain", "layer_plain"])
def test_a_pre_norm_residual_stream_prunes_and_its_norms_follow(norm: str) -> None:
    # The residual stream's mean over the channels made RMSNorm freeze it; now it prunes (inexact, like LayerNorm's
    # statistics). Surgery sets each norm's normalized_shape: from its weight, or without one (nothing in the plan
    # names it) from the width it receives.
    torch.manual_seed(0)
    model, x = _PreNormBlock(norm).eval(), torch.randn(2, 5, 6)
    graph = import_torch_module(model, (x,))
    deps = analyze(graph)
    stream = next(g for g in deps.groups if any(param_name(m) == "embed.weight" for m in g.producers()))
    assert stream.prunable and not stream.exact and stream.size == 16
    pruned, drift = _pruned_at_half(model, x, graph, deps)
    assert pruned.norm.normalized_shape == pruned.final.normalized_shape == (8,)
    assert drift <= RTOL


class _HardCodedPool(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], 8, 16).mean(-1)  # model code that hard-codes the width


def test_model_code_that_hard_codes_a_width_is_named() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), _HardCodedPool(), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(1, 3, 6, 6)
    deps = analyze(import_torch_module(model, (x,)))
    error = r"does not run: in '1' \(_HardCodedPool\): shape '\[1, 8, 16\]' is invalid"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=error):
        apply_plan_to_module(model, plan_to_json(deps, uniform_plan(deps, 0.5)), [x])
    # the refused plan left the module as it was: tensors, attributes, and it still runs
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())
    assert (model[0].out_channels, model[2].in_features) == (8, 8) and model(x).shape == (1, 2)


class _GroupStdNorm(torch.nn.Module):
    """EvoNorm-S's group statistics with the group count kept as an attribute."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = torch.nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        grouped = x.reshape(b, self.groups, c // self.groups, h, w)
        std = grouped.var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(1e-5).sqrt()
        return (grouped / std).reshape(b, c, h, w) * self.weight.view(1, -1, 1, 1)


@pytest.mark.parametrize("groups", [2, 8])
def test_a_group_count_attribute_follows_how_the_groups_were_pruned(groups: int) -> None:
    # [16] -> [groups, 16 / groups] carries the channels on its larger axis: 2 groups of 8 keep their count and
    # lose the same offsets in each (inexact: the statistics change); 8 groups of 2 go whole (exact).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), _GroupStdNorm(16, groups), torch.nn.Conv2d(16, 4, 1))
    x = torch.randn(1, 3, 6, 6)
    graph = import_torch_module(model.eval(), (x,))
    deps = analyze(graph)
    (conv,) = [g for g in deps.groups if any(param_name(m) == "0.weight" for m in g.producers())]
    assert conv.exact == (groups == 8)
    pruned, drift = _pruned_at_half(model, x, graph, deps)
    assert pruned[1].groups == {2: 2, 8: 4}[groups]
    assert drift <= RTOL


class _Tied(torch.nn.Module):
    """Two convs sharing one weight (tied weights; CoaT shares a whole position-encoding module)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.a, self.b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 8, 1)
        self.b.weight = self.a.weight
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(self.stem(x)))))


def test_a_shared_weight_is_sliced_once_and_stays_shared() -> None:
    model, x = _Tied().eval(), torch.randn(1, 3, 6, 6)
    pruned, drift = _pruned_at_half(model, x)
    assert pruned.a.weight is pruned.b.weight and pruned.a.weight.shape == (4, 4, 1, 1)
    assert drift <= RTOL


class _StdConv(torch.nn.Conv2d):
    """Weight standardization (BiT's StdConv2d): the conv's weight is computed from its parameter in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                           training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return torch.nn.functional.conv2d(x, w, self.bias)


class _LayerScale(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.reshape(1, -1, 1, 1)  # ConvNeXt's: folded at import, mapped back to gamma


@pytest.mark.parametrize("computed", [False, True])
def test_a_parameter_folded_through_arithmetic_is_flagged(computed: bool) -> None:
    # Standardizing over a conv's kept inputs is not the graph's standardized weight with columns removed: the plan
    # marks such folds `computed`, surgery warns, and the module measurably differs. A reshape folds exactly.
    import warnings

    torch.manual_seed(0)
    last = _StdConv(8, 4, 1) if computed else torch.nn.Conv2d(8, 4, 1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), _LayerScale(8), torch.nn.ReLU(), last).eval()
    x = torch.randn(1, 3, 6, 6)
    graph = import_torch_module(model, (x,))
    deps = analyze(graph)
    plan = uniform_plan(deps, 0.5)
    doc = plan_to_json(deps, plan)
    flagged = sorted({m["param"] for g in doc["groups"] for m in g["members"] if m.get("computed")})
    assert flagged == (["folded(3.weight)"] if computed else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = apply_plan_to_module(copy.deepcopy(model), doc, [x])
    assert any("folded(3.weight) reach the graph through arithmetic" in str(w.message) for w in caught) == computed
    assert pruned[1].gamma.shape == (4,)
    drift = module_drift(pruned, pruned_copy(graph, plan, deps), [x])
    assert (drift > 1e-2) if computed else (drift <= RTOL)


class _KeyValueAttention(torch.nn.Module):
    """LeViT's attention: each head's qkv rows are [q (key_dim), k (key_dim), v (val_dim)], split by attributes;
    then a split kept as a list attribute (FocalNet's input_split) feeds the projection."""

    def __init__(self, dim: int = 8, heads: int = 2, key_dim: int = 4, val_dim: int = 6) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = heads, key_dim, val_dim
        self.val_attn_dim, self.scale = heads * val_dim, key_dim ** -0.5
        self.qkv = torch.nn.Linear(dim, heads * (2 * key_dim + val_dim))
        self.gate = torch.nn.Linear(dim, 2 * dim + 1)
        self.input_split = [dim, dim, 1]
        self.proj = torch.nn.Linear(self.val_attn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], 3)
        attn = (q.transpose(1, 2) * self.scale) @ k.permute(0, 2, 3, 1)
        out = (attn.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(b, n, self.val_attn_dim)
        a, c, g = self.gate(x).split(self.input_split, -1)
        return self.proj(out) * a + c * g


def test_widths_kept_in_key_value_dims_and_in_a_list_follow_the_plan() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), _KeyValueAttention(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(1, 7, 5)
    pruned, drift = _pruned_at_half(model, x)
    attn = pruned[1]
    assert (attn.key_dim, attn.val_dim, attn.val_attn_dim) == (2, 3, 6) and attn.input_split == [4, 4, 1]
    assert drift <= RTOL


class _FoldedFromSeveral(torch.nn.Module):
    """Weights the model computes in forward from several tensors, folded at import: BEiT/EVA's qkv bias
    torch.cat((q_bias, k_bias, v_bias)) (k_bias a buffer), NFNet-style gain * weight, and a square weight used
    transposed (no shape tells its axes apart). The 12 channels removed at 0.5 sit at different offsets in each
    concatenated part: a, b and c each lose two."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(5, 12, bias=False)
        self.a, self.c = torch.nn.Parameter(torch.rand(4)), torch.nn.Parameter(torch.rand(4))
        self.register_buffer("b", torch.rand(4))
        self.gain = torch.nn.Parameter(torch.rand(12) + 0.5)
        self.mid = torch.nn.Parameter(torch.randn(12, 12, 1))
        self.square = torch.nn.Parameter(torch.randn(12, 12))
        self.out = torch.nn.Linear(12, 3)
        with torch.no_grad():  # the channels the plan removes: small wherever they are read
            removed = [1, 3, 5, 6, 9, 10]
            self.fc.weight[removed] *= 1e-3
            self.mid[:, removed] *= 1e-3
            for k, part in enumerate((self.a, self.b, self.c)):
                part[[i % 4 for i in removed if i // 4 == k]] *= 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.nn.functional.linear(x, self.fc.weight, torch.cat((self.a, self.b, self.c))))
        h = torch.relu(torch.nn.functional.conv1d(h.transpose(1, 2), self.gain.view(-1, 1, 1) * self.mid))
        return self.out(torch.nn.functional.linear(h.transpose(1, 2), self.square.t()))


def test_constants_folded_from_several_parameters_map_back_to_each() -> None:
    # Before the importer recorded where each folded element comes from, surgery refused all three folds.
    torch.manual_seed(0)
    model, x = _FoldedFromSeveral().eval(), torch.randn(1, 7, 5)
    pruned, drift = _pruned_at_half(model, x)
    assert [tuple(t.shape) for t in (pruned.a, pruned.b, pruned.c)] == [(2,), (2,), (2,)]
    assert "b" in dict(pruned.named_buffers()) and pruned.gain.shape == (6,) and pruned.square.shape == (6, 6)
    assert drift <= RTOL


class _RepeatedInConcat(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(5, 8, bias=False)
        self.a = torch.nn.Parameter(torch.rand(4))
        self.out = torch.nn.Linear(8, 3)
        with torch.no_grad():
            self.fc.weight[[0, 1, 2, 7]] *= 1e-3  # a's copies lose different entries: {0, 1, 2} and {3}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(torch.nn.functional.linear(x, self.fc.weight, torch.cat((self.a, self.a)))))


def test_a_parameter_concatenated_twice_and_pruned_differently_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match=r"repeats 'a' axis 0 with different channels removed"):
        _pruned_at_half(_RepeatedInConcat().eval(), torch.randn(1, 7, 5))


class _RotaryAttention(torch.nn.Module):
    """EVA-02's attention: rotary position embeddings pair channels inside each head (interleaved), so the analysis
    prunes whole heads even in head_dim mode; the module's head count must follow, not its head_dim."""

    def __init__(self, dim: int = 8, heads: int = 2, tokens: int = 7) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.fused_attn = heads, 4, True
        self.qkv = torch.nn.Linear(dim, 3 * heads * 4)
        self.proj = torch.nn.Linear(heads * 4, dim)
        self.register_buffer("sin", torch.randn(tokens, 4))
        self.register_buffer("cos", torch.randn(tokens, 4))

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.cos + torch.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape) * self.sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(self._rotate(q), self._rotate(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


def test_heads_pruned_whole_by_the_analysis_shrink_the_head_count() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), _RotaryAttention(), torch.nn.Linear(8, 3)).eval()
    pruned, drift = _pruned_at_half(model, torch.randn(1, 7, 5))
    assert (pruned[1].num_heads, pruned[1].head_dim) == (1, 4)
    assert drift <= RTOL


class _PlainTensorAttribute(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.w = torch.nn.Linear(5, 8), torch.nn.Parameter(torch.randn(3, 8))
        self.c = torch.rand(8)  # neither parameter nor buffer: torch.export lifts it as a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.relu(self.fc(x)), self.w * self.c)


def test_a_fold_from_a_tensor_the_module_does_not_hold_is_named() -> None:
    with pytest.raises(UnsupportedModelError, match=r"'folded\(c\+w\)', which is partly 'c': not a parameter"):
        _pruned_at_half(_PlainTensorAttribute().eval(), torch.randn(1, 7, 5))


class _PooledPair(torch.nn.Module):
    """A tuple attribute that sums to a pruned width but is not a split of it: a pooling kernel (3, 3) beside a
    6-channel conv. Surgery must leave it alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.kernel = torch.nn.Conv2d(3, 6, 1), (3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(torch.relu(self.conv(x)), self.kernel)


def test_a_tuple_that_only_sums_to_a_pruned_width_is_left_alone() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(_PooledPair(), torch.nn.Conv2d(6, 2, 1)).eval()
    pruned, drift = _pruned_at_half(model, torch.randn(1, 3, 9, 9))
    assert pruned[0].kernel == (3, 3) and pruned[0].conv.out_channels == 3
    assert drift <= RTOL


class _ProjectedEncoding(torch.nn.Module):
    """XCiT's Fourier position encoding: a constant made from arange only, projected by a 1x1 conv and repeated
    over the batch; folded at import into one constant whose channels are the conv's output channels."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.token_projection = torch.nn.Conv2d(4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        grid = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w) / (h * w)
        pos = torch.cat([torch.sin(grid), torch.cos(grid), torch.sin(2 * grid), torch.cos(2 * grid)], 1)
        return x + self.token_projection(pos).repeat(b, 1, 1, 1)


class _Interleaved(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = torch.nn.Linear(5, 8, bias=False), torch.nn.Linear(8, 3)
        self.a, self.b = torch.nn.Parameter(torch.rand(4)), torch.nn.Parameter(torch.rand(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # bias [a0, b0, a1, b1, ...]: a stack is not tracked
        return self.out(torch.relu(torch.nn.functional.linear(x, self.fc.weight,
                                                              torch.stack((self.a, self.b), 1).reshape(-1))))


def test_a_projected_constant_maps_to_the_projection_and_a_stack_is_not_guessed() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), _ProjectedEncoding(), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 2, 1)).eval()
    pruned, drift = _pruned_at_half(model, torch.randn(1, 3, 5, 5))
    assert pruned[1].token_projection.out_channels == 4 and drift <= RTOL
    # Each element of a stack is some source's, but no map was recorded for it: refused, not sliced as nothing.
    with pytest.raises(UnsupportedModelError, match=r"'folded\(a\+b\)', a constant folded from \['a', 'b'\]"):
        _pruned_at_half(_Interleaved().eval(), torch.randn(1, 7, 5))


class _ScaledStdConv(torch.nn.Conv2d):
    """NFNet's ScaledStdConv2d: batch_norm standardizes weight.reshape(1, out, -1) with (gain * scale) as its
    weight, then reshape_as(weight): the fold flattens the weight's input axes and splits them back."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 1)
        self.gain = torch.nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                           weight=(self.gain * 0.5).view(-1), training=True, momentum=0.0, eps=1e-6)
        return torch.nn.functional.conv2d(x, w.reshape_as(self.weight), self.bias)


def test_weight_standardization_with_a_gain_slices_both_parameters() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), _ScaledStdConv(8, 6), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 2, 1)).eval()
    x = torch.randn(1, 3, 5, 5)
    deps = analyze(import_torch_module(model, (x,)))
    doc = plan_to_json(deps, uniform_plan(deps, 0.5))
    kept = {}
    for g in doc["groups"]:
        for m in g["members"]:
            if m["param"] in ("0.weight", "4.weight") and g["removed"]:
                kept[m["param"]] = sorted(set(range(g["channels"])) - set(g["removed"]))
    pruned = apply_plan_to_module(copy.deepcopy(model), doc, [x])
    out, cin = kept["4.weight"], kept["0.weight"]
    assert torch.equal(pruned[2].weight, model[2].weight[out][:, cin])
    assert torch.equal(pruned[2].gain, model[2].gain[out])


class _PartialConv(torch.nn.Module):
    """FasterNet's partial convolution: split sizes kept as two integer attributes of the module that splits."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dim_conv3, self.dim_untouched = dim // 4, dim - dim // 4
        self.partial_conv3 = torch.nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), x2), 1)


def test_split_sizes_kept_in_integer_attributes_follow_the_plan() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), _PartialConv(), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 6, 6)
    deps = analyze(import_torch_module(model, (x,)))
    (split,) = plan_to_json(deps, uniform_plan(deps, 0.5))["splits"]
    assert split["module"] == "2" and split["sizes"] == [2, 6] and sum(split["kept"]) < 8
    pruned, drift = _pruned_at_half(model, x)
    assert [pruned[2].dim_conv3, pruned[2].dim_untouched] == split["kept"] and drift <= RTOL


class _BottleneckAttention(torch.nn.Module):
    """BoTNet's attention: a 1x1 conv makes q, k, v, split by sizes kept in attributes, and the model code reshapes
    by widths per head (`dim_head_qk`, `dim_head_v`) that the plan's splits give only over the head count; a
    relative position table is as wide as one head's q."""

    def __init__(self, dim: int = 8, heads: int = 2, tokens: int = 9) -> None:
        super().__init__()
        self.num_heads, self.dim_head_qk, self.dim_head_v = heads, 4, dim // heads
        self.dim_out_qk, self.dim_out_v = heads * self.dim_head_qk, heads * self.dim_head_v
        self.scale = self.dim_head_qk ** -0.5
        self.qkv = torch.nn.Conv2d(dim, 2 * self.dim_out_qk + self.dim_out_v, 1)
        self.rel = torch.nn.Parameter(torch.randn(tokens, self.dim_head_qk))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = torch.split(self.qkv(x), [self.dim_out_qk, self.dim_out_qk, self.dim_out_v], dim=1)
        q = q.reshape(b * self.num_heads, self.dim_head_qk, -1).transpose(-1, -2)
        k = k.reshape(b * self.num_heads, self.dim_head_qk, -1)
        v = v.reshape(b * self.num_heads, self.dim_head_v, -1).transpose(-1, -2)
        attn = ((q @ k) * self.scale + q @ self.rel.t()).softmax(dim=-1)
        return (attn @ v).transpose(-1, -2).reshape(b, self.dim_out_v, h, w)


@pytest.mark.parametrize("attention", ["head_dim", "heads"])
def test_widths_per_head_follow_the_splits_over_the_head_count(attention: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), _BottleneckAttention(), torch.nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 3, 3)
    graph = import_torch_module(model, (x,))
    deps = analyze(graph, attention=attention)
    (split,) = plan_to_json(deps, uniform_plan(deps, 0.5))["splits"]
    assert split["sizes"] == [8, 8, 8] and split["kept"] == [4, 4, 4]
    pruned, drift = _pruned_at_half(model, x, graph, deps)
    attn = pruned[1]
    per_head = (2, 2) if attention == "head_dim" else (1, 4)  # (heads, width of q per head)
    assert (attn.num_heads, attn.dim_head_qk, attn.dim_out_qk) == (*per_head, 4) and drift <= RTOL


class _SelectiveKernel(torch.nn.Module):
    """SKNet's selective kernel: the input is split into equal parts by a size computed from `in_channels`, one conv
    path each, and an attention picks between the paths."""

    def __init__(self, channels: int = 8, out: int = 6, paths: int = 2) -> None:
        super().__init__()
        self.in_channels, self.num_paths = channels, paths  # no tensor of the module is `channels` wide
        self.paths = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(channels // paths, out, 3, padding=1 + i, dilation=1 + i),
                                torch.nn.BatchNorm2d(out), torch.nn.ReLU()) for i in range(paths))
        self.select = torch.nn.Conv2d(out, out * paths, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.in_channels // self.num_paths, 1)
        x = torch.stack([path(part) for path, part in zip(self.paths, parts, strict=True)], 1)
        b, _, c, h, w = x.shape
        attn = self.select(x.sum(1).mean((2, 3), keepdim=True)).view(b, self.num_paths, c, 1, 1).softmax(1)
        return (x * attn).sum(1)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_width_split_into_equal_parts_follows_the_plan(inplace: bool) -> None:
    """After an in-place ReLU, torch's functionalization replays the split at each of its uses, and the split nodes
    carry the scope of the convs that consume them, not of the module that split: surgery looks outward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(inplace=inplace), _SelectiveKernel(),
                                torch.nn.ReLU(), torch.nn.Conv2d(6, 2, 1)).eval()
    x = torch.randn(1, 3, 5, 5)
    graph = import_torch_module(model, (x,))
    assert {n.scope for n in graph.nodes if n.op == "split"} == ({"2.paths.0.0", "2.paths.1.0"} if inplace else {"2"})
    pruned, drift = _pruned_at_half(model, x, graph)
    assert pruned[2].in_channels == pruned[0].out_channels < 8 and drift <= RTOL


class _PixelEmbed(torch.nn.Module):
    """Model code that reshapes by a width it keeps as an attribute, with no split: TNT's pixel embedding (`in_dim`),
    EfficientFormer-V2's attention (`dh`)."""

    def __init__(self, attr: str, dim: int = 8) -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, dim)
        self.proj = torch.nn.Conv2d(3, dim, 1)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return self.norm(self.proj(x).reshape(b, getattr(self, self.attr), h * w).transpose(1, 2))


@pytest.mark.parametrize("attr", ["in_dim", "dh"])
def test_a_width_kept_for_a_reshape_follows_the_plan(attr: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(_PixelEmbed(attr), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(1, 3, 4, 4)
    deps = analyze(import_torch_module(model, (x,)))
    (reshape,) = plan_to_json(deps, uniform_plan(deps, 0.5))["reshapes"]
    assert reshape["module"] == "0" and reshape["shape"] == [1, 8, 16] and reshape["kept"][1] < 8
    pruned, drift = _pruned_at_half(model, x)
    assert getattr(pruned[0], attr) == reshape["kept"][1] and drift <= RTOL


class _Subsample(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, x.shape[2] * x.shape[3])  # no width attribute of its own


class _HoldsAnUnrelatedWidth(torch.nn.Module):
    """LeViT's attention downsampling: its `key_attn_dim` happens to equal the width its subsampling child reshapes."""

    def __init__(self) -> None:
        super().__init__()
        self.key_attn_dim = 8
        self.proj, self.down = torch.nn.Conv2d(3, 8, 1), _Subsample()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.proj(x)).mean(-1)


def test_a_reshape_updates_only_the_module_that_reshapes() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(_HoldsAnUnrelatedWidth(), torch.nn.Linear(8, 2)).eval()
    pruned, drift = _pruned_at_half(model, torch.randn(1, 3, 4, 4))
    assert pruned[0].proj.out_channels < 8 and pruned[0].key_attn_dim == 8 and drift <= RTOL


class _DualPath(torch.nn.Module):
    """DPN's dual path block: the first `num_1x1_c` channels are a residual path, the rest a dense path, parted by
    slicing at an attribute whose name says nothing of widths."""

    def __init__(self, num_1x1_c: int = 8, inc: int = 4, twin: bool = False) -> None:
        super().__init__()
        self.num_1x1_c, self.inc = num_1x1_c, inc
        if twin:
            self.num_1x1_a = num_1x1_c  # another attribute of the same value: which one the code slices at is unknown
        self.conv = torch.nn.Conv2d(num_1x1_c + inc, num_1x1_c + inc, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([x[:, :self.num_1x1_c] + y[:, :self.num_1x1_c], x[:, self.num_1x1_c:], y[:, self.num_1x1_c:]],
                         dim=1)


def test_a_slice_bound_kept_in_an_attribute_follows_the_plan() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 1), _DualPath(), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 2, 1)).eval()
    x = torch.randn(1, 3, 4, 4)
    deps = analyze(import_torch_module(model, (x,)))
    slices = plan_to_json(deps, uniform_plan(deps, 0.5))["slices"]
    moved = {tuple(s["bounds"]): s["kept"] for s in slices}
    assert {s["module"] for s in slices} == {"1"} and (0, 8) in moved and moved[(0, 8)][1] < 8
    pruned, drift = _pruned_at_half(model, x)
    assert pruned[1].num_1x1_c == moved[(0, 8)][1] and pruned[1].inc == 4 and drift <= RTOL
    model[1] = _DualPath(twin=True)
    with pytest.raises(UnsupportedModelError, match="does not run"):  # not a guess between the two
        _pruned_at_half(model, x)
