"""Textual pass pipelines, like LLVM's `opt -passes=` and MLIR's pass-pipeline syntax.

    analyze{attention=heads},plan{policy=global ratio=0.5 round-to=8},rewrite,verify,compile{target=cpu tune=64}

Passes are separated by commas; options go in braces as space-separated `key=value` pairs; list options take
comma-separated values (`ignore=fc.*,head.*`). Every CLI option that configures a pass is the default for that
pass's options, so `--ratio 0.5 --passes "analyze,plan{policy=global},rewrite"` plans globally at ratio 0.5.

The pipeline is checked before anything runs: unknown passes or options, bad values, a pass whose inputs no
earlier pass produced (`rewrite` without a plan, `plan` after a graph change without a fresh `analyze`), and a
second pruning round in one pipeline are usage errors (exit 2).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from .importance import CRITERIA

# -- syntax -------------------------------------------------------------------------------------------------


@dataclass
class PassSpec:
    name: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + " ".join(f"{k}={_quoted(v)}" for k, v in self.options.items()) + "}"


def _quoted(value: str) -> str:
    """A value as the parser reads it back: in double quotes (with \\ and \" escaped) when it holds whitespace,
    braces or quotes, e.g. a path with a space."""
    if value and not any(c.isspace() or c in '{}"\\' for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_pipeline(text: str) -> list[PassSpec]:
    """`a,b{k=v k2=v1,v2 k3="a b"},c` → PassSpecs. Raises UsageError naming the position of a syntax error."""
    specs: list[PassSpec] = []
    i, n = 0, len(text)

    def fail(msg: str, at: int) -> UsageError:
        return UsageError(f"--passes '{text}': {msg} at column {at + 1}")

    while True:
        while i < n and text[i].isspace():
            i += 1
        start = i
        while i < n and (text[i].isalnum() or text[i] in "-_"):
            i += 1
        name = text[start:i]
        if not name:
            raise fail("expected a pass name", i)
        options: dict[str, str] = {}
        if i < n and text[i] == "{":
            i += 1
            while True:
                while i < n and text[i].isspace():
                    i += 1
                if i == n:
                    raise fail("unclosed '{'", i)
                if text[i] == "}":
                    i += 1
                    break
                item_at = i
                while i < n and not text[i].isspace() and text[i] not in '}="':
                    i += 1
                key = text[item_at:i]
                if not key or i == n or text[i] != "=":
                    while i < n and not text[i].isspace() and text[i] != "}":
                        i += 1
                    raise fail(f"option '{text[item_at:i]}' of pass '{name}' is not key=value", item_at)
                i += 1
                if i < n and text[i] == '"':  # quoted value: \\ and \" escaped
                    i += 1
                    chars = []
                    while i < n and text[i] != '"':
                        if text[i] == "\\" and i + 1 < n:
                            i += 1
                        chars.append(text[i])
                        i += 1
                    if i == n:
                        raise fail("unclosed '\"'", item_at)
                    i += 1
                    value = "".join(chars)
                else:
                    start_value = i
                    while i < n and not text[i].isspace() and text[i] != "}":
                        i += 1
                    value = text[start_value:i]
                if not value:
                    raise fail(f"option '{key}=' of pass '{name}' is not key=value", item_at)
                if key in options:
                    raise fail(f"option '{key}' of pass '{name}' given twice", item_at)
                options[key] = value
        specs.append(PassSpec(name, options))
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            return specs
        if text[i] != ",":
            raise fail(f"expected ',' or '{{' after '{name}', found '{text[i]}'", i)
        i += 1


def format_pipeline(specs: Sequence[PassSpec]) -> str:
    return ",".join(str(s) for s in specs)


# -- pass registry --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    name: str
    kind: str  # "str" | "int" | "float" | "bool" | "list"
    help: str
    choices: tuple[str, ...] = ()

    def parse(self, pass_name: str, raw: str) -> Any:
        where = f"option '{self.name}' of pass '{pass_name}'"
        if self.kind == "list":
            values = [v for v in raw.split(",") if v]
            bad = [v for v in values if self.choices and v not in self.choices]
            if bad:
                raise UsageError(f"{where}: '{bad[0]}' is not one of {', '.join(self.choices)}")
            return values
        if self.choices and raw not in self.choices:
            raise UsageError(f"{where}: '{raw}' is not one of {', '.join(self.choices)}")
        try:
            if self.kind == "int":
                return int(raw)
            if self.kind == "float":
                return float(raw)
        except ValueError:
            raise UsageError(f"{where}: '{raw}' is not a{'n integer' if self.kind == 'int' else ' number'}") from None
        if self.kind == "bool":
            if raw not in ("true", "false"):
                raise UsageError(f"{where}: '{raw}' is not true or false")
            return raw == "true"
        return raw


@dataclass(frozen=True)
class PassInfo:
    name: str
    help: str
    options: tuple[Option, ...] = ()
    needs: tuple[str, ...] = ()  # facts an earlier pass must have established: "deps", "plan"
    gives: tuple[str, ...] = ()
    changes_graph: bool = False  # invalidates "deps" and "plan"
    once: bool = False  # one pruning round per pipeline

    def option(self, key: str) -> Option:
        for o in self.options:
            if o.name == key:
                return o
        known = ", ".join(o.name for o in self.options) or "none"
        raise UsageError(f"pass '{self.name}' has no option '{key}' (options: {known})")


_PLAN_OPTIONS = (
    Option("policy", "str", "uniform | global | sensitivity | latency",
           ("uniform", "global", "sensitivity", "latency")),
    Option("ratio", "float", "fraction of channels removed per group, in [0, 1)"),
    Option("importance", "str", "channel importance", CRITERIA),
    Option("round-to", "int", "kept counts are multiples of N"),
    Option("min-channels", "int", "channels every group keeps"),
    Option("max-ratio", "float", "global, latency: the most one group may lose (0.9 global, 0.7 latency)"),
    Option("target-macs", "float", "prune until MACs fall by this factor (replaces ratio)"),
    Option("target-latency", "float", "latency policy: measured latency as a fraction of the original's"),
    Option("latency-engine", "str", "latency policy: what measures, ort | tvm (tuned cpu code) | tvm-arm (tuned arm "
           "code, on the RPC device)", ("ort", "tvm", "tvm-arm")),
    Option("latency-trials", "int", "latency policy on tvm: tuning trials per layer shape"),
    Option("ignore", "list", "parameter globs whose groups stay whole"),
    Option("override", "list", "GLOB=RATIO per-group ratios (uniform)"),
    Option("seed", "int", "seed of random importance and calibration inputs"),
    Option("allocation", "str", "sensitivity: lagrange | threshold | greedy", ("lagrange", "threshold", "greedy")),
    Option("calibration", "str", "sensitivity: .npz of calibration inputs (and labels) to measure on"),
    Option("metric", "str", "sensitivity damage: output-change | cross-entropy | top1",
           ("output-change", "cross-entropy", "top1")),
)
_TARGETS = ("cpu", "gpu", "arm")

PASSES: dict[str, PassInfo] = {p.name: p for p in (
    PassInfo("analyze", "dependency propagation: find the coupled channel groups",
             (Option("attention", "str", "what attention pruning removes first", ("head_dim", "heads")),),
             gives=("deps",)),
    PassInfo("plan", "score channels and choose what each group loses", _PLAN_OPTIONS,
             needs=("deps",), gives=("plan",), once=True),
    PassInfo("replay", "use a plan.json made earlier for this model (by either importer)",
             (Option("plan", "str", "path of the plan.json"),), needs=("deps",), gives=("plan",), once=True),
    PassInfo("rewrite", "physically remove the planned channels", needs=("deps", "plan"), changes_graph=True,
             once=True),
    PassInfo("fold-bn", "fold inference batch_norm into the conv before it", changes_graph=True),
    PassInfo("verify", "check the current graph with ONNX Runtime: pruned == consumer-zeroed original"),
    PassInfo("compile", "compile the current graph with TVM for each target",
             (Option("target", "list", "targets", _TARGETS),
              Option("tune", "int", "MetaSchedule trial budget per target (0: default schedules)"),
              Option("fold-bn", "bool", "fold batch_norm into convs in the compiled copy (default true)"),
              Option("check", "bool", "compare the cpu library with ONNX Runtime (default true)"))),
    PassInfo("measure", "time the original and the current model: ONNX Runtime, and each compiled cpu library",
             (Option("runs", "int", "timed runs per engine (median reported); 0: until 1 s has passed"),)),
)}


def resolve(specs: Sequence[PassSpec], defaults: Mapping[str, Mapping[str, Any]]) -> list[tuple[PassInfo, dict]]:
    """Parse option values, fill in `defaults[pass][option]` (from CLI flags) and check the pass order."""
    facts: set[str] = set()
    seen_once: set[str] = set()
    changed = False
    resolved = []
    for spec in specs:
        info = PASSES.get(spec.name)
        if info is None:
            raise UsageError(f"unknown pass '{spec.name}' (passes: {', '.join(PASSES)})")
        for need in info.needs:
            if need not in facts:
                producer = "analyze" if need == "deps" else "plan or replay"
                after = " after the last graph change" if changed else ""
                raise UsageError(f"pass '{spec.name}' needs '{producer}' before it{after}")
        group = "plan" if info.name in ("plan", "replay") else info.name
        if info.once:
            if group in seen_once:
                raise UsageError(f"pass '{spec.name}': one pruning round per pipeline (run prune-compile again on "
                                 "model.pruned.onnx for another)")
            seen_once.add(group)
        values = dict(defaults.get(info.name, {}))
        for key, raw in spec.options.items():
            values[key.replace("-", "_")] = info.option(key).parse(info.name, raw)
        if info.name == "compile" and not values.get("target"):
            raise UsageError("pass 'compile' has no target: compile{target=cpu} or --target cpu")
        if info.name == "replay" and not values.get("plan"):
            raise UsageError("pass 'replay' needs its plan file: replay{plan=PATH} or --plan PATH")
        if info.changes_graph:
            facts -= {"deps", "plan"}
            changed = True
        facts |= set(info.gives)
        resolved.append((info, values))
    return resolved


# -- running ------------------------------------------------------------------------------------------------


@dataclass
class JobState:
    """What the passes read and write. `graph` is always the current graph."""

    loaded: Any  # api.LoadedModel
    graph: Any
    initial: Any  # the graph as imported
    deps: Any = None
    plan: Any = None
    planning: Any = None  # PlanningOptions of a `plan` pass
    planned: Any = None  # PlanningResult
    replayed_from: str | None = None
    # the round that was rewritten: original graph, its analysis and plan (the verify oracle needs them)
    before_rewrite: Any = None
    rewrite_deps: Any = None
    rewrite_plan: Any = None
    folded_bn: int = 0
    graph_steps: list[tuple] = field(default_factory=list)  # ("rewrite", deps, plan) / ("fold-bn", None, None)
    verification: dict | None = None
    targets: dict[str, dict] = field(default_factory=dict)
    staged: dict[str, str] = field(default_factory=dict)  # target → compiled library in a temp file
    compiled: dict[str, tuple[bool, int]] = field(default_factory=dict)  # target → (fold_bn, tune) it was built with
    latency: dict[str, Any] = field(default_factory=dict)
    pass_seconds: list[dict] = field(default_factory=list)
    context: Any = None  # api._RunContext: backend options, progress, staging directory


PassBody = Callable[[JobState, dict], None]
_BODIES: dict[str, PassBody] = {}


def body(name: str) -> Callable[[PassBody], PassBody]:
    def register(fn: PassBody) -> PassBody:
        _BODIES[name] = fn
        return fn
    return register


def run_pipeline(state: JobState, resolved: Sequence[tuple[PassInfo, dict]], print_after_all: bool = False,
                 dump_ir: str | None = None, stream=None) -> None:
    from ..util import atomic_write_text
    from . import pipeline_passes  # noqa: F401  (registers the pass bodies)

    if dump_ir:
        try:
            os.makedirs(dump_ir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--dump-ir '{dump_ir}': {e.strerror}") from e
        atomic_write_text(os.path.join(dump_ir, "00-input.ir"), state.graph.dump() + "\n")
    for i, (info, values) in enumerate(resolved, start=1):
        started = time.perf_counter()
        _BODIES[info.name](state, values)
        state.pass_seconds.append({"pass": info.name, "seconds": round(time.perf_counter() - started, 4)})
        if print_after_all:
            import sys

            print(f"; *** IR after {info.name} ***\n{state.graph.dump()}", file=stream or sys.stderr)
        if dump_ir:
            atomic_write_text(os.path.join(dump_ir, f"{i:02d}-{info.name}.ir"), state.graph.dump() + "\n")


def load_plan_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"plan file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"plan file '{path}' is not readable JSON: {e}") from None
