"""Pruning a user's PyTorch module in place: one shot, iteratively with training between steps, and the group
sparsity regularizer (DepGraph's sparse training) to add to a training loss.

    from prune_compile.pruner import prune_module, iterative_prune
    result = prune_module(model, [x], PlanningOptions(policy="global", target_macs=2.5))
    history = iterative_prune(model, [x], target_macs=2.5, steps=4, train_fn=lambda m, step: finetune(m))

Each step captures the module with torch.export, finds the channel groups, plans, and slices the module (torch
surgery); the module object stays the same, so optimizers must be recreated after a step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import UsageError
from .passes.policy import PlanningOptions


@dataclass
class PruneResult:
    module: Any
    plan: dict  # the plan.json document applied
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    # convs the plan moved off the CPU runtimes' channel blocks; a module whose outputs differ from the pruned
    # graph's (see module_drift). Also raised as Python warnings.
    warnings: list[str] = field(default_factory=list)

    @property
    def macs_ratio(self) -> float:
        return self.macs_before / max(self.macs_after, 1)


def _capture(module, example_inputs: Sequence[Any], attention: str):
    from .ir.fx_importer import import_torch_module
    from .passes.deps import analyze

    was_training = module.training
    module.eval()
    try:
        graph = import_torch_module(module, tuple(example_inputs), name=type(module).__name__)
    finally:
        module.train(was_training)
    return graph, analyze(graph, attention=attention)


def gradients_of(module, loss_fn: Callable[[Any], Any]) -> dict:
    """dL/dw by state_dict name, from the user's loss on the current module (for Taylor importance)."""
    module.zero_grad(set_to_none=True)
    loss_fn(module).backward()
    grads = {n: p.grad.detach().cpu().numpy().copy() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


def cross_entropy_loss(batches: Sequence[Sequence[Any]], labels: np.ndarray | None = None) -> Callable[[Any], Any]:
    """`loss_fn(module)` for Taylor importance from calibration samples: the mean cross-entropy of the module's first
    output (class scores along its last axis; a softmax output is read as probabilities) over `batches` (each the
    forward() inputs of one batch) against `labels` (one class per row, in batch order), or, without labels, against
    the module's own top class (its own softmax as a soft target would have zero gradient)."""
    import torch

    from .passes.calibration import are_probabilities, check_labels

    def loss_fn(module):
        scores = []
        for batch in batches:
            out = module(*batch)
            first = out[0] if isinstance(out, (tuple, list)) else out
            if first.ndim < 2:
                raise UsageError(f"importance taylor: the model's first output has shape {list(first.shape)}; its "
                                 "cross-entropy needs class scores along the last axis")
            scores.append(first.reshape(-1, first.shape[-1]))
        rows = torch.cat(scores).double()
        if labels is None:
            target = rows.detach().argmax(1)
        else:
            check_labels(np.asarray(labels).reshape(-1), rows.shape)
            target = torch.as_tensor(np.asarray(labels).reshape(-1), dtype=torch.long)
        logp = rows.clamp_min(1e-12).log() if are_probabilities(rows.detach().cpu().numpy()) else \
            torch.log_softmax(rows, 1)
        return -logp[torch.arange(len(rows)), target].mean()

    return loss_fn


def prune_module(module, example_inputs: Sequence[Any], planning: PlanningOptions, *, attention: str = "head_dim",
                 loss_fn: Callable[[Any], Any] | None = None,
                 metric: Callable[[list], float] | None = None) -> PruneResult:
    """Plan on `module` and slice it in place. `loss_fn(module) -> scalar` supplies gradients for Taylor. The
    sensitivity policy measures on `example_inputs` (pass a real calibration batch) with the relative output
    change, or `metric(outputs) -> damage` (numpy outputs of the model on them, e.g. error rate)."""
    from .backends.torch_module import apply_plan_to_module
    from .passes.alignment import channel_alignment
    from .passes.cost import graph_cost
    from .passes.plan import plan_to_json
    from .passes.policy import make_plan
    from .passes.rewrite import pruned_copy

    if planning.importance == "taylor" and loss_fn is None:
        raise UsageError("importance 'taylor' needs loss_fn(module) -> loss to compute gradients")
    gradients = gradients_of(module, loss_fn) if planning.importance == "taylor" else None
    graph, deps = _capture(module, example_inputs, attention)
    calibration = {v.name: np.asarray(t.detach().cpu().numpy()) for v, t in zip(graph.inputs, example_inputs,
                                                                                strict=True)}
    planned = make_plan(graph, deps, planning, gradients=gradients, calibration=calibration, metric=metric)
    doc = plan_to_json(deps, planned.plan, attention=attention)
    before = graph_cost(graph)
    pruned = pruned_copy(graph, planned.plan, deps) if not planned.plan.is_empty() else graph
    after = graph_cost(pruned)
    alignment = channel_alignment(graph, pruned, policy=planning.policy)
    notes = [alignment["warning"]] if alignment else []
    apply_plan_to_module(module, doc, example_inputs)
    if not planned.plan.is_empty():
        drift = module_drift(module, pruned, example_inputs)
        if drift is not None and drift > DRIFT_TOLERANCE:
            notes.append(f"the pruned module's outputs differ from the pruned graph's by {drift:.1e} (relative) on "
                         "the example inputs: its code computes something from a pruned width that the graph keeps "
                         "as it was (an unbiased variance's n/(n-1) over the channels, say); fine-tuning absorbs "
                         "it, and an ONNX exported from the module follows the module")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return PruneResult(module, doc, before["macs"], after["macs"], before["parameters"], after["parameters"], notes)


DRIFT_TOLERANCE = 1e-3  # far above float32 noise (1e-6), far below a wrong slice


def module_drift(module, graph, example_inputs: Sequence[Any]) -> float | None:
    """Relative difference between the (pruned) module and the (pruned) graph on the example inputs, run by
    ONNX Runtime; None where the graph cannot be exported (torch-only ops) or the outputs are not tensors."""
    import torch

    from .backends import ort
    from .errors import PruneCompileError
    from .ir import export_onnx

    try:
        model = export_onnx(graph)
    except PruneCompileError:
        return None
    feeds = {v.name: t.detach().cpu().numpy() for v, t in zip(graph.inputs, example_inputs, strict=True)}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(*example_inputs)
    finally:
        module.train(was_training)
    outs = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, (tuple, list)) else None
    if outs is None or not all(isinstance(t, torch.Tensor) for t in outs) or len(outs) != len(graph.outputs):
        return None
    return ort.relative_error(ort.run(model, feeds), [t.detach().cpu().numpy() for t in outs])


def iterative_prune(module, example_inputs: Sequence[Any], *, target_macs: float, steps: int,
                    train_fn: Callable[[Any, int], Any] | None = None, planning: PlanningOptions | None = None,
                    attention: str = "head_dim", loss_fn: Callable[[Any], Any] | None = None,
                    metric: Callable[[list], float] | None = None) -> list[PruneResult]:
    """Reach `target_macs` (reduction factor vs the module as given) in `steps` geometric steps, calling
    `train_fn(module, step)` after each (fine-tuning; recreate optimizers there)."""
    if steps < 1:
        raise UsageError(f"steps {steps}: must be >= 1")
    if target_macs < 1.0:
        raise UsageError(f"target_macs {target_macs}: must be >= 1")
    planning = planning or PlanningOptions(policy="global")
    history: list[PruneResult] = []
    original = None
    for step in range(1, steps + 1):
        graph, _ = _capture(module, example_inputs, attention)
        from .passes.cost import graph_cost

        current = graph_cost(graph)["macs"]
        original = original or current
        wanted = original / (target_macs ** (step / steps))
        factor = current / wanted
        if factor > 1.0 + 1e-6:
            result = prune_module(module, example_inputs, replace(planning, ratio=0.0, target_macs=factor),
                                  attention=attention, loss_fn=loss_fn, metric=metric)
        else:
            result = PruneResult(module, {}, current, current, 0, 0)
        history.append(result)
        if train_fn is not None:
            train_fn(module, step)
    return history


class GroupSparsity:
    """Group-lasso penalty over the module's prunable channel groups: for every group and root channel, the L2
    norm of all its coupled weights; summed. Add `lam * penalty(module)` to the training loss so whole coupled
    channels go to zero together (and the magnitude importances then remove them). Rebuild after surgery."""

    def __init__(self, module, example_inputs: Sequence[Any], attention: str = "head_dim") -> None:
        import torch

        from .passes.plan import param_name

        _, deps = _capture(module, example_inputs, attention)
        names = dict(module.named_parameters())
        self.terms: list[tuple[int, list[tuple[str, int, Any]]]] = []
        for g in deps.prunable():
            members = [(param_name(m), m.axis, torch.as_tensor(m.indices, dtype=torch.long)) for m in g.params
                       if param_name(m) in names]
            if members:
                self.terms.append((g.size, members))

    def __call__(self, module):
        import torch

        params = dict(module.named_parameters())
        total = None
        for _size, members in self.terms:
            sq = None
            for name, axis, idx in members:
                w = params[name]
                per_index = w.movedim(axis, 0).reshape(w.shape[axis], -1).pow(2).sum(dim=1)
                part = per_index[idx].sum(dim=1)
                sq = part if sq is None else sq + part
            term = torch.sqrt(sq + 1e-12).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total


def recalibrate_batch_norm(module, batches: Sequence[Sequence[Any]]) -> int:
    """Re-estimate every BatchNorm's running mean and variance on `batches` (each a tuple of forward inputs).

    Pruning a layer changes the input statistics of the layers after it, while their BatchNorms still normalize
    with the old ones; a few forward passes over calibration data fix that without training (no gradients, other
    modules stay in eval mode). Returns the number of BatchNorm modules updated."""
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    saved = [m.momentum for m in norms]
    was_training = module.training
    module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    try:
        with torch.no_grad():
            for batch in batches:
                module(*batch)
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.eval()
        module.train(was_training)
    return len(norms)
