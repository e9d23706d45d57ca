"""The latency policy: its search logic against a deterministic stand-in timer (real timings are benchmarks:
tools/bench_latency_plan.py), and the CLI end to end with real ONNX Runtime timing (structure only)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from prune_compile.errors import UsageError
from prune_compile.ir import export_onnx, import_onnx
from prune_compile.passes import latency
from prune_compile.passes.cost import graph_cost, node_macs
from prune_compile.passes.deps import analyze
from prune_compile.passes.fold_bn import folded_copy
from prune_compile.passes.latency import (
    PAIR_SLICES,
    SEARCH_WAIT_SLICES,
    UNREACHABLE_RETRIES,
    find_layers,
    timed_proto,
)
from prune_compile.passes.policy import PlanningOptions, make_plan
from prune_compile.passes.rewrite import pruned_copy
from prune_compile.recent_models import RecentModels

from .oracle import oracle_error
from .test_cli import DEFAULT_MODEL

# The stand-in timers below answer from the models' shapes, so those searches are deterministic and run beside other
# test workers; only the tests that time or tune on this machine are `serial`.

# the search's record (timings.json) rounds milliseconds to 4 decimals
ROUNDED = 1e-5


_SHAPE_READINGS: dict[tuple, float] = {}


def _structure(proto) -> tuple:
    """What ShapeTimer's reading depends on: the nodes, the inputs and outputs, and every initializer's name, type
    and dims, with the values of the small ones only (a shape or an axis; a weight's values change no MACs)."""
    g = proto.graph
    return (tuple(n.SerializeToString() for n in g.node),
            tuple(v.SerializeToString() for v in (*g.input, *g.output)),
            tuple((t.name, t.data_type, tuple(t.dims), t.SerializeToString() if math.prod(t.dims) <= 64 else b"")
                  for t in g.initializer), tuple((o.domain, o.version) for o in proto.opset_import))


class ShapeTimer:
    """Latency as a kernel library would have it: MACs at full speed when the output channels fill 16-wide
    vectors, 1.8x slower per MAC otherwise, plus a fixed cost per op."""

    def __init__(self, width: int = 16) -> None:
        self.width, self.models_timed = width, 0
        self._readings = RecentModels()  # importing every slice's model again was most of this file's time

    def __call__(self, proto, feeds, seconds=None) -> float:
        self.models_timed += 1
        return self._readings.get(proto, self.shared_reading)

    def shared_reading(self, proto) -> float:
        """`reading`, kept across searches for the base class: the resnet fixture's searches time the same layer
        shapes and plans again and again, and importing each model (ONNX shape inference serializing its random
        weights three times) was ~40% of a search."""
        if type(self).reading is not ShapeTimer.reading:
            return self.reading(proto)
        key = (self.width, _structure(proto))
        if key not in _SHAPE_READINGS:
            _SHAPE_READINGS[key] = self.reading(proto)
        return _SHAPE_READINGS[key]

    def reading(self, proto) -> float:
        graph = import_onnx(proto)
        ms = 0.0
        for n in graph.nodes:
            slow = 1.0
            if n.op in ("conv", "linear") and n.inputs[1].shape[0] % self.width:
                slow = 1.8
            ms += node_macs(n) * 1e-6 * slow + 0.002
        return ms


class SavingScaledTimer(ShapeTimer):
    """The table's layers as ShapeTimer times them; a whole model saves `factor` x what they predict (below 1: work
    the one-layer models do not have, which pruning shrinks less; above 1: TVM's resnet18 table), plus `drift` x
    the predicted saving (a fraction of the original): a factor that changes with depth."""

    def __init__(self, full_ms: float, factor: float, drift: float = 0.0) -> None:
        super().__init__()
        self.full_ms, self.factor, self.drift = full_ms, factor, drift

    def layer(self, proto, feeds) -> float:
        return super().__call__(proto, feeds)

    def __call__(self, proto, feeds, seconds=None) -> float:
        saving = self.full_ms - super().__call__(proto, feeds)
        return self.full_ms - (self.factor + self.drift * saving / self.full_ms) * saving


def saving_scaled_search(resnet, factor: float, target: float, drift: float = 0.0):
    """A latency plan searched against SavingScaledTimer: (the result, its progress lines, the plan's latency as a
    fraction of the original's on that timer)."""
    graph, deps, feeds = resnet
    timer = SavingScaledTimer(ShapeTimer()(timed_proto(graph), feeds), factor, drift)
    lines = []
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=target), calibration=feeds,
                       latency_timer=timer, progress=lambda line, *_a, **_k: lines.append(line))
    return result, lines, timer(timed_proto(pruned_copy(graph, result.plan, deps)), feeds) / timer.full_ms


@pytest.fixture(scope="module")
def resnet():
    import torch
    import torchvision

    from prune_compile.ir.fx_importer import import_torch_module

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    graph = import_torch_module(model, (x,))
    return graph, analyze(graph), {graph.inputs[0].name: x.numpy()}


@pytest.mark.parametrize("target", [0.4, 0.6])
def test_latency_plan_meets_the_target_within_10_percent(resnet, target) -> None:
    graph, deps, feeds = resnet
    timer = ShapeTimer()
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=target), calibration=feeds,
                       latency_timer=timer)
    pruned = pruned_copy(graph, result.plan, deps)
    fraction = timer(timed_proto(pruned), feeds) / timer(timed_proto(graph), feeds)
    assert abs(fraction / target - 1) <= 0.10, fraction
    assert result.latency["measured_ms"] == pytest.approx(fraction * result.latency["base_ms"], rel=ROUNDED)
    assert result.latency["table_entries"] < result.latency["models_timed"] + 1
    assert oracle_error(graph, deps, result.plan, feeds) <= 1e-4


def test_of_the_timed_plans_that_meet_the_target_the_one_losing_least_importance_is_kept(resnet) -> None:
    """A plan at most 2% slower or 5% faster than the target meets it. Which of two such steps is nearer the target
    is decided by noise on a real machine (CREPE tiny at 0.433x: one step read 0.4395x, the next 0.426x and removed
    half of a 16-channel layer), so the search keeps the one that loses the least importance, not the nearest."""
    graph, deps, feeds = resnet
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.4), calibration=feeds,
                       latency_timer=ShapeTimer())
    timed = [t for t in result.latency["trajectory"] if t["step"] > 0]
    meeting = [t for t in timed if 0.95 <= t["measured_ms"] / t["original_ms"] / 0.4 <= 1.02]
    assert len(meeting) >= 2, timed  # else there is nothing to choose between
    nearest = min(meeting, key=lambda t: abs(t["measured_ms"] / t["original_ms"] / 0.4 - 1))
    least = min(meeting, key=lambda t: t["importance_lost"])
    assert nearest is not least, meeting  # the two rules disagree here
    assert result.latency["measured_ms"] == pytest.approx(least["measured_ms"], rel=ROUNDED)
    assert result.latency["chosen_step"] == least["step"]


def test_a_slow_reading_does_not_make_the_target_unreachable(resnet) -> None:
    """The machine slows down 2x just when the deepest plan is first timed: the search times deeper steps, or the
    original and that plan again, before giving up, and still meets the target; a target truly out of reach still
    fails."""
    graph, deps, feeds = resnet
    whole = timed_proto(graph)
    nodes, params = len(whole.graph.node), sum(int(np.prod(t.dims)) for t in whole.graph.initializer)

    class SpikeTimer(ShapeTimer):
        spiked = False

        def __call__(self, proto, feeds, seconds=None) -> float:
            ms = super().__call__(proto, feeds, seconds)
            pruned_whole = (len(proto.graph.node) == nodes
                            and sum(int(np.prod(t.dims)) for t in proto.graph.initializer) < 0.9 * params)
            if pruned_whole and not self.spiked:  # the first pruned whole model the search times: the deepest plan
                self.spiked = True
                return 2 * ms
            return ms

    timer = SpikeTimer()
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.4), calibration=feeds,
                       latency_timer=timer)
    assert timer.spiked
    fraction = ShapeTimer()(timed_proto(pruned_copy(graph, result.plan, deps)), feeds) / result.latency["base_ms"]
    assert abs(fraction / 0.4 - 1) <= 0.10, fraction
    with pytest.raises(UsageError, match="unreachable"):
        make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.4, max_ratio=0.3),
                  calibration=feeds, latency_timer=ShapeTimer())


def test_each_step_is_judged_against_the_original_timed_beside_it(resnet) -> None:
    """The machine runs 1.3x slow while the search builds its table and first times the original, then speeds up
    as the bisection starts: the plan still meets the target, because each step is compared with the original
    timed right after it, not with the reading taken minutes before."""
    graph, deps, feeds = resnet
    whole = timed_proto(graph)
    nodes, params = len(whole.graph.node), sum(int(np.prod(t.dims)) for t in whole.graph.initializer)

    class DriftTimer(ShapeTimer):
        settled = False

        def __call__(self, proto, feeds, seconds=None) -> float:
            ms = super().__call__(proto, feeds, seconds)
            if (len(proto.graph.node) == nodes
                    and sum(int(np.prod(t.dims)) for t in proto.graph.initializer) < 0.9 * params):
                self.settled = True  # the first pruned whole model: the bisection has begun
            return ms if self.settled else 1.3 * ms

    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.4), calibration=feeds,
                       latency_timer=DriftTimer())
    fraction = ShapeTimer()(timed_proto(pruned_copy(graph, result.plan, deps)), feeds) / ShapeTimer()(whole, feeds)
    assert abs(fraction / 0.4 - 1) <= 0.10, fraction
    assert result.latency["base_ms"] == pytest.approx(ShapeTimer()(whole, feeds), rel=ROUNDED)


def test_a_slow_phase_during_one_timing_of_a_pair_does_not_decide_the_step(resnet) -> None:
    """The machine slows down 1.8x for a moment right after each new step is first timed, so the original timed
    next to it reads slow (as a TVM search read it at 0.51, 0.71, 0.93 and 0.51 ms in four back-to-back pairs):
    judged by that pair alone every step looks fast enough and the search keeps far too much (0.71x for 0.4x)."""
    graph, deps, feeds = resnet
    whole = timed_proto(graph)
    nodes, params = len(whole.graph.node), sum(int(np.prod(t.dims)) for t in whole.graph.initializer)

    class PhaseTimer(ShapeTimer):
        steps_seen: set[bytes] = set()
        pending = hit = 0

        def __call__(self, proto, feeds, seconds=None) -> float:
            ms = super().__call__(proto, feeds, seconds)
            if len(proto.graph.node) != nodes:
                return ms
            if sum(int(np.prod(t.dims)) for t in proto.graph.initializer) < params:  # a pruned step
                key = proto.SerializeToString()
                if key not in self.steps_seen:
                    self.steps_seen.add(key)
                    self.pending = 1
                return ms
            if self.pending:  # the original, right after a step's first timing
                self.pending, self.hit = 0, self.hit + 1
                return 1.8 * ms
            return ms

    timer = PhaseTimer()
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.4), calibration=feeds,
                       latency_timer=timer)
    assert timer.hit >= 3
    fraction = ShapeTimer()(timed_proto(pruned_copy(graph, result.plan, deps)), feeds) / ShapeTimer()(whole, feeds)
    assert abs(fraction / 0.4 - 1) <= 0.10, fraction
    assert result.latency["measured_ms"] / result.latency["base_ms"] == pytest.approx(fraction, rel=ROUNDED)


@pytest.mark.parametrize("schedule, slower, extra", [("alternating", 1.0, 0.6), ("slow_start", 1.0, 0.6),
                                                     ("after_base", 1.0, 0.06), ("long", 1.28, 0.17)])
def test_steps_are_judged_in_the_machines_fast_phase(resnet, schedule, slower, extra) -> None:
    """For tens of seconds at a time one of the two cores is taken, and every run pays a fixed extra cost (the demo
    model on TVM read 0.65 ms, then 1.08 ms, for 20-60 s each): in such a phase every ratio is pulled towards 1,
    and a search that judged its steps there pruned far past the target (chosen at 0.45x, ran at 0.30x). Milder
    phases do the same on a smaller scale (CREPE tiny's original read 0.884 ms, then 0.94 ms for 10 s and more, and a
    0.439x plan read 0.474x in them: half the searches chose a step that removed more). Slow phases alternating with
    fast ones every 6 pairs (a search that times fewer steps saw one slow phase of 8 pairs only), one the search
    starts in (its first timing of the original too, then 15 pairs), or a mild one (6% of the original) from just
    after the first timing for 30 pairs, or a long one from the first pair on for 150 slices, where every run is
    also 28% slower (mobilenet_v2's original read 2.50-2.57 ms for ~118 slices, 1.73 ms around them, and its 0.432x
    plan 0.498x: 1.28x each run, plus 17% of the original): the plan meets the target as the fast machine runs it,
    within the search's own tolerance (+2%, -5%; in the mild phase the plan ran at 0.369x for 0.4x when a slice
    within 10% of the fastest original counted as fast; in the long one, judged against the fastest of the 60
    originals before and after it, mobilenet_v2's 0.5x plan ran at 0.432x and this one at 0.321x for 0.4x)."""
    graph, deps, feeds = resnet
    whole = timed_proto(graph)
    nodes = len(whole.graph.node)
    extra_ms = extra * ShapeTimer()(whole, feeds)

    class SlowPhaseTimer(ShapeTimer):
        whole_calls = slow_calls = 0

        def slow(self) -> bool:
            if schedule == "alternating":
                return (self.whole_calls // 12) % 2 == 1
            if schedule == "after_base":
                return 1 <= self.whole_calls <= 60
            if schedule == "long":
                return 2 <= self.whole_calls < 302
            return self.whole_calls <= 30

        def __call__(self, proto, feeds, seconds=None) -> float:
            ms = super().__call__(proto, feeds, seconds)
            if len(proto.graph.node) != nodes:  # one-layer models of the table
                return ms
            slow = self.slow()
            self.whole_calls += 1
            self.slow_calls += slow
            return ms * slower + extra_ms if slow else ms

    timer = SlowPhaseTimer()
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.4), calibration=feeds,
                       latency_timer=timer)
    assert timer.slow_calls >= 20, (timer.slow_calls, timer.whole_calls)
    fraction = ShapeTimer()(timed_proto(pruned_copy(graph, result.plan, deps)), feeds) / ShapeTimer()(whole, feeds)
    assert 0.95 <= fraction / 0.4 <= 1.02, fraction
    assert result.latency["measured_ms"] / result.latency["base_ms"] == pytest.approx(fraction, rel=ROUNDED)
    chosen = [t for t in result.latency["trajectory"] if "slices" in t
              and t["measured_ms"] == round(result.latency["measured_ms"], 4)]
    assert chosen and chosen[-1]["quiet_slices"] >= 5, result.latency["trajectory"]


def test_the_search_waits_for_the_fast_phase_a_bounded_number_of_slices(resnet) -> None:
    """A machine that never returns to the speed of the search's first timing (the original 6% slow from then on)
    gives no pair a quiet slice: each would wait its PAIR_MAX_SLICES (a bad hour made a mobilenet_v2 search last
    more than 15 minutes). The whole search waits at most SEARCH_WAIT_SLICES slices, says so in its record, and
    still returns a plan judged on the slices it has."""
    graph, deps, feeds = resnet
    whole = timed_proto(graph)
    nodes = len(whole.graph.node)
    extra_ms = 0.06 * ShapeTimer()(whole, feeds)

    class SlowerEverAfterTimer(ShapeTimer):
        whole_calls = 0

        def __call__(self, proto, feeds, seconds=None) -> float:
            ms = super().__call__(proto, feeds, seconds)
            if len(proto.graph.node) != nodes:
                return ms
            self.whole_calls += 1
            return ms + extra_ms if self.whole_calls > 1 else ms

    timer = SlowerEverAfterTimer()
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.4), calibration=feeds,
                       latency_timer=timer)
    timed = [t for t in result.latency["trajectory"] if "slices" in t]
    assert result.latency["waited_slices"] == SEARCH_WAIT_SLICES
    # every pair's first PAIR_SLICES, plus the search's waiting (each slice times the plan and the original)
    assert timer.whole_calls <= 1 + 2 * (PAIR_SLICES * (len(timed) + UNREACHABLE_RETRIES) + SEARCH_WAIT_SLICES), \
        timer.whole_calls
    fraction = ShapeTimer()(timed_proto(pruned_copy(graph, result.plan, deps)), feeds) / ShapeTimer()(whole, feeds)
    assert 0.85 <= fraction / 0.4 <= 1.02, fraction


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_a_trajectory_step_that_jumps_over_the_target_is_refined_by_single_group_moves(target) -> None:
    """Two groups of 32 and 48 channels, and kernels slow unless the channels fill 16-wide vectors: each step of
    the search takes 16 channels, 25-50% of the latency. Where two steps bracket the target far from it (0.89x and
    0.83x of the target before), single-group moves between them are timed and the nearest is kept."""
    import torch

    from prune_compile.ir.fx_importer import import_torch_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 48, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(48, 16, 3, padding=1)).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = import_torch_module(model, (x,))
    deps, feeds = analyze(graph), {graph.inputs[0].name: x.numpy()}
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=target), calibration=feeds,
                       latency_timer=ShapeTimer())
    fraction = ShapeTimer()(timed_proto(pruned_copy(graph, result.plan, deps)), feeds) / \
        ShapeTimer()(timed_proto(graph), feeds)
    assert abs(fraction / target - 1) <= 0.10, fraction
    moves = [t for t in result.latency["trajectory"] if "move" in t]
    assert 0 < len(moves) <= 3
    assert result.latency["measured_ms"] / result.latency["base_ms"] == pytest.approx(fraction, rel=1e-4)  # rounded
    assert oracle_error(graph, deps, result.plan, feeds) <= 1e-4


@pytest.mark.parametrize("lazy", [False, True])
def test_boundary_moves_are_ranked_by_measured_layers_unless_the_table_is_lazy(resnet, lazy) -> None:
    """The single-group moves between two bracketing steps are ranked by the table's measured layers (ONNX
    Runtime: an entry is milliseconds), by its estimates only where an entry is a tuning run (lazy). Fails when
    the ranking's own arithmetic leaks into the table's `estimate` switch (it once did: after the first move, a
    measured table ranked the rest by estimates)."""
    from prune_compile.passes.latency import LatencyTable, _boundary_moves

    graph, deps, _ = resnet
    table = LatencyTable(graph, deps, ShapeTimer())
    groups = [g for g in deps.prunable() if table.by_group.get(g.id)]
    size = {g.id: g.size for g in groups}
    floor = {g.id: 1 for g in groups}
    hi_kept = {gid: n - 8 if n > 16 else n for gid, n in size.items()}
    overhead = 0.01

    def predicted_ms(kept: dict[int, int], estimate: bool = False) -> float:
        return overhead + table.layers_sum({g: size[g] - k for g, k in kept.items()}, estimate)

    steps = [(i, {"kept": kept, "predicted_ms": predicted_ms(kept)}) for i, kept in enumerate((size, hi_kept))]
    base = steps[0][1]["predicted_ms"]
    estimated = []
    estimate_ms = table.estimate_ms
    table.estimate_ms = lambda layer, removed: estimated.append(1) or estimate_ms(layer, removed)
    moves = _boundary_moves((*steps[0], (base, base)), (*steps[1], (steps[1][1]["predicted_ms"], base)), 0.98, base,
                            size, table, 8, floor, estimate=lazy)
    assert len(moves) == latency.REFINE_MOVES
    assert bool(estimated) == lazy
    for _, kept, predicted in moves:
        assert predicted == pytest.approx(predicted_ms(kept, estimate=lazy))


def test_the_table_is_built_only_as_deep_as_the_target_needs(resnet) -> None:
    """Every table entry is a layer shape timed (on TVM a tuning run). When the table predicts well, the greedy
    stops at the first step it predicts at the target: nothing deeper is timed. (It used to go on to 0.6x the
    target: resnet18 at 224² on ONNX Runtime timed 664 layer shapes, against 305 now.)"""
    graph, deps, feeds = resnet
    timer = ShapeTimer()
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.5), calibration=feeds,
                       latency_timer=timer)
    search = result.latency
    deepest = [t for t in search["trajectory"] if t["step"] == search["steps"] and "move" not in t]
    assert deepest, search["trajectory"]
    # the deepest step is the first one the table puts under the target, not one far past it
    assert 0.85 * search["target_ms"] <= deepest[0]["predicted_ms"] <= search["target_ms"], deepest
    fraction = timer(timed_proto(pruned_copy(graph, result.plan, deps)), feeds) / search["base_ms"]
    assert abs(fraction / 0.5 - 1) <= 0.10, fraction


def test_the_trajectory_is_extended_while_its_deepest_step_is_too_slow(resnet, monkeypatch) -> None:
    """The whole model gains only 60% of what the table predicts (work the one-layer models do not have, which
    pruning shrinks less): the step the table puts at a 0.6x target runs at 0.76x. With the checkpoint's scaling off
    (a table whose error shows only past the checkpoint), the search extends its trajectory by the measured ratio
    until a step is fast enough, then searches the bracket, and meets the target; without the extension the target
    would be called unreachable."""
    monkeypatch.setattr(latency, "CALIBRATE_SCALE", (1.0, 1.0))
    graph, deps, feeds = resnet
    result, lines, fraction = saving_scaled_search(resnet, 0.6, 0.6)
    search = result.latency
    assert abs(fraction / 0.6 - 1) <= 0.10, fraction
    timed = sorted((t for t in search["trajectory"] if "move" not in t and t["step"] > 0), key=lambda t: t["step"])
    first = min(t["step"] for t in timed if t["predicted_ms"] <= 0.6 * search["base_ms"])
    assert any(t["step"] > first for t in timed), timed  # timed past the table's first step at the target
    # the progress says, as each step is timed, what it measured against what the table predicted
    base = next(t["predicted_ms"] for t in search["trajectory"] if t["step"] == 0)
    for t in timed:
        said = [re.search(r"measured ([\d.]+)x .*the table predicted ([\d.]+)x", line) for line in lines
                if line.startswith(f"latency: step {t['step']} of ")]
        assert said and said[-1], (t, lines)
        assert float(said[-1][1]) == pytest.approx(t["measured_ms"] / t["original_ms"], abs=2e-3)
        assert float(said[-1][2]) == pytest.approx(t["predicted_ms"] / base, abs=2e-3)
    assert oracle_error(graph, deps, result.plan, feeds) <= 1e-4


def test_a_table_off_by_a_factor_is_scaled_at_a_checkpoint(resnet) -> None:
    """The whole model saves 1.3x what the table predicts at every depth (TVM's resnet18 table: 0.687x predicted,
    0.593x measured at one step, 0.491x and 0.372x at another). The greedy times a step part of the way, scales the
    rest of the way by what it measured, and stops near the target: the deepest step is not far past it (uncalibrated,
    the step the table puts at 0.5x runs at 0.35x, and every table entry on the way there is a tuning run)."""
    result, lines, fraction = saving_scaled_search(resnet, 1.3, 0.5)
    search = result.latency
    assert search["calibration_scale"] == pytest.approx(1.3, rel=0.02)
    assert any(re.search(r"saves 1\.30x what the table predicts", line) for line in lines), lines
    timed = [t for t in search["trajectory"] if "move" not in t and t["step"] > 0]
    deepest = max(timed, key=lambda t: t["step"])
    assert deepest["step"] == search["steps"]
    assert 0.45 <= deepest["measured_ms"] / deepest["original_ms"] <= 0.5, timed
    assert deepest["predicted_ms"] > 0.55 * search["base_ms"], deepest  # the table alone would have gone to 0.5x
    assert abs(fraction / 0.5 - 1) <= 0.10, fraction


def test_a_factor_that_drifts_with_depth_is_scaled_again_nearer_the_target(resnet) -> None:
    """TVM's resnet18 table in one run: the whole model saved 1.16x its predicted saving at 0.69x predicted, 1.22x
    at 0.61x, 1.33x at 0.56x; scaled by the first checkpoint alone, the greedy went 4 steps (40 layer shapes, each a
    tuning run) past the chosen one. Here the factor drifts the same way (0.726 + 1.38 x the predicted saving): a
    second checkpoint nearer the target scales the rest of the way (or, fast enough, is where the greedy stops), the
    greedy stops at most a step past the chosen step, and 3 whole models are timed (one checkpoint: 3 steps past,
    5 timed)."""
    result, lines, fraction = saving_scaled_search(resnet, 0.726, 0.5, drift=1.38)
    search = result.latency
    assert search["steps"] <= search["chosen_step"] + 1, (search["steps"], search["chosen_step"])
    timed = [line for line in lines if re.match(r"latency: step \d+ of \d+ measured", line)]
    assert len(timed) <= 3, timed
    assert 0.95 <= fraction / 0.5 <= 1.02, fraction


class KernelsSlowerInTheModelTimer(ShapeTimer):
    """TVM's table: each layer timed alone (as ShapeTimer times it), and a whole model that runs every kernel
    `slowdown` x slower (resnet18 at 224²: 1.3-1.45x their tuning runs' times), so that
    what it takes beyond the table's sum is a share of its layers' time. `overhead_scales`: whether it says so."""

    def __init__(self, slowdown: float, overhead_scales: bool = True) -> None:
        super().__init__()
        self.slowdown, self.overhead_scales = slowdown, overhead_scales

    def layer(self, proto, feeds) -> float:
        return super().__call__(proto, feeds)

    def __call__(self, proto, feeds, seconds=None) -> float:
        return self.slowdown * super().__call__(proto, feeds)


@pytest.mark.parametrize("overhead_scales", [True, False])
def test_a_table_of_kernels_timed_alone_scales_what_the_model_adds_to_them(resnet, overhead_scales) -> None:
    """A timer whose entries are kernels timed alone (TVM's tuning runs) has the original's time beyond the table's
    sum scaled with the layers: then the table predicts every timed step (the first checkpoint, CALIBRATE_AT of the
    way to the target, measures what was predicted there; the search reports `overhead_scales`). Kept constant, as
    for ONNX Runtime's in-model timings, the table predicts 1/1.4 of the saving here (TVM's resnet18: 0.61-0.72),
    which only the checkpoints correct."""
    graph, deps, feeds = resnet
    timer = KernelsSlowerInTheModelTimer(1.4, overhead_scales)
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.5), calibration=feeds,
                       latency_timer=timer)
    search = result.latency
    assert search["overhead_scales"] is overhead_scales
    timed = [t for t in search["trajectory"] if t["step"] > 0]
    off = [(t["measured_ms"] / t["original_ms"]) / (t["predicted_ms"] / search["base_ms"]) for t in timed]
    if overhead_scales:
        assert all(abs(x - 1) <= 0.01 for x in off), (off, timed)
        assert search["calibration_scale"] == pytest.approx(1.0, abs=0.01)
        first = timed[0]  # the first checkpoint
        assert first["measured_ms"] / first["original_ms"] == pytest.approx(1 - latency.CALIBRATE_AT * 0.5, abs=0.03)
    else:
        assert search["calibration_scale"] == pytest.approx(1.4, rel=0.02)
        assert max(abs(x - 1) for x in off) > 0.1, off
    assert 0.95 <= search["measured_ms"] / search["base_ms"] / 0.5 <= 1.02


@pytest.mark.parametrize("amplified, target", [(1.0, 0.4), (1.3, 0.5)])
def test_the_bracket_is_searched_by_interpolation(resnet, amplified, target) -> None:
    """Each step timed is a whole model (on TVM a tuned build, 60-80 s for resnet18). Between a step slower than the
    target and one fast enough, the next one timed is where their measured ratios, interpolated along the table's
    predictions, put the target: with a table right up to a factor on its saving that is at most one step more than
    the two checkpoints and the deepest step (bisection timed 7 steps here at 0.4x)."""
    _, lines, fraction = saving_scaled_search(resnet, amplified, target)
    timed = [line for line in lines if re.match(r"latency: step \d+ of \d+ measured", line)]
    assert len(timed) <= 4, timed
    assert 0.95 <= fraction / target <= 1.02, fraction


def test_a_plateau_in_the_table_is_crossed_by_larger_moves(resnet) -> None:
    """Kernels that run fast only when the output channels fill 64-wide vectors: every count 1/8 of a group below
    its full width is slower than the full width (as ONNX Runtime's mobilenet_v2 depthwise layers were at 88 and 80
    of 96 channels, which stopped a search at 0.53x for a 0.5x target). The greedy looks further down when nothing
    near saves time, and meets the target."""
    graph, deps, feeds = resnet
    timer = ShapeTimer(width=64)
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.5), calibration=feeds,
                       latency_timer=timer)
    fraction = timer(timed_proto(pruned_copy(graph, result.plan, deps)), feeds) / result.latency["base_ms"]
    assert abs(fraction / 0.5 - 1) <= 0.10, fraction


def test_the_search_times_the_graph_the_backends_build(resnet) -> None:
    """Backends run batch_norms folded into their convs (ONNX Runtime folds them itself, the TVM compile step with
    passes/fold_bn). A timer that charges an unfolded batch_norm a fixed cost that pruning does not remove (on TVM
    a pass in NCHW between two layout transforms) must not steer the plan: it meets the target on the folded graph.
    Timing unfolded graphs, the search chose a plan at 0.36x for a 0.5x target."""
    graph, deps, feeds = resnet

    class UnfoldedNormTimer(ShapeTimer):
        def reading(self, proto) -> float:
            return sum(2.0 if n.op == "batch_norm" else node_macs(n) * 1e-6 + 0.002
                       for n in import_onnx(proto).nodes)

    timer = UnfoldedNormTimer()
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.5), calibration=feeds,
                       latency_timer=timer)

    def built(g):
        return export_onnx(folded_copy(g)[0])

    assert "BatchNormalization" in {n.op_type for n in export_onnx(graph).graph.node}
    fraction = timer(built(pruned_copy(graph, result.plan, deps)), feeds) / timer(built(graph), feeds)
    assert abs(fraction / 0.5 - 1) <= 0.10, fraction


def test_latency_plan_prefers_counts_the_kernels_run_fast_at(resnet) -> None:
    graph, deps, feeds = resnet
    result = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.5), calibration=feeds,
                       latency_timer=ShapeTimer(width=16))
    kept = {g.id: g.size - len(result.plan.removed_of(g)) for g in deps.prunable()}
    # candidates step by 8, but the timer makes non-multiples of 16 slower: the search never settles on them
    assert result.latency["step"] == 8
    assert all(k % 16 == 0 for k in kept.values() if k >= 16), kept
    assert any(k < g.size for g in deps.prunable() for k in [kept[g.id]])


class LazyShapeTimer(ShapeTimer):
    lazy_table = True  # as the TVM timer: an entry is a tuning run


@pytest.mark.parametrize("width, fraction", [(16, 0.6), (64, 0.8)])  # measured: 199 of 383 shapes, 287 of 396
def test_a_lazy_table_measures_only_the_moves_its_estimates_rank_first(resnet, width, fraction) -> None:
    """Where an entry is a tuning run, the greedy ranks candidates by estimates (MACs at the layer's best measured
    ms per MAC) and measures only until a measured move beats every estimate. Here the estimates are never slower
    than the timer (fixed cost per op, slower counts off the vector width), so the lazy greedy takes the moves the
    measured table takes, step for step, for a fraction of the layer shapes; at width 64 nothing near full width
    saves time and the greedy reaches further down (REACHES), and most estimates are 1.8x optimistic, so more
    candidates are measured. Fails when the lazy table's estimates decide a move
    unmeasured, or when it measures every candidate."""
    graph, deps, feeds = resnet
    options = PlanningOptions(policy="latency", target_latency=0.5)
    exact = make_plan(graph, deps, options, calibration=feeds, latency_timer=ShapeTimer(width=width)).latency
    lazy = make_plan(graph, deps, options, calibration=feeds, latency_timer=LazyShapeTimer(width=width)).latency
    assert lazy["lazy_table"] and not exact["lazy_table"]
    assert [(t["step"], t["predicted_ms"], t["importance_lost"]) for t in lazy["trajectory"]] == \
        [(t["step"], t["predicted_ms"], t["importance_lost"]) for t in exact["trajectory"]]
    assert lazy["steps"] == exact["steps"] and lazy["chosen_step"] == exact["chosen_step"]
    assert lazy["table_entries"] <= fraction * exact["table_entries"], (lazy["table_entries"], exact["table_entries"])


def _one_conv(shape_in, weight, group, stride, bias):
    from prune_compile.ir import Graph
    from prune_compile.ir.graph import Value

    rng = np.random.default_rng(0)
    x = Value("x", shape_in, np.float32)
    inputs = [x, Value("w", weight, np.float32, rng.standard_normal(weight).astype(np.float32))]
    if bias:
        inputs.append(Value("b", (weight[0],), np.float32, rng.standard_normal(weight[0]).astype(np.float32)))
    size = (shape_in[2] + 2 - weight[2]) // stride + 1
    y = Value("y", (1, weight[0], size, size), np.float32)
    g = Graph(name="layer")
    g.inputs, g.outputs = [x], [y]
    g.add_node("conv", inputs, [y], {"group": group, "kernel_shape": list(weight[2:]), "pads": [1, 1, 1, 1],
                                     "strides": [stride, stride], "dilations": [1, 1]})
    return export_onnx(g), {"x": rng.standard_normal(shape_in).astype(np.float32)}


@pytest.mark.parametrize("shape_in, weight, group, stride, bias", [
    ((1, 96, 14, 14), (96, 1, 3, 3), 96, 1, True),  # mobilenet_v2's depthwise conv
    ((1, 32, 28, 28), (64, 32, 3, 3), 1, 2, False),  # a strided conv without bias
])
def test_the_onnx_runtime_table_times_a_conv_among_copies_of_itself(tmp_path, shape_in, weight, group, stride,
                                                                    bias) -> None:
    """The ORT table times a conv as LAYER_COPIES convs of its shape summed: the model computes the sum of the
    copies (each with its own weights), and ONNX Runtime runs it as just the convs, in NCHWc between one reorder in
    and one out (each Add fused into a conv, no copy merged), so the time divided is a conv's time in a model."""
    import platform

    import onnx
    from onnx import numpy_helper

    from prune_compile.backends import ort
    from prune_compile.passes.latency import LAYER_COPIES, summed_copies

    proto, feeds = _one_conv(shape_in, weight, group, stride, bias)
    copies = summed_copies(proto, 3)
    # the oracle: the original conv run with each copy's weights, summed
    constants = {i.name: numpy_helper.to_array(i) for i in copies.graph.initializer}
    expected = 0
    for c in range(3):
        one = onnx.ModelProto()
        one.CopyFrom(proto)
        for init in one.graph.initializer:
            init.CopyFrom(numpy_helper.from_array(constants[init.name if c == 0 else f"{init.name}.copy{c}"],
                                                  init.name))
        expected = expected + ort.run(one, feeds)[0]
    got = ort.run(copies, feeds)[0]
    assert got.shape == expected.shape and np.allclose(got, expected, rtol=1e-4, atol=1e-3)
    if platform.machine() not in ("x86_64", "AMD64"):
        return  # the NCHWc layout is ONNX Runtime's x86 path
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    onnxruntime.InferenceSession(summed_copies(proto, LAYER_COPIES).SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops == ["ReorderInput"] + ["Conv"] * LAYER_COPIES + ["ReorderOutput"], ops


def test_latency_plan_keeps_more_macs_than_uniform_at_equal_latency(resnet) -> None:
    """Against a timer where early, wide-resolution layers cost more per MAC (memory bound), the latency plan
    prunes there and keeps more MACs than a uniform plan of the same latency."""
    graph, deps, feeds = resnet

    class MemoryBoundTimer(ShapeTimer):
        def reading(self, proto) -> float:
            graph = import_onnx(proto)
            return sum(node_macs(n) * 1e-6 * (1 + 3 * (n.outputs[0].shape[-1] >= 16)) + 0.002
                       for n in graph.nodes if n.outputs[0].shape)

    timer = MemoryBoundTimer()
    lat = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=0.5), calibration=feeds,
                    latency_timer=timer)
    lat_graph = pruned_copy(graph, lat.plan, deps)
    lat_ms = timer(timed_proto(lat_graph), feeds)
    lo, hi = 0.0, 0.95
    for _ in range(30):  # uniform ratio with the same latency
        mid = (lo + hi) / 2
        uni = pruned_copy(graph, make_plan(graph, deps, PlanningOptions(ratio=mid)).plan, deps)
        ms = timer(timed_proto(uni), feeds)
        lo, hi = (mid, hi) if ms > lat_ms else (lo, mid)
    assert ms == pytest.approx(lat_ms, rel=0.03)
    assert graph_cost(lat_graph)["macs"] > 1.1 * graph_cost(uni)["macs"]


def test_no_group_loses_more_than_the_latency_policys_max_ratio(resnet) -> None:
    """The latency policy caps every group at 70% removed unless --max-ratio says otherwise: its search drains the
    groups whose channels save time in many layers at once (residual streams) down to whatever cap there is, and at
    0.9 that cost a trained ResNet most of its accuracy at equal latency (README, "Accuracy at equal latency")."""
    graph, deps, feeds = resnet
    kept = {}
    for max_ratio in (None, 0.9):
        options = PlanningOptions(policy="latency", target_latency=0.3, max_ratio=max_ratio)
        result = make_plan(graph, deps, options, calibration=feeds, latency_timer=ShapeTimer())
        kept[max_ratio] = {g.id: 1 - result.group_ratios[g.id] for g in deps.groups if g.id in result.group_ratios}
        assert options.group_max_ratio == (0.7 if max_ratio is None else 0.9)
    assert min(kept[None].values()) >= 0.3 - 1e-9, kept[None]
    # the cap binds: allowed to, the search takes some group below what 0.7 leaves
    assert min(kept[0.9].values()) < 0.3, kept[0.9]
    assert PlanningOptions(policy="global").group_max_ratio == 0.9


def test_layers_map_every_conv_and_the_classifier(resnet) -> None:
    graph, deps, _ = resnet
    layers = find_layers(graph, deps)
    convs = [n for n in graph.nodes if n.op == "conv"]
    # every conv but the stem's input side touches a prunable group; the classifier consumes the last group
    assert len(layers) == len(convs) + 1


def test_a_conv_entry_holds_the_epilogue_the_whole_model_fuses_into_it(resnet) -> None:
    """For timers that ask (TVM), a conv is timed with what its kernel computes in the whole model: the folded batch
    norm's bias, the residual add and the relu. resnet18: the stem and every block's first conv end in bias + relu,
    every block's second conv in bias + residual add + relu (the add goes to the main branch, not to the downsample
    conv, which keeps its bias alone). The one-layer models are built that way, a residual as a second input."""
    from collections import Counter

    from prune_compile.passes.latency import LatencyTable, conv_epilogue

    graph, deps, _ = resnet
    convs = [n for n in graph.nodes if n.op == "conv"]
    epilogues = Counter(tuple(op[0] for op in conv_epilogue(graph, n)) for n in convs)
    assert epilogues == {("bias", "relu"): 9, ("bias", "add", "relu"): 8, ("bias",): 3}, epilogues

    class RecordingTimer:
        layer_epilogues = True

        def __init__(self) -> None:
            self.models = []

        def __call__(self, proto, feeds, seconds=None) -> float:
            assert set(feeds) == {i.name for i in proto.graph.input}
            self.models.append((tuple(n.op_type for n in proto.graph.node), len(proto.graph.input),
                                len(proto.graph.node[0].input)))
            return 1.0

    timer = RecordingTimer()
    table = LatencyTable(graph, deps, timer)
    table.full_sum()
    assert set(timer.models) == {(("Conv", "Relu"), 1, 3), (("Conv", "Add", "Relu"), 2, 3), (("Conv",), 1, 3),
                                 (("Gemm",), 1, 3)}  # (ops, model inputs, conv inputs); the classifier alone
    plain = RecordingTimer()
    plain.layer_epilogues = False  # ONNX Runtime's table: a conv alone, as its summed copies need
    LatencyTable(graph, deps, plain).full_sum()
    assert {m[0] for m in plain.models} == {("Conv",), ("Gemm",)}


def test_tvm_builds_the_table_entries_kernels_in_the_whole_model() -> None:
    """The point of the epilogues on TVM: every conv kernel the whole (folded) resnet18 tunes is a task some table
    entry tuned, same function and same ledger key (task_family drops Relax's numbering), so the bisection's
    whole-model builds and the final build reuse the table's records instead of tuning every conv again. Lowered
    only, the tuner stopped at its task list. Fails when an entry's epilogue differs from the fused kernel."""
    pytest.importorskip("tvm")
    import importlib

    import torch
    import torchvision

    from prune_compile.backends.tvm import tuning
    from prune_compile.backends.tvm.tuning import TuningOptions
    from prune_compile.errors import BackendError
    from prune_compile.ir.fx_importer import import_torch_module
    from prune_compile.passes.latency import LatencyTable

    build = importlib.import_module("prune_compile.backends.tvm.build")
    torch.manual_seed(0)
    graph = import_torch_module(torchvision.models.resnet18(num_classes=10).eval(), (torch.randn(1, 3, 56, 56),))
    keys: list[str] = []

    def task_list(mod, target, target_name, options):
        from tvm.s_tir import meta_schedule as ms

        keys.extend(tuning.task_key(t) for t in ms.relax_integration.extract_tasks(mod, target))
        raise BackendError("task list taken")

    def lowered(proto) -> list[str]:
        keys.clear()
        with pytest.raises(BackendError, match="task list taken"):
            build.lower_model(proto, "cpu", tuning=TuningOptions(trials=8))
        return [k for k in keys if "conv2d" in k]

    class TaskTimer:
        layer_epilogues = True
        tasks: set[str] = set()

        def layer(self, proto, feeds) -> float:
            self.tasks.update(lowered(proto))
            return 1.0

    timer = TaskTimer()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "tune", task_list)
        LatencyTable(graph, analyze(graph), timer).full_sum()
        whole = lowered(timed_proto(graph))
    assert len(set(whole)) >= 8 and set(whole) <= timer.tasks, sorted(set(whole) - timer.tasks)


@pytest.mark.parametrize("options,needle", [
    ({"policy": "latency"}, "go together"),
    ({"target_latency": 0.5}, "go together"),
    ({"policy": "latency", "target_latency": 1.5}, "in (0, 1)"),
    ({"policy": "latency", "target_latency": 0.5, "target_macs": 2.0}, "give one"),
    ({"policy": "latency", "target_latency": 0.5, "latency_engine": "tensorrt"}, "expected one of ort, tvm"),
    ({"policy": "latency", "target_latency": 0.5, "latency_engine": "tvm", "latency_trials": 4}, ">= 8"),
    ({"ratio": 0.5, "latency_engine": "tvm"}, "add --policy latency"),
])
def test_latency_option_errors(options, needle) -> None:
    with pytest.raises(UsageError, match=f".*{needle.replace('(', '.').replace(')', '.')}"):
        PlanningOptions(**options).validate()


@pytest.mark.serial  # searched by timing the model on this machine
def test_cli_latency_policy_end_to_end(tmp_path, capsys) -> None:
    from prune_compile.cli import main

    out = tmp_path / "o"
    assert main([DEFAULT_MODEL, "-o", str(out), "--policy", "latency", "--target-latency", "0.6x"]) == 0
    shown = capsys.readouterr().out
    assert "for latency 0.6x" in shown and "layer shapes timed" in shown
    report = json.loads((out / "report.json").read_text())
    assert report["pruning"]["policy"] == "latency" and report["pruning"]["pruned_groups"] > 0
    assert report["pruning"]["max_ratio"] == 0.7  # the latency policy's own cap (see policy.DEFAULT_MAX_RATIO)
    assert report["verification"]["max_relative_error"] <= 1e-5
    search = json.loads((out / "timings.json").read_text())["planning"]
    assert search["target_ms"] == pytest.approx(0.6 * search["base_ms"], rel=1e-3)
    assert "measured_ms" not in json.dumps(report)  # measurements stay out of report.json
    # the plan replays to the same model: the reproducible way to ship a latency-planned build
    assert main([DEFAULT_MODEL, "-o", str(tmp_path / "r"), "-q", "--plan", str(out / "plan.json")]) == 0
    assert (out / "model.pruned.onnx").read_bytes() == (tmp_path / "r" / "model.pruned.onnx").read_bytes()


def test_cli_latency_factor_parsing(tmp_path, capsys) -> None:
    from prune_compile.cli import main

    with pytest.raises(SystemExit) as e:
        main([DEFAULT_MODEL, "-o", str(tmp_path / "e"), "--policy", "latency", "--target-latency", "fast"])
    assert e.value.code == 2 and "not a latency factor" in capsys.readouterr().err
    assert main([DEFAULT_MODEL, "-o", str(tmp_path / "e"), "--target-latency", "0.5x"]) == 2
    assert "--policy latency and --target-latency go together" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.serial  # tunes and times on this machine
@pytest.mark.big
def test_cli_tvm_latency_engine_without_a_compile_target(tmp_path, capsys) -> None:
    """--latency-engine tvm needs no --target: it reads --num-cores and --tune-db itself (it crashed on the target
    options a run without a compile pass did not make)."""
    import onnx

    from prune_compile.cli import main

    graph, _, _ = _one_group_net()
    model = tmp_path / "net.onnx"
    onnx.save(export_onnx(graph), model)
    out, db = tmp_path / "o", tmp_path / "db"
    rc = main([str(model), "-o", str(out), "--policy", "latency", "--target-latency", "0.7x", "--latency-engine",
               "tvm", "--latency-trials", "8", "--num-cores", "1", "--tune-db", str(db)])
    err = capsys.readouterr().err
    assert rc == 0 or (rc == 2 and "unreachable" in err), err  # 2 steps may not reach 0.7x on a noisy machine
    if rc == 0:
        assert json.loads((out / "timings.json").read_text())["planning"]["engine"] == "tvm-cpu"
    from prune_compile.backends.tvm.targets import TargetOptions, make_target
    from prune_compile.backends.tvm.tuning import database_dir, measuring_threads

    target = make_target("cpu", TargetOptions(num_cores=1))  # the tuning was for one core: --num-cores got there
    want = database_dir(str(db), "cpu", str(target), measuring_threads(target, None))
    assert [str(p) for p in db.iterdir()] == [want]


def _one_group_net():
    """conv 3→16 → relu → conv 16→8 (the model's output): one prunable group of 16 (kept 16 or 8), two layers."""
    import torch

    from prune_compile.ir.fx_importer import import_torch_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 56, 56)
    graph = import_torch_module(model, (x,))
    return graph, analyze(graph), {graph.inputs[0].name: x.numpy()}


@pytest.mark.serial  # tunes and times on this machine
@pytest.mark.big
def test_tvm_latency_engine_measures_tuned_kernels_and_reuses_records(tmp_path, monkeypatch) -> None:
    """The latency policy on TVM's tuned cpu code (mechanics; plans on real models: bench_latency_plan --engine
    tvm): a layer's entry is its tuned kernel, which the whole one-layer model (kernel + layout transforms at its
    borders) cannot beat; a second plan on the same database tunes nothing and measures the same table."""
    pytest.importorskip("tvm")
    from prune_compile.backends.tvm import latency_timer
    from prune_compile.backends.tvm.latency_timer import TvmTimer
    from prune_compile.ir import Graph
    from prune_compile.ir.graph import Value

    graph, deps, feeds = _one_group_net()
    assert [g.size for g in deps.prunable()] == [16]
    db = str(tmp_path / "db")
    options = PlanningOptions(policy="latency", target_latency=0.7, latency_engine="tvm", latency_trials=8)
    first = TvmTimer(database=db, trials_per_layer=8)
    try:
        result = make_plan(graph, deps, options, calibration=feeds, latency_timer=first)
    except UsageError as e:  # a 2-step trajectory may not reach 0.7x on a noisy machine; the mechanics still ran
        assert "unreachable" in str(e)
        result = None
    assert first.trials_run > 0 and first.layers_tuned == 4  # 2 layers x kept {16, 8}
    if result is not None:
        assert result.latency["engine"] == "tvm-cpu" and result.latency["tuning_trials_run"] == first.trials_run
        assert result.latency["overhead_scales"] is True  # entries are kernels tuned alone (LatencyTable.predicted_ms)
        assert result.latency["table_entries"] == 4
        assert oracle_error(graph, deps, result.plan, feeds) <= 1e-4

    again = TvmTimer(database=db, trials_per_layer=8)
    conv = graph.nodes[-1]
    assert conv.op == "conv"
    g = Graph(name="layer")
    x = Value("x", conv.inputs[0].shape, np.float32)
    y = Value("y", conv.outputs[0].shape, np.float32)
    g.inputs, g.outputs = [x], [y]
    g.add_node("conv", [x, *conv.inputs[1:]], [y], dict(conv.attrs))
    proto = export_onnx(g)
    layer_feeds = {"x": np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)}
    digested = []
    monkeypatch.setattr(latency_timer, "_digest", lambda p, f=latency_timer._digest: digested.append(p) or f(p))
    kernel_ms, model_ms = again.layer(proto, layer_feeds), again(proto, layer_feeds, 0.3)
    again(proto, layer_feeds, 0.05)
    assert digested == [proto]  # a model timed again (the search's slices) is not serialized and hashed again
    # the kernel is a share of the model (a sanity bound, not a speed claim): since Winograd (3x3 convs, session 48)
    # and its tile groups (49) it reads ~0.4 of it alone, 0.30 next to a second test worker
    assert 0.15 * model_ms <= kernel_ms <= 1.1 * model_ms, (kernel_ms, model_ms)
    again(timed_proto(graph), feeds, 0.1)
    assert again.trials_run == 0  # the layer shape and the whole model: records from the first search


def test_cli_latency_engine_options(tmp_path, capsys) -> None:
    from prune_compile.api import default_pipeline
    from prune_compile.cli import main

    assert main([DEFAULT_MODEL, "-o", str(tmp_path / "e"), "--policy", "latency", "--target-latency", "0.5x",
                 "--latency-engine", "tvm", "--latency-trials", "4"]) == 2
    assert "--latency-trials 4: must be >= 8" in capsys.readouterr().err
    assert main([DEFAULT_MODEL, "-o", str(tmp_path / "e"), "--ratio", "0.5", "--latency-engine", "tvm"]) == 2
    assert "add --policy latency" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    planning = PlanningOptions(policy="latency", target_latency=0.5, latency_engine="tvm", latency_trials=32)
    assert "plan{policy=latency target-latency=0.5 latency-engine=tvm latency-trials=32}" in default_pipeline(planning)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_the_table_times_a_recurrent_layer_at_the_shape_the_plan_gives_it(op: str) -> None:
    """The one-node model the table times for a recurrent layer is the pruned graph's layer: same MACs (W, R, the
    biases and peepholes follow the hidden units), and ONNX Runtime runs it."""
    from prune_compile.backends import ort
    from prune_compile.passes.latency import LatencyTable
    from prune_compile.passes.plan import Plan

    from .test_recurrent_units import _onnx_recurrent

    graph = import_onnx(_onnx_recurrent(op, 2))
    deps = analyze(graph)
    (node,) = [n for n in graph.nodes if n.op == op.lower()]
    (hidden,) = [g for g in deps.groups if any(m.value is node.inputs[2] and m.axis == 2 for m in g.members)]
    (features,) = [g for g in deps.groups if any(m.value is node.inputs[1] and m.axis == 2 for m in g.members)]

    def timer(proto, feeds) -> float:
        ort.run(proto, feeds)
        (layer,) = import_onnx(proto).nodes
        return float(node_macs(layer))

    table = LatencyTable(graph, deps, timer)
    (layer,) = [layer for layer in table.layers if layer.node is node]
    assert sorted(layer.terms) == sorted([(hidden.id, 1, {"LSTM": 4, "GRU": 3}[op]), (features.id, 2, 1)])
    removed = {hidden.id: np.array([0, 2, 5]), features.id: np.array([1, 4])}
    pruned = pruned_copy(graph, Plan(removed), deps)
    (slim,) = [n for n in pruned.nodes if n.op == op.lower()]
    assert table.layer_ms(layer, {gid: len(r) for gid, r in removed.items()}) == node_macs(slim)
    assert table.layer_ms(layer, {}) == node_macs(node)
