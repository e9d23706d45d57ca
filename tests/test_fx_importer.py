"""torch.export importer: state_dict names, folding of weight-only subgraphs, op coverage, fail-closed export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prune_compile.backends import ort
from prune_compile.errors import UnsupportedModelError
from prune_compile.ir import export_onnx
from prune_compile.ir.fx_importer import import_torch_module


def _check(model: nn.Module, *inputs: torch.Tensor, rtol: float = 1e-5):
    model = model.eval()
    graph = import_torch_module(model, inputs)
    with torch.no_grad():
        out = model(*inputs)
    expected = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
    feeds = {v.name: t.numpy() for v, t in zip(graph.inputs, inputs, strict=True)}
    got = ort.run(export_onnx(graph), feeds)
    assert ort.relative_error(expected, got) <= rtol
    return graph


class _Bias(nn.Module):
    """A relative-position-bias-like weight subgraph: table[index].view().permute() — all constant."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(9, 2))
        self.register_buffer("index", torch.randint(0, 9, (16,)))
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.table[self.index].view(4, 4, 2).permute(2, 0, 1)  # [2, 4, 4]
        return self.proj(x) + bias.sum(0)


def test_constants_keep_state_dict_names_and_weight_subgraphs_fold() -> None:
    model = _Bias()
    graph = _check(model, torch.randn(1, 4, 4))
    names = {v.name: v.provenance for v in graph.constants()}
    assert names["proj.weight"].kind == "torch_parameter"
    assert names["proj.bias"].kind == "torch_parameter"
    folded = [p for p in names.values() if p.kind == "folded"]
    assert len(folded) == 1 and set(folded[0].sources) == {"table", "index"}
    assert [n.op for n in graph.nodes] == ["linear", "add"]


class _Kitchen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding="same", groups=2)
        self.bn = nn.BatchNorm2d(8, affine=False)
        self.deconv = nn.ConvTranspose2d(8, 4, 2, stride=2, output_padding=0)
        self.ln = nn.LayerNorm(4, elementwise_affine=False)
        self.attn_in = nn.Linear(4, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(self.bn(self.conv(x)))
        y = F.pad(y, (1, 1, 2, 0), mode="reflect")
        y = torch.roll(y, shifts=(1, -2), dims=(2, 3))
        a, b = torch.chunk(y, 2, dim=1)
        y = torch.cat([F.gelu(a, approximate="tanh"), F.silu(b)], 1)
        y = F.avg_pool2d(y, 2, ceil_mode=True, count_include_pad=False)
        y = F.interpolate(y, scale_factor=2, mode="nearest")
        y = self.deconv(y)
        y = F.interpolate(y, size=(6, 6), mode="bilinear", align_corners=False)
        t = y.flatten(2).transpose(1, 2)  # [1, 36, 4]
        q, k, v = self.attn_in(self.ln(t)).unflatten(-1, (3, 4)).unbind(-2)
        mask = torch.ones(36, 36, dtype=torch.bool).tril()
        att = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=mask)
        s = torch.einsum("bhnd,bhmd->bhnm", att, att).softmax(-1)
        return s.mean(dim=(1, 2)) + torch.clamp(t.amax(-1), min=-0.5, max=0.5)


def test_many_ops_roundtrip() -> None:
    torch.manual_seed(0)
    model = _Kitchen()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 1.5)
    graph = _check(model, torch.randn(1, 4, 6, 6))
    ops = set(graph.op_counts())
    assert {"conv", "batch_norm", "hard_swish", "pad", "concat", "split", "gelu", "silu", "avg_pool", "resize",
            "conv_transpose", "layer_norm", "linear", "attention", "einsum", "softmax", "reduce_mean",
            "reduce_max", "clip"} <= ops
    assert not any(k.startswith("opaque") for k in ops)


def test_causal_attention_and_scalar_arithmetic() -> None:
    class M(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            out = F.scaled_dot_product_attention(q, k, k, is_causal=True, scale=0.3)
            return (1.0 - out) * 2 + out / 3

    _check(M(), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))


def test_unknown_torch_op_is_kept_opaque_and_export_names_it() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(x, dim=1) + 1

    graph = import_torch_module(M(), (torch.randn(2, 3),))
    opaque = [n for n in graph.nodes if n.opaque]
    assert len(opaque) == 1 and "cumsum" in opaque[0].opaque.op_type
    with pytest.raises(UnsupportedModelError, match=f"'{opaque[0].name}'.*cumsum"):
        export_onnx(graph)


def test_training_mode_batch_norm_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    with pytest.raises(UnsupportedModelError, match="eval"):
        from prune_compile.ir.fx_importer import import_exported_program

        import_exported_program(torch.export.export(model, (torch.randn(2, 3, 4, 4),)))


def test_graph_verifies_and_shapes_are_static() -> None:
    graph = _check(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)),
                   torch.randn(1, 3, 7, 7))
    graph.verify()
    assert all(isinstance(d, int) for v in graph.values() for d in v.shape)
    assert np.prod(graph.outputs[0].shape) == 2


class _Normed(nn.Module):
    """GroupNorm with and without its affine, and ConvNeXt-V2's global response norm (addcmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.gn = nn.GroupNorm(4, 8)
        self.gn_plain = nn.GroupNorm(2, 8, affine=False)
        self.gamma = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gn_plain(self.gn(x))
        response = y.norm(p=2, dim=(2, 3), keepdim=True)
        return torch.addcmul(y, self.gamma, response, value=0.5)


def test_group_norm_and_addcmul_lower_to_known_ops() -> None:
    torch.manual_seed(0)
    model = _Normed()
    with torch.no_grad():
        model.gn.weight.uniform_(0.5, 1.5)
        model.gn.bias.normal_()
    graph = _check(model, torch.randn(1, 8, 5, 5))
    assert not any(n.op == "opaque" for n in graph.nodes)
    # As ONNX exporters write GroupNorm: [N, C, H, W] -> [N, G, C/G*H*W], normalized per group, back, affine.
    norms = [n for n in graph.nodes if n.op == "instance_norm"]
    assert [n.inputs[0].shape for n in norms] == [(1, 4, 50), (1, 2, 100)]
    assert {"gn.weight", "gn.bias"} <= {v.name for v in graph.constants()}


def test_stack_repeat_interleave_and_bicubic_lower_to_known_ops() -> None:
    # CrossViT (stack, bicubic resize of position embeddings) and GCViT (repeat_interleave of global queries).
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.interpolate(x, size=(7, 9), mode="bicubic", align_corners=False)
            z = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=True)[..., :7, :9]
            s = torch.stack([y, z, y * z], dim=2)  # [1, 3, 3, 7, 9]
            return s.repeat_interleave(2, dim=1).flatten(1, 2)

    graph = _check(M(), torch.randn(1, 3, 4, 5))
    assert not any(n.op == "opaque" for n in graph.nodes)
    assert {"resize", "concat", "unsqueeze", "tile"} <= set(graph.op_counts())


def test_variance_and_rms_norm_lower_to_known_ops() -> None:
    # EvoNorm's variance (biased and unbiased), RMSNorm (newer ViTs) and rsqrt: the torch importer had no lowering,
    # so the model could not be exported. Both paths write RMSNorm as the same decomposition.
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.RMSNorm(6, eps=1e-6)
            self.plain = nn.RMSNorm(6)
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            spread = x.var(dim=(2, 3), keepdim=True) + torch.var(x, dim=1, correction=0, keepdim=True)
            return self.plain(self.norm(x + spread)) * torch.rsqrt(spread.abs() + 1.0)  # timm's RmsNorm2d

    graph = _check(M(), torch.randn(1, 4, 5, 6))
    assert not any(n.op == "opaque" for n in graph.nodes)
    assert "norm.weight" in {v.name for v in graph.constants()}


def test_adaptive_max_pool_lowers_unless_its_indices_are_used() -> None:
    class Pooled(nn.Module):  # BAT's attention pooling
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.adaptive_max_pool2d(x, 1) + F.adaptive_max_pool2d(x, (2, 3)).amax((2, 3), keepdim=True)

    class Indices(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            values, indices = F.adaptive_max_pool2d(x, 1, return_indices=True)
            return values + indices.float()

    graph = _check(Pooled(), torch.randn(1, 4, 6, 9))
    assert [n.op for n in graph.nodes][:2] == ["global_max_pool", "max_pool"]
    graph = import_torch_module(Indices().eval(), (torch.randn(1, 4, 6, 9),))
    assert graph.nodes[0].op == "opaque"


class _Folds(nn.Module):
    """Weight subgraphs whose elements the importer follows back to the parameters (torch surgery's element map)."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(4, 2, 3)), nn.Parameter(torch.randn(4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.w.reshape(1, 4, -1).reshape(4, 2, 3).flatten(1))  # axis 1 flattens w's axes 1, 2
        x = F.linear(x, torch.cat((self.b, self.b * 2), 1).t())  # b's axis 1 at offsets 0 and 6 of axis 0
        return F.linear(x, torch.cat((self.w.reshape(4, 6), self.b), 1))  # a flattened axis in a cat: once crashed


def test_folded_constants_map_their_elements_to_the_parameters() -> None:
    graph = import_torch_module(_Folds().eval(), (torch.randn(3, 6),))
    maps = sorted((v.shape, v.provenance.index_map) for v in graph.constants() if v.provenance.kind == "folded")
    assert maps == [((4, 6), (("w", ((0, 0, 4), ("merged", ((1, 2), (2, 3))))),)),
                    ((4, 12), None),  # a flattened axis at an offset is not tracked
                    ((12, 4), (("b", ((1, 0, 6), (0, 0, 4))), ("b", ((1, 6, 6), (0, 0, 4)))))]
