"""`Graph.verify()`: structural and shape checks. Every pass that changes a graph ends with it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import GraphError
from .ops import OpKind, op_def

if TYPE_CHECKING:
    from .graph import Graph


def verify_graph(graph: Graph) -> None:
    _verify_links(graph)
    _verify_order_and_names(graph)
    _verify_constants(graph)
    _verify_shapes(graph)


def _verify_links(graph: Graph) -> None:
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None and n not in v.users:
                raise GraphError(f"node '{n.name}' reads '{v.name}' but is not among its users")
        for v in n.outputs:
            if v.producer is not n:
                raise GraphError(f"node '{n.name}' writes '{v.name}' whose producer is {v.producer}")
    node_ids = {id(n) for n in graph.nodes}
    for v in graph.values():
        if v.producer is not None and id(v.producer) not in node_ids:
            raise GraphError(f"value '{v.name}' is produced by node '{v.producer.name}' that is not in the graph")
        for u in v.users:
            if id(u) not in node_ids:
                raise GraphError(f"value '{v.name}' is used by node '{u.name}' that is not in the graph")
        if v.producer is None and not v.is_constant and v not in graph.inputs:
            raise GraphError(f"value '{v.name}' has no producer and is neither a constant nor a graph input")


def _verify_order_and_names(graph: Graph) -> None:
    done: set[int] = set()
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None and v.producer is not None and id(v.producer) not in done:
                raise GraphError(f"node '{n.name}' reads '{v.name}' before its producer '{v.producer.name}' runs")
        done.add(id(n))
    names: dict[str, int] = {}
    for v in graph.values():
        if names.setdefault(v.name, id(v)) != id(v):
            raise GraphError(f"two different values are named '{v.name}'")
    node_names: set[str] = set()
    for n in graph.nodes:
        if n.name in node_names:
            raise GraphError(f"two nodes are named '{n.name}'")
        node_names.add(n.name)


def _verify_constants(graph: Graph) -> None:
    for v in graph.constants():
        if tuple(v.data.shape) != v.shape:
            raise GraphError(f"constant '{v.name}' holds an array of shape {v.data.shape}, declared {v.shape}")
        if v.data.dtype != v.dtype:
            raise GraphError(f"constant '{v.name}' holds {v.data.dtype}, declared {v.dtype}")


def _verify_shapes(graph: Graph) -> None:
    for n in graph.nodes:
        for v in n.outputs:
            if v.shape is None:
                raise GraphError(f"node '{n.name}' output '{v.name}' has no shape")
        rule = op_def(n.op)
        if rule.kind is OpKind.OPAQUE or rule.infer is None:
            continue
        present = [v for v in n.inputs if v is not None]
        if any(v.shape is None or not all(isinstance(d, int) for d in v.shape) for v in present):
            continue
        try:
            expected = rule.infer(n, [v.shape for v in present])
        except GraphError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
            raise GraphError(f"node '{n.name}' ({n.op}): malformed attributes {n.attrs}: {e!r}") from e
        got = [v.shape for v in n.outputs]
        if [tuple(s) for s in expected] != got[: len(expected)]:
            raise GraphError(f"node '{n.name}' ({n.op}): output shapes {got} but the op rule gives {expected}")
