"""The dataflow IR: `Value` (a tensor edge), `Node` (one normalized op) and `Graph`.

Use-def links are kept in sync by the containers themselves: assigning `node.inputs` or `node.outputs`
updates every affected `Value.users` / `Value.producer`, so no pass can leave a dangling edge.
Op semantics follow ONNX (opset 18) with normalized lower-case names and constant operands
(reshape targets, slice bounds, split sizes...) lifted into attributes; see `ops.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import GraphError

Dim = int | str
Shape = tuple[Dim, ...]


@dataclass(frozen=True)
class Provenance:
    """Where a constant came from, in the input model's own names.

    kind: "torch_parameter", "torch_buffer", "torch_constant", "onnx_initializer", "onnx_constant_node"
    or "folded" (computed at import from the constants named in `sources`). `computed`: the fold did arithmetic
    (weight standardization, a scale times a weight), not only moved elements (reshape, transpose, expand).
    `index_map`: for a torch fold, which source element each element is (see ir/fold_index_map.py); None when
    the fold's indexing was not tracked.
    """

    kind: str
    name: str
    sources: tuple[str, ...] = ()
    computed: bool = False
    index_map: tuple | None = None

    def __str__(self) -> str:
        if self.kind == "folded":
            return f"folded({', '.join(self.sources)})"
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class OpaqueInfo:
    """What is needed to write an op we do not understand back unchanged.

    For ONNX nodes: `op_type`, `domain` and the original attribute protos. For torch nodes: the ATen target name
    (such nodes cannot be exported to ONNX and say so).
    """

    op_type: str
    domain: str = ""
    attributes: tuple[Any, ...] = ()
    source: str = "onnx"
    why: str = ""  # why an op the importer otherwise maps stayed opaque (a later opset changed it)


class Value:
    """A tensor edge. A constant value carries `data` (numpy) and `provenance`."""

    __slots__ = ("name", "shape", "dtype", "data", "provenance", "producer", "users")

    def __init__(
        self,
        name: str,
        shape: Sequence[Dim] | None,
        dtype: np.dtype | type | str,
        data: np.ndarray | None = None,
        provenance: Provenance | None = None,
    ) -> None:
        self.name = name
        self.dtype = np.dtype(dtype)
        if data is not None:
            data = np.asarray(data)
            if shape is None:
                shape = data.shape
        self.shape: Shape | None = None if shape is None else tuple(shape)
        self.data = data
        self.provenance = provenance
        self.producer: Node | None = None
        self.users: list[Node] = []

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    @property
    def rank(self) -> int:
        if self.shape is None:
            raise GraphError(f"value '{self.name}' has no known shape")
        return len(self.shape)

    def static_shape(self) -> tuple[int, ...]:
        if self.shape is None or not all(isinstance(d, int) for d in self.shape):
            raise GraphError(f"value '{self.name}' has a non-static shape {self.shape}")
        return tuple(int(d) for d in self.shape)

    def __repr__(self) -> str:
        kind = "const " if self.is_constant else ""
        return f"Value({kind}{self.name!r}, {_fmt_shape(self.shape)}, {self.dtype})"


class Node:
    """One op. `op` is a normalized name from the op registry, or "opaque" with `opaque` set."""

    __slots__ = ("op", "name", "attrs", "origin", "opaque", "scope", "_inputs", "_outputs")

    def __init__(
        self,
        op: str,
        name: str,
        inputs: Sequence[Value | None] = (),
        outputs: Sequence[Value] = (),
        attrs: dict[str, Any] | None = None,
        origin: str = "",
        opaque: OpaqueInfo | None = None,
        scope: str = "",
    ) -> None:
        self.op = op
        self.name = name
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.origin = origin or name
        self.opaque = opaque
        self.scope = scope  # torch: the path of the module whose forward made this op ("" if unknown)
        self._inputs: tuple[Value | None, ...] = ()
        self._outputs: tuple[Value, ...] = ()
        self.inputs = inputs
        self.outputs = outputs

    # Inputs may contain None for an omitted optional input (ONNX's empty name).
    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return self._inputs

    @inputs.setter
    def inputs(self, values: Sequence[Value | None]) -> None:
        for v in self._inputs:
            if v is not None:
                v.users.remove(self)
        self._inputs = tuple(values)
        for v in self._inputs:
            if v is not None:
                v.users.append(self)

    @property
    def outputs(self) -> tuple[Value, ...]:
        return self._outputs

    @outputs.setter
    def outputs(self, values: Sequence[Value]) -> None:
        for v in self._outputs:
            v.producer = None
        for v in values:
            if v.producer is not None and v.producer is not self:
                raise GraphError(f"value '{v.name}' already produced by node '{v.producer.name}'")
            if v.is_constant:
                raise GraphError(f"node '{self.name}' cannot produce constant value '{v.name}'")
        self._outputs = tuple(values)
        for v in self._outputs:
            v.producer = self

    def set_input(self, index: int, value: Value | None) -> None:
        items = list(self._inputs)
        items[index] = value
        self.inputs = items

    def detach(self) -> None:
        """Disconnect from all values (used when removing the node from a graph)."""
        self.inputs = ()
        self.outputs = ()

    def __repr__(self) -> str:
        return f"Node({self.op}, {self.name!r})"


@dataclass
class Graph:
    """Nodes in topological order, graph inputs and outputs, plus the metadata the exporters need."""

    name: str = "graph"
    nodes: list[Node] = field(default_factory=list)
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    # ONNX opset imports ({domain: version}) and IR version of the source model, when it was ONNX.
    opset_imports: dict[str, int] = field(default_factory=dict)
    ir_version: int | None = None
    source: str = ""

    # -- building -----------------------------------------------------------------------------------------
    def add_node(
        self,
        op: str,
        inputs: Sequence[Value | None],
        outputs: Sequence[Value],
        attrs: dict[str, Any] | None = None,
        name: str | None = None,
        origin: str = "",
        opaque: OpaqueInfo | None = None,
        scope: str = "",
    ) -> Node:
        node = Node(op, name or f"{op}_{len(self.nodes)}", inputs, outputs, attrs, origin, opaque, scope)
        self.nodes.append(node)
        return node

    def remove_node(self, node: Node) -> None:
        if any(v.users for v in node.outputs) or any(v in self.outputs for v in node.outputs):
            raise GraphError(f"cannot remove node '{node.name}': its outputs are still used")
        node.detach()
        self.nodes.remove(node)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        for user in list(old.users):
            user.inputs = [new if v is old else v for v in user.inputs]
        self.outputs = [new if v is old else v for v in self.outputs]

    # -- queries ------------------------------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        """Every value reachable from the graph (inputs, node inputs and outputs), each once, in order."""
        seen: set[int] = set()
        for v in self._all_value_refs():
            if id(v) not in seen:
                seen.add(id(v))
                yield v

    def constants(self) -> list[Value]:
        return [v for v in self.values() if v.is_constant]

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(name)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            key = f"opaque:{n.opaque.op_type}" if n.opaque else n.op
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def _all_value_refs(self) -> Iterable[Value]:
        yield from self.inputs
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    yield v
            yield from n.outputs
        yield from self.outputs

    # -- whole-graph operations ---------------------------------------------------------------------------
    def clone(self, share_constants: bool = False) -> Graph:
        """A deep copy (constant arrays copied too), so a pass can rewrite it and leave this graph intact.
        `share_constants`: the copy's constants hold this graph's arrays (for a caller that only replaces them,
        never writes into them: no second copy of a large model's weights)."""
        vmap: dict[int, Value] = {}

        def copy_value(v: Value | None) -> Value | None:
            if v is None:
                return None
            if id(v) not in vmap:
                data = None if v.data is None else v.data if share_constants else v.data.copy()
                vmap[id(v)] = Value(v.name, v.shape, v.dtype, data=data, provenance=v.provenance)
            return vmap[id(v)]

        g = Graph(self.name, [], [copy_value(v) for v in self.inputs], [], dict(self.opset_imports),
                  self.ir_version, self.source)
        for n in self.nodes:
            g.nodes.append(Node(n.op, n.name, [copy_value(v) for v in n.inputs], [copy_value(v) for v in n.outputs],
                                copy.deepcopy(n.attrs), n.origin, n.opaque, n.scope))
        g.outputs = [copy_value(v) for v in self.outputs]
        return g

    def toposort(self) -> None:
        """Reorder nodes topologically, keeping the current order among independent nodes (stable)."""
        position = {id(n): i for i, n in enumerate(self.nodes)}
        pending = {id(n): sum(1 for v in n.inputs if v is not None and v.producer is not None) for n in self.nodes}
        import heapq

        ready = [(position[id(n)], n) for n in self.nodes if pending[id(n)] == 0]
        heapq.heapify(ready)
        order: list[Node] = []
        while ready:
            _, n = heapq.heappop(ready)
            order.append(n)
            for out in n.outputs:
                for user in out.users:
                    # A user reading the same value twice appears twice in `users`: one decrement per edge.
                    pending[id(user)] -= 1
                    if pending[id(user)] == 0:
                        heapq.heappush(ready, (position[id(user)], user))
        if len(order) != len(self.nodes):
            stuck = [n.name for n in self.nodes if pending[id(n)] > 0][:5]
            raise GraphError(f"graph has a cycle or dangling producer near nodes {stuck}")
        self.nodes = order

    def cleanup(self) -> int:
        """Remove nodes whose outputs reach no graph output. Returns how many were removed."""
        live: set[int] = set()
        stack = [v.producer for v in self.outputs if v.producer is not None]
        while stack:
            n = stack.pop()
            if id(n) in live:
                continue
            live.add(id(n))
            stack.extend(v.producer for v in n.inputs if v is not None and v.producer is not None)
        dead = [n for n in self.nodes if id(n) not in live]
        for n in dead:
            n.detach()
        self.nodes = [n for n in self.nodes if id(n) in live]
        return len(dead)

    def verify(self) -> None:
        """Check links, order, names, constants and (where the op registry has a rule) shapes."""
        from .verify import verify_graph

        verify_graph(self)

    def dump(self, max_nodes: int | None = None) -> str:
        """A readable text form: one line per node, `%out[shape] = op(%in, ...) {attrs}`."""
        lines = [f"graph {self.name} ({len(self.nodes)} nodes)"]
        for v in self.inputs:
            lines.append(f"  input  %{v.name}: {_fmt_shape(v.shape)} {v.dtype}")
        consts = self.constants()
        lines.append(f"  {len(consts)} constants, {sum(int(c.data.size) for c in consts)} elements")
        shown = self.nodes if max_nodes is None else self.nodes[:max_nodes]
        for n in shown:
            outs = ", ".join(f"%{v.name}{_fmt_shape(v.shape)}" for v in n.outputs)
            ins = ", ".join("_" if v is None else (f"@{v.name}" if v.is_constant else f"%{v.name}") for v in n.inputs)
            op = f"opaque<{n.opaque.domain + '::' if n.opaque.domain else ''}{n.opaque.op_type}>" if n.opaque else n.op
            attrs = "" if not n.attrs else " {" + ", ".join(f"{k}={_fmt_attr(a)}" for k, a in n.attrs.items()) + "}"
            lines.append(f"  {outs} = {op}({ins}){attrs}")
        if max_nodes is not None and len(self.nodes) > max_nodes:
            lines.append(f"  ... {len(self.nodes) - max_nodes} more nodes")
        for v in self.outputs:
            lines.append(f"  output %{v.name}: {_fmt_shape(v.shape)} {v.dtype}")
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        consts = self.constants()
        return {
            "name": self.name,
            "source": self.source,
            "nodes": len(self.nodes),
            "constants": len(consts),
            "parameters": int(sum(c.data.size for c in consts if c.dtype.kind == "f")),
            "inputs": {v.name: list(v.shape or ()) for v in self.inputs},
            "outputs": {v.name: list(v.shape or ()) for v in self.outputs},
            "ops": self.op_counts(),
            "opaque": sum(1 for n in self.nodes if n.opaque is not None),
        }


def _fmt_shape(shape: Shape | None) -> str:
    return "[?]" if shape is None else "[" + ",".join(str(d) for d in shape) + "]"


def _fmt_attr(a: Any) -> str:
    if isinstance(a, np.ndarray):
        return f"array{list(a.shape)}"
    if isinstance(a, (list, tuple)) and len(a) > 8:
        return f"[{', '.join(map(str, a[:8]))}, ...]"
    return repr(a)
