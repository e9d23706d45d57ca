"""The bodies of the pipeline's passes (names, options and ordering rules live in pipeline.py)."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np

from ..backends import fma_peak
from ..errors import UsageError
from ..ir import export_onnx, onnx_io
from .pipeline import JobState, body


@body("analyze")
def _analyze(state: JobState, opts: dict) -> None:
    from .deps import analyze

    state.deps = analyze(state.graph, attention=opts.get("attention", "head_dim"))


def planning_options(opts: dict):
    """PlanningOptions from the `plan` pass's resolved options (CLI defaults already merged in)."""
    from .policy import PlanningOptions, parse_overrides

    overrides = parse_overrides(opts.get("override", []) or [])
    planning = PlanningOptions(policy=opts.get("policy", "uniform"), ratio=opts.get("ratio", 0.0),
                               importance=opts.get("importance", "l2"), round_to=opts.get("round_to", 1),
                               min_channels=opts.get("min_channels", 1), max_ratio=opts.get("max_ratio"),
                               ignore=tuple(opts.get("ignore", ()) or ()), overrides=overrides,
                               target_macs=opts.get("target_macs"), target_latency=opts.get("target_latency"),
                               latency_engine=opts.get("latency_engine", "ort"),
                               latency_trials=opts.get("latency_trials", 16),
                               seed=opts.get("seed", 0),
                               sensitivity_allocation=opts.get("allocation", "lagrange"),
                               sensitivity_metric=opts.get("metric", "output-change"),
                               calibration_data=opts.get("calibration") or None)
    planning.validate()
    return planning


@body("plan")
def _plan(state: JobState, opts: dict) -> None:
    from .calibration import damage_metric, load_calibration
    from .policy import make_plan
    from .sensitivity import model_outputs

    state.planning = planning = planning_options(opts)
    progress = state.context.progress if state.context else None
    calibration = load_calibration(planning.calibration_data, state.graph) if planning.calibration_data else None
    feeds = calibration.batches if calibration else state.loaded.example_inputs
    metric = damage_metric(planning.sensitivity_metric, calibration.labels if calibration else None,
                           lambda: model_outputs(state.graph, feeds))
    timer = None
    if planning.policy == "latency" and planning.latency_engine != "ort":
        from ..backends.tvm.latency_timer import ENGINE_TARGETS, TvmTimer
        from ..backends.tvm.targets import DEFAULT_OPTIONS

        ctx = state.context
        target = ENGINE_TARGETS[planning.latency_engine]
        # with an RPC device (--rpc-tracker, --rpc-key) the engine measures there, as --tune does
        timer = TvmTimer(ctx.target_options or DEFAULT_OPTIONS, ctx.tune_db, planning.latency_trials, target,
                         ctx.rpc) if ctx else TvmTimer(trials_per_layer=planning.latency_trials, target=target)
    gradients = _taylor_gradients(state, calibration) if planning.importance == "taylor" else None
    try:
        state.planned = make_plan(state.graph, state.deps, planning, gradients=gradients, calibration=feeds,
                                  metric=metric, progress=progress, latency_timer=timer)
    finally:
        if timer is not None:
            timer.close()
    state.planned.calibration = calibration.describe() if calibration else None
    state.plan = state.planned.plan
    if state.planned.latency:
        state.latency["planning"] = state.planned.latency


def _taylor_gradients(state: JobState, calibration) -> dict:
    """Gradients of the calibration samples' cross-entropy (against their labels, or the model's own top class)
    with respect to the torch model's parameters: what Taylor importance weighs each weight by."""
    import torch

    from ..pruner import cross_entropy_loss, gradients_of

    loaded = state.loaded
    if loaded.kind != "torch" or loaded.module is None:
        raise UsageError("--importance taylor needs gradients, so a torch model (package.module:factory or .pt2); "
                         f"'{loaded.source}' is ONNX")
    if calibration is None:
        raise UsageError("--importance taylor needs --calibration-data: the samples (and optional 'labels') whose "
                         "cross-entropy gives the gradients")
    if state.folded_bn:
        raise UsageError("--importance taylor scores the model's own weights: run fold-bn after plan, not before")
    names = [v.name for v in state.graph.inputs]
    batches = [[torch.from_numpy(batch[n]) for n in names] for batch in calibration.batches]
    return gradients_of(loaded.module, cross_entropy_loss(batches, calibration.labels))


@body("replay")
def _replay(state: JobState, opts: dict) -> None:
    from .pipeline import load_plan_file
    from .plan import plan_from_json

    doc = load_plan_file(opts["plan"])
    want = (doc.get("analysis") or {}).get("attention")
    if want and want != state.deps.attention:
        raise UsageError(f"plan file '{opts['plan']}' was made with attention={want}; this analysis used "
                         f"attention={state.deps.attention} (pass --attention {want})")
    state.plan = plan_from_json(state.deps, doc)
    state.replayed_from = opts["plan"]


@body("rewrite")
def _rewrite(state: JobState, opts: dict) -> None:
    from .rewrite import pruned_copy

    state.before_rewrite, state.rewrite_deps, state.rewrite_plan = state.graph, state.deps, state.plan
    state.graph_steps.append(("rewrite", state.deps, state.plan))
    state.graph = pruned_copy(state.graph, state.plan, state.deps)
    state.deps = state.plan = None


@body("fold-bn")
def _fold_bn(state: JobState, opts: dict) -> None:
    from .fold_bn import folded_copy

    graph, folded = folded_copy(state.graph)
    state.folded_bn += folded
    state.graph_steps.append(("fold-bn", None, None))
    graph.verify()
    state.graph = graph
    state.deps = state.plan = None


def _feeds_for(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ..api import _feeds_for as feeds_for  # lazily: api imports this package

    return feeds_for(model, feeds)


def _outputs(graph: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """`graph`'s outputs in ONNX Runtime, run once. A heavy graph reaches ONNX Runtime as a scratch file with external
    data written from its arrays: its proto would hold another copy of the weights, and serialized bytes another."""
    from ..backends import ort
    from ..ir.onnx_exporter import export_onnx_external

    feeds = {v.name: inputs[v.name] for v in graph.inputs}
    if sum(v.data.nbytes for v in graph.constants()) < onnx_io.HEAVY_BYTES:
        return ort.run(export_onnx(graph), feeds)
    with tempfile.TemporaryDirectory(prefix="prune-compile-onnx-") as directory:
        path = os.path.join(directory, "model.onnx")
        export_onnx_external(graph, path)
        return ort.run(ort.session(path, threads=2, prepack=False), feeds)


@body("verify")
def _verify(state: JobState, opts: dict) -> None:
    """Against the consumer-zeroed original (design §5.1) after a rewrite; otherwise against the original model."""
    from ..api import reference_outputs
    from ..backends import ort
    from .oracle import zeroed_graph

    got = _outputs(state.graph, state.loaded.example_inputs)
    plan, deps = state.rewrite_plan, state.rewrite_deps
    if plan is None or plan.is_empty():
        err = ort.relative_error(reference_outputs(state.loaded), got)
        state.verification = {"oracle": "exported model vs original on seeded random inputs",
                               "max_relative_error": float(f"{err:.3e}")}
        return
    err = ort.relative_error(_outputs(zeroed_graph(state.before_rewrite, deps, plan), state.loaded.example_inputs),
                             got)
    inexact = sum(1 for g in deps.groups if len(plan.removed_of(g)) and not g.exact)
    state.verification = {
        "oracle": "pruned model vs consumer-zeroed original on seeded random inputs",
        "max_relative_error": float(f"{err:.3e}"), "exact": inexact == 0,
        "note": "" if inexact == 0 else f"{inexact} pruned groups are inexact (a normalization over their "
                                        "channels such as LayerNorm, or a product of activations that zeroed "
                                        "weights do not silence): outputs are expected to differ"}


def _compiled_proto(graph, fold_bn: bool):
    if not fold_bn:
        return export_onnx(graph), 0
    from .fold_bn import folded_copy

    copy, folded = folded_copy(graph)
    return export_onnx(copy), folded


def _tuning(ctx, trials: int):
    if not trials:
        return None
    from ..backends import tvm as tvm_backend

    return tvm_backend.TuningOptions(trials=trials, database=ctx.tune_db, rpc=ctx.rpc, progress=ctx.progress)


@body("compile")
def _compile(state: JobState, opts: dict) -> None:
    from ..api import library_name
    from ..backends import ort
    from ..backends import tvm as tvm_backend

    ctx = state.context
    proto, folded = _compiled_proto(state.graph, opts.get("fold_bn", True))
    tune = opts.get("tune", 0)
    for target in opts.get("target", []):
        fd, tmp = tempfile.mkstemp(prefix=f".{target}-", suffix=".so", dir=ctx.staging_dir)
        os.close(fd)
        old = state.staged.pop(target, None)
        if old and os.path.exists(old):
            os.unlink(old)
        state.staged[target] = tmp
        result = tvm_backend.build(proto, target, tmp, ctx.target_options, _tuning(ctx, tune))
        entry: dict[str, Any] = {"library": library_name(target), "target": result.target_json,
                                 "pipeline": result.pipeline, "batch_norms_folded": folded}
        if result.tuning is not None:
            entry["tuning"] = {k: v for k, v in result.tuning.items() if k in STABLE_TUNING_KEYS}
            state.latency.setdefault("tuning", {})[target] = result.tuning
        if result.device_code:
            entry["device_code"] = result.device_code
        if opts.get("check", True) and target == "cpu":
            exported = export_onnx(state.graph)
            feeds = _feeds_for(exported, state.loaded.example_inputs)
            got = tvm_backend.run_library(tmp, feeds, list(feeds))
            err = ort.relative_error(ort.run(exported, feeds), got)
            entry["verification"] = {"oracle": "TVM vs ONNX Runtime on the output model",
                                     "max_relative_error": float(f"{err:.3e}")}
        state.targets[target] = entry
        state.compiled[target] = (opts.get("fold_bn", True), tune)


# Parts of a tuning summary that depend only on the inputs (graph, target, budget, database root); the trials
# run this time depend on the database's history and go to timings.json.
STABLE_TUNING_KEYS = ("trials_requested", "tasks", "database")


def _median_ms(fn, runs: int) -> dict[str, float]:
    for _ in range(3):
        fn()
    times = []
    deadline = time.perf_counter() + 1.0
    while (len(times) < runs) if runs else (len(times) < 10 or time.perf_counter() < deadline):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if not runs and len(times) >= 1000:
            break
    return _run_summary(times)


def _run_summary(times: list[float]) -> dict[str, float]:
    a = np.asarray(times)
    return {"median_ms": round(float(np.median(a)), 4), "p10_ms": round(float(np.percentile(a, 10)), 4),
            "p90_ms": round(float(np.percentile(a, 90)), 4), "runs": len(times)}


@body("measure")
def _measure(state: JobState, opts: dict) -> None:
    """Latency of the original model and of the current one, each engine timed the same way in this process."""
    from ..backends import ort
    from .cost import graph_cost

    runs = opts.get("runs", 0)
    if runs < 0:
        raise UsageError(f"option 'runs' of pass 'measure': {runs} must be >= 0")
    before_proto, after_proto = export_onnx(state.initial), export_onnx(state.graph)
    feeds = _feeds_for(after_proto, state.loaded.example_inputs)
    engines: dict[str, Any] = {}
    timings = {}
    for label, proto in (("before", before_proto), ("after", after_proto)):
        sess = ort.session(proto)
        timings[label] = _median_ms(lambda s=sess: s.run(None, feeds), runs)
    engines["onnxruntime"] = timings
    ctx = state.context
    for target, (fold, tune) in sorted(state.compiled.items()):
        # cpu libraries run here; arm ones on the RPC device when there is one (a GPU's: not yet)
        board = target == "arm" and ctx.rpc is not None
        if target != "cpu" and not board:
            continue
        from ..backends import tvm as tvm_backend

        fd, tmp = tempfile.mkstemp(prefix=".before-", suffix=".so", dir=ctx.staging_dir)
        os.close(fd)
        try:
            proto, _ = _compiled_proto(state.initial, fold)
            tvm_backend.build(proto, target, tmp, ctx.target_options, _tuning(ctx, tune))
            libraries = (("before", tmp), ("after", state.staged[target]))
            engines[f"tvm-{target}"] = _board_timings(ctx.rpc, libraries, feeds, runs) if board else {
                label: _median_ms(tvm_backend.library_runner(path, feeds, list(feeds)), runs)
                for label, path in libraries}
        finally:
            os.unlink(tmp)
    for t in engines.values():
        t["speedup"] = round(t["before"]["median_ms"] / t["after"]["median_ms"], 3)
    state.latency["engines"] = engines
    # how much of the cores each engine uses: what is left to gain in its kernels, and what only fewer MACs can buy
    peak = _fma_peak()
    here = [t for t in engines.values() if "measured_on" not in t]  # the peak is this machine's
    if "gflops" in peak:
        macs = {"before": graph_cost(state.initial)["macs"], "after": graph_cost(state.graph)["macs"]}
        for _ in range(_PEAK_REREADS):
            # A model cannot outrun the FMA pipes: one that seems to means another process slowed every reading
            # of the peak (a long busy loop shares a core fairly, where a model's short runs wake ahead). Read again.
            if all(fma_peak.fraction(macs[label], t[label]["median_ms"], peak) < 1
                   for t in here for label in ("before", "after")):
                break
            peak = _faster_peak(peak, _fma_peak())
        for t in here:
            t["fma_peak_fraction"] = {label: fma_peak.fraction(macs[label], t[label]["median_ms"], peak)
                                      for label in ("before", "after")}
    state.latency["fma_peak"] = peak


def _board_timings(rpc, libraries, feeds: dict, runs: int) -> dict[str, Any]:
    """`_median_ms`'s numbers for each (label, library) timed on the RPC device (about a second of runs each
    when `runs` is 0), one session for all."""
    from ..backends.tvm.board_timing import BoardModels

    board = BoardModels(rpc)
    out: dict[str, Any] = {"measured_on": board.measured_on}
    try:
        for label, path in libraries:
            out[label] = _run_summary(board.times(path, list(feeds.values()), 1.0, runs or None))
    finally:
        board.release()
    return out


_PEAK_REREADS = 3


def _faster_peak(peak: dict, again: dict) -> dict:
    """The faster of two peak measurements, with every reading of both."""
    if "gflops" not in again:
        return peak
    best = dict(again if again["gflops"] > peak["gflops"] else peak)
    best["readings_gflops"] = peak["readings_gflops"] + again["readings_gflops"]
    return best


def _fma_peak() -> dict:
    """The FMA peak of the cores the engines run on (ONNX Runtime's and TVM's pools use them all), or the reason
    there is none (no C compiler)."""
    from ..backends.tvm.threads import available_cores

    try:
        return fma_peak.measure(available_cores())
    except fma_peak.PeakUnavailable as e:
        return {"error": str(e)}
