"""Apache TVM (Relax) backend: target presets, build from the (pruned) ONNX model, export a shared library.

This slice builds with TVM's default pipeline (no MetaSchedule tuning yet) for `cpu` (the host's LLVM CPU, all its
features) and cross-compiles `arm` (aarch64 + NEON) when the cross compiler is installed. `gpu` is refused with a
clear error until its schedules land. TVM is imported lazily: `import prune_compile` stays fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import BackendError, UsageError

ARM_CROSS_COMPILER = "aarch64-linux-gnu-gcc"
ARM_APT_PACKAGE = "gcc-aarch64-linux-gnu"


@dataclass
class BuildResult:
    target: str
    path: str
    target_json: str


def make_target(name: str, num_cores: int | None = None):
    """The TVM target for a preset name: `cpu` (host), `arm` (aarch64 NEON)."""
    import tvm
    from tvm.target import codegen

    cores = num_cores or os.cpu_count() or 1
    if name == "cpu":
        return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": cores})
    if name == "arm":
        return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"],
                                  "num-cores": cores})
    if name == "gpu":
        raise UsageError("--target gpu: the CUDA build (dlight schedules, sm_XX) is not in this build yet")
    raise UsageError(f"--target {name}: unknown target (cpu, arm, gpu)")


def check_toolchain(target: str) -> None:
    """Raise the error a build would hit for a missing toolchain, before any work is done."""
    if target == "gpu":
        raise UsageError("--target gpu: the CUDA build (dlight schedules, sm_XX) is not in this build yet")
    if target not in ("cpu", "arm"):
        raise UsageError(f"--target {target}: unknown target (cpu, arm, gpu)")
    if target == "arm" and shutil.which(ARM_CROSS_COMPILER) is None:
        raise BackendError(f"--target arm needs the cross compiler {ARM_CROSS_COMPILER}: "
                           f"apt-get install {ARM_APT_PACKAGE}")
    try:
        import tvm  # noqa: F401
    except Exception as e:
        raise BackendError(f"Apache TVM cannot be imported: {e}") from e


def build(model: onnx.ModelProto, target: str, path: str) -> BuildResult:
    """Compile `model` for `target` and write the shared library to `path` atomically."""
    fcompile = None
    check_toolchain(target)
    tvm_target = make_target(target)
    try:
        import tvm
        from tvm.relax.frontend.onnx import from_onnx

        mod = from_onnx(model, keep_params_in_input=False)
        with tvm_target:
            executable = tvm.compile(mod, target=tvm_target)
        if target == "arm":
            fcompile = tvm.contrib.cc.cross_compiler(ARM_CROSS_COMPILER)
    except (UsageError, BackendError):
        raise
    except Exception as e:
        raise BackendError(f"TVM failed to build for {target}: {str(e).strip().splitlines()[-1][:300]}") from e
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        if fcompile is not None:
            executable.export_library(tmp, fcompile=fcompile)
        else:
            executable.export_library(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise BackendError(f"TVM failed to export the {target} library: {str(e).strip().splitlines()[-1][:300]}") from e
    return BuildResult(target, path, str(tvm_target))


def run_library(path: str, inputs: Mapping[str, np.ndarray], input_order: list[str]) -> list[np.ndarray]:
    """Load a library built by `build` on this machine and run it once on the CPU."""
    import tvm
    from tvm import relax

    try:
        vm = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), tvm.cpu()) for name in input_order]
        out = vm["main"](*args)
    except Exception as e:
        raise BackendError(f"TVM failed to run '{path}': {str(e).strip().splitlines()[-1][:300]}") from e
    outs = [out] if hasattr(out, "numpy") else list(out)  # one output: a tensor; several: a tuple
    return [o.numpy() for o in outs]
