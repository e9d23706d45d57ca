"""Latency-aware plans vs uniform plans at equal measured latency (ONNX Runtime or TVM, this machine, one run).

    python tools/bench_latency_plan.py resnet18 --target-latency 0.5
    python tools/bench_latency_plan.py mobilenet_v2 --target-latency 0.5 --round-to 8
    python tools/bench_latency_plan.py demo --engine tvm --latency-trials 16 --tune-db DIR

`--engine tvm` measures everything (the search's table and bisection, the uniform bisection, the final rounds) on
TVM's tuned cpu code: every model timed is a tuned build (`--latency-trials` per weight layer, records kept in
`--tune-db`, so a rerun re-tunes nothing). MODEL `demo` is the bundled default model.

1. The latency policy plans for `--target-latency` (fraction of the original's measured latency).
2. A uniform plan is searched (bisection on the ratio) whose *measured* latency equals the latency plan's.
3. Both are re-measured interleaved (rounds of original / latency plan / uniform plan, medians), so machine drift
   hits all three alike. Printed as JSON: latency, MACs and parameters kept, and the ratios that matter:
   `latency_vs_target` (goal: within 10%) and `macs_kept_latency_over_uniform` (goal: > 1 — more of the model
   kept for the same latency).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _model(name: str):
    from prune_compile.api import load_model

    if name == "demo":
        import prune_compile

        return load_model(os.path.join(os.path.dirname(prune_compile.__file__), "data", "default_model.onnx"))
    if name.endswith(".onnx"):
        return load_model(name)
    return load_model(f"torchvision.models:{name}", {"x": [1, 3, 224, 224]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="torchvision model name or an .onnx file")
    ap.add_argument("--target-latency", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--importance", default="l2")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    ap.add_argument("--engine", choices=("ort", "tvm"), default="ort", help="what measures (see the module doc)")
    ap.add_argument("--latency-trials", type=int, default=16, help="tvm: tuning trials per weight layer")
    ap.add_argument("--tune-db", default=None, help="tvm: tuning database root")
    args = ap.parse_args(argv)

    from prune_compile.ir import export_onnx
    from prune_compile.passes.cost import graph_cost
    from prune_compile.passes.deps import analyze
    from prune_compile.passes.latency import Timer
    from prune_compile.passes.policy import PlanningOptions, make_plan
    from prune_compile.passes.rewrite import pruned_copy

    loaded = _model(args.model)
    graph, feeds = loaded.graph, loaded.example_inputs
    deps = analyze(graph)
    if args.engine == "tvm":
        from prune_compile.backends.tvm.latency_timer import TvmTimer

        timer = TvmTimer(database=args.tune_db, trials_per_layer=args.latency_trials)
    else:
        timer = Timer()
    started = time.perf_counter()

    def log(line, final=False, fraction=None):
        if final:
            print(line, file=sys.stderr)

    lat = make_plan(graph, deps, PlanningOptions(policy="latency", target_latency=args.target_latency,
                                                 round_to=args.round_to, importance=args.importance,
                                                 latency_engine=args.engine, latency_trials=args.latency_trials),
                    calibration=feeds, progress=log, latency_timer=timer)
    search_s = time.perf_counter() - started
    lat_graph = pruned_copy(graph, lat.plan, deps)
    lat_ms = timer(export_onnx(lat_graph), feeds, 2.0)

    lo, hi = 0.0, 0.95
    uni_graph, uni_ratio, uni_ms = None, None, float("inf")
    # uniform ratio whose measured latency matches the latency plan's (on TVM each step is a tuned build: fewer)
    for _ in range(12 if args.engine == "ort" else 7):
        mid = (lo + hi) / 2
        plan = make_plan(graph, deps, PlanningOptions(ratio=mid, round_to=args.round_to,
                                                      importance=args.importance)).plan
        g = pruned_copy(graph, plan, deps)
        ms = timer(export_onnx(g), feeds, 1.0)
        if abs(ms - lat_ms) < abs(uni_ms - lat_ms):
            uni_graph, uni_ratio, uni_ms = g, mid, ms
        if abs(ms / lat_ms - 1) <= 0.02:
            break
        lo, hi = (mid, hi) if ms > lat_ms else (lo, mid)

    protos = {"original": export_onnx(graph), "latency_plan": export_onnx(lat_graph),
              "uniform_plan": export_onnx(uni_graph)}
    samples: dict[str, list[float]] = {k: [] for k in protos}
    for _ in range(args.rounds):
        for name, proto in protos.items():
            samples[name].append(timer(proto, feeds, 1.0))
    ms = {k: float(np.median(v)) for k, v in samples.items()}
    cost = {"original": graph_cost(graph), "latency_plan": graph_cost(lat_graph),
            "uniform_plan": graph_cost(uni_graph)}
    base = cost["original"]
    rows = {k: {"latency_ms": round(ms[k], 4), "latency_fraction": round(ms[k] / ms["original"], 4),
                "macs": cost[k]["macs"], "macs_kept": round(cost[k]["macs"] / base["macs"], 4),
                "parameters_kept": round(cost[k]["parameters"] / base["parameters"], 4)} for k in protos}
    rows["uniform_plan"]["ratio"] = round(uni_ratio, 4)
    out = {
        "model": args.model, "engine": timer.engine, "target_latency": args.target_latency,
        "round_to": args.round_to, "importance": args.importance, "rows": rows,
        "latency_vs_target": round(rows["latency_plan"]["latency_fraction"] / args.target_latency, 4),
        "latency_plan_over_uniform_latency": round(ms["latency_plan"] / ms["uniform_plan"], 4),
        "macs_kept_latency_over_uniform": round(rows["latency_plan"]["macs_kept"] / rows["uniform_plan"]["macs_kept"],
                                                4),
        "search": {k: v for k, v in lat.latency.items() if k != "trajectory"} | {"seconds": round(search_s, 1)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.engine == "tvm":
        out["tuning"] = {"trials_per_layer": args.latency_trials, "trials_run": timer.trials_run,
                         "layer_shapes_tuned": timer.layers_tuned}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
