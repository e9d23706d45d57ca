"""Planning policies: turn groups + importance into a Plan.

- `uniform`: every prunable group loses `floor(r * size)` channels, r = the ratio or a per-parameter override.
- `global`: all prunable channels ranked together by normalized importance; the lowest go first until the
  ratio of all prunable channels is reached, with a per-group cap (`max_ratio`).
Both honour `min_channels`, `round_to` (kept counts are multiples of N, except in groups smaller than N) and
`ignore` globs (a group with any parameter matching is left whole). A `target_macs` reduction (e.g. 2.5 for 2.5x
fewer MACs) replaces the ratio: the ratio (uniform) or the global cut is found by bisection on the real MAC count
of the rewritten graph.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from .calibration import METRICS
from .deps import DependencyResult, Group
from .importance import CRITERIA, ImportanceStats, group_importance, normalized
from .plan import Plan, param_name
from .sensitivity import ALLOCATIONS

POLICIES = ("uniform", "global", "sensitivity", "latency")
# the most one group may lose when --max-ratio is not given. The latency policy's is tighter: its search takes the
# channels that lose the least importance per millisecond saved, and a residual stream's channels save time in
# every conv along it, so at 0.9 it drove them to the floor (resnet18 at 0.5x: 8 of 64 in the stem and stage 1).
# On a trained model that costs accuracy at equal measured latency (tools/bench_accuracy_latency.py, MNIST ResNet
# at 0.30x: BN-recalibrated 9.2% at 0.9 against 51.1% at 0.7 and 45.4% for the aligned uniform plan)
DEFAULT_MAX_RATIO = {"global": 0.9, "latency": 0.7}
# ONNX Runtime; TVM's tuned code for the cpu target, or for the arm target on a board over RPC
# (backends/tvm/latency_timer)
LATENCY_ENGINES = ("ort", "tvm", "tvm-arm")


@dataclass
class PlanningOptions:
    ratio: float = 0.0
    policy: str = "uniform"
    importance: str = "l2"
    round_to: int = 1
    min_channels: int = 1
    max_ratio: float | None = None  # global, latency: no group loses more than this fraction (None: the policy's)
    ignore: Sequence[str] = ()
    overrides: Mapping[str, float] = field(default_factory=dict)  # parameter glob → ratio (uniform)
    target_macs: float | None = None  # wanted MACs reduction factor (before / after), replaces `ratio`
    target_latency: float | None = None  # latency policy: wanted latency as a fraction of the original's
    latency_engine: str = "ort"  # latency policy: what measures, ONNX Runtime or TVM's tuned cpu (or arm) code
    latency_trials: int = 16  # latency policy on TVM: tuning trials per layer shape (whole models: × layers)
    seed: int = 0
    sensitivity_grid: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    sensitivity_allocation: str = "lagrange"  # or "threshold", "greedy" (see passes/sensitivity.py)
    sensitivity_metric: str = "output-change"  # or "cross-entropy", "top1" (see passes/calibration.py)
    calibration_data: str | None = None  # .npz the sensitivity policy measures on (default: the example inputs)

    @property
    def group_max_ratio(self) -> float:
        """`max_ratio`, or the policy's default when it is None (see DEFAULT_MAX_RATIO)."""
        if self.max_ratio is not None:
            return self.max_ratio
        return DEFAULT_MAX_RATIO.get(self.policy, DEFAULT_MAX_RATIO["global"])

    def validate(self, policy_checks: bool = True) -> None:
        """Check every value; `policy_checks=False` skips the checks tying options to the policy (a pipeline's
        plan pass may choose another policy than the command line's and checks them again)."""
        if self.policy not in POLICIES:
            raise UsageError(f"--policy {self.policy}: unknown policy ({', '.join(POLICIES)})")
        if self.sensitivity_allocation not in ALLOCATIONS:
            raise UsageError(f"--sensitivity-allocation {self.sensitivity_allocation}: expected one of "
                             f"{', '.join(ALLOCATIONS)}")
        if self.sensitivity_metric not in METRICS:
            raise UsageError(f"--sensitivity-metric {self.sensitivity_metric}: expected one of {', '.join(METRICS)}")
        if policy_checks and self.policy != "sensitivity" and self.sensitivity_metric != "output-change":
            raise UsageError(f"--sensitivity-metric is what the sensitivity policy measures with; policy "
                             f"'{self.policy}' does not use it (add --policy sensitivity)")
        if policy_checks and self.policy != "sensitivity" and self.calibration_data and self.importance != "taylor":
            raise UsageError("--calibration-data is what the sensitivity policy measures on and Taylor importance "
                             f"takes gradients from; policy '{self.policy}' with importance '{self.importance}' does "
                             "not use it (add --policy sensitivity or --importance taylor)")
        if self.importance not in CRITERIA:
            raise UsageError(f"--importance {self.importance}: unknown criterion ({', '.join(CRITERIA)})")
        if not 0.0 <= self.ratio < 1.0:
            raise UsageError(f"--ratio {self.ratio}: must be in [0, 1)")
        if self.round_to < 1:
            raise UsageError(f"--round-to {self.round_to}: must be >= 1")
        if self.min_channels < 1:
            raise UsageError(f"--min-channels {self.min_channels}: must be >= 1")
        if self.max_ratio is not None and not 0.0 < self.max_ratio < 1.0:
            raise UsageError(f"--max-ratio {self.max_ratio}: must be in (0, 1)")
        for glob, r in self.overrides.items():
            if not 0.0 <= r < 1.0:
                raise UsageError(f"--override {glob}={r}: ratio must be in [0, 1)")
        if policy_checks and (self.policy == "latency") != (self.target_latency is not None):
            raise UsageError("--policy latency and --target-latency go together (e.g. --policy latency "
                             "--target-latency 0.5x)")
        if self.target_latency is not None and not 0.0 < self.target_latency < 1.0:
            raise UsageError(f"--target-latency {self.target_latency}: must be a fraction of the original "
                             "latency in (0, 1), e.g. 0.5x")
        if self.latency_engine not in LATENCY_ENGINES:
            raise UsageError(f"--latency-engine {self.latency_engine}: expected one of {', '.join(LATENCY_ENGINES)}")
        if self.latency_trials < 8:
            raise UsageError(f"--latency-trials {self.latency_trials}: must be >= 8 (one tuning search round)")
        if policy_checks and self.policy != "latency" and (self.latency_engine != "ort" or self.latency_trials != 16):
            raise UsageError("--latency-engine and --latency-trials say how the latency policy measures; policy "
                             f"'{self.policy}' does not measure latency (add --policy latency)")
        if self.target_latency is not None and self.target_macs is not None:
            raise UsageError("--target-latency and --target-macs are two targets: give one")
        if self.target_macs is not None and self.target_macs < 1.0:
            raise UsageError(f"--target-macs {self.target_macs}: must be >= 1 (a reduction factor, e.g. 2.5)")


def parse_overrides(specs: Sequence[str]) -> dict[str, float]:
    """`GLOB=RATIO` strings (--override, plan{override=...}) → {glob: ratio}."""
    overrides = {}
    for spec in specs:
        glob, sep, value = spec.rpartition("=")
        try:
            overrides[glob] = float(value)
        except ValueError:
            sep = ""
        if not sep or not glob:
            raise UsageError(f"--override '{spec}': expected GLOB=RATIO")
    return overrides


@dataclass
class PlanningResult:
    plan: Plan
    ignored_groups: list[int] = field(default_factory=list)
    unmatched_ignores: list[str] = field(default_factory=list)
    unmatched_overrides: list[str] = field(default_factory=list)
    importance_notes: dict[str, int] = field(default_factory=dict)
    ratio_used: float | None = None
    macs_ratio: float | None = None
    curves: list = field(default_factory=list)  # sensitivity: per-group damage curves (Curve.to_json())
    group_ratios: dict[int, float] = field(default_factory=dict)
    latency: dict | None = None  # latency policy: what the search measured (run-dependent: timings.json)
    calibration: str | None = None  # sensitivity: what it measured on, when not the example inputs


def _matches(group: Group, globs: Sequence[str]) -> set[str]:
    names = {param_name(m) for m in group.params}
    return {g for g in globs if any(fnmatch.fnmatchcase(n, g) for n in names)}


def kept_after_rounding(size: int, kept: int, round_to: int, min_channels: int) -> int:
    """Kept count rounded *up* to a multiple of `round_to` (never past `size`); groups smaller than `round_to`
    keep their count. Rounding up keeps the plan at or below the requested removal."""
    kept = max(kept, min(min_channels, size))
    if round_to > 1 and size >= round_to:
        kept = min(size, max(round_to, math.ceil(kept / round_to) * round_to))
    return kept


def lowest(score: np.ndarray, n: int) -> np.ndarray:
    order = np.lexsort((np.arange(score.size), score))  # ties broken by index: deterministic
    return np.sort(order[:n]).astype(np.int64)


class _Planner:
    def __init__(self, deps: DependencyResult, options: PlanningOptions, gradients=None) -> None:
        options.validate()
        self.deps, self.options = deps, options
        self.result = PlanningResult(Plan())
        stats = ImportanceStats()
        used_ignores: set[str] = set()
        used_overrides: set[str] = set()
        self.groups: list[Group] = []
        self.override: dict[int, float] = {}
        for g in deps.prunable():
            hit = _matches(g, options.ignore)
            if hit:
                used_ignores |= hit
                self.result.ignored_groups.append(g.id)
                continue
            hits = _matches(g, list(options.overrides))
            if hits:
                used_overrides |= hits
                self.override[g.id] = max(options.overrides[h] for h in hits)
            self.groups.append(g)
        self.scores = {g.id: group_importance(g, options.importance, gradients=gradients, seed=options.seed,
                                              stats=stats, name_of=param_name) for g in self.groups}
        self.result.unmatched_ignores = [g for g in options.ignore if g not in used_ignores]
        self.result.unmatched_overrides = [g for g in options.overrides if g not in used_overrides]
        self.result.importance_notes = stats.fallbacks

    def uniform(self, ratio: float) -> Plan:
        o = self.options
        plan = Plan()
        for g in self.groups:
            r = self.override.get(g.id, ratio)
            kept = kept_after_rounding(g.size, g.size - math.floor(r * g.size), o.round_to, o.min_channels)
            if kept < g.size:
                plan.removed[g.id] = lowest(self.scores[g.id], g.size - kept)
        return plan

    def global_(self, ratio: float) -> Plan:
        """Remove the globally lowest normalized scores until `ratio` of all prunable channels is gone."""
        o = self.options
        total = sum(g.size for g in self.groups)
        budget = math.floor(ratio * total)
        entries = []  # (score, group id, channel)
        for g in self.groups:
            s = normalized(self.scores[g.id])
            entries.extend((float(s[c]), g.id, c) for c in range(g.size))
        entries.sort(key=lambda e: (e[0], e[1], e[2]))
        most = o.group_max_ratio
        cap = {g.id: min(math.floor(most * g.size), g.size - min(o.min_channels, g.size)) for g in self.groups}
        count = {g.id: 0 for g in self.groups}
        taken = 0
        for _, gid, _c in entries:
            if taken >= budget:
                break
            if count[gid] < cap[gid]:
                count[gid] += 1
                taken += 1
        plan = Plan()
        for g in self.groups:
            kept = kept_after_rounding(g.size, g.size - count[g.id], o.round_to, o.min_channels)
            if kept < g.size:
                plan.removed[g.id] = lowest(self.scores[g.id], g.size - kept)
        return plan

    def make(self, ratio: float) -> Plan:
        return self.uniform(ratio) if self.options.policy == "uniform" else self.global_(ratio)


def make_plan(graph, deps: DependencyResult, options: PlanningOptions, gradients=None, calibration=None,
              metric=None, progress=None, latency_timer=None) -> PlanningResult:
    """Plan under `options`; with `target_macs`, bisect the ratio until the rewritten graph meets it (≤ 2%).
    `sensitivity` measures each group on `calibration` feeds (or `metric(outputs)`) first; `latency` times layers
    and the whole model on them (ONNX Runtime, or `latency_timer(proto, feeds, seconds) -> ms`)."""
    planner = _Planner(deps, options, gradients)
    result = planner.result
    if options.policy == "sensitivity":
        return _sensitivity(graph, deps, options, planner, calibration, metric, progress)
    if options.policy == "latency":
        return _latency(graph, deps, options, planner, calibration, progress, latency_timer)
    if options.target_macs is None:
        result.plan = planner.make(options.ratio)
        result.ratio_used = options.ratio
        return result
    from .cost import graph_cost
    from .rewrite import pruned_copy

    before = graph_cost(graph)["macs"]

    def reduction(ratio: float) -> tuple[float, Plan]:
        plan = planner.make(ratio)
        after = graph_cost(pruned_copy(graph, plan, deps))["macs"] if not plan.is_empty() else before
        return before / max(after, 1), plan

    lo, hi = 0.0, 0.99
    best_plan, best_red, best_ratio = Plan(), 1.0, 0.0
    top, top_plan = reduction(hi)
    if top < options.target_macs * 0.98:
        raise UsageError(f"--target-macs {options.target_macs}: unreachable, at most {top:.2f}x with this policy "
                         "(ignored or frozen groups, min channels, max ratio)")
    for _ in range(30):
        mid = (lo + hi) / 2
        red, plan = reduction(mid)
        if red >= options.target_macs:
            hi, best_plan, best_red, best_ratio = mid, plan, red, mid
        else:
            lo = mid
        if best_red and abs(best_red / options.target_macs - 1) <= 0.01:
            break
    if best_ratio == 0.0 and best_red == 1.0:
        best_plan, best_red, best_ratio = top_plan, top, hi
    result.plan, result.ratio_used, result.macs_ratio = best_plan, best_ratio, best_red
    return result


def _latency(graph, deps, options: PlanningOptions, planner: _Planner, calibration, progress,
             timer=None) -> PlanningResult:
    from .latency import latency_plan

    result = planner.result
    if options.overrides:
        raise UsageError("--override applies to the uniform policy only")
    if graph is None or calibration is None:
        raise UsageError("the latency policy needs the graph and example inputs to time")
    kept, search = latency_plan(graph, deps, planner.groups, planner.scores, options.target_latency, calibration,
                                step=options.round_to if options.round_to > 1 else LATENCY_STEP,
                                min_channels=options.min_channels, max_ratio=options.group_max_ratio, timer=timer,
                                progress=progress)
    plan = Plan()
    for g in planner.groups:
        if kept[g.id] < g.size:
            plan.removed[g.id] = lowest(planner.scores[g.id], g.size - kept[g.id])
    result.plan, result.latency = plan, search.to_json()
    result.group_ratios = {g.id: 1 - kept[g.id] / g.size for g in planner.groups}
    return result


# kept counts the latency policy tries are multiples of this unless --round-to says otherwise: 8 fp32 lanes
# fill an AVX2 register (and half an AVX-512 one); the latency table decides which multiples are worth it
LATENCY_STEP = 8


def _sensitivity(graph, deps, options: PlanningOptions, planner: _Planner, calibration, metric, progress):
    from .sensitivity import allocate, greedy_allocate, measure_curves

    result = planner.result
    if options.overrides:
        raise UsageError("--override applies to the uniform policy only")
    if calibration is None:
        raise UsageError("the sensitivity policy needs calibration inputs")
    if options.target_macs is None and options.ratio == 0.0:
        result.plan, result.ratio_used = Plan(), 0.0
        return result
    curves = measure_curves(graph, deps, planner.groups, calibration, grid=options.sensitivity_grid,
                            min_channels=options.min_channels, round_to=options.round_to, metric=metric,
                            progress=progress, scores=planner.scores)
    target = dict(target_macs=options.target_macs, ratio=None if options.target_macs is not None else options.ratio,
                  min_channels=options.min_channels, round_to=options.round_to)
    if options.sensitivity_allocation == "greedy":
        allocated = greedy_allocate(graph, deps, curves, planner.scores, calibration,
                                    grid=options.sensitivity_grid, metric=metric, progress=progress, **target)
    else:
        allocated = allocate(graph, deps, curves, planner.scores, method=options.sensitivity_allocation, **target)
    result.plan, result.curves = allocated.plan, [c.to_json() for c in curves]
    result.group_ratios, result.macs_ratio = allocated.ratios, allocated.macs_ratio
    result.ratio_used = options.ratio
    return result
