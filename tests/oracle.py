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


__all__ = ["analyze", "exact_plan", "oracle_error", "sample", "torch_onnx_graph", "zeroed_model"]
