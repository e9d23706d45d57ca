"""Our parallel launcher in TVM CPU libraries: linked in by `build`, installed by `load_library`.

Why: TVM's launcher splits every parallel loop into one static share per thread and returns when all shares are
done, so each kernel waits for a thread that has not started yet. On these 2-vCPU machines another process often
holds one core for a while (the "slow phases" of every benchmark here), and TVM lost far more to it than ONNX Runtime,
whose pool lets the calling thread take work no thread has started. Reproduced with a neighbour that holds core 1
for 1 ms of every 2 (pruned resnet18, Zen 5, 8 interleaved rounds): ONNX Runtime 2.0 -> 3.06 ms, TVM's launcher
2.05 -> 4.10 ms (1.35x ORT's), ours 2.02 -> 3.09 ms (1.01-1.11x); in a quiet machine ours ran as fast as TVM's or
faster (0.99-1.01x ORT's against 1.03). Per-kernel medians under that neighbour: TVM's launcher 1.03-1.44x its
quiet ones, ONNX Runtime's 0.92-1.03x (its slow calls are outliers, not every call).

What (`parallel_launch.c`): the same split (one share per thread, so a core computes the same rows kernel after
kernel), each thread first on its own share, then on any share no thread has started; the caller waits only for
shares already started. Nested launches and launches from a second application thread run serially.

How it gets in: the generated code calls the launcher through a function pointer the library holds,
`__TVMBackendParallelLaunch`, which TVM sets to its own when it loads the library. `build` links
`parallel_launch.c` into cpu libraries, and `load_library` points that pointer at `prune_compile_parallel_launch`
after TVM has loaded it. A library loaded with plain `tvm.runtime.load_module` keeps TVM's launcher and runs the same
(one store of the symbol's address into the pointer installs ours, from C++ too). `PRUNE_COMPILE_TVM_LAUNCHER=tvm`
keeps TVM's launcher in `load_library` as well (A/B comparisons).
"""

from __future__ import annotations

import ctypes
import os

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_launch.c")
LAUNCH_SYMBOL = "prune_compile_parallel_launch"
POINTER_SYMBOL = "__TVMBackendParallelLaunch"
# a library whose code synchronizes inside a parallel region calls TVM's barrier with TVM's own thread group, which
# our launcher does not create: such a library keeps TVM's launcher
BARRIER_SYMBOL = "__TVMBackendParallelBarrier"
ENV = "PRUNE_COMPILE_TVM_LAUNCHER"
COMPILE_OPTIONS = ("-O2", "-pthread")


def fcompile(compiler=None):
    """An `export_library` compile function that also compiles and links `parallel_launch.c` (`compiler`: a
    compiler command, or TVM's default, g++ or cc)."""
    from tvm.support import cc

    return cc.cross_compiler(compiler or cc.create_shared, options=list(COMPILE_OPTIONS), add_files=[SOURCE])


def _pointer_and_ours(path: str) -> tuple[ctypes.c_void_p, int] | None:
    """The loaded library's launcher pointer and our launcher's address in it; None when it lacks either (built
    before our launcher or for another target, or without parallel loops) or synchronizes with TVM's barrier."""
    try:
        lib = ctypes.CDLL(os.path.abspath(path))  # dlopen of a loaded library: the same handle, no second copy
    except OSError:  # TVM loaded it, so this does not happen; if it did, TVM's launcher still runs the library
        return None
    if not all(hasattr(lib, name) for name in (LAUNCH_SYMBOL, POINTER_SYMBOL)) or hasattr(lib, BARRIER_SYMBOL):
        return None
    return ctypes.c_void_p.in_dll(lib, POINTER_SYMBOL), ctypes.cast(getattr(lib, LAUNCH_SYMBOL), ctypes.c_void_p).value


def install(path: str) -> bool:
    """Point the library's launcher at ours. `path` must already be loaded by TVM. False, with TVM's launcher left in
    place, when the library has no launcher of ours or no parallel loops, uses TVM's barrier, or
    PRUNE_COMPILE_TVM_LAUNCHER=tvm."""
    found = None if os.environ.get(ENV, "ours") == "tvm" else _pointer_and_ours(path)
    if found is None:
        return False
    pointer, ours = found
    pointer.value = ours
    return True


def installed(path: str) -> bool:
    """Whether the loaded library at `path` runs its parallel loops through our launcher."""
    found = _pointer_and_ours(path)
    return found is not None and found[0].value == found[1]
