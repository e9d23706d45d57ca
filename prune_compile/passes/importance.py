"""Group-level channel importance: one score per root channel of a group, aggregated over all its members.

Criteria: `l1`, `l2` (weight magnitude over every parameter member), `bn_scale` (|gamma| of the group's
BatchNorm scales; groups without one fall back to L2 and are counted), `random` (seeded baseline), `taylor`
(first-order Taylor, |w · dL/dw| summed over members, from gradients the caller computed on its own loss).

Each member's contribution is divided by its mean so no single layer dominates a group; `normalized` then
divides a group's scores by their mean so scores are comparable across groups (global ranking).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from .deps import Group, Member

CRITERIA = ("l1", "l2", "bn_scale", "random", "taylor")


@dataclass
class ImportanceStats:
    """What scoring had to do beyond the criterion (goes into the report)."""

    fallbacks: dict[str, int] = field(default_factory=dict)

    def note(self, what: str) -> None:
        self.fallbacks[what] = self.fallbacks.get(what, 0) + 1


def _per_root(m: Member, per_index: np.ndarray) -> np.ndarray:
    """Sum a member's per-index score over the indices each root channel owns in it."""
    return per_index[m.indices].sum(axis=1)


def _per_index(m: Member, values: np.ndarray) -> np.ndarray:
    """Sum `values` (shaped like the member's tensor) over everything but the member's axis."""
    return np.moveaxis(values, m.axis, 0).reshape(values.shape[m.axis], -1).sum(axis=1)


_CHUNK_ELEMENTS = 1 << 23  # 64 MB of float64 at a time


def _magnitude(m: Member, power: int) -> np.ndarray:
    """|w|^power summed per index. A tensor over _CHUNK_ELEMENTS goes a few indices at a time: a float64 copy of a
    whole 1 GiB weight would take 2 GiB, and its abs and power as much again. (Its sums may then differ from one
    pass's in the last bit: numpy orders a reduction by the memory layout; each way is deterministic.)"""
    data = np.asarray(m.value.data)
    if data.size <= _CHUNK_ELEMENTS:
        return _per_root(m, _per_index(m, np.abs(np.asarray(data, dtype=np.float64)) ** power))
    count = data.shape[m.axis]
    step = max(1, _CHUNK_ELEMENTS // max(1, data.size // max(1, count)))
    parts = [_per_index(m, np.abs(np.asarray(np.take(data, np.arange(lo, min(lo + step, count)), axis=m.axis),
                                             dtype=np.float64)) ** power)
             for lo in range(0, count, step)]
    return _per_root(m, np.concatenate(parts))


def _add_normalized(score: np.ndarray, part: np.ndarray) -> None:
    mean = part.mean() if part.size else 0.0
    score += part / mean if mean > 0 else part


def _bn_scale_members(group: Group) -> list[Member]:
    """Parameter members that are the scale (gamma) input of a batch_norm node."""
    out = []
    for m in group.params:
        if any(n.op == "batch_norm" and len(n.inputs) > 1 and n.inputs[1] is m.value for n in m.value.users):
            out.append(m)
    return out


def group_importance(group: Group, criterion: str = "l2", *, gradients: Mapping[str, np.ndarray] | None = None,
                     seed: int = 0, stats: ImportanceStats | None = None, name_of=None) -> np.ndarray:
    """Per-root-channel importance of `group` under `criterion` (higher = keep)."""
    if criterion not in CRITERIA:
        raise UsageError(f"--importance {criterion}: unknown criterion ({', '.join(CRITERIA)})")
    score = np.zeros(group.size, dtype=np.float64)
    if criterion == "random":
        return np.random.default_rng([seed, group.id]).random(group.size)
    if criterion == "bn_scale":
        bns = _bn_scale_members(group)
        if bns:
            for m in bns:
                _add_normalized(score, _per_root(m, np.abs(np.asarray(m.value.data, dtype=np.float64))))
            return score
        if stats is not None:
            stats.note("bn_scale: groups without a BatchNorm scored by L2")
        criterion = "l2"
    if criterion == "taylor":
        if gradients is None:
            raise UsageError("--importance taylor needs gradients (the Python API's `gradients=`, from a loss)")
        used = 0
        for m in group.params:
            grad = gradients.get(name_of(m) if name_of else m.value.name)
            if grad is None or np.shape(grad) != np.shape(m.value.data):
                continue
            prod = np.abs(np.asarray(m.value.data, dtype=np.float64) * np.asarray(grad, dtype=np.float64))
            _add_normalized(score, _per_root(m, _per_index(m, prod)))
            used += 1
        if used:
            return score
        if stats is not None:
            stats.note("taylor: groups without gradients scored by L2")
        criterion = "l2"
    power = 1 if criterion == "l1" else 2
    for m in group.params:
        _add_normalized(score, _magnitude(m, power))
    return score


def normalized(score: np.ndarray) -> np.ndarray:
    """Scores divided by their group mean: comparable across groups of different sizes and layer types."""
    mean = score.mean() if score.size else 0.0
    return score / mean if mean > 0 else score
