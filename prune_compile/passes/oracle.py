"""The consumer-zeroing oracle (design §5.1): what the original model computes when the removed channels
are silenced. For an exact group, `pruned(x) == zeroed(x)`.

Zeroing consumer columns silences every path from a removed channel through a weight; zeroing producer rows too
silences the paths through activation-activation products (q·kᵀ over a removed head_dim, SE gating), where no
weight column sits between the channel and the output.
"""

from __future__ import annotations

import numpy as np

from .channel_rules import CONSUMER, PRODUCER
from .deps import DependencyResult
from .plan import Plan


def zeroed_constants(deps: DependencyResult, plan: Plan) -> dict[str, np.ndarray]:
    """Constant name → array of the original model with removed channels' producer rows and consumer columns zeroed."""
    out: dict[str, np.ndarray] = {}
    for g in deps.groups:
        removed = plan.removed_of(g)
        if not len(removed):
            continue
        for m in g.params:
            if m.role not in (PRODUCER, CONSUMER):
                continue
            arr = out.get(m.value.name)
            if arr is None:
                arr = out[m.value.name] = np.array(m.value.data, copy=True)
            index = [slice(None)] * arr.ndim
            index[m.axis] = m.indices[removed].ravel()
            arr[tuple(index)] = 0
    return out


def zeroed_graph(graph, deps: DependencyResult, plan: Plan):
    """A copy of `graph` with the removed channels silenced (see `zeroed_constants`)."""
    zeroed = zeroed_constants(deps, plan)
    copy = graph.clone(share_constants=True)  # the zeroed arrays replace, never write into, the shared ones
    for v in copy.constants():
        if v.name in zeroed:
            v.data = zeroed[v.name]
    return copy
