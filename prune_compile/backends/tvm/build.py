"""Build an ONNX model (the pruned output) with TVM Relax for a target preset and export a shared library.

Pipeline: recurrent layers unrolled (recurrent_unroll) → Relax ONNX frontend (weights bound as constants) → layouts
(`converted_layouts`: conv_nchwc, with transposed convs, resizes and the guard around it) → on CPUs, exp / tanh /
erf and their activations as vectorizable arithmetic (vector_math) → for tuned builds: DecomposeOpsForInference,
CanonicalizeBindings, our lowerings (`own_lowerings`), the zero pipeline (legalize, fold, fuse),
MetaSchedule, apply the database → `tvm.compile` (default pipeline; for CUDA it schedules whatever is left with
dlight) → `export_library`. `arm` links with the
aarch64 cross compiler; `gpu` embeds a fatbin compiled by nvcc (see cuda_embed).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ...errors import BackendError, UsageError
from . import conv_nchwc, conv_winograd, parallel_launcher, pool_nchwc
from .clip_ops import clips_as_min_max
from .conv_nchwc import convert_layout, pairs_half_blocks, vector_lanes
from .conv_nchwc import legalize as legalize_nchwc
from .conv_winograd import winograd_kernels
from .cpu_passes import build_context
from .layout_transforms import legalize_layout_transform
from .recurrent_steps import recurrent_steps_frontend
from .recurrent_unroll import has_recurrences, unrolled_recurrences
from .stack_ops import stacks_as_concats
from .targets import (
    ARM_BOARDS,
    ARM_CROSS_COMPILER,
    DEFAULT_OPTIONS,
    TargetOptions,
    check_toolchain,
    check_tunable,
    find_nvcc,
    make_target,
    resolve_conv_layout,
)
from .threads import ensure_thread_pool
from .transposed_convs import strided_transposes_as_convs
from .tuning import TuningOptions, tune
from .unvalued_constants import unvalued_constants
from .vector_math import vectorized_math


@dataclass
class BuildResult:
    target: str
    path: str
    target_json: str
    pipeline: str
    tuning: dict[str, Any] | None = None
    device_code: dict[str, Any] = field(default_factory=dict)


def _last_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[-1] if lines else type(e).__name__)[:300]


@contextlib.contextmanager
def _cuda_env() -> Any:
    """TVM's CUDA helpers find the toolkit from CUDA_PATH; point it at the nvcc we found."""
    saved = os.environ.get("CUDA_PATH")
    nvcc = find_nvcc()
    if saved is None and nvcc:
        os.environ["CUDA_PATH"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    try:
        yield nvcc
    finally:
        if saved is None:
            os.environ.pop("CUDA_PATH", None)


def compile_model(model: onnx.ModelProto, target: str, target_options: TargetOptions = DEFAULT_OPTIONS,
                  tuning: TuningOptions | None = None):
    """Compile to an in-memory Relax executable. Returns (executable, tvm target, pipeline name, tuning summary)."""
    import tvm

    mod, tvm_target, pipeline, summary = lower_model(model, target, target_options, tuning)
    try:
        with tvm_target, build_context(tvm_target):
            executable = tvm.compile(mod, target=tvm_target)
    except Exception as e:
        raise BackendError(f"TVM failed to build for {target}: {_last_line(e)}") from e
    return executable, tvm_target, pipeline, summary


def converted_layouts(mod, layout: str, lanes: int):
    """The convolutions of `mod` in `layout` (NCHW, NHWC, or NCHWc in blocks of up to `lanes` channels), the ops
    around them rewritten first so that the conversion follows through them and cannot fail on them."""
    from tvm import relax

    if layout == "NCHW" or layout == "NCHWc" and not lanes:
        return mod
    mod = clips_as_min_max(mod)  # else each clip stays NCHW between two layout transforms
    mod = stacks_as_concats(mod)  # else the conversion fails after a stack
    if layout == "NHWC":
        return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)
    mod = strided_transposes_as_convs(mod)  # else TVM multiplies mostly zeros, in NCHW
    return convert_layout(mod, lanes)


def register_schedule_rules(machine: conv_winograd.Machine = conv_winograd.HOST_MEASURED) -> None:
    """Make our CPU schedule rules visible to MetaSchedule, which calls the one a block's `schedule_rule`
    annotation names as `s_tir.meta_schedule.cpu.<name>` (the CPU target key). The Winograd rule sizes its tile
    groups for `machine` (a rule sees the schedule, not the target)."""
    import tvm

    winograd = functools.partial(conv_winograd.schedule_rule, machine=machine)
    for name, rule in ((conv_nchwc.RULE, conv_nchwc.schedule_rule), (conv_winograd.RULE, winograd),
                       (pool_nchwc.TAG, pool_nchwc.schedule_rule)):
        tvm.register_global_func(f"s_tir.meta_schedule.cpu.{name}", rule, override=True)


def winograd_machine(tvm_target, target_name: str,
                     target_options: TargetOptions = DEFAULT_OPTIONS) -> conv_winograd.Machine:
    """The cores and L2 cache Winograd's choices are sized for: the target's num-cores; the L2 per core of the host
    when the build is for it (`cpu`), of the board preset (`arm`, `ARM_BOARDS`), the measured hosts' otherwise."""
    from ...host_cpu import l2_bytes_per_core

    default = conv_winograd.HOST_MEASURED
    cores = int(tvm_target.attrs["num-cores"]) if "num-cores" in tvm_target.attrs else default.cores
    board = ARM_BOARDS.get(target_options.arm_board, {}) if target_name == "arm" else {}
    l2 = l2_bytes_per_core() if target_name == "cpu" else (board.get("l2_kib") or 0) << 10
    return conv_winograd.Machine(max(cores, 1), l2 or default.l2_bytes)


def own_lowerings(lanes: int, winograd: bool = True,
                  machine: conv_winograd.Machine = conv_winograd.HOST_MEASURED) -> dict:
    """The ops tuned builds lower with our computes (LegalizeOps hooks) instead of TVM's: blocked convs (when
    `lanes`; half-width blocks in pairs where this CPU's wide FMAs pay, `pairs_half_blocks`; with `winograd`, 3x3
    stride-1 ones by F(4x4, 3x3) where it pays on `machine`, conv_winograd), layout transforms as gathers that fuse
    with their neighbours."""
    lowerings = {"relax.layout_transform": legalize_layout_transform}
    if lanes:
        paired = lanes if pairs_half_blocks(lanes) else 0
        on = machine if winograd else None
        lowerings["relax.nn.conv2d"] = lambda bb, call: legalize_nchwc(bb, call, paired, on)
    return lowerings


def lower_model(model: onnx.ModelProto, target: str, target_options: TargetOptions = DEFAULT_OPTIONS,
                tuning: TuningOptions | None = None, weights_unused: bool = False):
    """Import, change layouts and (with a budget) tune, up to the code generation `compile_model` adds.
    Returns (Relax module, tvm target, pipeline name, tuning summary). The latency table stops here: the tuning
    records already hold what each kernel measured. `weights_unused`: the module will not run (the table), so what
    constant folding would compute from the weights is left zero (unvalued_constants: the same kernels)."""
    if target == "cpu":  # before TVM runs anything (constant folding does): its pool is sized once
        ensure_thread_pool(target_options.num_cores)
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    tvm_target = make_target(target, target_options)
    tuned = tuning is not None and tuning.trials > 0
    if tuned:
        check_tunable(target, target_options)
    if has_recurrences(model):  # the frontend has no LSTM, GRU or RNN (CPUs run a layer's steps as one kernel)
        model = unrolled_recurrences(model, fused_steps=tvm_target.kind.name == "llvm")
    try:
        with recurrent_steps_frontend():
            mod = from_onnx(model, keep_params_in_input=False)
    except Exception as e:
        raise BackendError(f"TVM's ONNX frontend rejected the model: {_last_line(e)}") from e
    summary = None
    pipeline = "default (untuned)"
    layout = resolve_conv_layout(target_options.conv_layout, target, tuned)
    lanes = vector_lanes(tvm_target) if layout == "NCHWc" else 0  # 0 on GPUs: they keep NCHW
    try:
        mod = converted_layouts(mod, layout, lanes)
        if layout == "NHWC":
            pipeline = "NHWC, default (untuned)"
        machine = winograd_machine(tvm_target, target, target_options)
        if lanes:
            register_schedule_rules(machine)
        if tvm_target.kind.name == "llvm":
            mod = vectorized_math(mod)  # else exp, tanh, erf are a libm call per vector lane
        if tuned:
            passes = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
                      relax.transform.LegalizeOps(own_lowerings(lanes, target_options.winograd, machine))]
            with tvm_target:
                mod = tvm.transform.Sequential(passes)(mod)
                if weights_unused:
                    mod = unvalued_constants(mod)
                mod = relax.get_pipeline("zero")(mod)
            database, summary = tune(mod, tvm_target, target, tuning)
            with tvm_target, database:
                mod = relax.transform.MetaScheduleApplyDatabase()(mod)
            pipeline = "metaschedule" + (", NHWC" if layout == "NHWC" else f", NCHW{lanes}c" if lanes else "")
            winograd = winograd_kernels(mod)
            pipeline += f", Winograd F(4x4,3x3) in {winograd} kernels" if winograd else ""
    except (UsageError, BackendError):
        raise
    except Exception as e:
        raise BackendError(f"TVM failed to build for {target}: {_last_line(e)}") from e
    return mod, tvm_target, pipeline, summary


def build(model: onnx.ModelProto, target: str, path: str, target_options: TargetOptions = DEFAULT_OPTIONS,
          tuning: TuningOptions | None = None) -> BuildResult:
    """Compile `model` for `target` and write the shared library to `path` atomically."""
    check_toolchain(target, target_options)
    with _cuda_env() if target == "gpu" else contextlib.nullcontext() as nvcc:
        executable, tvm_target, pipeline, summary = compile_model(model, target, target_options, tuning)
        export_kwargs: dict[str, Any] = {}
        device_code: dict[str, Any] = {}
        if target == "gpu":
            from .cuda_embed import compile_fatbin, cuda_source_of, make_fpack_imports

            source = cuda_source_of(executable.mod)
            if source is not None:
                fatbin = compile_fatbin(source, target_options.gpu_arch, nvcc)
                export_kwargs["fpack_imports"] = make_fpack_imports(source, fatbin)
                device_code = {"format": "fatbin", "arch": target_options.gpu_arch, "bytes": len(fatbin),
                               "compiler": "nvcc"}
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=directory)
        os.close(fd)
        try:
            export_library(executable, target, tmp, **export_kwargs)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return BuildResult(target, path, str(tvm_target), pipeline, summary.to_json() if summary else None, device_code)


def export_library(executable, target: str, path: str, **export_kwargs: Any) -> None:
    """Write `executable` as a shared library for `target`; CPU libraries carry our parallel launcher (load_library
    installs it), arm ones cross-compiled."""
    if target in ("cpu", "arm"):
        export_kwargs["fcompile"] = parallel_launcher.fcompile(ARM_CROSS_COMPILER if target == "arm" else None)
    try:
        executable.export_library(path, **export_kwargs)
    except (UsageError, BackendError):
        raise
    except Exception as e:
        raise BackendError(f"TVM failed to export the {target} library: {_last_line(e)}") from e


def cuda_device():
    """TVM's first CUDA device. Its device API lives in a sidecar library, libtvm_runtime_cuda.so, that `import tvm`
    loads only when TVM's compiler is installed too; a runtime-only install (`TVM_USE_RUNTIME_LIB=1`, or the wheel
    without libtvm_compiler.so: a deployment machine) does not, so load it here."""
    import ctypes

    import tvm
    import tvm_ffi

    if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is None:
        sidecar = os.path.join(os.path.dirname(tvm.libinfo.find_libtvm_runtime()), "libtvm_runtime_cuda.so")
        try:
            ctypes.CDLL(sidecar, mode=ctypes.RTLD_LOCAL)  # registers device_api.cuda as it loads
        except OSError as e:  # names what is missing: libcudart.so.13, or the driver's libcuda.so.1
            raise BackendError(f"TVM's CUDA runtime cannot be loaded: {e}") from e
    dev = tvm.cuda(0)
    if not dev.exist:
        raise BackendError("no CUDA device: TVM's CUDA runtime loaded but sees no GPU")
    return dev


def load_library(path: str, device: str = "cpu"):
    """A VirtualMachine over a library built by `build` (never reload a rewritten path in-process: dlopen caches by
    path). Needs only TVM's runtime, so it works on a deployment machine without the compiler. On the CPU, TVM runs
    with every available core unless TVM_NUM_THREADS says otherwise, its parallel loops through our launcher when
    the library has it (see parallel_launcher)."""
    if device == "cpu":
        ensure_thread_pool()
    elif device != "cuda":
        raise UsageError(f"unknown device '{device}' (cpu or cuda)")
    import tvm
    from tvm.runtime.vm import VirtualMachine  # what tvm.relax re-exports; tvm.relax needs the compiler

    dev = tvm.cpu() if device == "cpu" else cuda_device()
    try:
        module = tvm.runtime.load_module(path)
    except Exception as e:
        raise BackendError(f"TVM failed to load '{path}': {_last_line(e)}") from e
    if device == "cpu":
        parallel_launcher.install(path)
    return VirtualMachine(module, dev), dev


def library_runner(path: str, inputs: Mapping[str, np.ndarray], input_order: list[str],
                   device: str = "cpu") -> Callable[[], Any]:
    """A zero-argument call that runs the library once on inputs already on the device (for timing)."""
    import tvm

    vm, dev = load_library(path, device)
    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), dev) for name in input_order]
    main = vm["main"]
    return lambda: main(*args)


def run_library(path: str, inputs: Mapping[str, np.ndarray], input_order: list[str],
                device: str = "cpu") -> list[np.ndarray]:
    """Load a library built by `build` on this machine and run it once."""
    import tvm

    vm, dev = load_library(path, device)
    try:
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), dev) for name in input_order]
        out = vm["main"](*args)
    except Exception as e:
        raise BackendError(f"TVM failed to run '{path}': {_last_line(e)}") from e
    return numpy_outputs(out)


def numpy_outputs(out) -> list[np.ndarray]:
    """What the VM's `main` returned, as arrays: one output is a tensor, several a tuple."""
    return [o.numpy() for o in ([out] if hasattr(out, "numpy") else list(out))]
