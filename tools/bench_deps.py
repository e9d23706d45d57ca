"""Benchmark the channel dependency analysis. Prints JSON: seconds per model (best of N runs, each on a fresh
analysis), channel/slot/group counts, and a size sweep of synthetic graphs to show time is linear in graph size.

Run: .venv/bin/python tools/bench_deps.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _torchvision_graph(name: str):
    import torch
    import torchvision

    from prune_compile.ir.fx_importer import import_torch_module

    model = getattr(torchvision.models, name)(weights=None).eval()
    return import_torch_module(model, (torch.randn(1, 3, 224, 224),))


def synthetic_graph(nodes: int, channels: int = 16):
    """Residual conv/BN/ReLU blocks (7 nodes each, with a concat every 4th block) until `nodes` is reached."""
    from prune_compile.ir import Graph, Provenance, Value

    rng = np.random.default_rng(0)
    g = Graph(name=f"synthetic{nodes}")
    x = Value("x", (1, channels, 4, 4), np.float32)
    g.inputs.append(x)
    counter = 0

    def const(shape):
        nonlocal counter
        counter += 1
        name = f"p{counter}"
        return Value(name, shape, np.float32, data=rng.standard_normal(shape).astype(np.float32),
                     provenance=Provenance("onnx_initializer", name))

    def add(op, inputs, shape, **attrs):
        nonlocal counter
        counter += 1
        out = Value(f"v{counter}", shape, np.float32)
        g.add_node(op, inputs, [out], attrs, name=f"n{counter}")
        return out

    def conv(inp, cout):
        shape = (1, cout, 4, 4)
        y = add("conv", [inp, const((cout, inp.shape[1], 3, 3)), const((cout,))], shape, kernel_shape=[3, 3],
                strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1)
        y = add("batch_norm", [y, const((cout,)), const((cout,)), const((cout,)), const((cout,))], shape,
                epsilon=1e-5)
        return add("relu", [y], shape)

    y = x
    block = 0
    while len(g.nodes) < nodes:
        h = conv(conv(y, channels), channels)
        y = add("add", [y, h], y.shape)
        block += 1
        if block % 4 == 0:
            c = conv(y, channels // 2)
            y = conv(add("concat", [c, c], (1, channels, 4, 4), axis=1), channels)
    g.outputs.append(y)
    return g


def best_time(graph, repeat: int) -> tuple[float, dict]:
    from prune_compile.passes.deps import analyze

    best, stats = float("inf"), {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = analyze(graph)
        best = min(best, time.perf_counter() - t0)
        stats = dict(result.stats, prunable=len(result.prunable()))
    return best, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from prune_compile.passes.deps import analyze

    analyze(synthetic_graph(50))  # import scipy and warm up outside the measurements
    results = {}
    for name in ("resnet50", "densenet121", "densenet201", "vit_b_16"):
        graph = _torchvision_graph(name)
        seconds, stats = best_time(graph, args.repeat)
        results[name] = {"seconds": round(seconds, 4), "nodes": len(graph.nodes), **stats}
    sweep = {}
    for n in (6250, 12500, 25000, 50000):
        graph = synthetic_graph(n)
        seconds, stats = best_time(graph, args.repeat)
        sweep[str(len(graph.nodes))] = {"seconds": round(seconds, 4), **stats}
    sizes = sorted(sweep, key=int)
    results["synthetic"] = sweep
    results["synthetic_time_ratio_50k_over_6k"] = round(sweep[sizes[-1]]["seconds"] / sweep[sizes[0]]["seconds"], 2)
    results["synthetic_size_ratio_50k_over_6k"] = round(int(sizes[-1]) / int(sizes[0]), 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
