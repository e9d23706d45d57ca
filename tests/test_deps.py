"""Dependency analysis on hand-built graphs: the groups a reader can check by eye, fail-closed behaviour,
and the rewrite of channel-count attributes."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from prune_compile.errors import GraphError
from prune_compile.ir import Value
from prune_compile.ir.fx_importer import import_torch_module
from prune_compile.passes.deps import analyze
from prune_compile.passes.plan import Plan, param_name, plan_to_json, uniform_plan
from prune_compile.passes.rewrite import apply_plan, pruned_copy

from .oracle import exact_plan, oracle_error, torch_onnx_graph
from .random_arch import Builder


def _groups_by_producer(deps) -> dict[str, object]:
    return {param_name(g.producers()[0]): g for g in deps.groups if g.producers()}


def test_fail_closed_freezes_exactly_what_touches_the_unknown_op() -> None:
    b = Builder(0)
    x = Value("x", (1, 3, 4, 4), np.float32)
    b.graph.inputs.append(x)
    a = b.conv(x, 8)  # group A: feeds the opaque op → frozen
    from prune_compile.ir import OpaqueInfo

    frozen_out = Value("mystery_out", a.shape, np.float32)
    b.graph.add_node("opaque", [a], [frozen_out], name="mystery", opaque=OpaqueInfo("Softsign"))
    c = b.conv(frozen_out, 6)  # group C: free
    d = b.conv(c, 5)  # group D: free
    out = b.op("linear", [b.op("flatten", [b.op("global_avg_pool", [d])], axis=1), b.const((4, 5))])
    b.graph.outputs.append(out)
    deps = analyze(b.graph)
    frozen = [g for g in deps.groups if not g.prunable]
    assert any("node 'mystery': op 'Softsign' has no channel rule" == g.reason for g in frozen)
    sizes = sorted(g.size for g in deps.prunable())
    assert sizes == [5, 6]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)}
    assert oracle_error(b.graph, deps, exact_plan(deps, 0.5), feeds) <= 1e-5
    with pytest.raises(GraphError, match="frozen"):
        apply_plan(b.graph.clone(), deps, Plan({frozen[0].id: np.array([0])}))


class _Dense(nn.Module):
    """A DenseNet-style block: each concat output is split into per-producer groups, not one giant group."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 5, 3, padding=1)
        self.c2 = nn.Conv2d(9, 6, 3, padding=1)
        self.head = nn.Conv2d(15, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c0(x))
        b = torch.cat([a, torch.relu(self.c1(a))], 1)
        return self.head(torch.cat([b, torch.relu(self.c2(b))], 1))


def test_concat_channels_stay_with_their_producers() -> None:
    graph = import_torch_module(_Dense(), (torch.randn(1, 3, 5, 5),))
    deps = analyze(graph)
    groups = _groups_by_producer(deps)
    assert {k: g.size for k, g in groups.items() if g.prunable} == {"c0.weight": 4, "c1.weight": 5, "c2.weight": 6}
    consumers = {param_name(m): m.indices[:, 0].tolist() for m in groups["c1.weight"].members if m.role == "consumer"}
    assert consumers == {"c2.weight": [4, 5, 6, 7, 8], "head.weight": [4, 5, 6, 7, 8]}


def test_flatten_linear_maps_each_channel_to_its_spatial_block() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    graph = import_torch_module(model, (torch.randn(1, 3, 4, 4),))
    deps = analyze(graph)
    (g,) = deps.prunable()
    fc = next(m for m in g.members if param_name(m) == "3.weight")
    assert fc.role == "consumer" and fc.indices.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                                             [12, 13, 14, 15]]
    doc = plan_to_json(deps, uniform_plan(deps, 0.5))
    entry = doc["groups"][g.id]
    assert entry["removed"] and len({m["param"] for m in entry["members"]}) == 3
    fc_entry = next(m for m in entry["members"] if m["param"] == "3.weight")
    assert len(fc_entry["removed"]) == 2 * 4 and fc_entry["axis"] == 1


def test_rewrite_updates_split_slice_groups_and_gather() -> None:
    b = Builder(1)
    x = Value("x", (1, 3, 4, 4), np.float32)
    b.graph.inputs.append(x)
    y = b.conv(x, 8)
    left, right = b.op("split", [y], axis=1, split=[5, 3])
    s = b.op("slice", [left], starts=[1], ends=[5], axes=[1], steps=[1])  # channels 1..4 of the first producer
    dw = b.conv(s, 4, group=4)  # depthwise on the slice
    idx = Value("idx", (3,), np.int64, data=np.array([2, 0, 1]))
    g = b.op("gather", [right, idx], axis=1)  # permuted copy of the last 3 channels
    z = b.op("concat", [dw, g], axis=1)
    out = b.op("linear", [b.op("flatten", [b.op("global_avg_pool", [z])], axis=1), b.const((2, 7))])
    b.graph.outputs.append(out)
    deps = analyze(b.graph)
    # The producer's 8 channels fall into segments: 0 (read by nothing), 1..4 (slice → depthwise), 5..7 (gather).
    by_first = {int(g.members[0].indices[0, 0]): g for g in deps.prunable() if param_name(g.members[0]) == "w_1"}
    assert {k: g.size for k, g in by_first.items()} == {0: 1, 1: 4, 5: 3}
    plan = Plan({by_first[1].id: np.array([1, 3]), by_first[5].id: np.array([0])})  # channels 2, 4 and 5
    pruned = pruned_copy(b.graph, plan, deps)
    ops = {n.op: n for n in pruned.nodes}
    assert ops["split"].attrs["split"] == [3, 2]
    assert ops["slice"].attrs["starts"] == [1] and ops["slice"].attrs["ends"] == [3]  # keeps channels 1, 3
    assert ops["gather"].inputs[1].data.tolist() == [1, 0]  # [7, 6] of the kept [6, 7]
    assert [n.attrs["group"] for n in pruned.nodes if n.op == "conv"] == [1, 2]  # depthwise follows its input
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)}
    assert oracle_error(b.graph, deps, plan, feeds) <= 1e-5
    # Removing every channel of a group is refused.
    with pytest.raises(GraphError, match="every channel"):
        apply_plan(b.graph.clone(), analyze(b.graph.clone()), Plan({by_first[1].id: np.arange(4)}))


def test_attention_heads_mode_prunes_whole_heads() -> None:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=8, batch_first=True, dropout=0.0)
    graph = import_torch_module(layer, (torch.randn(1, 5, 16),))
    for unit, size in (("head_dim", 8), ("heads", 2)):
        deps = analyze(graph, attention=unit)
        att = [g for g in deps.prunable() if any("in_proj" in param_name(m) for m in g.params)]
        assert att and {g.size for g in att} == {size}, unit
        in_proj = next(m for g in att for m in g.params if param_name(m) == "self_attn.in_proj_weight")
        rows = in_proj.indices[0]
        # head_dim: dim 0 of every head, for q, k and v; heads: every dim of head 0, for q, k and v.
        expected = ([h * 8 + k * 16 for k in range(3) for h in range(2)] if unit == "head_dim"
                    else [d + k * 16 for k in range(3) for d in range(8)])
        assert sorted(rows.tolist()) == sorted(expected), unit
        feeds = {graph.inputs[0].name: np.random.default_rng(0).standard_normal((1, 5, 16)).astype(np.float32)}
        assert oracle_error(graph, deps, exact_plan(deps, 0.5), feeds) <= 1e-5


def _tiny_vit() -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=4,
                                                hidden_dim=16, mlp_dim=8, num_classes=3)


def _group_params(deps) -> list[tuple]:
    return sorted((g.size, g.prunable, tuple((param_name(m), m.axis, m.indices.tobytes()) for m in g.params))
                  for g in deps.groups)


@pytest.mark.parametrize("unit", ["head_dim", "heads"])
@pytest.mark.parametrize(("make", "shape"), [
    (_tiny_vit, (3, 16, 16)),  # [tokens, batch, h*d] -> [tokens, batch*h, d], as torch's attention does it
    (lambda: nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=8, dropout=0.0), (5, 16)),
], ids=["vit", "sequence_first"])
def test_attention_with_the_batch_folded_into_the_heads_finds_the_groups_of_batch_1(make, shape, unit) -> None:
    torch.manual_seed(0)
    model = make().eval()

    def graph_at(batch: int):
        # the encoder layer reads [sequence, batch, features]
        x = torch.randn(batch, *shape) if len(shape) == 3 else torch.randn(shape[0], batch, shape[1])
        return import_torch_module(model, (x,)), x

    want = _group_params(analyze(graph_at(1)[0], attention=unit))
    for batch in (3, 8):  # fewer and more than the heads: the batch digit must not carry either way
        graph, x = graph_at(batch)
        deps = analyze(graph, attention=unit)
        assert _group_params(deps) == want, batch
    feeds = {graph.inputs[0].name: x.numpy()}
    assert oracle_error(graph, deps, exact_plan(deps, 0.5), feeds) <= 1e-5


class _DistributionHead(nn.Module):
    """YOLOv8's box head: 4 box sides x 16 bins as one conv's 64 channels, reshaped to [4, 16], the bins moved to the
    channel axis for a softmax and a fixed 1x1 conv (their expectation). The box sides land on that conv's height
    axis, which no channel rule maps through."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.box = nn.Conv2d(8, 64, 1)
        self.dfl = nn.Conv2d(16, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes = self.box(torch.relu(self.stem(x))).flatten(2)  # [1, 64, anchors]
        bins = boxes.view(1, 4, 16, -1).transpose(2, 1).softmax(1)  # [1, 16 bins, 4 sides, anchors]
        return self.dfl(bins).view(1, 4, -1)


def test_a_group_reaching_an_axis_its_op_has_no_rule_for_is_frozen() -> None:
    x = torch.randn(1, 3, 4, 4)
    graph = import_torch_module(_DistributionHead(), (x,))
    deps = analyze(graph)
    box = [g for g in deps.groups if any(param_name(m) == "box.weight" for m in g.producers())]
    assert box and not any(g.prunable for g in box)
    assert any(re.fullmatch(r"node '.*': conv has no channel rule for axis 2 of '.*'", g.reason) for g in box)
    assert {param_name(g.producers()[0]) for g in deps.prunable() if g.size > 1} == {"stem.weight"}
    plan = uniform_plan(deps, 0.5)
    feeds = {graph.inputs[0].name: x.numpy()}
    assert oracle_error(graph, deps, plan, feeds) <= 1e-5


def _group_normed(groups: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(groups, 8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    return model


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_group_norm_prunes_whole_groups_and_one_group_is_inexact(groups: int) -> None:
    # Both importers write GroupNorm as reshape [C, H, W] -> [G, C/G*H*W], instance_norm, reshape back. Several
    # groups: whole groups go (channel c rides on group c // (C/G)), exactly; one group: any channel, but the
    # statistics cover every channel, so the group is inexact.
    model, x = _group_normed(groups), torch.randn(1, 3, 6, 6)
    signatures = []
    for graph in (import_torch_module(model, (x,)), torch_onnx_graph(model, x)):
        deps = analyze(graph)
        (conv,) = [g for g in deps.groups if any(param_name(m) == "0.weight" for m in g.producers())]
        assert conv.prunable and conv.size == (8 if groups == 1 else groups)
        assert conv.exact == (groups > 1)
        if groups == 1:
            assert "instance_norm statistics over this axis" in conv.inexact_reason
        else:
            rows = next(m for m in conv.members if param_name(m) == "0.weight").indices
            assert rows.tolist() == np.arange(8).reshape(groups, 8 // groups).tolist()
            feeds = {graph.inputs[0].name: x.numpy()}
            assert oracle_error(graph, deps, Plan({conv.id: np.arange(groups // 2)}), feeds) <= 1e-5
        signatures.append(sorted((g.size, g.prunable, g.exact) for g in deps.groups))
    assert signatures[0] == signatures[1]


class _ContentLambda(nn.Module):
    """A lambda layer's content term: queries (through a BatchNorm or not) times keys softmaxed over positions,
    summed over their shared channels."""

    def __init__(self, normed: bool) -> None:
        super().__init__()
        self.qk = nn.Conv2d(3, 16, 1)  # 8 query channels, then 8 key channels
        self.norm = nn.BatchNorm1d(8) if normed else nn.Identity()
        if normed:
            with torch.no_grad():
                self.norm.running_mean.normal_()
                self.norm.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.qk(x).flatten(2).split(8, 1)  # [1, 8, positions] each
        return self.norm(q).transpose(1, 2) @ k.softmax(-1)


@pytest.mark.parametrize("normed", [False, True])
def test_a_product_of_activations_is_exact_only_if_zeroing_silences_a_factor(normed: bool) -> None:
    # Zeroing the producer rows makes q zero, unless a BatchNorm shift sits on its way; k = softmax(0) is never
    # zero. The pruned model then drops a term the zeroed one keeps: the group is inexact, naming the product.
    model, x = _ContentLambda(normed).eval(), torch.randn(1, 3, 4, 4)
    graph = import_torch_module(model, (x,))
    deps = analyze(graph)
    (g,) = deps.prunable()
    assert g.size == 8 and g.exact == (not normed)
    if normed:
        assert re.fullmatch(r"node '.*': matmul sums these channels' products of activations that are not zero when "
                            r"their producers are \(batch_norm '.*' on the way\)", g.inexact_reason)
    error = oracle_error(graph, deps, Plan({g.id: np.arange(4)}), {graph.inputs[0].name: x.numpy()})
    assert (error > 1e-2) if normed else (error <= 1e-5)


def test_a_bias_added_after_a_matmul_is_its_producer() -> None:
    # Paddle-style exports keep [in, out] weights: MatMul + Add instead of a linear. The added constant is the
    # layer's bias: removed and zeroed with the rows, so q·kᵀ over a removed dim is silenced and the group exact.
    b = Builder(2)
    x = Value("x", (1, 5, 8), np.float32)
    b.graph.inputs.append(x)
    q = b.op("add", [b.op("matmul", [x, b.const((8, 6))]), b.const((6,))])
    k = b.op("add", [b.op("matmul", [x, b.const((8, 6))]), b.const((6,))])
    scores = b.op("softmax", [b.op("matmul", [q, b.op("transpose", [k], perm=[0, 2, 1])])], axis=-1)
    shifted = b.op("add", [b.op("relu", [q]), b.const((6,))])  # after an activation: a passthrough constant
    b.graph.outputs.extend([scores, b.op("linear", [shifted, b.const((3, 6))])])
    deps = analyze(b.graph)
    (g,) = [g for g in deps.prunable() if g.size == 6]
    roles = sorted((m.value.shape, m.role) for m in g.params)
    assert roles == [((3, 6), "consumer"), ((6,), "passthrough"), ((6,), "producer"), ((6,), "producer"),
                     ((8, 6), "producer"), ((8, 6), "producer")]
    assert g.exact
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 5, 8)).astype(np.float32)}
    assert oracle_error(b.graph, deps, Plan({g.id: np.array([1, 4])}), feeds) <= 1e-5


class _ChannelReduced(nn.Module):
    """A conv's channels read by a weight (a 1x1 conv) and by a reduce over them: CBAM's channel pooling (mean,
    max), a plain sum (through a BatchNorm or not), an L2 norm."""

    def __init__(self, reduce: str) -> None:
        super().__init__()
        self.reduce = reduce
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
        self.norm = nn.BatchNorm2d(8) if reduce == "sum_bn" else nn.Identity()
        if reduce == "sum_bn":
            with torch.no_grad():
                self.norm.running_mean.normal_()
                self.norm.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        reduced = {"mean": lambda: y.mean(1, keepdim=True), "amax": lambda: y.amax(1, keepdim=True),
                   "sum": lambda: y.sum(1, keepdim=True), "sum_bn": lambda: y.sum(1, keepdim=True),
                   "l2": lambda: torch.linalg.vector_norm(y, dim=1, keepdim=True)}[self.reduce]()
        return self.head(y) + reduced


@pytest.mark.parametrize("reduce", ["mean", "amax", "sum", "sum_bn", "l2"])
def test_a_reduce_over_the_channels_prunes_them(reduce: str) -> None:
    # A mean or max over the channels reads fewer of them after pruning (inexact, like layer_norm's statistics);
    # a sum or L2 norm is unchanged by channels that are zero in the zeroed model (exact), but a BatchNorm shift
    # makes them non-zero. These froze the channels before (RMSNorm, global response norm, CBAM).
    torch.manual_seed(0)
    model, x = _ChannelReduced(reduce).eval(), torch.randn(1, 3, 6, 6)
    signatures = []
    for graph in (import_torch_module(model, (x,)), torch_onnx_graph(model, x)):
        deps = analyze(graph)
        (g,) = deps.prunable()
        assert g.size == 8 and g.exact == (reduce in ("sum", "l2"))
        reason = {"mean": r"node '.*': reduce_mean over this axis", "amax": r"node '.*': reduce_max over this axis",
                  "sum_bn": r"node '.*': reduce_sum sums these channels' values that are not zero when their "
                            r"producers are \(batch_norm '.*' on the way\)"}.get(reduce, "")
        assert re.fullmatch(reason, g.inexact_reason)
        error = oracle_error(graph, deps, Plan({g.id: np.arange(1, 7)}), {graph.inputs[0].name: x.numpy()})
        assert (error <= 1e-5) if g.exact else (error > 1e-3)
        signatures.append(sorted((g.size, g.prunable, g.exact) for g in deps.groups))
    assert signatures[0] == signatures[1]
