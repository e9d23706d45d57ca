"""Check on a real GPU that our `gpu` libraries load and compute right, with only TVM's runtime on that machine.

The build machine has TVM's compiler and nvcc; the deployment machine has the GPU. Two steps, on two machines:

    python tools/gpu_check.py build DIR [--models demonet,mobilenet_v2] [--ratio 0.5] [--target gpu]
    python tools/gpu_check.py run DIR [--rounds 7 --runs 50]     # on the GPU machine

`build` runs the pipeline a user runs (`prune-compile MODEL --ratio R --target gpu`, via `api.run`) for each model,
unpruned and pruned, keeps `model.gpu.so` with seeded random inputs and ONNX Runtime's outputs on the exported
graph; and builds one-op models whose embedded fatbins it extracts. `run` checks two levels:
- libraries (needs TVM's runtime only: `load_library(path, "cuda")`, which also works with TVM_USE_RUNTIME_LIB=1 or
  a wheel without libtvm_compiler.so): run each, compare with ONNX Runtime (max error over the largest reference
  value), time it (median over rounds of `--runs` calls and one device sync); `--profile` times each fused kernel;
- kernels (needs CuPy, no TVM at all): load each fatbin with the CUDA driver, resolve every kernel TVM generated,
  launch the one-op models' kernels and compare with NumPy.
Prints JSON; exit status 1 if a check fails. `--target cpu` builds CPU libraries instead (a dry run anywhere).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?(\w+)\(([^)]*)\)')
DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "prune_compile", "data", "default_model.onnx")
LIBRARY_TOLERANCE = 1e-4  # what the CPU library's check against ONNX Runtime allows
KERNEL_TOLERANCE = 1e-5

# one-op models: (name, ONNX op, input shapes, numpy reference)
CASES = [
    ("relu", "Relu", [[1, 64, 56, 56]], lambda a: np.maximum(a, 0)),
    ("add", "Add", [[1, 256, 14, 14], [1, 256, 14, 14]], lambda a, b: a + b),
    ("sigmoid", "Sigmoid", [[4, 1000]], lambda a: 1 / (1 + np.exp(-a))),
]


def _one_op(op: str, shapes: list[list[int]]):
    from onnx import TensorProto, helper

    names = [f"x{i}" for i in range(len(shapes))]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(names, shapes, strict=True)]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes[0])
    graph = helper.make_graph([helper.make_node(op, names, ["y"])], op, inputs, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _kernels(source: str) -> list[dict]:
    """Each kernel once (the source declares them before defining them)."""
    found = {}
    for m in KERNEL.finditer(source):
        found[m.group(2)] = {"name": m.group(2), "threads": int(m.group(1) or 0),
                             "params": [p.strip().split()[-1] for p in m.group(3).split(",")]}
    return list(found.values())


def _model_source(name: str):
    """(what api.run takes, input shapes): the bundled model, or a torchvision architecture or tests/zoo.py bench
    model (crnn, crnn_gru) with seeded weights."""
    if name == "demonet":
        return DEMO, None
    from tests.zoo import bench_model

    return bench_model(name)


def _build_libraries(directory: str, models: list[str], ratio: float, target: str, options) -> list[dict]:
    import onnx

    from prune_compile import api
    from prune_compile.backends import ort

    entries = []
    for name in models:
        model, shapes = _model_source(name)
        for variant, r in (("unpruned", 0.0), ("pruned", ratio)):
            with tempfile.TemporaryDirectory() as out:
                t0 = time.monotonic()
                result = api.run(model, out, input_shapes=shapes, ratio=r, targets=[target], target_options=options)
                seconds = time.monotonic() - t0
                proto = onnx.load(result.files["onnx"])
                feeds = ort.random_feeds(proto, seed=0)
                expected = ort.run(proto, feeds)
                stem = f"{name}-{variant}"
                shutil.copy(result.files[target], os.path.join(directory, f"{stem}.so"))
            np.savez(os.path.join(directory, f"{stem}.npz"), **{f"in:{k}": v for k, v in feeds.items()},
                     **{f"out:{i}": v for i, v in enumerate(expected)})
            entries.append({"kind": "library", "model": name, "variant": variant, "ratio": r, "device":
                            "cuda" if target == "gpu" else "cpu", "library": f"{stem}.so", "data": f"{stem}.npz",
                            "inputs": list(feeds), "macs": result.report["cost"]["after"]["macs"],
                            "build_seconds": round(seconds, 1)})
    return entries


def _build_kernels(directory: str, options) -> list[dict]:
    from prune_compile.backends import tvm as tvm_backend
    from prune_compile.backends.tvm.build import compile_model
    from prune_compile.backends.tvm.cuda_embed import cuda_source_of, library_blob, read_cuda_entry

    rng = np.random.default_rng(0)
    entries = []
    for name, op, shapes, ref in CASES:
        model = _one_op(op, shapes)
        lib = os.path.join(directory, f"{name}.gpu.so")
        tvm_backend.build(model, "gpu", lib, options)
        fmt, code = read_cuda_entry(library_blob(lib))
        assert fmt == "fatbin", fmt
        with open(os.path.join(directory, f"{name}.fatbin"), "wb") as f:
            f.write(code)
        os.unlink(lib)
        executable = compile_model(model, "gpu", options)[0]
        arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        np.savez(os.path.join(directory, f"{name}.npz"), *arrays, expected=ref(*arrays).astype(np.float32))
        entries.append({"kind": "kernel", "model": name, "fatbin": f"{name}.fatbin", "data": f"{name}.npz",
                        "kernels": _kernels(cuda_source_of(executable.mod))})
    return entries


def build(args: argparse.Namespace) -> int:
    from prune_compile.backends import tvm as tvm_backend

    os.makedirs(args.dir, exist_ok=True)
    options = tvm_backend.TargetOptions(gpu_arch=args.gpu_arch)
    manifest = _build_libraries(args.dir, args.models.split(","), args.ratio, args.target, options)
    if args.target == "gpu":
        manifest += _build_kernels(args.dir, options)
    with open(os.path.join(args.dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps([{k: e[k] for k in ("kind", "model", "variant", "macs", "build_seconds") if k in e}
                      for e in manifest]))
    return 0


def _relative_error(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(g - e)) / (np.max(np.abs(e)) + 1e-12)) for g, e in zip(got, expected, strict=True))


def _check_library(directory: str, entry: dict, rounds: int, runs: int, profile: bool = False) -> dict:
    import tvm

    from prune_compile.backends.tvm import load_library

    data = np.load(os.path.join(directory, entry["data"]))
    vm, dev = load_library(os.path.join(directory, entry["library"]), entry["device"])
    args = [tvm.runtime.tensor(np.ascontiguousarray(data[f"in:{name}"]), dev) for name in entry["inputs"]]
    main = vm["main"]
    out = main(*args)
    outs = [out] if hasattr(out, "numpy") else list(out)
    expected = [data[f"out:{i}"] for i in range(len(outs))]
    err = _relative_error([o.numpy() for o in outs], expected)
    for _ in range(3):  # warm-up
        main(*args)
    dev.sync()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(runs):
            main(*args)
        dev.sync()
        samples.append((time.perf_counter() - t0) * 1e3 / runs)
    row = {"model": entry["model"], "variant": entry["variant"], "device": entry["device"], "macs": entry["macs"],
           "max_relative_error": err, "ok": err <= LIBRARY_TOLERANCE,
           "latency_ms": round(statistics.median(samples), 4), "latency_ms_range": [round(min(samples), 4),
                                                                                    round(max(samples), 4)]}
    if profile:  # each fused kernel, the device synchronized around it
        from bench_latency import tvm_kernels

        row["kernels"] = tvm_kernels(vm, lambda: main(*args), runs, sync=dev.sync, n=12)
    return row


def _check_kernels(directory: str, entry: dict) -> dict:
    import cupy as cp

    module = cp.RawModule(path=os.path.join(directory, entry["fatbin"]))
    resolved = [k["name"] for k in entry["kernels"] if module.get_function(k["name"]) is not None]
    row = {"model": entry["model"], "kernels": len(entry["kernels"]), "loaded": len(resolved)}
    ok = len(resolved) == len(entry["kernels"]) > 0
    data = np.load(os.path.join(directory, entry["data"]))
    inputs = [cp.asarray(data[f"arr_{i}"]) for i in range(len(data.files) - 1)]
    expected = data["expected"]
    out = cp.zeros(expected.shape, dtype=cp.float32)
    (kernel,) = entry["kernels"]  # a one-op model: one fused elementwise kernel
    # TVM's elementwise kernels take the output then the inputs, one thread per element in blocks of the launch bound
    threads = kernel["threads"] or 1024
    blocks = math.ceil(expected.size / threads)
    module.get_function(kernel["name"])((blocks,), (threads,), (out, *inputs))
    cp.cuda.runtime.deviceSynchronize()
    err = float(np.max(np.abs(cp.asnumpy(out) - expected)) / (np.max(np.abs(expected)) + 1e-12))
    row.update({"kernel": kernel["name"], "grid": blocks, "block": threads, "max_relative_error": err,
                "ok": bool(ok and err <= KERNEL_TOLERANCE)})
    return row


def _speedups(rows: list[dict]) -> list[dict]:
    """Pruned over unpruned, per model: latency speedup against the MACs ratio."""
    by = {(r["model"], r["variant"]): r for r in rows if "latency_ms" in r}
    out = []
    for (model, variant), pruned in by.items():
        base = by.get((model, "unpruned"))
        if variant == "pruned" and base:
            speedup, macs = base["latency_ms"] / pruned["latency_ms"], base["macs"] / pruned["macs"]
            out.append({"model": model, "speedup": round(speedup, 3), "macs_ratio": round(macs, 3),
                        "speedup_over_macs_ratio": round(speedup / macs, 3)})
    return out


def run(args: argparse.Namespace) -> int:
    with open(os.path.join(args.dir, "manifest.json")) as f:
        manifest = json.load(f)
    report: dict = {"libraries": [], "kernels": []}
    for entry in manifest:
        try:
            if entry["kind"] == "library":
                report["libraries"].append(_check_library(args.dir, entry, args.rounds, args.runs, args.profile))
            else:
                report["kernels"].append(_check_kernels(args.dir, entry))
        except Exception as e:  # one broken entry must not hide the others' results
            report["libraries" if entry["kind"] == "library" else "kernels"].append(
                {"model": entry["model"], "variant": entry.get("variant"), "ok": False,
                 "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"})
    report["speedups"] = _speedups(report["libraries"])
    if any(e["device"] == "cuda" for e in manifest if e["kind"] == "library"):
        import tvm

        dev = tvm.cuda(0)
        report["device"] = {"name": dev.device_name, "compute_version": dev.compute_version}
    rows = report["libraries"] + report["kernels"]
    report["ok"] = bool(rows) and all(r["ok"] for r in rows)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build", help="here: build the libraries and the reference data into DIR")
    b.add_argument("dir")
    b.add_argument("--models", default="demonet,mobilenet_v2", help="demonet and/or torchvision names")
    b.add_argument("--ratio", type=float, default=0.5)
    b.add_argument("--target", choices=("gpu", "cpu"), default="gpu")
    b.add_argument("--gpu-arch", default="sm_90")
    r = sub.add_parser("run", help="on the GPU machine: run and compare what DIR holds")
    r.add_argument("dir")
    r.add_argument("--rounds", type=int, default=7)
    r.add_argument("--runs", type=int, default=50)
    r.add_argument("--profile", action="store_true", help="time each fused kernel too (after the timed rounds)")
    args = ap.parse_args()
    return build(args) if args.step == "build" else run(args)


if __name__ == "__main__":
    sys.exit(main())
