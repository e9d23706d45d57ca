"""Target presets (`cpu`, `arm`, `gpu`) and the toolchain checks that run before any work is done.

A preset turns a short name plus a few options into a TVM target dict. TVM 0.27 only accepts targets as JSON dicts.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass

from ...errors import BackendError, UsageError
from ...host_cpu import cpu_flags, hidden_features, is_x86

TARGET_NAMES = ("cpu", "arm", "gpu")
CONV_LAYOUTS = ("auto", "NCHW", "NHWC", "NCHWc")
ARM_CROSS_COMPILER = "aarch64-linux-gnu-gcc"
ARM_APT_PACKAGE = "gcc-aarch64-linux-gnu"
CUDA_APT_PACKAGE = "nvidia-cuda-toolkit"
DEFAULT_GPU_ARCH = "sm_90"

# Named aarch64 boards: the core LLVM should schedule for, its extensions, how many cores it has and the L2 cache
# per core in KiB (the vendors' specifications; a shared L2 divided among its cores), which sizes Winograd's choices
# (conv_winograd.Machine) when convs are blocked.
ARM_BOARDS: dict[str, dict] = {
    "generic": {"mcpu": None, "mattr": ["+neon"], "cores": None, "l2_kib": None},
    "rasp4": {"mcpu": "cortex-a72", "mattr": ["+neon"], "cores": 4, "l2_kib": 256},  # 1 MiB shared by 4
    "rasp5": {"mcpu": "cortex-a76", "mattr": ["+neon"], "cores": 4, "l2_kib": 512},
    "graviton2": {"mcpu": "neoverse-n1", "mattr": ["+neon"], "cores": None, "l2_kib": 1024},
    "graviton3": {"mcpu": "neoverse-v1", "mattr": ["+neon", "+sve"], "cores": None, "l2_kib": 1024},
    "jetson-orin": {"mcpu": "cortex-a78ae", "mattr": ["+neon"], "cores": None, "l2_kib": 256},
}
_SM = re.compile(r"^sm_(\d{2,3})[a-z]?$")


@dataclass(frozen=True)
class TargetOptions:
    """Per-target knobs the CLI exposes (`--arm-board`, `--gpu-arch`, `--num-cores`, `--conv-layout`,
    `--no-winograd`)."""

    arm_board: str = "generic"
    gpu_arch: str = DEFAULT_GPU_ARCH
    num_cores: int | None = None
    conv_layout: str = "auto"  # see resolve_conv_layout
    winograd: bool = True  # 3x3 stride-1 convs in the blocked layout by F(4x4, 3x3) where it pays (conv_winograd)


DEFAULT_OPTIONS = TargetOptions()


def target_dict(name: str, options: TargetOptions = DEFAULT_OPTIONS) -> dict:
    """The JSON-dict form of a preset; validates the options (UsageError on a bad one)."""
    if name == "cpu":
        from tvm.target import Target, codegen

        cpu = codegen.llvm_get_system_cpu()
        d = {"kind": "llvm", "mcpu": cpu, "num-cores": options.num_cores or os.cpu_count() or 1}
        if is_x86():  # what the CPU's name implies but a hypervisor hides goes off (see host_cpu)
            implied = {str(f) for f in codegen.llvm_get_cpu_features(Target({"kind": "llvm", "mcpu": cpu}))}
            hidden = hidden_features(implied, cpu_flags())
            if hidden:
                d["mattr"] = [f"-{f}" for f in hidden]
        return d
    if name == "arm":
        board = ARM_BOARDS.get(options.arm_board)
        if board is None:
            raise UsageError(f"--arm-board {options.arm_board}: unknown board ({', '.join(ARM_BOARDS)})")
        d = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": list(board["mattr"])}
        if board["mcpu"]:
            d["mcpu"] = board["mcpu"]
        cores = options.num_cores or board["cores"]
        if cores:
            d["num-cores"] = cores
        return d
    if name == "gpu":
        if not _SM.match(options.gpu_arch):
            raise UsageError(f"--gpu-arch {options.gpu_arch}: expected sm_XX (for example sm_90)")
        return {"kind": "cuda", "arch": options.gpu_arch, "host": {"kind": "llvm"}}
    raise UsageError(f"--target {name}: unknown target ({', '.join(TARGET_NAMES)})")


def check_tunable(name: str, options: TargetOptions = DEFAULT_OPTIONS) -> None:
    """MetaSchedule tunes CPU code for a known core count (the target's num-cores): a board preset that does not
    give one needs --num-cores, said before any work is done (TVM's own error came after pruning, as a build
    failure)."""
    d = target_dict(name, options)
    if d["kind"] == "llvm" and "num-cores" not in d:
        with_cores = ", ".join(b for b, v in ARM_BOARDS.items() if v["cores"])
        raise UsageError(f"--tune for --target {name} needs the board's core count: pass --num-cores N "
                         f"(--arm-board {options.arm_board} does not give one; {with_cores} do)")


def resolve_conv_layout(layout: str, target_name: str, tuned: bool) -> str:
    """The layout convolutions are scheduled in. `auto`: NCHWc for tuned `cpu` builds (its schedule rule beat
    MetaSchedule's NCHW space on every model measured, and ONNX Runtime's kernels use the same layout), NCHW
    otherwise: the rule only acts through tuning, and on `arm` it has not been measured on a board yet.
    NCHWc asked for explicitly on an untuned build falls back to NCHW for the same reason (on a GPU the build
    finds no vector lanes and keeps NCHW)."""
    if layout not in CONV_LAYOUTS:
        raise UsageError(f"--conv-layout {layout}: expected one of {', '.join(CONV_LAYOUTS)}")
    if layout == "auto":
        return "NCHWc" if tuned and target_name == "cpu" else "NCHW"
    return "NCHW" if layout == "NCHWc" and not tuned else layout


def make_target(name: str, options: TargetOptions = DEFAULT_OPTIONS):
    import tvm

    return tvm.target.Target(target_dict(name, options))


def find_nvcc() -> str | None:
    """nvcc from PATH, else from CUDA_PATH/CUDA_HOME, else the usual install prefix."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def check_toolchain(name: str, options: TargetOptions = DEFAULT_OPTIONS) -> None:
    """Raise the error a build would hit (missing compiler, bad option) before any work is done."""
    if name not in TARGET_NAMES:
        raise UsageError(f"--target {name}: unknown target ({', '.join(TARGET_NAMES)})")
    if name == "arm" and shutil.which(ARM_CROSS_COMPILER) is None:
        raise BackendError(f"--target arm needs the cross compiler {ARM_CROSS_COMPILER}: "
                           f"apt-get install {ARM_APT_PACKAGE}")
    if name == "gpu" and find_nvcc() is None:
        raise BackendError(f"--target gpu needs nvcc (the CUDA toolkit) to compile device code: "
                           f"apt-get install {CUDA_APT_PACKAGE}, or put a CUDA toolkit's bin/ on PATH")
    try:
        import tvm  # noqa: F401
    except Exception as e:
        raise BackendError(f"Apache TVM cannot be imported: {e}") from e
    target_dict(name, options)  # option errors (board, arch) surface here too
