"""What tuning one layer shape costs, with MetaSchedule's stock builder and search against ours (this machine, one run).

    python tools/bench_tuning_search.py                 # 8 trials per shape, as the TVM latency table tunes them
    python tools/bench_tuning_search.py --trials 32 --rounds 3

Each shape is a conv + bias + ReLU of resnet18 (full width, and pruned to a multiple of 8 as the latency search
asks for them), tuned alone as a TVM latency-table entry is (`TvmTimer.layer`, fresh database per run). Variants,
each run in its own process, alternating round by round:
- `stock`: TVM's LocalBuilder (new worker processes for every batch of candidates, each importing TVM) and the
  evolutionary search with its XGBoost model, as our tuning ran until session 59;
- `ours`: the builder whose workers live across batches (backends/tvm/candidate_builder.py) and, for budgets the
  cost model cannot learn from, a population sampled once and drawn from at random (backends/tvm/search_strategy.py).
The process's first tuning (worker start, TVM's tensor intrinsics) is a warm-up and not counted. Printed as JSON: per
variant the seconds and best kernel time of each shape (median over rounds), the total, and `ours ÷ stock` for
the time and, as the geometric mean over shapes, for the kernels found (the search picks at random below the cost
model's warm-up in both: a quality ratio away from 1 is the draw of schedules, which the rounds average).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# (input channels, output channels, map size, kernel, stride): resnet18's convs at full width and pruned
SHAPES = [(64, 64, 56, 3, 1), (64, 48, 56, 3, 1), (128, 120, 28, 3, 1), (128, 128, 28, 3, 1), (256, 248, 14, 3, 1),
          (96, 96, 14, 3, 1), (512, 504, 7, 3, 1), (64, 128, 56, 1, 2), (256, 256, 14, 1, 2), (32, 32, 56, 3, 1)]


def conv_model(cin: int, cout: int, size: int, kernel: int, stride: int):
    """The one-layer model and its input, as the latency table builds a conv with its fused epilogue."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((cout, cin, kernel, kernel)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")]
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[kernel // 2] * 4, strides=[stride] * 2,
                              kernel_shape=[kernel, kernel]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             [1, cin, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, out, out])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"x": rng.standard_normal((1, cin, size, size)).astype(np.float32)}


def use_stock() -> None:
    """MetaSchedule's own builder and search, as tuning.py used them before session 59."""
    from tvm.s_tir import meta_schedule as ms

    from prune_compile.backends.tvm import candidate_builder, search_strategy

    def stock_builder(f_build, f_export, timeout_sec, max_workers):
        return ms.builder.LocalBuilder(f_build=f_build, f_export=f_export, timeout_sec=timeout_sec,
                                       max_workers=max_workers)

    # tuning imports both when it runs: what these modules hold then is what it uses
    candidate_builder.KeptPoolBuilder = stock_builder
    search_strategy.search_for = lambda trials, _seed: (search_strategy.evolutionary(trials), "xgb")


def run_variant(variant: str, trials: int, seed: int, shapes: list[tuple]) -> dict:
    from prune_compile.backends.tvm.latency_timer import TvmTimer
    from prune_compile.backends.tvm.tuning import TuningOptions

    if variant == "stock":
        use_stock()
    with tempfile.TemporaryDirectory(prefix="bench-tuning-search-") as db:
        timer = TvmTimer(database=db, trials_per_layer=trials)
        options = timer._tuning

        def seeded(proto) -> TuningOptions:
            chosen = options(proto)
            chosen.seed = seed
            return chosen

        timer._tuning = seeded
        timer.layer(*conv_model(16, 16, 28, 3, 1))  # warm-up
        seconds, best = [], []
        for shape in shapes:
            started = time.perf_counter()
            best.append(timer.layer(*conv_model(*shape)))
            seconds.append(time.perf_counter() - started)
    return {"variant": variant, "seed": seed, "seconds": seconds, "best_ms": best, "trials": timer.trials_run}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8, help="per shape (the TVM latency table's default is 16; 8 "
                                                          "in the README's measurements)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N of the shapes")
    ap.add_argument("--variant", choices=("stock", "ours"), help=argparse.SUPPRESS)  # a child's one run
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.trials, args.seed, SHAPES[:args.shapes])))
        return 0
    runs = {"stock": [], "ours": []}
    for r in range(args.rounds):
        for variant in (("stock", "ours") if r % 2 == 0 else ("ours", "stock")):
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", variant, "--trials",
                                   str(args.trials), "--seed", str(r), "--shapes", str(args.shapes)],
                                  capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr[-3000:])
                return done.returncode
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"trials_per_shape": args.trials, "rounds": args.rounds,
              "shapes": [list(s) for s in SHAPES[:args.shapes]]}
    for variant, rs in runs.items():
        seconds = np.median([r["seconds"] for r in rs], axis=0)
        best = np.median([r["best_ms"] for r in rs], axis=0)
        result[variant] = {"seconds": [round(float(s), 2) for s in seconds], "total_s": round(float(seconds.sum()), 1),
                           "best_ms": [round(float(b), 4) for b in best]}
    result["ours_over_stock"] = {
        "time": round(result["ours"]["total_s"] / result["stock"]["total_s"], 3),
        "best_ms_geomean": round(float(np.exp(np.mean(np.log(np.array(result["ours"]["best_ms"]) /
                                                              np.array(result["stock"]["best_ms"]))))), 3)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
