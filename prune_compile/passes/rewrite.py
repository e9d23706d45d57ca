"""Rewrite: apply a plan to the graph in place. Constants are sliced, shapes updated, attributes that encode
channel counts rewritten (conv groups, split sizes, slice bounds, reshape/expand/resize targets, gather indices,
attention scale, recurrent hidden_size), then `Graph.verify()` re-checks every shape rule."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..errors import GraphError
from ..ir.graph import Graph, Node, Value
from .deps import DependencyResult
from .plan import Plan

SlotKey = tuple[int, int]


def removed_by_slot(deps: DependencyResult, plan: Plan) -> dict[SlotKey, tuple[Value, int, np.ndarray]]:
    """(value id, axis) → (value, axis, sorted unique indices removed along that axis)."""
    acc: dict[SlotKey, tuple[Value, int, list[np.ndarray]]] = {}
    for g in deps.groups:
        removed = plan.removed_of(g)
        if not len(removed):
            continue
        if not g.prunable:
            raise GraphError(f"plan removes channels of group {g.id}, which is frozen: {g.reason}")
        if removed.min() < 0 or removed.max() >= g.size:
            raise GraphError(f"plan for group {g.id} names channels outside 0..{g.size - 1}")
        if len(np.unique(removed)) >= g.size:
            raise GraphError(f"plan removes every channel of group {g.id}")
        for m in g.members:
            key = (id(m.value), m.axis)
            acc.setdefault(key, (m.value, m.axis, []))[2].append(m.indices[removed].ravel())
    return {k: (v, a, np.unique(np.concatenate(parts))) for k, (v, a, parts) in acc.items()}


def apply_plan(graph: Graph, deps: DependencyResult, plan: Plan) -> int:
    """Remove the planned channels from `graph`. Returns how many slots changed."""
    removed = removed_by_slot(deps, plan)
    if not removed:
        return 0
    kept = kept_indices(removed)
    for node in graph.nodes:
        fix = _ATTR_FIXES.get(node.op)
        if fix is not None:
            fix(node, kept)
    for v, axis, idx in removed.values():
        keep = np.setdiff1d(np.arange(v.shape[axis]), idx)
        if v.is_constant:
            v.data = np.take(v.data, keep, axis=axis)
        shape = list(v.shape)
        shape[axis] = len(keep)
        v.shape = tuple(shape)
    for node in graph.nodes:
        if node.op in ("reshape", "expand"):
            node.attrs["shape"] = list(node.outputs[0].shape)
        elif node.op == "resize" and "sizes" in node.attrs:
            node.attrs["sizes"] = list(node.outputs[0].shape)
    graph.verify()
    return len(removed)


Kept = Callable[[Value | None, int], np.ndarray | None]


def kept_indices(removed: dict[SlotKey, tuple[Value, int, np.ndarray]]) -> Kept:
    """(v, axis) → the indices kept along it, or None when nothing is removed there."""

    def kept(v: Value | None, axis: int) -> np.ndarray | None:
        if v is None:
            return None
        entry = removed.get((id(v), axis % len(v.shape)))
        if entry is None:
            return None
        return np.setdiff1d(np.arange(v.shape[axis]), entry[2])

    return kept


def split_sizes_after(node: Node, kept: Kept) -> list[int]:
    """A split node's sizes once the planned channels are gone."""
    sizes = []
    for out, size in zip(node.outputs, node.attrs["split"], strict=True):
        k = kept(out, node.attrs["axis"])
        sizes.append(int(size) if k is None else len(k))
    return sizes


def _fix_conv(node: Node, kept: Kept) -> None:
    x = node.inputs[0]
    k = kept(x, 1)
    if k is not None and node.attrs["group"] == x.shape[1] and node.attrs["group"] > 1:
        node.attrs["group"] = len(k)  # depthwise: one group per remaining input channel


def _fix_split(node: Node, kept: Kept) -> None:
    node.attrs["split"] = split_sizes_after(node, kept)


def slice_bounds_after(node: Node, kept: Kept) -> tuple[list[int], list[int]]:
    """A slice node's starts and ends once the planned channels are gone."""
    x, y = node.inputs[0], node.outputs[0]
    starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
    for i, axis in enumerate(node.attrs["axes"]):
        kx = kept(x, axis)
        if kx is None:
            continue
        ky = kept(y, axis)
        new_start = int(np.count_nonzero(kx < starts[i]))
        new_len = y.shape[axis] if ky is None else len(ky)
        starts[i], ends[i] = new_start, new_start + new_len
    return starts, ends


def _fix_slice(node: Node, kept: Kept) -> None:
    node.attrs["starts"], node.attrs["ends"] = slice_bounds_after(node, kept)


def _fix_gather(node: Node, kept: Kept) -> None:
    data, indices = node.inputs
    axis = node.attrs["axis"] % len(data.shape)
    kd = kept(data, axis)
    # Only 1-D indices keep the gathered axis (at `axis` of the output); other output axes need no fix here.
    ky = kept(node.outputs[0], axis) if len(indices.shape) == 1 else None
    if kd is None and ky is None:
        return
    if not indices.is_constant:
        raise GraphError(f"node '{node.name}': cannot rewrite gather with computed indices")
    old = np.asarray(indices.data, dtype=np.int64) % data.shape[axis]
    new_pos = np.full(data.shape[axis], -1, dtype=np.int64)
    keep_data = kd if kd is not None else np.arange(data.shape[axis])
    new_pos[keep_data] = np.arange(len(keep_data))
    new = new_pos[old]
    # Entries of removed output positions are dropped by the generic slicing (indices are a group member).
    if (new[ky if ky is not None else slice(None)] < 0).any():
        raise GraphError(f"node '{node.name}': gather reads a removed channel")
    indices.data = new.astype(indices.dtype)


def _fix_attention(node: Node, kept: Kept) -> None:
    if node.attrs.get("scale") is None and kept(node.inputs[0], -1) is not None:
        # The default scale is 1/sqrt(head_dim): pin the original so removing head_dim channels is exact.
        node.attrs["scale"] = 1.0 / math.sqrt(node.inputs[0].shape[-1])


def _fix_recurrent(node: Node, kept: Kept) -> None:
    k = kept(node.inputs[2], 2)  # R's columns: one per hidden unit
    if k is not None:
        node.attrs["hidden_size"] = len(k)


_ATTR_FIXES: dict[str, Callable[[Node, Kept], None]] = {
    "conv": _fix_conv, "split": _fix_split, "slice": _fix_slice, "gather": _fix_gather,
    "attention": _fix_attention, "lstm": _fix_recurrent, "gru": _fix_recurrent, "rnn": _fix_recurrent,
}


def pruned_copy(graph: Graph, plan: Plan, deps: DependencyResult | None = None) -> Graph:
    """A pruned copy of `graph`; `graph` itself is left intact. `plan` refers to the groups of `deps`
    (by default `analyze(graph)`), which are rebound to the copy's values by name."""
    from dataclasses import replace

    from .deps import analyze

    deps = deps if deps is not None else analyze(graph)
    copy = graph.clone()
    by_name = {v.name: v for v in copy.values()}
    groups = [replace(g, members=[replace(m, value=by_name[m.value.name]) for m in g.members]) for g in deps.groups]
    apply_plan(copy, DependencyResult(groups, deps.seconds, deps.stats, deps.attention), plan)
    return copy
