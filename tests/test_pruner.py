"""The torch-facing pruning API: one shot to a MACs target, iterative pruning with training between steps,
Taylor importance from a user loss, and the group-sparsity regularizer."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from prune_compile.errors import UsageError
from prune_compile.ir.fx_importer import import_torch_module
from prune_compile.passes.cost import graph_cost
from prune_compile.passes.policy import PlanningOptions
from prune_compile.pruner import GroupSparsity, iterative_prune, prune_module

from .zoo import example_input, torchvision_model


def _macs(module, x) -> int:
    return graph_cost(import_torch_module(module.eval(), (x,)))["macs"]


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, stride=2), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))


def test_prune_module_meets_a_macs_target_in_place() -> None:
    model = torchvision_model("resnet18")
    x = example_input(64)
    before = _macs(model, x)
    result = prune_module(model, [x], PlanningOptions(policy="global", target_macs=2.5))
    assert result.module is model
    measured = before / _macs(model, x)
    assert abs(measured / 2.5 - 1) <= 0.02 and result.macs_ratio == pytest.approx(measured)
    assert result.plan["format"] == "prune-compile.plan/1"


def test_iterative_pruning_trains_between_steps() -> None:
    model = _small_cnn()
    x = torch.randn(1, 1, 28, 28)
    data = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))
    before = _macs(model, x)
    calls = []

    def train(module, step):
        module.train()
        opt = torch.optim.SGD(module.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(module(data), labels).backward()
            opt.step()
        calls.append((step, sum(p.numel() for p in module.parameters())))

    history = iterative_prune(model, [x], target_macs=2.5, steps=3, train_fn=train)
    assert [c[0] for c in calls] == [1, 2, 3]
    assert calls[0][1] > calls[1][1] > calls[2][1]  # it shrinks at every step
    assert len(history) == 3
    assert abs(before / _macs(model, x) / 2.5 - 1) <= 0.02


def test_taylor_importance_needs_and_uses_a_loss() -> None:
    model = _small_cnn()
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(UsageError, match="loss_fn"):
        prune_module(copy.deepcopy(model), [x], PlanningOptions(ratio=0.5, importance="taylor"))
    data = torch.randn(8, 1, 28, 28)
    taylor = prune_module(copy.deepcopy(model), [x], PlanningOptions(ratio=0.5, importance="taylor"),
                          loss_fn=lambda m: m(data).logsumexp(dim=1).mean())
    l2 = prune_module(copy.deepcopy(model), [x], PlanningOptions(ratio=0.5, importance="l2"))
    removed = [[g["removed"] for g in p.plan["groups"] if g["removed"]] for p in (taylor, l2)]
    assert removed[0] != removed[1]


def test_group_sparsity_penalty_is_differentiable_and_shrinks_groups() -> None:
    model = _small_cnn().train()
    x = torch.randn(1, 1, 28, 28)
    penalty = GroupSparsity(model, [x])
    first = penalty(model)
    assert first.item() > 0 and first.requires_grad
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        penalty(model).backward()
        opt.step()
    assert penalty(model).item() < 0.7 * first.item()


def test_batch_norm_recalibration_restores_statistics_after_pruning() -> None:
    """After pruning, the BNs' running stats are stale; recalibration makes them the batch statistics again."""
    import torch

    from prune_compile.passes.policy import PlanningOptions
    from prune_compile.pruner import prune_module, recalibrate_batch_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3),
                                torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():  # stats of the unpruned model
        recalibrate_batch_norm(model, [(x,)])
    prune_module(model, [x[:1]], PlanningOptions(ratio=0.5))
    bn = model[3]
    with torch.no_grad():
        pre_bn = model[2](model[1](model[0](x)))
    want_mean, want_var = pre_bn.mean(dim=(0, 2, 3)), pre_bn.var(dim=(0, 2, 3))
    assert not torch.allclose(bn.running_mean, want_mean, atol=1e-4)  # stale after pruning the first conv
    momentum = bn.momentum
    assert recalibrate_batch_norm(model, [(x[:4],), (x[4:],)]) == 1
    assert torch.allclose(bn.running_mean, want_mean, atol=1e-4)
    assert torch.allclose(bn.running_var, want_var, rtol=0.05)
    assert bn.momentum == momentum and not model.training


def test_prune_module_warns_of_convs_moved_off_the_cpu_blocks() -> None:
    """The torch flow gets the CLI's channel-alignment check (ONNX Runtime's rule: the torch flow compiles
    nothing), as Python warnings and in the result; none where ORT has no NCHWc kernels."""
    import warnings

    from prune_compile.backends.ort import nchwc_alignment

    x = torch.randn(1, 1, 28, 28)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = prune_module(_small_cnn(), [x], PlanningOptions(ratio=0.3))
    raised = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "blocked kernels" in
              str(w.message)]
    assert result.warnings == raised and bool(raised) is (nchwc_alignment() > 1)
    aligned = prune_module(_small_cnn(), [x], PlanningOptions(ratio=0.3, round_to=max(nchwc_alignment(), 1)))
    assert aligned.warnings == [] and aligned.macs_ratio > 1.2


class _StdNormed(torch.nn.Module):
    """timm's SimpleNorm: x / std(x) over the channels, the variance unbiased (n/(n-1), n = the width) or not."""

    def __init__(self, unbiased: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.unbiased = unbiased
        self.conv, self.head = torch.nn.Conv2d(1, 16, 3), torch.nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(y / torch.sqrt(y.var(dim=1, keepdim=True, unbiased=self.unbiased) + 1e-5))


@pytest.mark.parametrize("unbiased", [False, True])
def test_prune_module_warns_where_the_module_computes_from_a_pruned_width(unbiased: bool) -> None:
    # The graph keeps the original n/(n-1) (as it keeps an attention scale); the module recomputes it from its
    # new width. Nothing to fix by slicing, but the user should know the two differ.
    import warnings

    x = torch.randn(1, 1, 10, 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = prune_module(_StdNormed(unbiased), [x], PlanningOptions(ratio=0.5))
    assert result.module.conv.out_channels == 8
    drift = [w for w in result.warnings if "differ from the pruned graph's" in w]
    assert len(drift) == unbiased and [str(w.message) for w in caught if str(w.message) in drift] == drift
    if unbiased:
        assert float(re.search(r"by ([0-9.e+-]+) \(relative\)", drift[0]).group(1)) > 1e-2
