"""Channel dependency analysis: every group of coupled channels, with index maps, roles and a verdict.

Every (value, axis, index) is a node of an undirected graph; the op rules (`channel_rules.py`) add its edges.
Connected components are sets of channels that must be removed together (one component per channel: removing
conv1's output channel 5 removes BN channel 5, conv2's input column 5, ...). Components touching the same slots
the same number of times form one *group*; its root index space is the order of the components along a slot
where each has exactly one index (the producer's rows, when it has one). This is the design's segment analysis
done at channel granularity: concat/split boundaries, strided flatten maps, channel shuffle and head splits all
fall out of the per-channel edges, with no boundary fixpoint to iterate. Components come from scipy's C union-find.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import GraphError, UsageError
from ..ir.graph import Graph, Node, Value
from .channel_rules import CONSUMER, PASSTHROUGH, PRODUCER, RESHAPE_FREEZE, RuleSink, apply_rule
from .silencing import Silencing

_ROLE_RANK = {PRODUCER: 3, CONSUMER: 2, PASSTHROUGH: 1}


@dataclass
class Member:
    """One slot of a group: `indices[r]` are the indices along `axis` of `value` that root channel r maps to."""

    value: Value
    axis: int
    role: str | None  # producer / consumer / passthrough for parameters; None for activations
    indices: np.ndarray  # int64 [group size, k]

    @property
    def is_param(self) -> bool:
        return self.value.is_constant


@dataclass
class Group:
    id: int
    size: int
    members: list[Member]
    prunable: bool
    reason: str = ""
    exact: bool = True
    inexact_reason: str = ""

    @property
    def params(self) -> list[Member]:
        return [m for m in self.members if m.is_param and m.role is not None]

    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == PRODUCER]


@dataclass
class DependencyResult:
    groups: list[Group]
    seconds: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)
    attention: str = "head_dim"

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def group(self, gid: int) -> Group:
        return self.groups[gid]


_MAX_CARRIER_ROUNDS = 6
NO_PRODUCER = "no producer: these channels are not created by any prunable layer"


class _Analysis(RuleSink):
    def __init__(self, graph: Graph, carriers: dict[tuple[str, int], int] | None = None,
                 prefer_outer: bool = False) -> None:
        self.graph = graph
        self.prefer_outer = prefer_outer
        self.carriers = dict(carriers or {})
        self.blocks: dict[tuple[str, int], list[tuple[Value, int]]] = {}
        self.slot_of: dict[tuple[int, int], int] = {}
        self.slots: list[tuple[Value, int]] = []
        bases, sizes = [], []
        total = 0
        for v in graph.values():
            for axis, d in enumerate(v.static_shape()):
                self.slot_of[(id(v), axis)] = len(self.slots)
                self.slots.append((v, axis))
                bases.append(total)
                sizes.append(d)
                total += d
        self.base = np.asarray(bases, dtype=np.int64)
        self.size = np.asarray(sizes, dtype=np.int64)
        self.n = total
        self.src: list[np.ndarray] = []
        self.dst: list[np.ndarray] = []
        self.frozen = np.full(total, -1, dtype=np.int32)
        self.mixed = np.full(total, -1, dtype=np.int32)
        self.reasons: list[str] = []
        self.roles: dict[int, str] = {}
        self.node = ""
        self.touched: set[int] = set()  # slots the current node's rule spoke about
        self.contractions: list[tuple[Node, list[tuple[Value, int]]]] = []
        self.labels = np.zeros(0, dtype=np.int32)  # connected component of each channel, after `run`
        self._frozen_labels: np.ndarray | None = None

    # -- RuleSink -------------------------------------------------------------------------------------------
    def _slot(self, v: Value, axis: int) -> int:
        s = self.slot_of[(id(v), axis % len(v.shape))]
        self.touched.add(s)
        return s

    def couple(self, a: Value, axis_a: int, b: Value, axis_b: int) -> None:
        sa, sb = self._slot(a, axis_a), self._slot(b, axis_b)
        n = self.size[sa]
        if n != self.size[sb]:
            raise GraphError(f"node '{self.node}': channel rule couples '{a.name}' axis {axis_a} ({n}) with "
                             f"'{b.name}' axis {axis_b} ({self.size[sb]})")
        if n <= 1:
            return  # a size-1 axis carries no channel choice
        r = np.arange(n, dtype=np.int64)
        self.src.append(self.base[sa] + r)
        self.dst.append(self.base[sb] + r)

    def couple_pairs(self, a: Value, axis_a: int, ia: np.ndarray, b: Value, axis_b: int, ib: np.ndarray) -> None:
        sa, sb = self._slot(a, axis_a), self._slot(b, axis_b)
        ia, ib = np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)
        if ia.shape != ib.shape or (ia.size and (ia.max() >= self.size[sa] or ib.max() >= self.size[sb])):
            raise GraphError(f"node '{self.node}': channel rule maps indices outside '{a.name}'/'{b.name}'")
        self.src.append(self.base[sa] + ia)
        self.dst.append(self.base[sb] + ib)

    def role(self, const: Value, axis: int, role: str) -> None:
        s = self._slot(const, axis)
        if not const.is_constant:
            return
        if _ROLE_RANK[role] > _ROLE_RANK.get(self.roles.get(s, ""), 0):
            self.roles[s] = role

    def carrier(self, node, block: int, candidates: list[tuple[Value, int]]) -> int:
        key = (node.name, block)
        self.blocks[key] = candidates
        return min(self.carriers.get(key, 0), len(candidates) - 1)

    def contract(self, node, operands: list[tuple[Value, int]]) -> None:
        for v, axis in operands:
            self._slot(v, axis)  # accounted for: a sum over the slot is a consumer without a weight
        self.contractions.append((node, operands))

    def _mark(self, arr: np.ndarray, v: Value, axis: int, reason: str) -> None:
        s = self._slot(v, axis)
        lo, hi = self.base[s], self.base[s] + self.size[s]
        seg = arr[lo:hi]
        if (seg < 0).any():
            self.reasons.append(reason)
            seg[seg < 0] = len(self.reasons) - 1

    def freeze(self, v: Value, axis: int, reason: str) -> None:
        self._mark(self.frozen, v, axis, reason)

    def mixing(self, v: Value, axis: int, reason: str) -> None:
        self._mark(self.mixed, v, axis, reason)

    # -- driver ---------------------------------------------------------------------------------------------
    def run(self) -> list[Group]:
        for v in self.graph.inputs:
            for axis in range(len(v.shape)):
                self.freeze(v, axis, f"graph input '{v.name}'")
        for v in self.graph.outputs:
            for axis in range(len(v.shape)):
                self.freeze(v, axis, f"graph output '{v.name}'")
        for node in self.graph.nodes:
            self.node = node.name
            self.touched = set()
            apply_rule(self, node)
            self._freeze_unaccounted(node)
        return self._groups()

    def weightless_freeze(self, v: Value, axis: int) -> str | None:
        """Why the channels of (v, axis) are frozen when no weight touches them, so that no group reports them
        (a batch axis folded into a reshape block); None when they are not frozen. After `run`."""
        if self._frozen_labels is None:
            frozen = np.full(int(self.labels.max(initial=-1)) + 1, -1, dtype=np.int32)
            hit = self.frozen >= 0
            frozen[self.labels[hit]] = self.frozen[hit]
            self._frozen_labels = frozen
        s = self.slot_of[(id(v), axis % len(v.shape))]
        reason = self._frozen_labels[self.labels[self.base[s]]] if self.size[s] else -1
        return self.reasons[int(reason)] if reason >= 0 else None

    def _freeze_unaccounted(self, node) -> None:
        """Fail closed on the slots a rule said nothing about (a conv's spatial axes, say): a group that reaches one
        through a reshape or transpose would change that operand's shape while the op's output stays as it was."""
        touched = self.touched
        for v in [*node.inputs, *node.outputs]:
            if v is None:
                continue
            key = id(v)
            for axis, d in enumerate(v.shape):  # static: checked when the slots were made
                if d > 1 and self.slot_of[(key, axis)] not in touched:
                    self.freeze(v, axis, f"node '{node.name}': {node.op} has no channel rule for axis {axis} "
                                         f"of '{v.name}'")

    def _groups(self) -> list[Group]:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        src = np.concatenate(self.src) if self.src else np.zeros(0, np.int64)
        dst = np.concatenate(self.dst) if self.dst else np.zeros(0, np.int64)
        adj = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(self.n, self.n))
        _, labels = connected_components(adj, directed=False)
        self.labels = labels

        role_slots = np.asarray(sorted(s for s, r in self.roles.items() if r != PASSTHROUGH), dtype=np.int64)
        if not len(role_slots):
            return []
        # Components that touch a weight's rows or columns: only those can ever be pruned or reported.
        param_elems = np.concatenate([np.arange(self.base[s], self.base[s] + self.size[s]) for s in role_slots])
        keep_labels = np.unique(labels[param_elems])
        elems = np.nonzero(np.isin(labels, keep_labels))[0]
        slot_of_elem = np.searchsorted(self.base, elems, side="right") - 1
        lab = labels[elems]
        order = np.lexsort((elems, slot_of_elem, lab))
        elems, slot_of_elem, lab = elems[order], slot_of_elem[order], lab[order]

        # Signature of a component = its (slot, count) list; equal signatures = one group.
        pair_key = lab.astype(np.int64) * len(self.slots) + slot_of_elem
        pair_start = np.flatnonzero(np.r_[True, pair_key[1:] != pair_key[:-1]])
        pair_count = np.diff(np.r_[pair_start, len(pair_key)])
        pair_lab = lab[pair_start]
        pair_slot = slot_of_elem[pair_start]
        lab_start = np.flatnonzero(np.r_[True, pair_lab[1:] != pair_lab[:-1]])
        lab_end = np.r_[lab_start[1:], len(pair_lab)]
        by_signature: dict[tuple, list[int]] = {}
        comp_elem_start: dict[int, int] = {}
        for a, b in zip(lab_start.tolist(), lab_end.tolist(), strict=True):
            sig = tuple(zip(pair_slot[a:b].tolist(), pair_count[a:b].tolist(), strict=True))
            label = int(pair_lab[a])
            by_signature.setdefault(sig, []).append(label)
            comp_elem_start[label] = int(pair_start[a])

        groups: list[Group] = []
        for sig, comps in by_signature.items():
            groups.append(self._make_group(sig, comps, comp_elem_start, elems))
        groups.sort(key=lambda g: (min(self._slot(m.value, m.axis) for m in g.members if m.role == PRODUCER)
                                   if g.producers() else len(self.slots), self._first_index(g)))
        for i, g in enumerate(groups):
            g.id = i
        self._check_contractions(groups)
        return groups

    def _check_contractions(self, groups: list[Group]) -> None:
        """A group summed over with no weight in between (a product of two activations, or a reduce_sum) is exact
        only if one summed factor is zero in the zeroed model (see passes.silencing)."""
        group_of = {(id(m.value), m.axis): g for g in groups for m in g.members}
        for node, operands in self.contractions:
            g = next((group_of[k] for v, a in operands if (k := (id(v), a % len(v.shape))) in group_of), None)
            if g is None or not g.exact:
                continue
            silencing = Silencing({id(m.value): m.role for m in g.members})
            if not any(silencing.silenced(v) for v, _ in operands):
                g.exact = False
                via = silencing.culprit
                what = "products of activations" if len(operands) > 1 else "values"
                g.inexact_reason = (f"node '{node.name}': {node.op} sums these channels' {what} "
                                    "that are not zero when their producers are"
                                    + (f" ({via.op} '{via.name}' on the way)" if via is not None else ""))

    @staticmethod
    def _first_index(g: Group) -> int:
        return int(g.members[0].indices[0, 0]) if g.members and g.size else 0

    def _make_group(self, sig: tuple, comps: list[int], comp_elem_start: dict[int, int],
                    elems: np.ndarray) -> Group:
        total = sum(c for _, c in sig)
        # Element ids of each component, laid out slot by slot as in the signature: [n_comps, total].
        starts = np.asarray([comp_elem_start[c] for c in comps], dtype=np.int64)
        block = elems[starts[:, None] + np.arange(total)[None, :]]
        # Root slot: a slot where each component has one index; prefer a producer's.
        singles = [k for k, (_, c) in enumerate(sig) if c == 1]
        root_pos = next((k for k in singles if self.roles.get(sig[k][0]) == PRODUCER), singles[0] if singles else 0)
        offsets = np.cumsum([0] + [c for _, c in sig])
        root_col = offsets[root_pos]
        block = block[np.argsort(block[:, root_col], kind="stable")]
        members: list[Member] = []
        for k, (slot, count) in enumerate(sig):
            v, axis = self.slots[slot]
            idx = block[:, offsets[k]:offsets[k] + count] - self.base[slot]
            members.append(Member(v, axis, self.roles.get(slot) if v.is_constant else None, idx))
        flat = block.ravel()
        frozen_ids = self.frozen[flat]
        mixed_ids = self.mixed[flat]
        has_producer = any(m.role == PRODUCER for m in members)
        group = Group(id=-1, size=len(comps), members=members, prunable=True)
        if (frozen_ids >= 0).any():
            group.prunable = False
            group.reason = self.reasons[int(frozen_ids[frozen_ids >= 0][0])]
        elif not has_producer:
            group.prunable = False
            group.reason = NO_PRODUCER
        elif not singles:
            group.prunable = False
            group.reason = "no slot maps its channels one to one"
        if (mixed_ids >= 0).any():
            group.exact = False
            group.inexact_reason = self.reasons[int(mixed_ids[mixed_ids >= 0][0])]
        return group


ATTENTION_UNITS = ("head_dim", "heads")


def analyze(graph: Graph, attention: str = "head_dim") -> DependencyResult:
    """Find every channel group of `graph` (which must have static shapes).

    `attention` picks what a split [C] → [heads, head_dim] prunes first: "head_dim" (the same dims in every head)
    or "heads" (whole heads). Either falls back to the other where its channels end up frozen."""
    if attention not in ATTENTION_UNITS:
        raise UsageError(f"attention unit '{attention}': must be one of {', '.join(ATTENTION_UNITS)}")
    t0 = time.perf_counter()
    carriers: dict[tuple[str, int], int] = {}
    for _ in range(_MAX_CARRIER_ROUNDS):
        analysis = _Analysis(graph, carriers, prefer_outer=attention == "heads")
        groups = analysis.run()
        # Move a block's carrier on when its channels land in single-channel groups (no choice to make) or in a
        # frozen group. A freeze that comes from another reshape's non-carried axis waits one round: that block
        # may move first (qkv [3C] → [3, C] must carry C before [C] → [heads, d] can carry heads). A group that
        # only lacks a producer may gain one when another block moves: keep it. So may channels no weight touches
        # (in no group), unless they are frozen already: a batch axis folded in with the heads.
        bad: dict[tuple[int, int], str] = {}
        reported: set[tuple[int, int]] = set()
        for g in groups:
            for m in g.members:
                reported.add((id(m.value), m.axis))
                if g.size <= 1 or (not g.prunable and g.reason != NO_PRODUCER):
                    bad[(id(m.value), m.axis)] = "" if g.size <= 1 else g.reason
        moves = []
        for key, candidates in analysis.blocks.items():
            choice = min(carriers.get(key, 0), len(candidates) - 1)
            v, axis = candidates[choice]
            reason = bad.get((id(v), axis))
            if (id(v), axis) not in reported:
                reason = analysis.weightless_freeze(v, axis)
            if reason is not None and choice + 1 < len(candidates):
                foreign = reason.endswith(RESHAPE_FREEZE) and not reason.startswith(f"node '{key[0]}'")
                moves.append((key, choice + 1, foreign))
        direct = [m for m in moves if not m[2]]
        for key, choice, _ in direct or moves:
            carriers[key] = choice
        moved = bool(moves)
        if not moved:
            break
    return DependencyResult(groups, time.perf_counter() - t0,
                            {"channels": int(analysis.n), "slots": len(analysis.slots), "groups": len(groups)},
                            attention)
