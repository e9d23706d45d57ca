"""Apache TVM (Relax) backend: target presets, MetaSchedule tuning with a persistent database, build and export.

TVM is imported lazily by each function: `import prune_compile` stays fast, and MetaSchedule's worker processes,
which import this package to find the builder function, do not pay for it twice.
"""

from .build import (
    BuildResult,
    build,
    compile_model,
    cuda_device,
    library_runner,
    load_library,
    numpy_outputs,
    run_library,
)
from .targets import (
    ARM_APT_PACKAGE,
    ARM_BOARDS,
    ARM_CROSS_COMPILER,
    CONV_LAYOUTS,
    TARGET_NAMES,
    TargetOptions,
    check_toolchain,
    check_tunable,
    make_target,
    target_dict,
)
from .tuning import RPCSettings, TuningOptions, TuningSummary, allocate_trials, default_database_root

__all__ = ["ARM_APT_PACKAGE", "ARM_BOARDS", "ARM_CROSS_COMPILER", "CONV_LAYOUTS", "TARGET_NAMES", "BuildResult",
           "RPCSettings", "TargetOptions", "TuningOptions", "TuningSummary", "allocate_trials", "build",
           "check_toolchain", "check_tunable", "compile_model", "cuda_device", "default_database_root",
           "library_runner", "load_library", "make_target", "numpy_outputs", "run_library", "target_dict"]
