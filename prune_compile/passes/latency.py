"""Latency-aware planning: choose kept channel counts from measured latencies, not from MACs.

MACs predict latency badly: kernels run at different efficiencies per shape, channel counts that are not a multiple
of the vector width waste lanes, and small layers are dominated by overheads. So this policy measures.

1. **Latency table**: every weight layer (conv, linear, gemm, matmul with a constant weight) is built alone as a
   one-node model at the channel counts the search asks for, compiled by the engine and timed; results are
   memoized by shape, so repeated blocks cost one measurement. Engines: ONNX Runtime (`Timer`; a conv is timed
   among copies of itself, as it runs inside a model, see `Timer.layer`), or TVM's tuned
   code for the cpu target (`backends/tvm/latency_timer.py`: a layer's time is what tuning measured for its
   kernels, a conv's with the epilogue the whole model fuses into it, `conv_epilogue`; records persist in the
   tuning database). The model's predicted latency is its measured
   latency minus the full-width layer times plus the current ones (elementwise work follows roughly).
2. **Greedy search** (NetAdapt-like, with the table in place of retraining): from the full model, repeatedly
   shrink the group whose next candidate count loses the least importance per millisecond saved. Candidates
   are multiples of the vector width `step`, so a count whose kernel is no faster than its neighbour's is
   never worth taking. The trajectory goes as far as the first step the table predicts at the target. When an
   entry is expensive (TVM: a tuning run), the table is lazy: candidates are ranked by estimates scaled from
   the layer's measured shapes, and only those ranked ahead of the best measured one are measured.
3. **Calibration on the real model**: a step part of the way to the target is timed as a whole pruned model, and
   the greedy goes on to where the table's saving, scaled by what that measurement says it is off, reaches the
   target; that deepest step is timed, and while it is slower than the target the trajectory is extended (by what
   its measurement says the table is off); then a search over the trajectory on the *measured* latency
   (interpolating between the bracketing steps' measurements), so the target is met on the real graph, not on the
   table's sum. Of the timed plans that meet the target (at most 2% over, 5% under), the one that loses the least
   importance is kept. The table holds only the layer shapes that this needed.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from ..ir import Graph, export_onnx
from ..ir.graph import Node, Value
from ..ir.ops import OPS, RECURRENT_GATES, recurrent_shapes
from ..recent_models import RecentModels
from .deps import DependencyResult, Group
from .importance import normalized

LAYER_OPS = ("conv", "linear", "gemm", "matmul", *RECURRENT_GATES)
# the bisection times a step and the original alternately, this many slices of this many seconds each
PAIR_SLICES, PAIR_SLICE_S = 5, 0.2
# a slice whose original reads more than QUIET x the fastest original of the search was timed in a slow phase (the
# fastest of a model's runs spreads ~0.5% in a fast phase; a phase 6% slow moved CREPE tiny's 0.439x plan to 0.474x);
# slices are added until PAIR_SLICES are quiet, for at most PAIR_PATIENCE_S seconds or PAIR_MAX_SLICES slices
QUIET, PAIR_PATIENCE_S, PAIR_MAX_SLICES = 1.04, 60.0, 100
# and for at most SEARCH_WAIT_SLICES such added slices in the whole search: in a bad hour (mobilenet_v2's original at
# 1.03-1.14x its fastest in most slices, 1.7-2x in a quarter) pairs waited 40-105 slices each, and a search that took
# 110 s took 337 s, or more than 15 minutes. Spent, a pair decides on its first PAIR_SLICES (see quiet_or_all)
SEARCH_WAIT_SLICES = 200
# the deepest step over the target is re-timed at most this many times before the target is called unreachable
UNREACHABLE_RETRIES = 6
# a plan at most TARGET_SLACK over the target and at most REFINE_WITHIN under it meets the target; of the timed plans
# that do, the search keeps the one that loses the least importance (one plan's measured fraction spreads ~1% from run
# to run). When no timed step meets it, REFINE_MOVES single-group moves between the two bracketing steps are timed
TARGET_SLACK, REFINE_WITHIN, REFINE_MOVES = 0.02, 0.05, 3
# the trajectory is extended at most this many times past the first step the table predicts at the target, each time
# aiming at this fraction of the target by the last measurement (see latency_plan)
MAX_EXTENSIONS, EXTEND_AIM = 8, 0.9
# the greedy first goes CALIBRATE_AT of the way to the target by the table's prediction and times that step on the
# whole model; the rest of the way is scaled by how far the table's predicted saving was off there (clamped to
# CALIBRATE_SCALE). TVM's resnet18 table predicted 0.75-0.86 of the measured saving, less the deeper the plan (step
# 16: 0.687x predicted, 0.593x measured; step 33: 0.491x, 0.372x), so the greedy tuned 315 layer shapes to reach a
# step at 0.37x for a 0.5x target, where 236 reached the chosen one. (That table kept the original's time beyond its
# kernels constant; scaled with them (LatencyTable.predicted_ms), it still erred 0.94-1.23 in one run, by depth)
CALIBRATE_AT, CALIBRATE_SCALE = 0.6, (0.5, 2.0)
# checkpoints at most: the factor drifts with depth (another resnet18 run on TVM: 1.16 at 0.69x predicted, 1.22 at
# 0.61x, 1.33 at 0.56x), so a second checkpoint, nearer the target, scales the rest of the way by what it measures
CHECKPOINTS = 2
# the ONNX Runtime table times a conv as this many copies of itself (see Timer.layer)
LAYER_COPIES = 8
# elementwise ops a compiler fuses into the conv before them (TVM's FuseOps: one kernel computes them on its output)
EPILOGUE_OPS = ("relu", "clip", "leaky_relu", "sigmoid", "hard_sigmoid", "hard_swish", "silu", "gelu")


def quiet_indices(readings: Sequence[float], fastest: float | None = None, within: float = QUIET) -> list[int]:
    """Which readings of one model were taken in the machine's fast phase: within `within` x the fastest (of these,
    or `fastest` when given). For 20-60 s at a time one of the two cores is taken, and every run pays for it."""
    floor = min(readings) if fastest is None else fastest
    return [i for i, ms in enumerate(readings) if ms <= within * floor]


def quiet_or_all(quiet: Sequence[int], count: int, wanted: int) -> list[int]:
    """`quiet` (indices of `count` readings) when it holds at least half of the `wanted` readings, else all of
    them: a slow phase outlasted the measurement, and its readings are all there is."""
    return list(quiet) if len(quiet) >= (wanted + 1) // 2 else list(range(count))


@dataclass
class Layer:
    """A weight layer and how each group's kept count reaches its weight: (group id, weight axis, indices per root)."""

    node: Node
    weight: Value
    terms: list[tuple[int, int, int]] = field(default_factory=list)


def weight_layer_nodes(graph: Graph) -> list[Node]:
    """The weight layers a latency table times: conv, linear, gemm, matmul, LSTM, GRU, RNN; constant weight on a
    computed input."""
    return [n for n in graph.nodes
            if n.op in LAYER_OPS and len(n.inputs) > 1 and n.inputs[1] is not None and n.inputs[1].is_constant
            and n.inputs[0] is not None and not n.inputs[0].is_constant]


def find_layers(graph: Graph, deps: DependencyResult) -> list[Layer]:
    by_weight = {id(n.inputs[1]): Layer(n, n.inputs[1]) for n in weight_layer_nodes(graph)}
    for g in deps.groups:
        if not g.prunable:
            continue
        for m in g.members:
            layer = by_weight.get(id(m.value))
            if layer is not None:
                layer.terms.append((g.id, m.axis, int(m.indices.shape[1]) if m.indices.ndim > 1 else 1))
    return [layer for layer in by_weight.values() if layer.terms]


class Timer:
    """Times ONNX models with ONNX Runtime (the backend the user deploys with by default): the fastest of the runs,
    what the code costs rather than what other processes on the machine cost it (with the median, a loaded machine
    made the 0.6x target on the tiny default model look unreachable: 0.81x at most).

    The timer protocol: `timer(proto, feeds, min_seconds) -> ms` times a whole model; `timer.layer(proto, feeds)`
    a one-layer model for the table (here the same; TVM's timer reads its tuned kernels' times instead, see
    backends/tvm/latency_timer.py); `engine` names what measures, `models_timed` counts."""

    engine = "onnxruntime"
    lazy_table = False  # an entry takes ~0.2 s: the greedy measures every candidate (see latency_plan's best_move)
    # what the whole model takes beyond the table's layers is the same for every plan (see LatencyTable.predicted_ms):
    # the layers are timed in models like the whole one, and what is left (pools, session overhead) shrinks little
    overhead_scales = False

    def __init__(self, threads: int | None = None, min_seconds: float = 0.15, min_runs: int = 7) -> None:
        self.threads, self.min_seconds, self.min_runs = threads, min_seconds, min_runs
        self.models_timed = 0
        self._sessions = RecentModels()  # a mobilenet_v2 session took 0.02-0.08 s to build, a slice is 0.2 s

    def __call__(self, proto, feeds: dict[str, np.ndarray], min_seconds: float | None = None) -> float:
        from ..backends import ort

        sess = self._sessions.get(proto, lambda p: ort.session(p, threads=self.threads))
        for _ in range(2):
            sess.run(None, feeds)
        times: list[float] = []
        deadline = time.perf_counter() + (self.min_seconds if min_seconds is None else min_seconds)
        while len(times) < self.min_runs or time.perf_counter() < deadline:
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t)
            if len(times) >= 2000:
                break
        self.models_timed += 1
        return float(np.min(times)) * 1e3

    def layer(self, proto, feeds: dict[str, np.ndarray]) -> float:
        """A conv as the model runs it. ONNX Runtime runs a model's convs in its blocked NCHWc layout between one
        reorder in and one out, and pays a run's overhead once; a conv timed alone pays both, and the reorders scale
        with its channel counts (mobilenet_v2's 96-channel depthwise conv at 14x14: 13 us alone, 5 us among its like),
        so the table credited small layers with savings the model never sees. So LAYER_COPIES copies are timed
        together (see summed_copies) and the time divided."""
        if [n.op_type for n in proto.graph.node] != ["Conv"]:
            return self(proto, feeds)
        return self(summed_copies(proto, LAYER_COPIES), feeds) / LAYER_COPIES


def summed_copies(proto, copies: int):
    """A one-conv model with `copies` convs of the same shape on its input, each with its own random weights (shared
    ones would let common-subexpression elimination merge the convs), their outputs summed. ONNX Runtime fuses each Add
    into the conv after it (the NCHWc conv's sum input), so the model runs just the convs, in NCHWc, between one
    input reorder and one output reorder."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    (conv,) = graph.node
    constants = {i.name: i for i in graph.initializer}
    rng = np.random.default_rng(1)
    output = conv.output[0]
    conv.output[0] = acc = f"{output}.copy0"
    for c in range(1, copies):
        inputs = list(conv.input)
        for j, name in enumerate(conv.input):
            if name in constants:
                inputs[j] = f"{name}.copy{c}"
                weights = _random(tuple(constants[name].dims), rng)
                graph.initializer.append(numpy_helper.from_array(weights, inputs[j]))
        copy = helper.make_node("Conv", inputs, [f"{output}.copy{c}"], name=f"{conv.name}.copy{c}")
        copy.attribute.extend(conv.attribute)
        total = output if c == copies - 1 else f"{output}.sum{c}"
        graph.node.extend([copy, helper.make_node("Add", [acc, copy.output[0]], [total])])
        acc = total
    onnx.checker.check_model(model)
    return model


def conv_epilogue(graph: Graph, conv: Node) -> tuple[tuple, ...]:
    """What the model's kernel for `conv` computes on its output once batch norms are folded, as TVM fuses it:
    ("bias",) for the conv's bias or a batch_norm folded into it, ("add",) for a residual add, (op, attrs) for an
    elementwise activation, along values each used by one node. A residual add of two conv chains goes to the chain
    of its first operand (torchvision's `out += identity`: TVM fused resnet18's second 3x3 conv with it, and the
    1x1 downsample conv with its bias alone)."""
    from .fold_bn import folded_into

    ops: list[tuple] = [("bias",)] if len(conv.inputs) > 2 and conv.inputs[2] is not None else []
    v = conv.outputs[0]
    while len(v.users) == 1 and v not in graph.outputs:
        (user,) = v.users
        if user.op == "batch_norm" and folded_into(graph, user) is conv:
            ops[:1] = [("bias",)]
        elif user.op == "add" and len(user.inputs) == 2 and all(
                i is not None and not i.is_constant and i.shape == v.shape for i in user.inputs) and (
                user.inputs[0] is v or not _fusable_chain(graph, user.inputs[0])):
            ops.append(("add",))
        elif user.op in EPILOGUE_OPS and len(user.inputs) == 1:
            ops.append((user.op, tuple(sorted(user.attrs.items()))))
        else:
            break
        v = user.outputs[0]
    return tuple(ops)


def _fusable_chain(graph: Graph, value: Value) -> bool:
    """Whether `value` comes from a conv through values each used by one node (a kernel an add can join)."""
    while value.producer is not None and len(value.users) == 1 and value not in graph.outputs:
        node = value.producer
        if node.op == "conv":
            return True
        if node.op not in ("batch_norm", "add", *EPILOGUE_OPS) or node.inputs[0] is None:
            return False
        value = node.inputs[0]
    return False


def timed_proto(graph: Graph):
    """The ONNX model a whole-model timing runs: `graph` as the backends build it, batch_norms folded into their
    convs (ONNX Runtime folds them itself, the TVM compile step with passes/fold_bn; TVM timing the unfolded graph
    ran each BN as its own pass over the conv's output, in NCHW between layout transforms: 70% of the demo model's
    time, none of it in the latency table, and the table's ranking of the layers was wrong)."""
    from .fold_bn import folded_copy

    return export_onnx(folded_copy(graph)[0])


def _random(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


class LatencyTable:
    def __init__(self, graph: Graph, deps: DependencyResult, timer: Timer) -> None:
        self.graph, self.deps, self.timer = graph, deps, timer
        self.layers = find_layers(graph, deps)
        self.by_group: dict[int, list[Layer]] = {}
        for layer in self.layers:
            for gid, _, _ in layer.terms:
                self.by_group.setdefault(gid, []).append(layer)
        # a timer whose layer entries should be the whole model's kernels (TVM: the tuning records the whole model's
        # build reuses) has each conv's fused epilogue timed with it
        self.epilogue = {id(layer): conv_epilogue(graph, layer.node) for layer in self.layers
                         if layer.node.op == "conv" and getattr(timer, "layer_epilogues", False)}
        # how the original's time beyond its layers changes with them (see predicted_ms); stand-in timers may not say
        self.overhead_scales = bool(getattr(timer, "overhead_scales", False))
        self._full: float | None = None
        self.cache: dict[tuple, float] = {}
        # per layer, the lowest ms per weight element of the shapes of it measured: what estimate_ms scales by
        self.lowest_rate: dict[int, float] = {}
        self.rng = np.random.default_rng(0)

    def _shapes(self, layer: Layer, removed: dict[int, int]) -> tuple[tuple, tuple, int]:
        """(input shape, weight shape, conv group) of `layer` with `removed[g]` root channels gone from group g."""
        w = list(layer.weight.shape)
        for gid, axis, per_root in layer.terms:
            w[axis] -= removed.get(gid, 0) * per_root
        x = list(layer.node.inputs[0].shape)
        n = layer.node
        group = int(n.attrs.get("group", 1)) if n.op == "conv" else 1
        if n.op == "conv":
            depthwise = group > 1 and group == layer.weight.shape[0] and layer.weight.shape[1] == 1
            if depthwise:
                group = w[0]
            x[1] = w[1] * group
        elif n.op == "linear" or n.op in RECURRENT_GATES:  # recurrent W: [directions, gates*hidden, features]
            x[-1] = w[-1]
        else:  # gemm / matmul with the weight as second input: [in, out] unless gemm's transB
            x[-1] = w[1] if (n.op == "gemm" and n.attrs.get("transB")) else w[0]
        return tuple(x), tuple(w), group

    def _key(self, layer: Layer, removed: dict[int, int]) -> tuple[tuple, dict, tuple, tuple] | None:
        """(memo key, attributes, input shape, weight shape) of `layer` at `removed`; None when no channel is left."""
        x, w, group = self._shapes(layer, removed)
        n = layer.node
        if min(x) <= 0 or min(w) <= 0:
            return None
        attrs = dict(n.attrs)
        if n.op == "conv":
            attrs["group"] = group
        epilogue = self.epilogue.get(id(layer), ())
        key = (n.op, tuple(sorted((k, str(v)) for k, v in attrs.items())), x, w, len(n.inputs), repr(epilogue))
        return key, attrs, x, w

    def layer_ms(self, layer: Layer, removed: dict[int, int]) -> float:
        shaped = self._key(layer, removed)
        if shaped is None:
            return 0.0
        key, attrs, x, w = shaped
        if key not in self.cache:
            self.cache[key] = self._measure(layer.node, attrs, x, w, self.epilogue.get(id(layer), ()))
        rate = self.cache[key] / math.prod(w)
        self.lowest_rate[id(layer)] = min(rate, self.lowest_rate.get(id(layer), rate))
        return self.cache[key]

    def is_measured(self, layer: Layer, removed: dict[int, int]) -> bool:
        shaped = self._key(layer, removed)
        return shaped is None or shaped[0] in self.cache

    def estimate_ms(self, layer: Layer, removed: dict[int, int]) -> float:
        """`layer_ms` when the shape was measured, else an estimate that measures nothing: the shape's MACs at the
        lowest ms per MAC of the shapes of this layer measured so far (its MACs follow its weight's size; the
        spatial sizes are the layer's own). Lowest, so that an estimate is rarely slower than what the kernel
        measures: the lazy greedy (latency_plan) trusts a move whose measured cost beats every other's estimate."""
        shaped = self._key(layer, removed)
        if shaped is None:
            return 0.0
        key, _, _, w = shaped
        if key in self.cache:
            return self.cache[key]
        if id(layer) not in self.lowest_rate:
            self.layer_ms(layer, {})  # the full width: the search measures it first anyway
        return math.prod(w) * self.lowest_rate[id(layer)]

    def _measure(self, node: Node, attrs: dict, x: tuple, w: tuple, epilogue: tuple[tuple, ...] = ()) -> float:
        g = Graph(name="layer")
        xv = Value("x", x, np.float32)
        inputs = [xv, Value("w", w, np.float32, _random(w, self.rng))]
        if node.op in RECURRENT_GATES:
            return self._time(g, *self._recurrent_layer(node, attrs, inputs))
        for i, extra in enumerate(node.inputs[2:]):
            if extra is None:
                inputs.append(None)
                continue
            shape = list(extra.shape)
            if shape and node.op in ("conv", "linear", "gemm"):
                shape[-1] = w[0] if node.op != "gemm" or attrs.get("transB") else w[1]
            inputs.append(Value(f"b{i}", tuple(shape), np.float32, _random(shape, self.rng)))
        if ("bias",) in epilogue and (len(inputs) < 3 or inputs[2] is None):  # a folded batch_norm gives it one
            inputs[2:3] = [Value("b", (w[0],), np.float32, _random((w[0],), self.rng))]
        out_shape = OPS[node.op].infer(_Shaped(node.op, attrs), [v.shape if v is not None else None
                                                                for v in inputs])[0]
        return self._time(g, node.op, attrs, inputs, [Value("y", out_shape, np.float32)], epilogue)

    def _recurrent_layer(self, node: Node, attrs: dict, inputs: list) -> tuple[str, dict, list, list]:
        """A recurrent layer at W's shape: R, B and the peepholes follow its hidden size; the initial states and
        sequence lengths are left out (they cost nothing per step)."""
        (x, w), (directions, rows, _) = inputs, inputs[1].shape
        hidden = rows // RECURRENT_GATES[node.op]
        attrs = {**attrs, "hidden_size": hidden}
        shapes = {2: (directions, rows, hidden), 3: (directions, 2 * rows), 7: (directions, 3 * hidden)}
        for k, shape in shapes.items():
            present = len(node.inputs) > k and node.inputs[k] is not None
            inputs.extend([None] * (k - len(inputs)))
            inputs.append(Value(f"in{k}", shape, np.float32, _random(shape, self.rng)) if present else None)
        while inputs[-1] is None:
            inputs.pop()
        return node.op, attrs, inputs, [Value("y", recurrent_shapes(x.shape, w.shape, hidden)[0], np.float32)]

    def _time(self, g: Graph, op: str, attrs: dict, inputs: list, outputs: list,
              epilogue: tuple[tuple, ...] = ()) -> float:
        """The layer, then the residual adds and activations of its `epilogue` (`conv_epilogue`; a residual operand
        is a second model input), timed as a model."""
        g.inputs, g.outputs = [inputs[0]], outputs
        g.add_node(op, inputs, outputs, attrs)
        for i, (kind, *rest) in enumerate(e for e in epilogue if e != ("bias",)):
            y, out = g.outputs[0], Value(f"y{i}", g.outputs[0].shape, np.float32)
            if kind == "add":
                g.inputs.append(Value(f"r{i}", y.shape, np.float32))
                g.add_node("add", [y, g.inputs[-1]], [out], {})
            else:
                g.add_node(kind, [y], [out], dict(rest[0]))
            g.outputs = [out]
        proto, feeds = export_onnx(g), {v.name: _random(v.shape, self.rng) for v in g.inputs}
        layer = getattr(self.timer, "layer", None)  # stand-in timers in tests may be bare callables
        return layer(proto, feeds) if layer else self.timer(proto, feeds)

    def full_sum(self) -> float:
        if self._full is None:
            self._full = sum(self.layer_ms(layer, {}) for layer in self.layers)
        return self._full

    def layers_sum(self, removed: dict[int, int], estimate: bool = False) -> float:
        per_layer = self.estimate_ms if estimate else self.layer_ms
        return sum(per_layer(layer, removed) for layer in self.layers)

    def predicted_ms(self, base_ms: float, removed: dict[int, int], estimate: bool = False) -> float:
        """The whole model's ms by the table, the original's being `base_ms`. What the layers do not account for in
        the original (base_ms - full_sum) stays the same in every plan (elementwise ops, pools and session overhead
        in ONNX Runtime: resnet18's checkpoints measured 1.05-1.06x the saving so predicted), or, for a timer whose
        `overhead_scales`, is a share of the layers' time: TVM's entries are kernels tuned alone, which the whole
        model runs slower (resnet18: 1.06-1.45x in all, by the hour), and it has little else. Measured on TVM, the
        saving so predicted was 0.89-0.94 of resnet18's (kept constant: 0.61-0.72) and 1.10 of a uniform 0.5
        mobilenet_v2's (constant: 0.84)."""
        full, layers = self.full_sum(), self.layers_sum(removed, estimate)
        return base_ms * layers / full if self.overhead_scales and full > 0 else base_ms - full + layers


@dataclass
class _Shaped:  # the two things shape rules read from a node
    op: str
    attrs: dict
    name: str = "layer"


@dataclass
class LatencySearch:
    """What the search did (goes to timings.json: it depends on measurements)."""

    base_ms: float
    target_ms: float
    measured_ms: float
    predicted_ms: float
    steps: int
    chosen_step: int
    layers: int
    table_entries: int
    models_timed: int
    seconds: float
    trajectory: list[dict] = field(default_factory=list)
    engine: str = "onnxruntime"
    tuning_trials_run: int = 0  # TVM engine: MetaSchedule trials this search ran (0 when the database had them)
    waited_slices: int = 0  # slices pairs added waiting for the fast phase (at most SEARCH_WAIT_SLICES)
    step: int = 8  # kept counts were multiples of this (--round-to, else the policy's LATENCY_STEP)
    lazy_table: bool = False  # the greedy measured only the moves its estimates ranked first (see best_move)
    calibration_scale: float = 1.0  # the whole model's saving over the table's at the last checkpoint (CALIBRATE_AT)
    # the table's predictions scaled the original's time beyond its layers with them (the timer's overhead_scales:
    # TVM), rather than keeping it constant (ONNX Runtime)
    overhead_scales: bool = False
    measured_on: str = "this machine"  # or the RPC device the TVM engine measured on (key and tracker)

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _candidates(size: int, kept: int, step: int, floor: int, reach: int = 8) -> list[int]:
    """Lower kept counts worth trying: the next multiples of `step` and `2*step`, and one ~1/`reach` of the group
    down."""
    out = set()
    for s in (step, 2 * step):
        k = (kept - 1) // s * s
        if k >= floor:
            out.add(k)
    big = (kept - max(size // reach, step)) // step * step
    if big >= floor:
        out.add(big)
    return sorted(out, reverse=True)


# when no group's candidates within 1/8 of it save time (every lower count the table has is slower: a kernel that
# runs fast only at full width, or ONNX Runtime's mobilenet_v2 depthwise layers at 88 and 80 of 96 channels), the
# greedy looks 1/4, then 1/2 of a group down before it calls the trajectory finished
REACHES = (8, 4, 2)


def latency_plan(graph: Graph, deps: DependencyResult, groups: Sequence[Group], scores: dict[int, np.ndarray],
                 target: float, feeds: dict[str, np.ndarray], *, step: int = 8, min_channels: int = 1,
                 max_ratio: float, timer: Timer | None = None,
                 progress: Callable[..., None] | None = None) -> tuple[dict[int, int], LatencySearch]:
    """Kept counts per group whose measured model latency is `target` × the original's (within ~5–10%)."""
    from .plan import Plan
    from .policy import lowest
    from .rewrite import pruned_copy

    if not 0.0 < target < 1.0:
        raise UsageError(f"--target-latency {target}: must be a fraction of the original latency in (0, 1)")
    started = time.perf_counter()
    timer = timer or Timer()
    table = LatencyTable(graph, deps, timer)
    if not table.layers:
        raise UsageError("the latency policy found no prunable weight layer (conv, linear, gemm, matmul)")

    built: dict[tuple, object] = {}  # the original's timed model and the current plan's: a pair alternates them

    def whole_ms(removed_counts: dict[int, int], seconds: float = 1.0) -> float:
        key = tuple(sorted((gid, r) for gid, r in removed_counts.items() if r))
        if key not in built:
            plan = Plan({g.id: lowest(scores[g.id], removed_counts[g.id]) for g in groups if removed_counts.get(g.id)})
            for other in [k for k in built if k]:
                del built[other]
            built[key] = timed_proto(pruned_copy(graph, plan, deps) if not plan.is_empty() else graph)
        proto = built[key]
        return timer(proto, {k: v for k, v in feeds.items() if k in {i.name for i in proto.graph.input}}, seconds)

    base_ms = whole_ms({}, 2.0)
    target_ms = target * base_ms
    report = progress or (lambda *_a, **_k: None)
    # cumulative normalized importance lost when the lowest j channels of a group go
    lost = {g.id: np.concatenate([[0.0], np.cumsum(np.sort(normalized(scores[g.id])))]) for g in groups}
    floor = {g.id: max(min_channels, g.size - math.floor(max_ratio * g.size), 1) for g in groups}
    kept = {g.id: g.size for g in groups}
    size = {g.id: g.size for g in groups}
    lazy = bool(getattr(timer, "lazy_table", False))  # stand-in timers in tests may not say

    def removed() -> dict[int, int]:
        return {gid: size[gid] - k for gid, k in kept.items()}

    trajectory = [{"kept": dict(kept), "predicted_ms": base_ms}]
    exhausted = False

    def move_cost(gid: int, k: int, now: float, trial: dict[int, int], exact: bool) -> float | None:
        """Importance lost per ms saved when group `gid` keeps `k` (None: the table says it saves nothing); `now` is
        what the group's layers take at the current counts. `exact`: the layers measured, else estimated."""
        per_layer = table.layer_ms if exact else table.estimate_ms
        saved = now - sum(per_layer(layer, trial) for layer in table.by_group[gid])
        if saved <= 0.002 * now + 1e-4:  # within measurement noise: this count is not faster
            return None
        return (lost[gid][size[gid] - k] - lost[gid][size[gid] - kept[gid]]) / saved

    def best_move(reach: int) -> tuple[int, int] | None:
        """(group, kept count): of each group's candidates within 1/`reach` of it, the one losing the least
        importance per ms saved. A lazy table (`timer.lazy_table`: an entry is a tuning run) ranks the candidates by
        estimated costs and measures them in that order until a measured cost is the lowest: with estimates no
        slower than the kernels (see estimate_ms) that is the move the measured table would choose, and the
        candidates ranked behind it are never measured."""
        current, options = removed(), []
        for g in groups:
            touching = table.by_group.get(g.id, [])
            if not touching:
                continue
            now = sum(table.layer_ms(layer, current) for layer in touching)
            for k in _candidates(g.size, kept[g.id], step, floor[g.id], reach):
                trial = current | {g.id: g.size - k}
                exact = not lazy or all(table.is_measured(layer, trial) for layer in touching)
                cost = move_cost(g.id, k, now, trial, exact)
                if cost is not None:
                    options.append((cost, len(options), g.id, k, exact, now, trial))
        heapq.heapify(options)  # ties go to the earlier candidate, as they did in one pass over the groups
        while options:
            cost, order, gid, k, exact, now, trial = heapq.heappop(options)
            if exact:
                return gid, k
            cost = move_cost(gid, k, now, trial, True)
            if cost is not None:
                heapq.heappush(options, (cost, order, gid, k, True, now, trial))
        return None

    def extend(stop_ms: float, heading_ms: float | None = None) -> None:
        """Greedy steps appended to the trajectory until the table predicts `stop_ms` or less, or no move is left;
        the progress shows the way to `heading_ms` (the checkpoint's stop is part of the way to the target)."""
        nonlocal exhausted
        heading_ms = stop_ms if heading_ms is None else heading_ms
        while trajectory[-1]["predicted_ms"] > stop_ms and not exhausted:
            best = next((move for move in map(best_move, REACHES) if move is not None), None)
            if best is None:
                exhausted = True
                break
            kept[best[0]] = best[1]
            predicted_ms = table.predicted_ms(base_ms, removed())
            trajectory.append({"kept": dict(kept), "predicted_ms": predicted_ms})
            report(f"latency: step {len(trajectory) - 1}, predicted {predicted_ms:.2f} ms (table's aim "
                   f"{heading_ms:.2f} ms), {len(table.cache)} layer shapes timed", False,
                   min(1.0, (base_ms - predicted_ms) / max(base_ms - heading_ms, 1e-9)))

    # the search on the measured latency of the whole model along the trajectory, each step judged by its ratio to
    # the original timed beside it: these machines change speed by up to 2x within minutes (against an original
    # timed when the search began, a plan chosen at 0.52x measured 0.60x), and also for seconds at a time (one
    # TVM search read the original at 0.51, 0.71, 0.93 and 0.51 ms across four back-to-back pairs, and judged two
    # steps of the same speed at 0.53x and 0.41x). So a step and the original alternate in short slices, and the
    # ratio is the median over the slices: a slow phase reaches both sides of a slice pair, or only one pair.
    # Slow phases also last 20-60 s (one of the two cores taken: the demo model read 0.65 ms for tens of seconds,
    # then 1.08), and the ratio in them is another one (0.44x against 0.40x; a search that chose its step in one
    # measured it at 0.45x, and it ran at 0.30x). Only slices in the fast phase (the original within QUIET of its
    # fastest reading) decide, and the pair keeps timing, up to PAIR_PATIENCE_S, until it has PAIR_SLICES of them
    # (while the search's SEARCH_WAIT_SLICES last).
    # Steps timed before the machine's first fast phase are re-timed once one has been seen (`stale`).
    fastest, waited = [base_ms], [0]  # slices added to pairs beyond their first PAIR_SLICES, across the search

    def quiet_at(slices: list[tuple[float, float]]) -> list[int]:
        return quiet_indices([o for _, o in slices], fastest[0])

    def quiet(slices: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [slices[i] for i in quiet_at(slices)]

    def stale(slices: list[tuple[float, float]]) -> bool:
        return len(quiet(slices)) < (PAIR_SLICES + 1) // 2

    def paired(kept_counts: dict[int, int], slices: list | None = None) -> tuple[tuple[float, float], list]:
        """((the plan's ms, the original's ms), the slices): `slices` extended until PAIR_SLICES are quiet (or the
        patience ran out); the fastest quiet slice of each side, scaled so that their quotient is the median of
        the quiet slices' ratios (of all slices when a slow phase outlasted the patience)."""
        removed_counts = {gid: size[gid] - k for gid, k in kept_counts.items()}
        slices, began, added = list(slices or []), 0.0, 0
        while len(quiet(slices)) < PAIR_SLICES and (added < PAIR_SLICES or (
                added < PAIR_MAX_SLICES and time.perf_counter() - began < PAIR_PATIENCE_S
                and waited[0] < SEARCH_WAIT_SLICES)):
            slices.append((whole_ms(removed_counts, PAIR_SLICE_S), whole_ms({}, PAIR_SLICE_S)))
            fastest[0] = min(fastest[0], slices[-1][1])
            added += 1
            waited[0] += added > PAIR_SLICES
            if added == 1:  # the patience starts after the first slice: that one includes building the step
                began = time.perf_counter()
        used = [slices[i] for i in quiet_or_all(quiet_at(slices), len(slices), PAIR_SLICES)]
        orig = min(o for _, o in used)
        return (float(np.median([ms / o for ms, o in used])) * orig, orig), slices

    measured = {0: (base_ms, base_ms)}  # step → (its ms, the original's ms timed beside it)
    slices_of: dict[int, list] = {}

    def time_step(i: int, slices: list | None = None) -> None:
        measured[i], slices_of[i] = paired(trajectory[i]["kept"], slices)
        report(f"latency: step {i} of {len(trajectory) - 1} measured {measured[i][0] / measured[i][1]:.3f}x of the "
               f"original (the table predicted {trajectory[i]['predicted_ms'] / base_ms:.3f}x; target {target:g}x)")

    def fast_enough(i: int) -> bool:
        return measured[i][0] <= target * measured[i][1]

    # The trajectory goes only as deep as the measurements need: every table entry is a layer shape timed (on TVM a
    # tuning run), and a fixed margin (the greedy used to go on to 0.6x the target) doubled resnet18's table (664
    # layer shapes against 305 on ONNX Runtime at 224²) for steps the bisection rarely looked at. So the greedy stops
    # where the table predicts the target and its deepest step is timed; while that is slower than the target, the
    # trajectory is extended to where the measured ratio, scaled along the table's prediction from the original,
    # puts EXTEND_AIM x the target.
    # A table that is off by a factor on its saving (see CALIBRATE_AT) is scaled at checkpoints first: the
    # greedy's stop is where the table's saving, scaled by the latest checkpoint's factor, reaches the target; each
    # checkpoint is CALIBRATE_AT of the way from the last one to the stop, and a step the bracket search would
    # time anyway.
    stop_ms, scale, aim = target_ms, 1.0, base_ms - CALIBRATE_AT * (base_ms - target_ms)
    for _ in range(CHECKPOINTS):
        extend(aim, stop_ms)
        checkpoint = len(trajectory) - 1
        predicted = trajectory[checkpoint]["predicted_ms"]
        if checkpoint in measured or exhausted or predicted <= stop_ms:
            break
        time_step(checkpoint)
        scale = calibration_scale(measured[checkpoint], predicted / base_ms)
        # a checkpoint fast enough is where the greedy stops (the bracket search takes it on); else the stop is
        # deeper than the checkpoint, and the next checkpoint on the way there
        stop_ms = predicted if fast_enough(checkpoint) else base_ms - (base_ms - target_ms) / scale
        aim = predicted - CALIBRATE_AT * (predicted - stop_ms)
        report(f"latency: the whole model saves {scale:.2f}x what the table predicts at step {checkpoint}; the "
               f"greedy goes on to {stop_ms / base_ms:.3f}x by the table")
    extend(stop_ms)
    hi = len(trajectory) - 1
    if hi not in measured:
        time_step(hi)
    for _ in range(MAX_EXTENSIONS):
        if fast_enough(hi) or exhausted:
            break
        ratio, predicted = measured[hi][0] / measured[hi][1], trajectory[hi]["predicted_ms"]
        aim = base_ms - (1 - EXTEND_AIM * target) / max(1 - ratio, 1e-3) * (base_ms - predicted)
        # at most twice the predicted saving so far per extension: a reading taken in a slow phase (every ratio
        # pulled towards 1) would otherwise send the greedy to the end of every group
        extend(min(max(aim, predicted - (base_ms - predicted)), predicted - 0.05 * base_ms))
        if len(trajectory) - 1 == hi:
            break
        hi = len(trajectory) - 1
        time_step(hi)
    # before calling the target unreachable, time the pair again (the more favourable reading stays, as the timer
    # itself keeps the fastest run): one slow phase at the wrong moment is enough to miss. At least twice, and on
    # for PAIR_PATIENCE_S, as long as a slow phase lasts: a search that started in one and ran out of moves inside it
    # read 0.48x for a plan that runs at 0.17x (every slice was "quiet": the search had seen no faster original)
    retried, began = 0, time.perf_counter()
    while measured[hi][0] > target * measured[hi][1] * 1.1 and retried < UNREACHABLE_RETRIES and (
            retried < 2 or time.perf_counter() - began < PAIR_PATIENCE_S):
        again = paired(trajectory[hi]["kept"])
        measured[hi], slices_of[hi] = min((measured[hi], slices_of[hi]), again, key=lambda p: p[0][0] / p[0][1])
        retried += 1
    if measured[hi][0] > target * measured[hi][1] * 1.1:
        raise UsageError(f"--target-latency {target}: unreachable, at most {measured[hi][0] / measured[hi][1]:.2f}x "
                         f"of the original latency with these groups (ignored or frozen groups, max ratio)")
    lo = max((i for i in measured if i < hi and not fast_enough(i)), default=0)

    def interpolated(lo: int, hi: int) -> int:
        """The step strictly between `lo` (slower than the target) and `hi` (fast enough) whose predicted latency is
        nearest where the two steps' measured ratios, interpolated along the table's predictions, put the target:
        the table's error is mostly a factor on its saving (see CALIBRATE_AT), which this cancels."""
        (r_lo, r_hi), (p_lo, p_hi) = ([measured[i][0] / measured[i][1] for i in (lo, hi)],
                                      [trajectory[i]["predicted_ms"] for i in (lo, hi)])
        aim = p_lo + (target - r_lo) / min(r_hi - r_lo, -1e-9) * (p_hi - p_lo)
        return min(range(lo + 1, hi), key=lambda i: (abs(trajectory[i]["predicted_ms"] - aim), i))

    for _ in range(3):  # search; then re-time the bracket's steps timed before a faster phase, and search again
        halve = False  # an interpolated step that did not halve the bracket is followed by a bisection step
        while hi - lo > 1:
            width = hi - lo
            mid = (lo + hi) // 2 if halve else interpolated(lo, hi)
            time_step(mid)
            lo, hi = (lo, mid) if fast_enough(mid) else (mid, hi)
            halve = not halve and hi - lo > width // 2
        retimed = [i for i in (lo, hi) if i in slices_of and stale(slices_of[i])]
        if not retimed:
            break
        for i in retimed:
            time_step(i, slices_of[i])
        last = len(trajectory) - 1
        hi = min((i for i in measured if fast_enough(i)), default=last)
        lo = max((i for i in measured if i < hi and not fast_enough(i)), default=0)

    def off(pair: tuple[float, float]) -> float:
        return abs(pair[0] / (target * pair[1]) - 1)

    def meets(pair: tuple[float, float]) -> bool:
        return 1 - REFINE_WITHIN <= pair[0] / (target * pair[1]) <= 1 + TARGET_SLACK

    def lost_of(kept_counts: dict[int, int]) -> float:
        return float(sum(lost[gid][size[gid] - k] for gid, k in kept_counts.items()))

    def slice_counts(slices: list | None) -> dict:
        return {} if slices is None else {"slices": len(slices), "quiet_slices": len(quiet(slices))}

    def entry(i: int, kept_counts: dict[int, int], pair: tuple[float, float], predicted: float,
              slices: list | None) -> dict:
        return {"step": i, "predicted_ms": round(predicted, 4), "measured_ms": round(pair[0], 4),
                "original_ms": round(pair[1], 4), "importance_lost": round(lost_of(kept_counts), 4)} \
            | slice_counts(slices)

    # candidates: (step, kept counts, (ms, original ms), predicted ms), every timed step
    candidates = [(i, trajectory[i]["kept"], measured[i], trajectory[i]["predicted_ms"]) for i in sorted(measured)]
    timed = [entry(i, kept_counts, pair, predicted, slices_of.get(i)) for i, kept_counts, pair, predicted in candidates]
    # one step of the trajectory can move the latency by more than the tolerance (a group losing 8 of 64 channels
    # in the widest layers of a small model: 0.56x to 0.43x for a 0.5x target): then single-group moves between the
    # two bracketing steps are tried, those the table puts nearest the target
    if hi - lo == 1 and not any(meets(pair) for _, _, pair, _ in candidates):
        for move, kept_counts, predicted in _boundary_moves(
                (lo, trajectory[lo], measured[lo]), (hi, trajectory[hi], measured[hi]), target, base_ms, size,
                table, step, floor, estimate=lazy):
            pair, slices = paired(kept_counts)
            timed.append(entry(move["from_step"], kept_counts, pair, predicted, slices) | {"move": move})
            candidates.append((move["from_step"], kept_counts, pair, predicted))
    # of the plans that meet the target, the one that loses the least importance: which of two steps is nearer the
    # target is often decided by noise (CREPE tiny at 0.433x: its step 5 read 0.4395x, 1.5% off, step 6 0.426x, 1.6%
    # off, and step 6 removes half of a 16-channel layer: 7 points less accurate after fine-tuning in one run)
    meeting = [c for c in candidates if meets(c[2])]
    choice, chosen_kept, chosen_pair, chosen_predicted = (
        min(meeting, key=lambda c: lost_of(c[1])) if meeting else min(candidates, key=lambda c: off(c[2])))
    chosen_ms, base_ms = chosen_pair
    target_ms = target * base_ms
    report(f"latency: {len(trajectory) - 1} steps, chose step {choice} ({chosen_ms:.2f} ms, target "
           f"{target_ms:.2f} ms)", True)
    search = LatencySearch(base_ms, target_ms, chosen_ms, chosen_predicted, len(trajectory) - 1, choice,
                           len(table.layers), len(table.cache), timer.models_timed, time.perf_counter() - started,
                           timed, getattr(timer, "engine", "custom"), int(getattr(timer, "trials_run", 0)),
                           waited[0], step, lazy, scale, table.overhead_scales,
                           getattr(timer, "measured_on", "this machine"))
    return chosen_kept, search


def calibration_scale(pair: tuple[float, float], predicted_fraction: float) -> float:
    """The whole model's measured saving over the table's predicted one at a step ((its ms, the original's ms) timed
    beside it, and the table's predicted fraction of the original), clamped to CALIBRATE_SCALE: a step the table
    predicts no saving for, or a reading taken in a slow phase, says little about the rest of the way."""
    predicted_saving = 1 - predicted_fraction
    if predicted_saving <= 1e-3:
        return 1.0
    lowest, highest = CALIBRATE_SCALE
    return float(min(max((1 - pair[0] / pair[1]) / predicted_saving, lowest), highest))


def _boundary_moves(lo_step: tuple[int, dict, tuple[float, float]], hi_step: tuple[int, dict, tuple[float, float]],
                    target: float, base_ms: float, size: dict[int, int], table: LatencyTable, step: int,
                    floor: dict[int, int], estimate: bool = False) -> list[tuple[dict, dict[int, int], float]]:
    """The REFINE_MOVES single-group moves nearest the target between two adjacent trajectory steps, `lo` (slower
    than the target) and `hi` (faster): from either step, one group to one of its candidate counts down or one
    multiple of `step` up. Both directions from both steps: latency is not monotonic in the counts (with 16-wide
    vectors at full speed and other counts slow, keeping 24 of 48 channels ran at 0.468x where 32 ran at 0.447x),
    so the count nearest the target can lie below the faster step. The table's prediction is mapped to a fraction
    of the original by the two steps' measurements (on TVM the table's sums are off by 2x, but the difference
    between two nearby plans scales like what was measured). `estimate`: a lazy table ranks the moves by its
    estimates (their whole models are timed next; tuning every layer shape of every move would cost more).
    Steps come as (index, trajectory entry, (ms, original ms)); moves as (move, kept counts, predicted ms)."""
    (lo_i, lo, lo_pair), (hi_i, hi, hi_pair) = lo_step, hi_step
    r_lo, r_hi = lo_pair[0] / lo_pair[1], hi_pair[0] / hi_pair[1]
    p_lo, p_hi = lo["predicted_ms"], hi["predicted_ms"]
    scale = (r_lo - r_hi) / (p_lo - p_hi) if p_lo > p_hi and r_lo > r_hi else 1.0 / base_ms
    options: dict[tuple, tuple[float, dict, dict[int, int], float]] = {}
    for origin, start, r0, p0 in ((lo_i, lo, r_lo, p_lo), (hi_i, hi, r_hi, p_hi)):
        for gid, full in size.items():
            if not table.by_group.get(gid):
                continue
            now = start["kept"][gid]
            counts = _candidates(full, now, step, floor[gid]) + \
                [k for k in (min(full, (now // step + 1) * step),) if k > now]
            for k in counts:
                kept_counts = dict(start["kept"]) | {gid: k}
                key = tuple(sorted(kept_counts.items()))
                if kept_counts in (lo["kept"], hi["kept"]) or key in options:
                    continue
                predicted_ms = table.predicted_ms(base_ms, {g: size[g] - c for g, c in kept_counts.items()}, estimate)
                expected = r0 + scale * (predicted_ms - p0)
                options[key] = (abs(expected / target - 1),
                                {"from_step": origin, "group": gid, "kept": k}, kept_counts, predicted_ms)
    best = sorted(options.values(), key=lambda o: o[0])[:REFINE_MOVES]
    return [(move, kept_counts, predicted) for _, move, kept_counts, predicted in best]
