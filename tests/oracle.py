"""Oracle helpers shared by the pass tests (design §5)."""

from __future__ import annotations

import io

import numpy as np
import onnx

from prune_compile.backends import ort
from prune_compile.ir import Graph, export_onnx, import_onnx
from prune_compile.passes.deps import DependencyResult, analyze
from prune_compile.passes.oracle import zeroed_graph
from prune_compile.passes.plan import Plan
from prune_compile.passes.rewrite import pruned_copy


def zeroed_model(graph: Graph, deps: DependencyResult, plan: Plan) -> onnx.ModelProto:
    return export_onnx(zeroed_graph(graph, deps, plan))


_SQUASHING = ("sigmoid", "softmax", "log_softmax", "hard_sigmoid")


def logits(graph: Graph) -> Graph:
    """`graph` with each output produced by a squashing op (sigmoid, softmax) replaced by that op's input.

    A trained detector's probability map is saturated almost everywhere; compared after the sigmoid, a float32
    rounding difference in a large logit reads as a large relative error. The oracle compares logits instead."""
    out = graph.clone()
    out.outputs = [v.producer.inputs[0] if v.producer is not None and v.producer.op in _SQUASHING else v
                   for v in out.outputs]
    out.cleanup()
    return out


def oracle_error(graph: Graph, deps: DependencyResult, plan: Plan, feeds: dict[str, np.ndarray],
                 compare_logits: bool = False) -> float:
    """Relative error between the pruned model and the consumer-zeroed original (0 when the oracle holds)."""
    pruned = pruned_copy(graph, plan, deps)
    zeroed = zeroed_graph(graph, deps, plan)
    if compare_logits:
        pruned, zeroed = logits(pruned), logits(zeroed)
    return ort.relative_error(ort.run(export_onnx(zeroed), feeds), ort.run(export_onnx(pruned), feeds))


def group_oracle(graph: Graph, deps: DependencyResult, feeds: dict[str, np.ndarray], plans: list[Plan]):
    """oracle_error for many small plans on one graph (each exact group alone), with the original exported and
    loaded once: the constants any of `plans` zeroes are graph inputs with their values as defaults, which ONNX
    Runtime lets a run override, so each plan's consumer-zeroed original is the one session fed its zeroed
    constants (the same function as zeroed_graph's copy; only the pruned model is built per plan). Yields each
    plan's relative error, in order."""
    from onnx import helper

    from prune_compile.passes.oracle import zeroed_constants

    zeroed = [zeroed_constants(deps, p) for p in plans]
    names = set().union(*zeroed)
    model = export_onnx(graph)
    if not names <= {t.name for t in model.graph.initializer}:  # a constant the exporter writes otherwise
        yield from (oracle_error(graph, deps, p, feeds) for p in plans)
        return
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer if t.name in names)
    original = ort.session(model)
    for plan, constants in zip(plans, zeroed, strict=True):
        expected = ort.run(original, {**feeds, **constants})
        yield ort.relative_error(expected, ort.run(export_onnx(pruned_copy(graph, plan, deps)), feeds))


def exact_plan(deps: DependencyResult, ratio: float) -> Plan:
    """Uniform L2 plan restricted to exact prunable groups."""
    from prune_compile.passes.plan import uniform_plan

    plan = uniform_plan(deps, ratio)
    keep = {g.id for g in deps.prunable() if g.exact}
    return Plan({gid: r for gid, r in plan.removed.items() if gid in keep})


def torch_onnx_graph(model, x) -> Graph:
    """The ONNX path: torch.onnx export (TorchScript exporter, names kept), then our ONNX importer."""
    import torch

    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"], do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE)
    return import_onnx(onnx.load_from_string(buf.getvalue()))


def sample(items: list, n: int) -> list:
    """Up to n items spread evenly over the list (first and last included)."""
    if len(items) <= n:
        return items
    picks = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


__all__ = ["analyze", "exact_plan", "group_oracle", "oracle_error", "sample", "torch_onnx_graph", "zeroed_model"]
