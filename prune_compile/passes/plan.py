"""Plans: which root channels of which group are removed. A plan is data; it serializes to `plan.json`.

Importances live in passes/importance.py and policies in passes/policy.py; `uniform_plan` here is the
uniform policy with its defaults, kept as the short spelling the tests and tools use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UsageError
from .deps import DependencyResult, Group, Member

PLAN_FORMAT = "prune-compile.plan/1"


@dataclass
class Plan:
    """group id → sorted root indices to remove. Groups not listed keep everything."""

    removed: dict[int, np.ndarray] = field(default_factory=dict)

    def removed_of(self, group: Group) -> np.ndarray:
        return self.removed.get(group.id, np.zeros(0, dtype=np.int64))

    def is_empty(self) -> bool:
        return not any(len(r) for r in self.removed.values())


def l2_importance(group: Group) -> np.ndarray:
    """Group-level L2 score per root channel: the sum over parameter members of each channel's squared norm,
    each member normalized by its mean so no single layer dominates."""
    from .importance import group_importance

    return group_importance(group, "l2")


def uniform_plan(deps: DependencyResult, ratio: float, min_channels: int = 1) -> Plan:
    """Remove `floor(ratio * size)` lowest-L2 channels from every prunable group (keeping at least `min_channels`):
    the uniform policy with its defaults (see passes/policy.py for the others)."""
    from .policy import PlanningOptions, make_plan

    return make_plan(None, deps, PlanningOptions(ratio=ratio, min_channels=min_channels)).plan


def param_name(m: Member) -> str:
    """The parameter's name in the input model (state_dict key / ONNX initializer or Constant name)."""
    p = m.value.provenance
    if p is None:
        return m.value.name
    if p.kind == "folded" and not p.name:  # torch: a folded subgraph has no name of its own
        return f"folded({'+'.join(p.sources)})" if p.sources else m.value.name
    return p.name


def _is_folded(m: Member) -> bool:
    return m.value.provenance is not None and m.value.provenance.kind == "folded"


def _named(g: Group) -> list[Member]:
    return [m for m in g.params if not _is_folded(m)]


def plan_to_json(deps: DependencyResult, plan: Plan, attention: str | None = None) -> dict[str, Any]:
    """The `plan.json` document: every group, prunable or not, with per-parameter removed indices."""
    groups = []
    for g in deps.groups:
        removed = plan.removed_of(g)
        members = []
        # Parameters in a weight role, and constants the group flows through as data (a class token
        # concatenated to the tokens): torch surgery must slice those too. The latter have role null.
        for m in [m for m in g.members if m.is_param and (m.role is not None or m.value.provenance is not None)]:
            idx = np.sort(m.indices[removed].ravel()) if len(removed) else np.zeros(0, np.int64)
            entry = {"param": param_name(m), "axis": int(m.axis), "role": m.role, "removed": [int(i) for i in idx]}
            if _is_folded(m):
                entry["folded"] = True
                entry["shape"] = [int(d) for d in m.value.shape]  # lets torch surgery map it to its source
                if m.value.provenance.computed:
                    entry["computed"] = True  # the module recomputes it from the kept channels
                segments = [(name, e[m.axis]) for name, e in m.value.provenance.index_map or () if e[m.axis]]
                if m.value.provenance.index_map is not None and all(s[0] != "merged" for _, s in segments):
                    entry["maps"] = [[name, *s] for name, s in segments]  # which source elements this axis reads
            members.append(entry)
        members.sort(key=lambda d: (d["param"], d["axis"]))
        groups.append({"id": g.id, "prunable": g.prunable, "reason": g.reason, "channels": g.size,
                       "removed": [int(i) for i in removed], "exact": g.exact,
                       "inexact_reason": g.inexact_reason, "members": members})
    doc = {"format": PLAN_FORMAT, "analysis": {"attention": attention or deps.attention}, "groups": groups}
    from .rewrite import removed_by_slot

    removed = removed_by_slot(deps, plan)  # what the rewrite pass removes, per value and axis
    for key, entries in (("splits", _split_sizes(removed)), ("slices", _slice_bounds(removed)),
                         ("reshapes", _reshape_targets(removed))):
        if entries:
            doc[key] = entries
    return doc


def _split_sizes(removed: dict) -> list[dict[str, Any]]:
    """Splits whose sizes the plan changes, with the module that made them (torch graphs): model code often keeps
    split sizes in integer attributes (FasterNet's dim_conv3, a lambda layer's dim_qk), which torch surgery updates
    from these."""
    from .rewrite import kept_indices, split_sizes_after

    kept_of = kept_indices(removed)
    out: dict[int, dict[str, Any]] = {}
    for v, _, _ in removed.values():
        node = v.producer
        if node is None or node.op != "split" or not node.scope or id(node) in out:
            continue
        axis = node.attrs["axis"] % len(v.shape)
        sizes = [int(d) for d in node.attrs["split"]]
        kept = split_sizes_after(node, kept_of)
        if kept != sizes:
            out[id(node)] = {"node": node.origin, "module": node.scope, "axis": axis, "sizes": sizes, "kept": kept}
    return sorted(out.values(), key=lambda d: (d["module"], d["node"]))


def _slice_bounds(removed: dict) -> list[dict[str, Any]]:
    """Slices of a pruned axis whose bounds the plan moves, with the module that made them (torch graphs): model code
    often slices at a width it keeps in an attribute (DPN's `num_1x1_c` parts its residual and dense paths), which
    torch surgery updates from these. One entry per slice and pruned axis; bounds are in [0, size]."""
    from .rewrite import kept_indices, slice_bounds_after

    kept_of = kept_indices(removed)
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for x, axis, _ in removed.values():
        for node in x.users:
            if node.op != "slice" or not node.scope or node.inputs[0] is not x:
                continue
            axes = [a % len(x.shape) for a in node.attrs["axes"]]
            if axis not in axes or (id(node), axis) in out:
                continue
            i = axes.index(axis)
            starts, ends = slice_bounds_after(node, kept_of)
            bounds = [int(node.attrs["starts"][i]), int(node.attrs["ends"][i])]
            if [starts[i], ends[i]] != bounds:
                out[(id(node), axis)] = {"node": node.origin, "module": node.scope, "axis": axis,
                                         "size": int(x.shape[axis]), "bounds": bounds,
                                         "kept": [int(starts[i]), int(ends[i])]}
    return sorted(out.values(), key=lambda d: (d["module"], d["node"], d["axis"]))


def _reshape_targets(removed: dict) -> list[dict[str, Any]]:
    """Reshapes whose target shape the plan changes, with the module that made them (torch graphs): model code often
    reshapes by widths it keeps in attributes (TNT's `in_dim`), which torch surgery updates from these."""
    out: dict[int, dict[str, Any]] = {}
    for v, axis, idx in removed.values():
        node = v.producer
        if node is None or node.op != "reshape" or not node.scope:
            continue
        entry = out.setdefault(id(node), {"node": node.origin, "module": node.scope,
                                          "shape": [int(d) for d in v.shape], "kept": [int(d) for d in v.shape]})
        entry["kept"][axis] -= len(idx)
    return sorted(out.values(), key=lambda d: (d["module"], d["node"]))


def plan_from_json(deps: DependencyResult, doc: dict[str, Any]) -> Plan:
    """Replay a `plan.json` on `deps` (same model, through either importer). Groups are matched by their
    parameter members; removed channels by the member's own indices, so group numbering may differ."""
    from ..errors import UnsupportedModelError

    if doc.get("format") != PLAN_FORMAT:
        raise UsageError(f"not a prune-compile plan (format {doc.get('format')!r}, expected {PLAN_FORMAT!r})")
    # Folded weight subgraphs are named differently by each importer: match groups on named parameters.
    by_key: dict[frozenset, Group] = {}
    for g in deps.groups:
        by_key[frozenset((param_name(m), m.axis) for m in _named(g))] = g
    plan = Plan()
    for entry in doc["groups"]:
        if not entry.get("removed"):
            continue
        key = frozenset((m["param"], m["axis"]) for m in entry["members"]
                        if not m.get("folded") and m.get("role") is not None)
        g = by_key.get(key)
        if g is None:
            names = sorted(m["param"] for m in entry["members"])[:3]
            raise UnsupportedModelError(f"plan group {entry['id']} ({', '.join(names)}, ...) matches no channel group "
                                        "of this model: the plan was made for a different model")
        removed_roots = None
        for m in _named(g):
            want = next(x for x in entry["members"] if x["param"] == param_name(m) and x["axis"] == m.axis)
            hit = np.isin(m.indices, np.asarray(want["removed"], dtype=np.int64))
            if not (hit.all(axis=1) | ~hit.any(axis=1)).all():
                raise UnsupportedModelError(f"plan removes part of a channel of '{want['param']}' (group "
                                            f"{entry['id']}): the plan does not fit this model")
            roots = np.flatnonzero(hit.all(axis=1))
            if removed_roots is None:
                removed_roots = roots
            elif not np.array_equal(roots, removed_roots):
                raise UnsupportedModelError(f"plan group {entry['id']} removes different channels from its members: "
                                            "the plan does not fit this model")
        if removed_roots is not None and len(removed_roots):
            plan.removed[g.id] = removed_roots.astype(np.int64)
    return plan
