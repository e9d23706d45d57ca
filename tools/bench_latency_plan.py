"""Latency-aware plans vs uniform plans at equal measured latency (ONNX Runtime or TVM, this machine, one run).

    python tools/bench_latency_plan.py resnet18 --target-latency 0.5
    python tools/bench_latency_plan.py mobilenet_v2 --target-latency 0.5 --round-to 8
    python tools/bench_latency_plan.py resnet18 --uniform-round-to 16   # uniform plans aligned to ORT's blocks
    python tools/bench_latency_plan.py demo --engine tvm --latency-trials 16 --tune-db DIR
    python tools/bench_latency_plan.py resnet18 --engine tvm --uniform-candidates 0   # what the search alone costs
    python tools/bench_latency_plan.py resnet18 --engine tvm --uniform-candidates 0 --table exact   # ... unlazily
    python tools/bench_latency_plan.py resnet18 --engine tvm-arm --rpc-tracker HOST:PORT --rpc-key KEY --num-cores 4

`--engine tvm` measures everything (the search's table and bisection, the uniform bisection, the final rounds) on
TVM's tuned cpu code: every model timed is a tuned build (`--latency-trials` per weight layer, records kept in
`--tune-db`, so a rerun re-tunes nothing). `--engine tvm-arm` does the same on an aarch64 board over TVM's RPC (and
`--engine tvm` with `--rpc-tracker`/`--rpc-key` on a remote x86 one): tuning and every timing run on the device.
MODEL `demo` is the bundled default model. On every engine the models timed have their batch norms folded, as the
compile step builds them.

1. The latency policy plans for `--target-latency` (fraction of the original's measured latency).
2. A uniform plan is searched (bisection on the ratio) whose *measured* latency equals the latency plan's.
3. The original, the latency plan and the `--uniform-candidates` uniform plans nearest in latency are re-measured
   interleaved in rounds. As in bench_latency, every ratio is taken within a round and the median over rounds is
   reported (the machine's speed moves 10-40% between minutes; a ratio of two medians can pair a fast minute with a
   slow one): `latency_fraction` is the median of a plan's per-round ratios to the original, `latency_ms` the median
   of its timings. `uniform_plan` is the uniform plan whose median per-round ratio to the latency plan is nearest to
   one. Only quiet rounds count (`rounds_used`: the original within 4% of its fastest round or of the search's;
   rounds go on until `--rounds` are, at most 4x as many): for 20-60 s at a time one of the two cores is taken, and
   in such a phase every ratio is pulled towards 1, as the search (passes/latency.py) knows too. Printed as JSON:
   latency, MACs and parameters kept, each weight layer's shape (`weight_shapes`: where a plan pruned), the uniform
   plans' curve (by fraction), and the ratios that matter: `latency_vs_target` (goal: within 10%),
   `macs_kept_latency_over_uniform` (goal: > 1 — more of the model kept for the same latency) and
   `macs_kept_latency_over_uniform_interpolated` (the uniform MACs linearly interpolated to exactly the latency
   plan's fraction, when the curve brackets it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np


def bench_model(name: str):
    from prune_compile.api import load_model

    if name == "demo":
        import prune_compile

        return load_model(os.path.join(os.path.dirname(prune_compile.__file__), "data", "default_model.onnx"))
    if name.endswith(".onnx"):
        return load_model(name)
    return load_model(f"torchvision.models:{name}", {"x": [1, 3, 224, 224]})


def weight_shapes(graph) -> dict[str, list[int]]:
    """Each weight layer's weight shape by node name: where a plan pruned (MACs and parameters say how much)."""
    from prune_compile.passes.latency import weight_layer_nodes

    return {n.name: list(n.inputs[1].shape) for n in weight_layer_nodes(graph)}


def uniform_bisection(graph, deps, timer, feeds: dict, target_ms: float, *, round_to: int, importance: str,
                      steps: int) -> dict[float, tuple]:
    """Uniform plans bisected on the ratio towards `target_ms` measured: ratio → (pruned graph, ms in the
    bisection), every step timed (on TVM each is a tuned build: pass fewer `steps`). Stops within 2%."""
    from prune_compile.passes.latency import timed_proto
    from prune_compile.passes.policy import PlanningOptions, make_plan
    from prune_compile.passes.rewrite import pruned_copy

    lo, hi = 0.0, 0.95
    candidates: dict[float, tuple] = {}
    for _ in range(steps):
        mid = (lo + hi) / 2
        plan = make_plan(graph, deps, PlanningOptions(ratio=mid, round_to=round_to, importance=importance)).plan
        g = pruned_copy(graph, plan, deps)
        ms = timer(timed_proto(g), feeds, 1.0)
        candidates[mid] = (g, ms)
        if abs(ms / target_ms - 1) <= 0.02:
            break
        lo, hi = (mid, hi) if ms > target_ms else (lo, mid)
    return candidates


def interleaved_rounds(protos: dict, timer, feeds: dict, rounds: int, searched_fastest: float
                       ) -> tuple[dict[str, list[float]], list[int]]:
    """Every model in `protos` (one of them "original") timed once per round, in turn: (name → ms per round, the
    rounds to use). Rounds continue until `rounds` of them are quiet (the original within 4% of its fastest round,
    or of `searched_fastest`), at most 4x `rounds`: in a slow phase of the machine (one core taken for 20-60 s)
    every ratio is pulled towards 1 (the demo model's uniform 0.5 plan: 0.40x in fast phases, 0.44x in slow ones),
    as the search knows too. Pass the search's fastest original, not the one timed beside its chosen step: a slow
    phase can outlast all the rounds (a TVM run's five rounds read the original at 1.175 ms throughout, the search
    at 0.857), and one search chose in a slow phase (0.479 ms; its first 0.327)."""
    from prune_compile.passes.latency import quiet_indices, quiet_or_all

    samples: dict[str, list[float]] = {k: [] for k in protos}
    originals = samples["original"]

    def quiet_rounds() -> list[int]:
        return quiet_indices(originals, min(min(originals), searched_fastest))

    while len(originals) < rounds or (len(quiet_rounds()) < rounds and len(originals) < 4 * rounds):
        for name, proto in protos.items():
            samples[name].append(timer(proto, feeds, 1.0))
    return samples, quiet_or_all(quiet_rounds(), len(originals), rounds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="torchvision model name or an .onnx file")
    ap.add_argument("--target-latency", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--uniform-round-to", type=int, default=None,
                    help="round_to of the uniform plans (default: --round-to); 16 aligns them to ONNX Runtime's "
                         "NCHWc blocks on AVX-512, the strongest uniform baseline there")
    ap.add_argument("--importance", default="l2")
    ap.add_argument("--max-ratio", type=float, default=None,
                    help="the most of a group the latency plan may remove (default: the policy's, 0.7; runs before "
                         "2026-11-30 used 0.9)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    ap.add_argument("--engine", choices=("ort", "tvm", "tvm-arm"), default="ort",
                    help="what measures (see the module doc)")
    ap.add_argument("--latency-trials", type=int, default=16, help="tvm: tuning trials per weight layer")
    ap.add_argument("--tune-db", default=None, help="tvm: tuning database root")
    ap.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT", help="tvm: measure on this tracker's device")
    ap.add_argument("--rpc-key", default=None, help="tvm: the device's key at --rpc-tracker")
    ap.add_argument("--num-cores", type=int, default=None, help="tvm: threads (the board's, for tvm-arm)")
    ap.add_argument("--arm-board", default="generic", help="tvm-arm: the board preset (as the CLI's --arm-board)")
    ap.add_argument("--uniform-candidates", type=int, default=3,
                    help="uniform plans (nearest in latency in the bisection) re-measured in the rounds; 0: no "
                         "uniform plan, the search and its plan only (what a search costs: a TVM uniform "
                         "bisection is seven tuned builds)")
    ap.add_argument("--table", choices=("lazy", "exact"), default=None,
                    help="the search's latency table: lazy measures only the moves its estimates rank first, exact "
                         "every candidate (default: the engine's, lazy on tvm where an entry is a tuning run)")
    args = ap.parse_args(argv)
    uniform_round_to = args.round_to if args.uniform_round_to is None else args.uniform_round_to
    if args.uniform_candidates < 0:
        ap.error("--uniform-candidates must be 0 or more")

    from prune_compile.passes.cost import graph_cost
    from prune_compile.passes.deps import analyze
    from prune_compile.passes.latency import Timer, timed_proto
    from prune_compile.passes.policy import PlanningOptions, make_plan
    from prune_compile.passes.rewrite import pruned_copy

    loaded = bench_model(args.model)
    graph, feeds = loaded.graph, loaded.example_inputs
    deps = analyze(graph)
    if args.engine != "ort":
        from prune_compile.backends.tvm.latency_timer import ENGINE_TARGETS, TvmTimer
        from prune_compile.backends.tvm.targets import TargetOptions
        from prune_compile.backends.tvm.tuning import RPCSettings
        from prune_compile.errors import UsageError

        if (args.rpc_tracker is None) != (args.rpc_key is None):
            ap.error("--rpc-tracker and --rpc-key go together")
        rpc = RPCSettings(args.rpc_tracker, args.rpc_key) if args.rpc_tracker else None
        try:
            timer = TvmTimer(TargetOptions(arm_board=args.arm_board, num_cores=args.num_cores), args.tune_db,
                             args.latency_trials, ENGINE_TARGETS[args.engine], rpc)
        except UsageError as e:
            ap.error(str(e))
    else:
        timer = Timer()
    if args.table:
        timer.lazy_table = args.table == "lazy"
    started = time.perf_counter()

    def log(line, final=False, fraction=None):  # every step of the search, timed: a TVM search runs for an hour
        print(f"[{time.perf_counter() - started:7.0f} s] {line}", file=sys.stderr, flush=True)

    lat_options = PlanningOptions(policy="latency", target_latency=args.target_latency, round_to=args.round_to,
                                  importance=args.importance, max_ratio=args.max_ratio, latency_engine=args.engine,
                                  latency_trials=args.latency_trials)
    lat = make_plan(graph, deps, lat_options, calibration=feeds, progress=log, latency_timer=timer)
    search_s = time.perf_counter() - started
    lat_graph = pruned_copy(graph, lat.plan, deps)
    lat_ms = timer(timed_proto(lat_graph), feeds, 2.0)

    candidates = {} if not args.uniform_candidates else uniform_bisection(
        graph, deps, timer, feeds, lat_ms, round_to=uniform_round_to, importance=args.importance,
        steps=12 if args.engine == "ort" else 7)
    # one timing in the bisection can be off by 10-20% (on TVM the first timing after a tuning run reads slow), so
    # the uniform plans nearest in latency are re-measured with the others and compared by per-round ratios
    nearest = sorted(candidates, key=lambda r: abs(candidates[r][1] - lat_ms))[:args.uniform_candidates]
    graphs = {"original": graph, "latency_plan": lat_graph} | {f"uniform@{r:.6f}": candidates[r][0]
                                                                for r in sorted(nearest)}
    protos = {k: timed_proto(g) for k, g in graphs.items()}
    searched = min([lat.latency["base_ms"]] + [t["original_ms"] for t in lat.latency["trajectory"]])
    all_samples, used = interleaved_rounds(protos, timer, feeds, args.rounds, searched)
    samples = {k: [v[i] for i in used] for k, v in all_samples.items()}
    ms = {k: float(np.median(v)) for k, v in samples.items()}

    def per_round(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(samples[a], samples[b], strict=True)]

    fraction = {k: float(np.median(per_round(k, "original"))) for k in protos}
    cost = {k: graph_cost(g) for k, g in graphs.items()}
    base = cost["original"]
    rows = {k: {"latency_ms": round(ms[k], 4), "latency_fraction": round(fraction[k], 4),
                "latency_fraction_range": [round(min(per_round(k, "original")), 4),
                                           round(max(per_round(k, "original")), 4)],
                "rounds_ms": [round(t, 6) for t in all_samples[k]],
                "macs": cost[k]["macs"], "macs_kept": round(cost[k]["macs"] / base["macs"], 4),
                "parameters_kept": round(cost[k]["parameters"] / base["parameters"], 4)} for k in protos}
    uniform = sorted((k for k in rows if k.startswith("uniform@")), key=lambda k: fraction[k])
    for k in uniform:
        rows[k]["ratio"] = float(k.split("@")[1])
    # the uniform plan of equal latency: its per-round ratio to the latency plan nearest 1
    over_latency_plan = {k: float(np.median(per_round("latency_plan", k))) for k in uniform}
    closest = min(uniform, key=lambda k: abs(over_latency_plan[k] - 1)) if uniform else None
    curve = [{"ratio": rows[k]["ratio"], "latency_ms": rows[k]["latency_ms"],
              "latency_fraction": rows[k]["latency_fraction"], "macs_kept": rows[k]["macs_kept"],
              "rounds_ms": rows[k]["rounds_ms"]} for k in uniform]
    shown = {"original": "original", "latency_plan": "latency_plan"} | ({"uniform_plan": closest} if closest else {})
    rows = {k: rows[key] | {"weight_shapes": weight_shapes(graphs[key])} for k, key in shown.items()}
    # MACs a uniform plan keeps at exactly the latency plan's fraction of the original: linear between the
    # re-measured uniform plans that bracket it (None when none does)
    interpolated, lat_fraction = None, rows["latency_plan"]["latency_fraction"]
    for a, b in itertools.pairwise(curve):
        fa, fb = a["latency_fraction"], b["latency_fraction"]
        if fa <= lat_fraction <= fb and fb > fa:
            t = (lat_fraction - fa) / (fb - fa)
            interpolated = a["macs_kept"] + t * (b["macs_kept"] - a["macs_kept"])
    out = {
        "model": args.model, "engine": timer.engine, "target_latency": args.target_latency,
        "round_to": args.round_to, "uniform_round_to": uniform_round_to, "importance": args.importance,
        "max_ratio": lat_options.group_max_ratio, "rows": rows,
        "latency_vs_target": round(rows["latency_plan"]["latency_fraction"] / args.target_latency, 4),
        "latency_plan_over_uniform_latency": round(over_latency_plan[closest], 4) if closest else None,
        "macs_kept_latency_over_uniform": (
            round(rows["latency_plan"]["macs_kept"] / rows["uniform_plan"]["macs_kept"], 4) if closest else None),
        "macs_kept_latency_over_uniform_interpolated": (
            None if interpolated is None else round(rows["latency_plan"]["macs_kept"] / interpolated, 4)),
        "uniform_curve": curve,
        "rounds_used": used,  # indices into every row's rounds_ms: the quiet rounds the fractions come from
        # with the bisection's timed steps (each beside the original timed with it): how the choice was made
        "search": dict(lat.latency) | {"seconds": round(search_s, 1)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.engine != "ort":
        out["tuning"] = {"trials_per_layer": args.latency_trials, "trials_run": timer.trials_run,
                         "layer_shapes_tuned": timer.layers_tuned}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
