"""How well the latency table predicts what pruning saves on the whole model (ONNX Runtime, this machine, one run).

    python tools/bench_latency_table.py mobilenet_v2 --plans 10
    python tools/bench_latency_table.py resnet18

The latency policy (passes/latency.py) ranks moves by the table's predicted saving: the sum over the weight layers
of (time at the plan's channel counts - time at full width). This draws `--plans` plans (even ones uniform at
ratios 0.25..0.7, odd ones a random ratio per group, counts in multiples of 8), measures each whole pruned model
against the original (`--pairs` alternating pairs, median ratio: the machine's speed drifts between minutes), and
compares the measured saving with two tables' predictions:
- `in_model`: the policy's table (a conv timed as LAYER_COPIES copies of itself: its cost inside a model);
- `alone`: each layer timed as a one-node model (the table before that: per-run overhead and the NCHWc reorders
  around a lone conv counted as the conv's).
Printed as JSON: per plan the measured saving (fraction of the original) and each table's predicted saving (ms),
and per table the Pearson and Spearman correlations with the measurements (goal: near 1).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="torchvision model name, demo, or an .onnx file")
    ap.add_argument("--plans", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=5, help="alternating (pruned, original) timings per plan")
    ap.add_argument("--seconds", type=float, default=0.3, help="per timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from bench_latency_plan import bench_model

    from prune_compile.passes.deps import analyze
    from prune_compile.passes.latency import LatencyTable, Timer, timed_proto
    from prune_compile.passes.plan import Plan
    from prune_compile.passes.rewrite import pruned_copy

    class AloneTimer(Timer):
        def layer(self, proto, feeds):
            return self(proto, feeds)

    loaded = bench_model(args.model)
    graph, feeds = loaded.graph, loaded.example_inputs
    deps = analyze(graph)
    groups = [g for g in deps.groups if g.prunable]
    rng = np.random.default_rng(args.seed)
    plans = []
    for i in range(args.plans):
        uniform = 0.25 + 0.45 * (i // 2) / max((args.plans - 1) // 2, 1)
        removed = {}
        for g in groups:
            k = int(g.size * (rng.uniform(0.0, 0.7) if i % 2 else uniform)) // 8 * 8
            if k and g.size - k >= 8:
                removed[g.id] = k
        plans.append(removed)
    tables = {"in_model": LatencyTable(graph, deps, Timer(args.threads)),
              "alone": LatencyTable(graph, deps, AloneTimer(args.threads))}
    timer = Timer(args.threads)
    original = timed_proto(graph)
    rows = []
    for removed in plans:
        plan = Plan({g.id: np.arange(removed[g.id]) for g in groups if removed.get(g.id)})
        pruned = timed_proto(pruned_copy(graph, plan, deps))
        ratios = [timer(pruned, feeds, args.seconds) / timer(original, feeds, args.seconds) for _ in range(args.pairs)]
        rows.append({"measured_saving": round(1 - float(np.median(ratios)), 4),
                     "predicted_saving_ms": {name: round(t.full_sum() - t.layers_sum(removed), 4)
                                             for name, t in tables.items()}})
    measured = np.array([r["measured_saving"] for r in rows])
    result = {"model": args.model, "plans": rows, "original_ms": round(timer(original, feeds, 1.0), 4),
              "layer_shapes": {name: len(t.cache) for name, t in tables.items()}}
    for name in tables:
        predicted = np.array([r["predicted_saving_ms"][name] for r in rows])
        result[name] = {"pearson": round(float(np.corrcoef(predicted, measured)[0, 1]), 4),
                        "spearman": round(float(np.corrcoef(_ranks(predicted), _ranks(measured))[0, 1]), 4),
                        "negative_predictions": int(np.sum(predicted <= 0))}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
