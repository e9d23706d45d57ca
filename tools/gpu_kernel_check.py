"""Check on a real GPU that the device code embedded in our `gpu` libraries loads and computes right.

The PyPI TVM wheel has no CUDA runtime, so a `model.gpu.so` cannot be run through TVM on a GPU machine that only
has that wheel. What can be checked is the part we produce ourselves: the fatbin nvcc made from TVM's kernels,
patched into the library. Two steps, on two machines:

    python tools/gpu_kernel_check.py build DIR   # here: build gpu libraries, extract their fatbins + test data
    python tools/gpu_kernel_check.py run DIR     # on the GPU machine (needs CuPy): load, launch, compare

`run` loads every fatbin with the CUDA driver (cuModuleLoadData), resolves every kernel TVM generated, launches the
kernels of one-op models (their launch shapes are read from the CUDA source) and compares with NumPy. Prints JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

import numpy as np

KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?(\w+)\(([^)]*)\)')

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


def build(directory: str) -> None:
    import onnx

    from prune_compile.backends import tvm as tvm_backend
    from prune_compile.backends.tvm.build import compile_model
    from prune_compile.backends.tvm.cuda_embed import cuda_source_of, library_blob, read_cuda_entry

    os.makedirs(directory, exist_ok=True)
    options = tvm_backend.TargetOptions(gpu_arch="sm_90")
    rng = np.random.default_rng(0)
    manifest = []
    models = [(name, _one_op(op, shapes), shapes, ref) for name, op, shapes, ref in CASES]
    demo = os.path.join(os.path.dirname(__file__), "..", "prune_compile", "data", "default_model.onnx")
    models.append(("demonet", onnx.load(demo), None, None))
    for name, model, shapes, ref in models:
        lib = os.path.join(directory, f"{name}.gpu.so")
        tvm_backend.build(model, "gpu", lib, options)
        fmt, code = read_cuda_entry(library_blob(lib))
        assert fmt == "fatbin", fmt
        with open(os.path.join(directory, f"{name}.fatbin"), "wb") as f:
            f.write(code)
        os.unlink(lib)
        executable = compile_model(model, "gpu", options)[0]
        entry = {"name": name, "fatbin": f"{name}.fatbin", "kernels": _kernels(cuda_source_of(executable.mod))}
        if shapes is not None:
            arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            np.savez(os.path.join(directory, f"{name}.npz"), *arrays, expected=ref(*arrays).astype(np.float32))
            entry["data"] = f"{name}.npz"
        manifest.append(entry)
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps([{"name": e["name"], "kernels": len(e["kernels"])} for e in manifest]))


def run(directory: str) -> int:
    import cupy as cp

    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    results, ok = [], True
    device = cp.cuda.runtime.getDeviceProperties(0)
    for entry in manifest:
        module = cp.RawModule(path=os.path.join(directory, entry["fatbin"]))
        resolved = [k["name"] for k in entry["kernels"] if module.get_function(k["name"]) is not None]
        row = {"model": entry["name"], "kernels": len(entry["kernels"]), "loaded": len(resolved)}
        ok &= len(resolved) == len(entry["kernels"]) > 0
        if "data" in entry:
            data = np.load(os.path.join(directory, entry["data"]))
            inputs = [cp.asarray(data[f"arr_{i}"]) for i in range(len(data.files) - 1)]
            expected = data["expected"]
            out = cp.zeros(expected.shape, dtype=cp.float32)
            (kernel,) = entry["kernels"]  # a one-op model: one fused elementwise kernel
            # TVM's elementwise kernels: params are the output then the inputs (named after them), one thread
            # per element in blocks of the launch bound
            args = [out, *inputs] if len(kernel["params"]) == len(inputs) + 1 else None
            threads = kernel["threads"] or 1024
            blocks = math.ceil(expected.size / threads)
            module.get_function(kernel["name"])((blocks,), (threads,), tuple(args))
            cp.cuda.runtime.deviceSynchronize()
            err = float(np.max(np.abs(cp.asnumpy(out) - expected)) / (np.max(np.abs(expected)) + 1e-12))
            row.update({"kernel": kernel["name"], "grid": blocks, "block": threads, "max_relative_error": err})
            ok &= err <= 1e-5
        results.append(row)
    print(json.dumps({"device": device["name"].decode(), "compute_capability": f"{device['major']}{device['minor']}",
                      "ok": bool(ok), "results": results}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "run"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(build(sys.argv[2]) if sys.argv[1] == "build" else run(sys.argv[2]))
