"""The Python API behind the CLI: load a model from any supported source, and run the job.

`load_model` accepts an `.onnx` file, a `.pt2` ExportedProgram, `package.module:factory` (a callable returning an
`nn.Module`), or an `nn.Module` object. Torch sources are imported through torch.export and keep their
`state_dict` names; ONNX sources keep their initializer names.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import PruneCompileError, UnsupportedModelError, UsageError
from .ir import Graph, export_onnx, import_onnx, onnx_io

InputShapes = Mapping[str, Sequence[int]]
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class LoadedModel:
    """An imported graph plus what is needed to check it against the original."""

    graph: Graph
    kind: str  # "onnx" | "torch"
    source: str
    onnx_model: Any = None  # the original ModelProto (ONNX sources); see weights_in_file
    # A heavy ONNX model's weights stay in its file: onnx_model holds their names, types and shapes only (about
    # one copy of the model less through the whole job), and the original runs in ONNX Runtime from the file.
    weights_in_file: bool = False
    module: Any = None  # the nn.Module or ExportedProgram module (torch sources)
    example_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    symbolic_dims: dict[str, dict[int, str]] = field(default_factory=dict)  # ONNX inputs' dims --input-shape fixed


def parse_symbolic_dims(specs: Sequence[str]) -> dict[str, dict[int, str]]:
    """Parse `NAME:AXIS[=SYMBOL]` strings (the --symbolic-dim option); the symbol defaults to `NAME_dimAXIS`."""
    out: dict[str, dict[int, str]] = {}
    for spec in specs:
        where, _, symbol = spec.partition("=")
        name, sep, axis = where.rpartition(":")
        if not sep or not name or not axis.isdigit() or (_ and not symbol):
            raise UsageError(f"--symbolic-dim '{spec}': expected NAME:AXIS or NAME:AXIS=SYMBOL")
        out.setdefault(name, {})[int(axis)] = symbol or f"{name}_dim{axis}"
    return out


def parse_input_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    """Parse `NAME=d0,d1,...` strings (the --input-shape option)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        if not sep or not name:
            raise UsageError(f"--input-shape '{spec}': expected NAME=d0,d1,...")
        try:
            values = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"--input-shape '{spec}': dims must be integers") from None
        if not values or any(d <= 0 for d in values):
            raise UsageError(f"--input-shape '{spec}': dims must be positive integers")
        shapes[name] = values
    return shapes


def load_model(model: Any, input_shapes: InputShapes | None = None, seed: int = 0) -> LoadedModel:
    """Import `model` into the IR. See the module docstring for what `model` may be."""
    input_shapes = dict(input_shapes or {})
    if isinstance(model, (str, os.PathLike)):
        spec = os.fspath(model)
        if spec.endswith(".onnx") or (os.path.isfile(spec) and not spec.endswith(".pt2")):
            if not spec.endswith(".onnx"):
                raise UsageError(f"'{spec}': unknown model file type (expected .onnx or .pt2)")
            return _load_onnx(spec, input_shapes, seed)
        if spec.endswith(".pt2"):
            return _load_pt2(spec, input_shapes, seed)
        if _FACTORY.match(spec):
            return _load_torch(_call_factory(spec), spec, input_shapes, seed)
        if not os.path.exists(spec):
            raise UsageError(f"model '{spec}' is neither an existing file nor a 'package.module:factory' spec")
        raise UsageError(f"'{spec}': unknown model file type (expected .onnx or .pt2)")
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is part of the pinned set
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        return _load_torch(model, type(model).__name__, input_shapes, seed)
    raise UsageError(f"cannot load a model from {type(model).__name__}")


def _load_onnx(path: str, input_shapes: InputShapes, seed: int) -> LoadedModel:
    from .ir.onnx_importer import load_onnx_model
    from .passes.dynamic_dims import symbolic_input_dims

    proto = load_onnx_model(path)
    symbols = symbolic_input_dims(proto)  # before the import (which fixes them in place over 2 GiB)
    heavy = onnx_io.is_heavy(proto) or onnx_io.is_large(proto)
    original = onnx_io.without_weights(proto) if heavy else proto
    graph = import_onnx(proto, input_shapes, consume=heavy)  # heavy: the import may take this copy over
    del proto
    graph.source = path
    feeds = _random_feeds(graph, seed)
    return LoadedModel(graph, "onnx", path, onnx_model=original, example_inputs=feeds, symbolic_dims=symbols,
                       weights_in_file=heavy)


def _call_factory(spec: str) -> Any:
    module_name, attr = spec.split(":")
    try:
        mod = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"'{spec}': cannot import module '{module_name}': {e}") from e
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        raise UsageError(f"'{spec}': '{module_name}' has no callable '{attr}'")
    try:
        return factory()
    except Exception as e:
        raise UsageError(f"'{spec}': calling the factory failed: {e}") from e


def _load_torch(module: Any, source: str, input_shapes: InputShapes, seed: int) -> LoadedModel:
    import inspect

    import torch

    from .ir.fx_importer import import_torch_module

    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"'{source}' did not return a torch.nn.Module (got {type(module).__name__})")
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not input_shapes:
        raise UsageError(f"'{source}' is a torch model: pass --input-shape {params[0].name if params else 'x'}=..."
                         " for each forward() input")
    names = [p.name for p in params]
    if len(input_shapes) == 1 and len(names) == 1:
        input_shapes = {names[0]: next(iter(input_shapes.values()))}
    missing = [n for n in names if n not in input_shapes]
    if missing:
        raise UsageError(f"--input-shape is missing for forward() inputs {missing} of '{source}'")
    gen = torch.Generator().manual_seed(seed)
    example = [torch.randn(*input_shapes[n], generator=gen) for n in names]
    graph = import_torch_module(module, example, name=type(module).__name__)
    graph.source = source
    feeds = {v.name: t.numpy() for v, t in zip(graph.inputs, example, strict=True)}
    return LoadedModel(graph, "torch", source, module=module.eval(), example_inputs=feeds)


def _load_pt2(path: str, input_shapes: InputShapes, seed: int) -> LoadedModel:
    import torch

    from .ir.fx_importer import import_exported_program

    if not os.path.isfile(path):
        raise UsageError(f"model file '{path}' does not exist")
    if input_shapes:
        raise UsageError("--input-shape does not apply to a .pt2 ExportedProgram (its shapes are fixed at export)")
    try:
        ep = torch.export.load(path)
    except Exception as e:
        from .errors import ModelFormatError

        raise ModelFormatError(f"'{path}' is not a readable torch.export archive: {str(e).splitlines()[0]}") from e
    graph = import_exported_program(ep, name=os.path.splitext(os.path.basename(path))[0])
    graph.source = path
    feeds = _random_feeds(graph, seed)
    return LoadedModel(graph, "torch", path, module=ep.module(), example_inputs=feeds)


def _random_feeds(graph: Graph, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in graph.inputs:
        shape = v.static_shape()
        if v.dtype.kind == "f":
            feeds[v.name] = rng.standard_normal(shape).astype(v.dtype)
        else:
            feeds[v.name] = rng.integers(0, 2, size=shape).astype(v.dtype)
    return feeds


def reference_outputs(loaded: LoadedModel) -> list[np.ndarray]:
    """Outputs of the *original* model (ORT on the input file, or eager torch) on the example inputs."""
    from .backends import ort

    if loaded.kind == "onnx":
        feeds = _feeds_for(loaded.onnx_model, loaded.example_inputs)
        return ort.run(loaded.source if loaded.weights_in_file else loaded.onnx_model, feeds)
    import torch

    with torch.no_grad():
        out = loaded.module(*[torch.from_numpy(a) for a in loaded.example_inputs.values()])
    flat = out if isinstance(out, (tuple, list)) else [out]
    return [t.detach().numpy() for t in flat]


def _feeds_for(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    return {n: feeds[n] for n in names}


# -- the job ----------------------------------------------------------------------------------------------
OUTPUT_ONNX = "model.pruned.onnx"
OUTPUT_REPORT = "report.json"
OUTPUT_PLAN = "plan.json"
OUTPUT_HTML = "report.html"
OUTPUT_TIMINGS = "timings.json"  # everything that varies between identical runs: times, trials run, timestamp
TARGETS = ("none", "cpu", "gpu", "arm")


@dataclass
class RunResult:
    outdir: str
    files: dict[str, str]
    report: dict[str, Any]
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass
class _RunContext:
    """What passes need beyond the graph: backend settings, progress display, where to stage libraries."""

    target_options: Any
    tune_db: str | None
    rpc: Any
    progress: Any
    staging_dir: str


def default_pipeline(planning: Any, attention: str = "head_dim", targets: Sequence[str] = (),
                     verify: bool = True, plan: str | None = None, measure_latency: bool = False) -> str:
    """The pipeline the CLI's options describe, with the options that differ from the defaults spelled out."""
    from .passes.pipeline import PassSpec, format_pipeline
    from .passes.policy import PlanningOptions

    specs = [PassSpec("analyze", {} if attention == "head_dim" else {"attention": attention})]
    if plan:
        specs.append(PassSpec("replay", {"plan": plan}))
    else:
        options, default = {}, PlanningOptions()
        for name in ("policy", "ratio", "importance", "round_to", "min_channels", "max_ratio", "target_macs",
                     "target_latency", "latency_engine", "latency_trials", "seed"):
            value = getattr(planning, name)
            if value != getattr(default, name) and not (name == "max_ratio" and planning.policy not in ("global",
                                                                                                       "latency")):
                options[name.replace("_", "-")] = str(value)
        if planning.ignore:
            options["ignore"] = ",".join(planning.ignore)
        if planning.overrides:
            options["override"] = ",".join(f"{g}={r}" for g, r in planning.overrides.items())
        if planning.sensitivity_allocation != default.sensitivity_allocation:
            options["allocation"] = planning.sensitivity_allocation
        if planning.sensitivity_metric != default.sensitivity_metric:
            options["metric"] = planning.sensitivity_metric
        if planning.calibration_data:
            options["calibration"] = planning.calibration_data
        specs.append(PassSpec("plan", options))
    specs.append(PassSpec("rewrite"))
    if verify:
        specs.append(PassSpec("verify"))
    if targets:
        specs.append(PassSpec("compile", {"target": ",".join(targets)}))
    if measure_latency:
        specs.append(PassSpec("measure"))
    return format_pipeline(specs)


def _pass_defaults(planning: Any, attention: str, targets: Sequence[str], tune: int, verify: bool,
                   plan: str | None) -> dict[str, dict[str, Any]]:
    """CLI/API options as the defaults of every pass's options (an explicit pipeline option wins)."""
    return {
        "analyze": {"attention": attention},
        "plan": {"policy": planning.policy, "ratio": planning.ratio, "importance": planning.importance,
                 "round_to": planning.round_to, "min_channels": planning.min_channels,
                 "max_ratio": planning.max_ratio, "target_macs": planning.target_macs,
                 "target_latency": planning.target_latency, "latency_engine": planning.latency_engine,
                 "latency_trials": planning.latency_trials, "seed": planning.seed,
                 "allocation": planning.sensitivity_allocation, "metric": planning.sensitivity_metric,
                 "calibration": planning.calibration_data or "",
                 "ignore": list(planning.ignore), "override": [f"{g}={r}" for g, r in planning.overrides.items()]},
        "replay": {"plan": plan} if plan else {},
        "compile": {"target": list(targets), "tune": tune, "check": verify, "fold_bn": True},
        "measure": {"runs": 0},
    }


def run(
    model: Any,
    outdir: str | os.PathLike,
    input_shapes: InputShapes | None = None,
    ratio: float = 0.0,
    targets: Sequence[str] = ("none",),
    verify: bool = True,
    attention: str = "head_dim",
    tune: int = 0,
    tune_db: str | os.PathLike | None = None,
    rpc: Any = None,
    target_options: Any = None,
    progress: Any = None,
    planning: Any = None,
    passes: str | None = None,
    plan: str | os.PathLike | None = None,
    measure_latency: bool = False,
    print_after_all: bool = False,
    dump_ir: str | os.PathLike | None = None,
    static_shapes: bool = False,
    symbolic_dims: Mapping[str, Mapping[int, str]] | None = None,
) -> RunResult:
    """Import, prune, export, compile: what `prune-compile MODEL -o OUTDIR` does. Raises `PruneCompileError`s.

    `tune` is the MetaSchedule trial budget per target (0: default schedules); `tune_db` the database root
    (default: ~/.cache/prune-compile/tuning); `rpc` a `backends.tvm.RPCSettings` to measure on a remote device;
    `target_options` a `backends.tvm.TargetOptions` (ARM board, GPU arch, cores); `progress` follows
    `prune_compile.progress`. `planning` is a `passes.policy.PlanningOptions` (policy, importance, round_to,
    ignore globs, overrides, target MACs reduction); its ratio is `ratio`. `plan` replays a plan.json instead of
    planning. `passes` is a textual pipeline (see passes/pipeline.py) whose unset options default to the
    arguments above; without it, the arguments describe the pipeline (`default_pipeline`). `measure_latency`
    times the original and the pruned model on ONNX Runtime and each cpu library (and the arm library on the RPC
    device when `rpc` names one; results in timings.json).
    `static_shapes` writes the pruned ONNX at `input_shapes` even where the original's dims were symbolic;
    `symbolic_dims` (input → axis → symbol) asks for more symbolic dims than the original has (a torch model's
    batch), kept where they hold like the original's."""
    from .passes.pipeline import JobState, parse_pipeline, resolve, run_pipeline
    from .passes.policy import PlanningOptions

    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"--ratio {ratio}: must be in [0, 1)")
    planning = planning or PlanningOptions()
    planning.ratio = ratio
    planning.validate(policy_checks=passes is None)
    plan = os.fspath(plan) if plan is not None else None
    if plan is not None and passes is None:
        defaults = PlanningOptions()
        changed = [n for n in ("policy", "ratio", "importance", "round_to", "min_channels", "target_macs",
                               "target_latency", "latency_engine", "latency_trials", "sensitivity_allocation",
                               "sensitivity_metric", "calibration_data",
                               "ignore", "overrides") if getattr(planning, n) != getattr(defaults, n)
                   and not (n == "ignore" and tuple(planning.ignore) == ())]
        if changed:
            raise UsageError(f"--plan replays a plan; the planning options ({', '.join(changed)}) do not apply")
    for t in targets:
        if t not in TARGETS:
            raise UsageError(f"--target {t}: must be one of {', '.join(TARGETS)}")
    if tune < 0:
        raise UsageError(f"--tune {tune}: must be >= 0")
    compile_targets = sorted({t for t in targets if t != "none"})
    pipeline_text = passes if passes is not None else default_pipeline(
        planning, attention, compile_targets, verify, plan, measure_latency)
    resolved = resolve(parse_pipeline(pipeline_text),
                       _pass_defaults(planning, attention, compile_targets, tune, verify, plan))
    backend_options = target_options  # --num-cores, --conv-layout: the TVM latency engine reads them too
    tuned_targets: list[str] = []
    for info, values in resolved:
        if info.name != "compile":
            continue
        from .backends import tvm as tvm_backend

        backend_options = target_options or tvm_backend.TargetOptions()
        for t in values.get("target", []):
            tvm_backend.check_toolchain(t, backend_options)
            if values.get("tune") and t != "cpu" and rpc is None:
                raise UsageError(f"--tune for --target {t} measures candidates on that device: pass --rpc-tracker "
                                 "HOST:PORT and --rpc-key KEY")
            if values.get("tune"):
                tvm_backend.check_tunable(t, backend_options)
                tuned_targets.append(t)
        if values.get("tune", 0) < 0:
            raise UsageError(f"option 'tune' of pass 'compile': {values['tune']} must be >= 0")
    if planning.latency_engine == "tvm-arm":  # said before any work is done, as for --tune --target arm
        from .backends import tvm as tvm_backend
        from .backends.tvm.latency_timer import require_board

        require_board("arm", rpc)
        arm_options = target_options or tvm_backend.TargetOptions()
        try:
            tvm_backend.check_tunable("arm", arm_options)
        except UsageError as e:
            raise UsageError(f"--latency-engine tvm-arm tunes every layer it times: {e}") from None
        tvm_backend.check_toolchain("arm", arm_options)
    board_timings = (planning.policy == "latency" and planning.latency_engine != "ort") or (
        measure_latency and "arm" in compile_targets)
    if rpc is not None and (tuned_targets or board_timings):
        rpc.check_device()  # last: every option error comes first
    outdir = os.fspath(outdir)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UsageError(f"output directory '{outdir}' exists and is not a directory")

    if static_shapes and symbolic_dims:
        raise UsageError("--static-shapes and --symbolic-dim contradict each other")
    loaded = load_model(model, input_shapes)
    graph = loaded.graph
    graph.verify()
    _request_symbolic_dims(loaded, symbolic_dims or {})
    context = _RunContext(backend_options, os.fspath(tune_db) if tune_db else None, rpc, progress,
                          os.path.dirname(os.path.abspath(outdir)) or ".")
    state = JobState(loaded=loaded, graph=graph, initial=graph, context=context)
    try:
        run_pipeline(state, resolved, print_after_all=print_after_all,
                     dump_ir=os.fspath(dump_ir) if dump_ir else None)
        return _write_outputs(state, outdir, pipeline_text, static_shapes)
    finally:
        for tmp_path in state.staged.values():
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)


def _write_outputs(state: Any, outdir: str, pipeline_text: str, static_shapes: bool = False) -> RunResult:
    import datetime

    from .passes.cost import graph_cost
    from .passes.deps import analyze
    from .passes.plan import Plan, plan_to_json
    from .report_html import render_report
    from .util import atomic_write_text

    loaded = state.loaded
    if state.rewrite_plan is not None:
        deps, plan = state.rewrite_deps, state.rewrite_plan
    elif state.plan is not None:
        deps, plan = state.deps, state.plan
    else:  # no planning in the pipeline: plan.json still lists the groups, none pruned
        deps, plan = state.deps or analyze(state.graph), Plan()
    proto = export_onnx(state.graph)
    kept, static_why = {}, ""
    if loaded.symbolic_dims and not static_shapes:
        started = time.perf_counter()
        proto, kept, static_why = _with_symbolic_dims(state, proto)
        state.pass_seconds.append({"pass": "symbolic-dims", "seconds": round(time.perf_counter() - started, 4)})
    before, after = graph_cost(state.initial), graph_cost(state.graph)
    plan_doc = plan_to_json(deps, plan)
    report: dict[str, Any] = {
        "format": "prune-compile.report/1",
        "model": {"source": loaded.source, "kind": loaded.kind},
        "input_shapes": {v.name: list(v.shape) for v in state.initial.inputs},
        "graph": state.initial.summary(),
        "pipeline": pipeline_text,
        "pruning": _pruning_summary(deps, plan, state),
        "cost": {"before": before, "after": after,
                 "macs_ratio": round(before["macs"] / after["macs"], 4) if after["macs"] else None,
                 "parameters_ratio": round(before["parameters"] / after["parameters"], 4)
                 if after["parameters"] else None},
        "outputs": {"onnx": OUTPUT_ONNX, "plan": OUTPUT_PLAN, "html": OUTPUT_HTML, "timings": OUTPUT_TIMINGS},
    }
    if state.folded_bn:
        report["batch_norms_folded"] = state.folded_bn
    if kept:
        report["symbolic_dims"] = {name: {str(a): s for a, s in dims.items()} for name, dims in kept.items()}
    if static_why:
        fixed = ", ".join(f"{name}[{a}]" for name, dims in loaded.symbolic_dims.items() for a in dims
                          if a not in kept.get(name, {}))
        report["pruning"].setdefault("warnings", []).append(
            f"the pruned model keeps --input-shape's sizes for {fixed}, not symbolic: {static_why}")
    if state.verification is not None:
        report["verification"] = state.verification
    if state.targets:
        report["targets"] = state.targets
    timings = {"format": "prune-compile.timings/1",
               "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "passes": state.pass_seconds, **state.latency}
    _prepare_outdir(outdir)  # only now: a failed run leaves nothing behind
    files = {"onnx": os.path.join(outdir, OUTPUT_ONNX), "plan": os.path.join(outdir, OUTPUT_PLAN),
             "report": os.path.join(outdir, OUTPUT_REPORT), "html": os.path.join(outdir, OUTPUT_HTML),
             "timings": os.path.join(outdir, OUTPUT_TIMINGS)}
    try:
        written = onnx_io.save(proto, files["onnx"])
        report["outputs"]["onnx_sha256"] = onnx_io.sha256(written)
        if len(written) > 1:  # over protobuf's 2 GiB: the weights are in a data file beside it
            files["onnx_data"] = written[1]
            report["outputs"]["onnx_data"] = os.path.basename(written[1])
        elif os.path.exists(stale := os.path.join(outdir, onnx_io.data_file_name(OUTPUT_ONNX))):
            os.unlink(stale)  # an earlier large model's weights: this model holds its own
        atomic_write_text(files["plan"], json.dumps(plan_doc, indent=1, sort_keys=True) + "\n")
        atomic_write_text(files["report"], json.dumps(report, indent=2, sort_keys=True) + "\n")
        atomic_write_text(files["timings"], json.dumps(timings, indent=2, sort_keys=True) + "\n")
        atomic_write_text(files["html"], render_report(report, plan_doc, timings))
        for target, tmp_path in sorted(state.staged.items()):
            files[target] = os.path.join(outdir, library_name(target))
            os.replace(tmp_path, files[target])
    except OSError as e:
        raise UsageError(f"cannot write to output directory '{outdir}': {e.strerror}") from e
    return RunResult(outdir, files, report, timings)


def _request_symbolic_dims(loaded: LoadedModel, requested: Mapping[str, Mapping[int, str]]) -> None:
    shapes = {v.name: v.shape for v in loaded.graph.inputs}
    for name, dims in requested.items():
        if name not in shapes:
            raise UsageError(f"--symbolic-dim names '{name}', but the model's inputs are {sorted(shapes)}")
        for axis, symbol in dims.items():
            if axis >= len(shapes[name]):
                raise UsageError(f"--symbolic-dim {name}:{axis}: input '{name}' has rank {len(shapes[name])}")
            loaded.symbolic_dims.setdefault(name, {})[axis] = symbol


def _with_symbolic_dims(state: Any, proto: Any) -> tuple[Any, dict, str]:
    """The pruned model with as many of the original's symbolic input dims as hold (`passes/dynamic_dims.py`: the
    job's graph steps replayed on the original imported at doubled sizes): the model, the dims kept, and why the
    others stay static ("" if none does)."""
    from .passes.dynamic_dims import candidates, generalize

    reasons = []
    for symbols in candidates(state.loaded.symbolic_dims):
        other, why = _replayed_at_doubled(state, symbols)
        if other is not None:
            try:
                generalized, why = generalize(proto, other, symbols, original=state.loaded.onnx_model)
            except Exception as e:  # the static model is correct as it is: report, never fail the job for this
                generalized, why = None, f"checking the model with symbolic dims failed: {type(e).__name__}: {e}"
            if generalized is not None:
                return generalized, symbols, "; ".join(dict.fromkeys(reasons))
        reasons.append(why)
    return proto, {}, "; ".join(dict.fromkeys(reasons))


def _replayed_at_doubled(state: Any, symbols: dict) -> tuple[Any, str]:
    from .passes.deps import analyze
    from .passes.dynamic_dims import doubled_shapes
    from .passes.fold_bn import folded_copy
    from .passes.plan import plan_from_json, plan_to_json
    from .passes.rewrite import pruned_copy

    loaded = state.loaded
    shapes = doubled_shapes({v.name: list(v.shape) for v in state.initial.inputs}, symbols)
    try:
        # The file again, or the module object itself: a factory called again would make other weights.
        graph = load_model(loaded.source if loaded.kind == "onnx" else loaded.module, shapes).graph
        for step, deps, plan in state.graph_steps:
            if step == "rewrite":
                again = analyze(graph, deps.attention)
                graph = pruned_copy(graph, plan_from_json(again, plan_to_json(deps, plan)), again)
            else:
                graph, _ = folded_copy(graph)
        return export_onnx(graph), ""
    except Exception as e:  # as above: a model that fails at other sizes keeps the sizes it was pruned at
        sizes = ", ".join(f"{k}={','.join(map(str, v))}" for k, v in shapes.items())
        what = str(e) if isinstance(e, PruneCompileError) else f"{type(e).__name__}: {e}"
        return None, f"at {sizes} the job fails: {what}"


def library_name(target: str) -> str:
    return f"model.{target}.so"


def _pruning_summary(deps, plan, state) -> dict[str, Any]:
    from .passes.alignment import channel_alignment

    planning, planned = state.planning, state.planned
    frozen: dict[str, int] = {}
    for g in deps.groups:
        if not g.prunable:
            frozen[g.reason] = frozen.get(g.reason, 0) + 1
    pruned = [g for g in deps.groups if len(plan.removed_of(g))]
    summary = {
        "ratio": planning.ratio if planning else None,
        "policy": planning.policy if planning else ("replay" if state.replayed_from else None),
        "attention": deps.attention,
        "importance": planning.importance if planning else None,
        "groups": len(deps.groups),
        "prunable": len(deps.prunable()),
        "frozen": sum(frozen.values()),
        "frozen_reasons": dict(sorted(frozen.items(), key=lambda kv: (-kv[1], kv[0]))),
        "pruned_groups": len(pruned),
        "inexact_pruned_groups": sum(1 for g in pruned if not g.exact),
        "channels_removed": int(sum(len(plan.removed_of(g)) for g in pruned)),
        "channels_total": int(sum(g.size for g in deps.groups)),
    }
    if state.replayed_from:
        summary["replayed_plan"] = state.replayed_from
    alignment = channel_alignment(state.initial, state.graph, sorted(state.targets),
                                  state.planning.policy if state.planning else None)
    if alignment:
        summary["channel_alignment"] = alignment
    if planning is None:
        if alignment:
            summary["warnings"] = [alignment["warning"]]
        return summary
    if planning.round_to > 1:
        summary["round_to"] = planning.round_to
    if planning.min_channels > 1:
        summary["min_channels"] = planning.min_channels
    if planning.policy in ("global", "latency"):
        summary["max_ratio"] = planning.group_max_ratio
    if planning.ignore:
        summary["ignore"] = list(planning.ignore)
        summary["ignored_groups"] = len(planned.ignored_groups)
    if planning.overrides:
        summary["overrides"] = dict(planning.overrides)
    if planning.target_latency is not None:
        summary["target_latency"] = planning.target_latency
        summary["latency_engine"] = planning.latency_engine
        summary["latency_note"] = "kept counts chosen from measured latencies: see timings.json planning; " \
                                  "replay plan.json for a reproducible build"
    if planning.target_macs is not None:
        summary["target_macs"] = planning.target_macs
        summary["ratio_found"] = round(planned.ratio_used, 6)
    warnings = [f"--ignore {g} matches no parameter of a prunable group" for g in planned.unmatched_ignores]
    warnings += [f"--override {g} matches no parameter of a prunable group" for g in planned.unmatched_overrides]
    if alignment:
        warnings.append(alignment["warning"])
    if warnings:
        summary["warnings"] = warnings
    if planned.importance_notes:
        summary["importance_fallbacks"] = planned.importance_notes
    if planned.curves:
        summary["sensitivity"] = {"calibration": planned.calibration or "the seeded example inputs",
                                  "allocation": planning.sensitivity_allocation,
                                  "damage": _DAMAGE[planning.sensitivity_metric],
                                  "curves": planned.curves,
                                  "chosen_ratios": {str(k): round(v, 6) for k, v in
                                                    sorted(planned.group_ratios.items())}}
    return summary


_DAMAGE = {"output-change": "relative L2 change of the outputs",
           "cross-entropy": "increase of the first output's cross-entropy (vs labels, or the unpruned model)",
           "top1": "increase of the first output's top-1 error (vs labels, or the unpruned model's argmax)"}


def _prepare_outdir(outdir: str) -> None:
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UsageError(f"output directory '{outdir}' exists and is not a directory")
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output directory '{outdir}': {e.strerror}") from e
    if not os.access(outdir, os.W_OK):
        raise UsageError(f"output directory '{outdir}' is not writable")


__all__ = ["LoadedModel", "PruneCompileError", "RunResult", "UnsupportedModelError", "default_pipeline",
           "load_model", "parse_input_shapes", "reference_outputs", "run"]
