"""Benchmark the memory a job takes on a large model. Builds a model of `--layers` square fp32 Gemm layers of
`--width` (over 2 GiB it is saved with external data), runs `prune-compile` on it in a child process, and prints
JSON: the model's bytes, the child's peak resident memory and seconds, the same for a tiny model (what the
interpreter and libraries take by themselves), and the ratio that matters: (peak - baseline) / model bytes.

Run: .venv/bin/python tools/bench_memory.py [--width 16384 --layers 2 --ratio 0.5 --target none]
(16384 x 2: the 2 GiB model the README quotes; the default, 4096 x 2, is 128 MiB: heavy, a few seconds.)
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

PROTOBUF_LIMIT = 2**31 - 1


def build_model(path: str, width: int, layers: int) -> int:
    """`layers` Gemm+Relu layers of width x width fp32 weights, input [1, width]; returns the weights' bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for k in range(layers):
        w = f"fc{k}.weight"
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width), dtype=np.float32) * 0.01, w))
        y = "y" if k == layers - 1 else f"h{k}"
        nodes.append(helper.make_node("Gemm", [x, w], [y], transB=1, name=f"fc{k}"))
        if k < layers - 1:
            nodes.append(helper.make_node("Relu", [y], [f"r{k}"], name=f"relu{k}"))
            x = f"r{k}"
    graph = helper.make_graph(nodes, "bench_memory", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                    [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    weight_bytes = layers * width * width * 4
    onnx.save(model, path, save_as_external_data=weight_bytes >= PROTOBUF_LIMIT,
              all_tensors_to_one_file=True, location=os.path.basename(path) + ".data")
    return weight_bytes


def peak_of(cmd: list[str]) -> tuple[int, float]:
    """The child's peak resident bytes (its own, from wait4) and its seconds; raises if it failed."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return usage.ru_maxrss * 1024, seconds  # Linux reports KiB


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--target", default="none")
    ap.add_argument("--build", help=argparse.SUPPRESS)  # PATH: build the model there, in this (child) process
    args = ap.parse_args(argv)
    if args.build:
        return {"weight_bytes": build_model(args.build, args.width, args.layers)}
    cli = [sys.executable, "-m", "prune_compile.cli"]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as d:
        tiny, big = os.path.join(d, "tiny.onnx"), os.path.join(d, "big.onnx")
        # Built by children: a child's peak counts its parent's memory at the fork, so this one stays small.
        for path, width in ((tiny, 64), (big, args.width)):
            subprocess.run([sys.executable, __file__, "--build", path, "--width", str(width), "--layers",
                            str(args.layers)], check=True)
        model_bytes = args.layers * args.width * args.width * 4
        job = ["--ratio", str(args.ratio), "--target", args.target]
        base, base_s = peak_of([*cli, tiny, "-o", os.path.join(d, "tiny_out"), *job])
        peak, seconds = peak_of([*cli, big, "-o", os.path.join(d, "big_out"), *job])
    result = {"model": {"width": args.width, "layers": args.layers, "weight_bytes": model_bytes},
              "job": {"ratio": args.ratio, "target": args.target},
              "baseline": {"peak_rss_bytes": base, "seconds": round(base_s, 2)},
              "large": {"peak_rss_bytes": peak, "seconds": round(seconds, 2)},
              "peak_over_model": round(peak / model_bytes, 2),
              "peak_above_baseline_over_model": round((peak - base) / model_bytes, 2)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
