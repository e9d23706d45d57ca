"""Latency of the unpruned and pruned model in each engine, each measured in its own process (TVM's thread pool
distorts whatever else runs in the same process). Prints JSON with the MACs, the latencies, and the ratios that
matter: speedup ÷ MACs ratio per engine, and TVM ÷ ONNX Runtime.

Engines: ONNX Runtime, TVM default pipeline (untuned), TVM MetaSchedule-tuned (with --tune N trials; the database
is reused, so a rerun measures without re-tuning), eager PyTorch (for a torchvision or zoo model: the pruned module is
the plan applied by torch surgery).
All engines use the same thread count (--threads, default: all cores).

Timing runs in --rounds interleaved rounds (every engine and variant once per round, each in a fresh process), after
every build: on these VMs one engine's latency moves by 10-20% between minutes, so a ratio of two numbers taken
minutes apart says little. Each ratio is computed within a round; the JSON gives the median over rounds and the
range (`*_range`). For 20-60 s at a time one of the two cores is taken, which pulls every reading up and every
ratio towards 1, so only quiet rounds count: a reading within 10% of that engine and variant's fastest round
(`quiet_rounds`; `ROUND_QUIET`: a round's median spreads wider than the fastest-of-runs readings the latency search
compares, which use 4%), a ratio over the rounds quiet for both sides (all rounds when fewer than half are).
Rounds go on until `--rounds` are quiet for every engine and variant, at most 2x as many. An engine's `median_ms`
is the median of its quiet rounds' medians, `rounds_ms` every round's median.
Every engine's outputs of the first round are checked against ONNX Runtime's on the same variant and feeds
(`max_relative_error_vs_ort`; TVM builds get the BN-folded graph): past AGREEMENT the JSON is still printed and
the exit code is 1, naming the engine and variant.

Run: .venv/bin/python tools/bench_latency.py resnet18 --ratio 0.5 --tune 2000 [--tune-db DIR] [--repeat 50]
     MODEL is a torchvision name or crnn / crnn_gru (tests/zoo.py; random weights), or an .onnx file (then pass
     --input-shape for dynamic dims).
     A/B of built artifacts (e.g. two `--keep` directories): tools/bench_latency.py --compare A/pruned.folded.onnx
     A/pruned.tuned.so B/pruned.tuned.so --rounds 16 (each ratio to the first, within rounds); PATH@NAME=VALUE runs
     one with environment variables set (B/pruned.tuned.so@PRUNE_COMPILE_TVM_LAUNCHER=tvm: TVM's launcher)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from prune_compile.backends.fma_peak import PeakUnavailable, fraction
from prune_compile.backends.fma_peak import measure as measure_fma_peak
from prune_compile.backends.tvm.targets import CONV_LAYOUTS
from prune_compile.passes.latency import quiet_indices, quiet_or_all

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")  # for tests/zoo.py
# a round is quiet when its median is within this of the fastest round's (the module doc)
ROUND_QUIET = 1.10
# Max relative error to ONNX Runtime's outputs past which an engine's code is wrong, not rounded differently: float32
# kernels agree to ~1e-6, Winograd F(4, 3) to ~1e-5 per conv (1e-6 on whole models measured).
AGREEMENT = 1e-3


def _median_ms(fn, repeat: int, warmup: int = 5) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": round(float(np.median(times)), 4), "times_ms": [round(t, 4) for t in times]}


def _pooled(rounds: list[dict]) -> dict:
    """One engine and variant over all rounds: the median of the quiet rounds' medians, percentiles of every run."""
    times = [t for r in rounds for t in r["times_ms"]]
    medians = [r["median_ms"] for r in rounds]
    quiet = quiet_indices(medians, within=ROUND_QUIET)
    out = {"median_ms": round(float(np.median([medians[i] for i in quiet])), 4),
           "rounds_ms": medians, "quiet_rounds": quiet,
           "p10_ms": round(float(np.percentile(times, 10)), 4), "p90_ms": round(float(np.percentile(times, 90)), 4),
           "runs": len(times)}
    if "kernels" in rounds[0]:
        out["kernels"] = rounds[0]["kernels"]
    return out


def _summary(rounds: list[dict]) -> dict:
    """One engine and variant's rounds pooled (`_pooled`), or the first failed measurement's error."""
    failed = [m for m in rounds if "error" in m]
    return failed[0] if failed else _pooled(rounds)


def _ratio(values: list[float]) -> tuple[float, list[float]]:
    """Median and range of per-round ratios."""
    return round(float(np.median(values)), 4), [round(min(values), 4), round(max(values), 4)]


def _top(per_kernel: dict[str, float], runs: int, wall: float, n: int = 15) -> dict:
    """ms per run of the `n` slowest kernels, the total over all kernels, and the model call's own time in the same
    profiled runs (`model_ms`: what the kernels' shares are of; the timed rounds ran at another minute)."""
    total = sum(per_kernel.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:n]
    return {"count": len(per_kernel), "total_ms": round(total * 1e3 / runs, 4), "model_ms": round(wall * 1e3 / runs, 4),
            "top": [{"kernel": k, "ms": round(v * 1e3 / runs, 4), "share": round(v / total, 4)} for k, v in top]}


def tvm_kernels(vm, call, runs: int, sync=None, n: int = 15) -> dict:
    """Time each VM call (fused kernel) through the VM's instrument hook (TVM 0.27's VM has no profiler). `sync`
    (a GPU device's) is called around each kernel, whose launch would otherwise return before it ran."""
    spent: dict[str, float] = {}
    started: dict[str, float] = {}

    def instrument(func, symbol, before_run, ret_value, *args):
        if symbol.startswith("vm.builtin."):
            return 0
        if sync is not None:
            sync()
        if before_run:
            started[symbol] = time.perf_counter()
        else:
            spent[symbol] = spent.get(symbol, 0.0) + time.perf_counter() - started[symbol]
        return 0

    call()
    vm.set_instrument(instrument)
    t0 = time.perf_counter()
    for _ in range(runs):
        call()
    if sync is not None:
        sync()
    return _top(spent, runs, time.perf_counter() - t0, n)


def _ort_kernels(model: str, opts, feeds: dict, runs: int) -> dict:
    """ONNX Runtime's own per-node profile, summed per node."""
    import onnxruntime as ort

    opts.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as directory:
        opts.profile_file_prefix = os.path.join(directory, "p")
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feeds)
        wall = time.perf_counter() - t0
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    spent: dict[str, float] = {}
    kernel_events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for e in kernel_events[len(kernel_events) // (runs + 1):]:  # drop the warm-up run
        name = f"{e['args'].get('op_name', '?')} {e['name'][:-len('_kernel_time')]}"
        spent[name] = spent.get(name, 0.0) + e["dur"] * 1e-6
    return _top(spent, runs, wall)


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process."""
    feeds = dict(np.load(args.feeds))
    if args.engine == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(args.artifact, opts, providers=["CPUExecutionProvider"])
        result = _median_ms(lambda: sess.run(None, feeds), args.repeat)
        if args.outputs:
            np.savez(args.outputs, *sess.run(None, feeds))
        if args.profile:
            result["kernels"] = _ort_kernels(args.artifact, opts, feeds, max(3, args.repeat // 3))
        return result
    if args.engine == "tvm":
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
        import tvm

        from prune_compile.backends.tvm import load_library, numpy_outputs

        vm, dev = load_library(args.artifact)
        inputs = [tvm.runtime.tensor(feeds[k], dev) for k in json.loads(args.order)]
        f = vm["main"]
        result = _median_ms(lambda: f(*inputs), args.repeat)
        if args.outputs:
            np.savez(args.outputs, *numpy_outputs(f(*inputs)))
        if args.profile:
            result["kernels"] = tvm_kernels(vm, lambda: f(*inputs), max(3, args.repeat // 3))
        return result
    if args.engine == "torch":
        import torch

        torch.set_num_threads(args.threads)
        sys.path.insert(0, REPO)  # a pickled module's class may be tests/zoo.py's (CRNN)
        module = torch.load(args.artifact, weights_only=False).eval()
        xs = [torch.from_numpy(feeds[k]) for k in json.loads(args.order)]
        with torch.inference_mode():
            result = _median_ms(lambda: module(*xs), args.repeat)
            if args.outputs:
                out = module(*xs)
                np.savez(args.outputs, *[o.numpy() for o in ([out] if torch.is_tensor(out) else out)])
        return result
    raise SystemExit(f"unknown engine {args.engine}")


def agreement(outputs: dict[tuple[str, str], str], tolerance: float = AGREEMENT) -> tuple[dict, list[str]]:
    """Each engine's outputs (saved by its first round) against ONNX Runtime's on the same variant and feeds: {engine:
    {variant: max relative error}}, and the (engine, variant) pairs past `tolerance`. A benchmark of wrong code says
    nothing; bench_latency exits non-zero on one."""
    from prune_compile.backends.ort import relative_error

    def load(path: str) -> list[np.ndarray]:
        with np.load(path) as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]

    errors: dict[str, dict[str, float]] = {}
    for (engine, label), path in sorted(outputs.items()):
        reference = outputs.get(("ort", label))
        if engine == "ort" or reference is None or not os.path.exists(path) or not os.path.exists(reference):
            continue
        errors.setdefault(engine, {})[label] = float(f"{relative_error(load(reference), load(path)):.3e}")
    wrong = [f"{engine} {label}" for engine, per in errors.items() for label, e in per.items() if not e <= tolerance]
    return errors, wrong


def _measure(engine: str, artifact: str, feeds: str, order: list[str], threads: int, repeat: int,
             profile: bool = False, env: dict[str, str] | None = None, outputs: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--artifact", artifact, "--feeds", feeds,
           "--order", json.dumps(order), "--threads", str(threads), "--repeat", str(repeat)]
    cmd += ["--profile"] if profile else []
    cmd += ["--outputs", outputs] if outputs else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                          env=dict(os.environ, **env) if env else None)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _timed_rounds(runs: list[tuple[str, str, str, str, int, dict | None]], feeds: str, order: list[str],
                  args: argparse.Namespace, outputs: dict[tuple[str, str], str] | None = None
                  ) -> dict[tuple[str, str], list[dict]]:
    """Each run (engine, label, worker kind, artifact, repeat, environment or None) once per round, interleaved,
    until --rounds are quiet for every run (at most 2x --rounds; see the module doc). {(engine, label): every round's
    reading}. The first round saves each run's outputs where `outputs` says ({(engine, label): .npz path})."""
    measured: dict[tuple[str, str], list[dict]] = {}

    def quiet_everywhere() -> int:
        if any("error" in m for ms in measured.values() for m in ms):
            return r  # a failed measurement: no more rounds
        quiet = [set(quiet_indices([m["median_ms"] for m in ms], within=ROUND_QUIET)) for ms in measured.values()]
        return len(set.intersection(*quiet))

    r = 0
    while r < args.rounds or (r < 2 * args.rounds and quiet_everywhere() < args.rounds):
        r += 1
        for engine, label, kind, artifact, repeat, env in runs:
            profile = args.profile and r == 1 and engine != "torch"
            saved = (outputs or {}).get((engine, label)) if r == 1 else None
            measured.setdefault((engine, label), []).append(
                _measure(kind, artifact, feeds, order, args.threads, repeat, profile, env, saved))
    return measured


def _fma_peak(threads: int, before: dict | None = None) -> dict:
    """The machine's FMA peak with `threads` threads (backends/fma_peak.py), the faster of this reading and `before`:
    taken before and after the timed rounds, so a slow phase at one of the two moments does not set it."""
    try:
        reading = measure_fma_peak(threads)
    except PeakUnavailable as e:
        reading = {"error": str(e)}
    measured = [r for r in (before, reading) if r and "gflops" in r]
    if not measured:
        return reading
    return max(measured, key=lambda r: r["gflops"]) | {
        "readings_gflops": [g for r in measured for g in r["readings_gflops"]]}


def _quiet_ratios(a: dict, b: dict, wanted: int) -> list[float] | None:
    """Per-round a ÷ b over the rounds quiet for both (all rounds when fewer than `wanted` are)."""
    if "rounds_ms" not in a or "rounds_ms" not in b:
        return None
    both = sorted(set(a["quiet_rounds"]) & set(b["quiet_rounds"]))
    return [a["rounds_ms"][i] / b["rounds_ms"][i] for i in quiet_or_all(both, len(a["rounds_ms"]), wanted)]


def compare(args: argparse.Namespace) -> dict:
    """`--compare`: time already-built artifacts (a `--keep` directory's models and libraries, or libraries built
    from the same model at two commits) in interleaved rounds, and each one's latency ÷ the first's. An A/B of a
    schedule change with the same tuning records: two runs of the whole benchmark minutes apart differ by more
    than the change on these machines. `PATH@NAME=VALUE[,NAME=VALUE]` runs PATH with those environment variables
    (a runtime A/B on one library: `lib.so lib.so@PRUNE_COMPILE_TVM_LAUNCHER=tvm`); results are keyed by the spec."""
    kinds = {".onnx": "ort", ".so": "tvm", ".pt": "torch"}
    runs = []
    for i, spec in enumerate(args.compare):
        artifact, _, settings = spec.partition("@")
        kind = kinds.get(os.path.splitext(artifact)[1])
        if kind is None or not os.path.exists(artifact):
            raise SystemExit(f"--compare {spec}: not an existing .onnx (ONNX Runtime), .so (TVM) or .pt file")
        pairs = [item.partition("=") for item in settings.split(",")] if settings else []
        if any(not name or not eq for name, eq, _ in pairs):
            raise SystemExit(f"--compare {spec}: the environment after '@' must be NAME=VALUE[,NAME=VALUE]")
        runs.append((kind, f"{i}:{spec}", kind, artifact, args.repeat, {name: value for name, _, value in pairs}))
    feeds = args.feeds or os.path.join(os.path.dirname(args.compare[0].partition("@")[0]), "feeds.npz")
    with np.load(feeds) as f:
        order = list(f.files)  # saved in the graph's input order
    pooled = {label: _summary(rounds) for (_, label), rounds in _timed_rounds(runs, feeds, order, args).items()}
    first = pooled[runs[0][1]]
    result: dict = {"threads": args.threads, "repeat": args.repeat, "rounds": args.rounds, "feeds": feeds,
                    "artifacts": [], "over_first": {}, "over_first_range": {}}
    for (kind, label, *_), spec in zip(runs, args.compare, strict=True):
        result["artifacts"].append({"artifact": spec, "engine": kind} | pooled[label])
        ratios = _quiet_ratios(pooled[label], first, args.rounds)
        if ratios:
            result["over_first"][spec], result["over_first_range"][spec] = _ratio(ratios)
    return result


def _build_tvm(onnx_path: str, lib: str, threads: int, trials: int, db: str | None, layout: str = "auto",
               winograd: bool = True) -> dict:
    """Compile in a child process too: tuning spawns its own workers, and the parent stays free of TVM."""
    code = ("import json, onnx, sys\n"
            "from prune_compile.backends import tvm as T\n"
            "tuning = T.TuningOptions(trials=int(sys.argv[3]), database=sys.argv[4] or None) "
            "if int(sys.argv[3]) else None\n"
            "r = T.build(onnx.load(sys.argv[1]), 'cpu', sys.argv[2], T.TargetOptions(num_cores=int(sys.argv[5]), "
            "conv_layout=sys.argv[6], winograd=sys.argv[7] == '1'), tuning)\n"
            "print(json.dumps({'pipeline': r.pipeline, 'tuning': r.tuning}))\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, onnx_path, lib, str(trials), db or "", str(threads),
                           layout, "1" if winograd else "0"],
                          capture_output=True, text=True, timeout=6 * 3600)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["build_seconds"] = round(time.monotonic() - t0, 1)
    if info.get("tuning"):
        info["tuning"].pop("per_task", None)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=1,
                    help="kept channel counts are multiples of N (8: the AVX2 vector, half an AVX-512 one; "
                         "for --conv-layout NCHWc)")
    ap.add_argument("--tune", type=int, default=0, help="MetaSchedule trials per variant (0: skip tuned TVM)")
    ap.add_argument("--tune-db", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=30, help="timed runs per engine, variant and round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (see the module doc)")
    ap.add_argument("--input-shape", action="append", default=[])
    ap.add_argument("--engines", default="ort,tvm_untuned,tvm_tuned,torch")
    ap.add_argument("--conv-layout", choices=CONV_LAYOUTS, default="auto")
    ap.add_argument("--no-winograd", action="store_true", help="TVM computes every 3x3 conv directly")
    ap.add_argument("--variants", default="unpruned,pruned", help="which of unpruned,pruned to build and time")
    ap.add_argument("--no-fold-bn", action="store_true",
                    help="hand TVM the graph with batch_norm as is (default: folded into the convs, as compile does)")
    ap.add_argument("--keep", metavar="DIR", default=None,
                    help="write the models, feeds and libraries to DIR and keep them (default: a temporary directory)")
    ap.add_argument("--profile", action="store_true",
                    help="also time every kernel (TVM: each fused kernel the VM calls; ORT: its node profile)")
    ap.add_argument("--compare", nargs="+", metavar="ARTIFACT", default=None,
                    help="time these built artifacts (.onnx: ONNX Runtime, .so: TVM, .pt: torch) instead, in "
                         "interleaved rounds, each against the first (no MODEL; feeds: --feeds, else the feeds.npz "
                         "beside the first); ARTIFACT@NAME=VALUE[,NAME=VALUE] runs it with those environment variables")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--artifact", help=argparse.SUPPRESS)
    ap.add_argument("--feeds", help="with --compare: the inputs (.npz, in the graph's input order)")
    ap.add_argument("--order", help=argparse.SUPPRESS)
    ap.add_argument("--outputs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.engine = args.worker
        print(json.dumps(worker(args)))
        return
    if args.compare:
        print(json.dumps(compare(args), indent=1, sort_keys=True))
        return
    if not args.model:
        ap.error("MODEL is required (or --compare ARTIFACT ...)")

    engines = set(args.engines.split(","))
    work = args.keep or tempfile.mkdtemp(prefix="bench-latency-")
    os.makedirs(work, exist_ok=True)
    try:
        _run(args, engines, work)
    finally:
        if not args.keep:  # models and libraries: hundreds of MB per run
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, engines: set[str], work: str) -> None:
    from prune_compile.api import load_model, parse_input_shapes
    from prune_compile.ir import export_onnx
    from prune_compile.passes.cost import graph_cost
    from prune_compile.passes.deps import analyze
    from prune_compile.passes.fold_bn import fold_batch_norms
    from prune_compile.passes.policy import PlanningOptions, make_plan
    from prune_compile.passes.rewrite import pruned_copy

    torch_module = None
    if args.model.endswith(".onnx"):
        loaded = load_model(args.model, parse_input_shapes(args.input_shape))
    else:
        import torch

        sys.path.insert(0, REPO)
        from tests.zoo import bench_model

        torch_module, shapes = bench_model(args.model)
        loaded = load_model(torch_module, shapes)
        torch.save(torch_module, os.path.join(work, "unpruned.pt"))
    graph = loaded.graph
    deps = analyze(graph)
    plan = make_plan(None, deps, PlanningOptions(ratio=args.ratio, round_to=args.round_to)).plan
    variants = {"unpruned": graph, "pruned": pruned_copy(graph, plan, deps)}
    variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    if torch_module is not None:  # the same plan applied to the module by torch surgery
        import copy

        from prune_compile.backends.torch_module import apply_plan_to_module
        from prune_compile.passes.plan import plan_to_json

        pruned_module = apply_plan_to_module(copy.deepcopy(torch_module), plan_to_json(deps, plan),
                                             [torch.from_numpy(a) for a in loaded.example_inputs.values()])
        torch.save(pruned_module, os.path.join(work, "pruned.pt"))
    feeds_path = os.path.join(work, "feeds.npz")
    np.savez(feeds_path, **loaded.example_inputs)
    order = [v.name for v in graph.inputs]
    runs: list[tuple[str, str, str, str, int]] = []  # (engine, variant, worker kind, artifact, repeat)
    result: dict = {"model": args.model, "ratio": args.ratio, "round_to": args.round_to, "threads": args.threads,
                    "repeat": args.repeat, "rounds": args.rounds, "tune_trials": args.tune,
                    "fold_bn": not args.no_fold_bn, "conv_layout": args.conv_layout,
                    "winograd": not args.no_winograd, "macs": {}, "params": {},
                    "latency_ms": {}, "builds": {}}
    for label, g in variants.items():
        cost = graph_cost(g)
        result["macs"][label], result["params"][label] = cost["macs"], cost["parameters"]
        onnx_path = os.path.join(work, f"{label}.onnx")
        with open(onnx_path, "wb") as f:
            f.write(export_onnx(g).SerializeToString())
        tvm_path = onnx_path  # what TVM compiles: BN folded into the convs unless --no-fold-bn
        if not args.no_fold_bn:
            folded = g.clone()
            result.setdefault("batch_norms_folded", {})[label] = fold_batch_norms(folded)
            tvm_path = os.path.join(work, f"{label}.folded.onnx")
            with open(tvm_path, "wb") as f:
                f.write(export_onnx(folded).SerializeToString())
        if "ort" in engines:
            runs.append(("ort", label, "ort", onnx_path, args.repeat, None))
        if "tvm_untuned" in engines:
            lib = os.path.join(work, f"{label}.untuned.so")
            result["builds"][f"tvm_untuned.{label}"] = _build_tvm(tvm_path, lib, args.threads, 0, None,
                                                                  args.conv_layout, not args.no_winograd)
            runs.append(("tvm_untuned", label, "tvm", lib, max(3, args.repeat // 10), None))
        if "tvm_tuned" in engines and args.tune:
            lib = os.path.join(work, f"{label}.tuned.so")
            result["builds"][f"tvm_tuned.{label}"] = _build_tvm(tvm_path, lib, args.threads, args.tune,
                                                                args.tune_db, args.conv_layout, not args.no_winograd)
            runs.append(("tvm_tuned", label, "tvm", lib, args.repeat, None))
        if "torch" in engines and torch_module is not None:
            runs.append(("torch", label, "torch", os.path.join(work, f"{label}.pt"), args.repeat, None))
    # Every build is done: now time each (engine, variant) once per round, interleaved.
    runs = [run for run in runs if "error" not in result["builds"].get(f"{run[0]}.{run[1]}", {})]
    before = _fma_peak(args.threads)
    outputs = {(engine, label): os.path.join(work, f"outputs.{engine}.{label}.npz") for engine, label, *_ in runs}
    measured = _timed_rounds(runs, feeds_path, order, args, outputs)
    result["fma_peak"] = _fma_peak(args.threads, before)
    result["max_relative_error_vs_ort"], wrong = agreement(outputs)
    for (engine, label), rounds in measured.items():
        result["latency_ms"].setdefault(engine, {})[label] = _summary(rounds)
    macs_ratio = (graph_cost(graph)["macs"] / graph_cost(pruned_copy(graph, plan, deps))["macs"])
    result["macs_ratio"] = round(macs_ratio, 4)
    for key in ("speedup", "speedup_over_macs_ratio", "tvm_tuned_over_ort"):
        result[key], result[f"{key}_range"] = {}, {}

    def per_round(a: tuple[str, str], b: tuple[str, str]) -> list[float] | None:
        return _quiet_ratios(result["latency_ms"].get(a[0], {}).get(a[1], {}),
                             result["latency_ms"].get(b[0], {}).get(b[1], {}), args.rounds)

    for engine in result["latency_ms"]:
        speedups = per_round((engine, "unpruned"), (engine, "pruned"))
        if speedups:
            result["speedup"][engine], result["speedup_range"][engine] = _ratio(speedups)
            result["speedup_over_macs_ratio"][engine], result["speedup_over_macs_ratio_range"][engine] = _ratio(
                [s / macs_ratio for s in speedups])
    for label in variants:
        ratios = per_round(("tvm_tuned", label), ("ort", label))
        if ratios:
            result["tvm_tuned_over_ort"][label], result["tvm_tuned_over_ort_range"][label] = _ratio(ratios)
    if "gflops" in result["fma_peak"]:
        result["fma_peak_fraction"] = {
            engine: {label: fraction(result["macs"][label], m["median_ms"], result["fma_peak"])
                     for label, m in per_variant.items() if "median_ms" in m}
            for engine, per_variant in result["latency_ms"].items()}
    print(json.dumps(result, indent=1, sort_keys=True))
    if wrong:
        raise SystemExit(f"outputs disagree with ONNX Runtime's (max relative error > {AGREEMENT:g}): "
                         f"{', '.join(wrong)}; see max_relative_error_vs_ort")


if __name__ == "__main__":
    main()
