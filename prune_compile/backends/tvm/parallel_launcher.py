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
`__TVMBackendParallelLaunch`, which TVM sets to its own when it loads the library. `build` links `parallel_launch.c`
into cpu and arm libraries, and `load_library` points that pointer at `prune_compile_parallel_launch` after TVM has
loaded it. A library loaded with plain `tvm.runtime.load_module` keeps TVM's launcher and runs the same (one store
of the symbol's address into the pointer installs ours, from C++ too). `PRUNE_COMPILE_TVM_LAUNCHER=tvm` keeps TVM's
launcher in `load_library` as well (A/B comparisons).

Where TVM code runs before there is a library of ours (MetaSchedule's runner workers timing candidate kernels, the
latency search timing in-memory executables), `register` compiles the launcher on its own and makes it the one TVM
hands every module it loads or JIT-compiles afterwards in that process (tvm-ffi's context symbol registry, which TVM
fills its own launcher into when it loads): the tuner then chooses schedules and the planner counts layers with the
launcher they will run with, and a busy neighbour does not double their readings. On a board tuned over TVM's RPC
nothing of ours runs in the server's process: there each candidate carries the launcher, and the runner calls the
candidate's `prune_compile_install_launcher` function (INSTALL_FUNCTION) when it has loaded it, and its
`prune_compile_quiet_tvm_pool` (QUIET_POOL_FUNCTION), which keeps TVM's pool from spinning there, as the local runner's
worker does (tuning._start_runner_worker).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import shutil
import tempfile

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_launch.c")
LAUNCH_SYMBOL = "prune_compile_parallel_launch"
LAUNCHES_SYMBOL = "prune_compile_parallel_launches"
# functions a loaded library offers by name (module.get_function), also over TVM's RPC: installs our launcher in that
# library (returns 1, or 0 when it keeps TVM's, as `install`); how many launches ours has run in its process
INSTALL_FUNCTION = "prune_compile_install_launcher"
LAUNCHES_FUNCTION = "prune_compile_parallel_launches"
# sets TVM_THREAD_POOL_SPIN_COUNT=0 in its process (returns the count set before, -1 for none): tuning on a board
QUIET_POOL_FUNCTION = "prune_compile_quiet_tvm_pool"
POINTER_SYMBOL = "__TVMBackendParallelLaunch"
# a library whose code synchronizes inside a parallel region calls TVM's barrier with TVM's own thread group, which
# our launcher does not create: such a library keeps TVM's launcher
BARRIER_SYMBOL = "__TVMBackendParallelBarrier"
ENV = "PRUNE_COMPILE_TVM_LAUNCHER"
COMPILE_OPTIONS = ("-O2", "-pthread")


def fcompile(compiler=None, launcher: str | None = None):
    """An `export_library` compile function that also links our launcher: `launcher`, the object `compiled` made
    with the same compiler, or else `parallel_launch.c`, compiled with the library (`compiler`: a compiler command,
    or TVM's default, g++ or cc)."""
    from tvm.support import cc

    return cc.cross_compiler(compiler or cc.create_shared, options=list(COMPILE_OPTIONS),
                             add_files=[launcher or SOURCE])


@functools.cache
def compiled(compiler: str | None = None) -> str:
    """`parallel_launch.c` compiled into an object file for `fcompile` (once per process and compiler, removed at
    exit): tuning on a board links it into every candidate, and compiling the source took ~70 ms of each
    candidate's build (g++ and the aarch64 cross compiler alike). Tuning's builder workers get its path from the
    main process: a worker is killed, not exited, so its own would stay behind."""
    import subprocess

    from tvm.support import cc

    path = os.path.join(_scratch(), "parallel_launch.o")
    try:
        proc = subprocess.run([compiler or cc.get_cc(), "-c", "-fPIC", *COMPILE_OPTIONS, SOURCE, "-o", path],
                              capture_output=True, text=True)
    except OSError as e:  # no such compiler
        raise _failed(str(e)) from e
    if proc.returncode != 0:
        raise _failed(proc.stderr)
    return path


def _scratch() -> str:
    """A directory of this process's, removed at exit."""
    directory = tempfile.mkdtemp(prefix="prune-compile-launcher-")
    atexit.register(shutil.rmtree, directory, True)
    return directory


def _failed(output: str):
    from ...errors import BackendError

    return BackendError(f"compiling our parallel launcher ({SOURCE}) failed: {output.strip()[-500:]} ({ENV}=tvm "
                        "keeps TVM's launcher)")


_registered: list = []  # the standalone launcher registered in this process (kept loaded for good)


def opted_out() -> bool:
    """PRUNE_COMPILE_TVM_LAUNCHER=tvm: TVM's launcher everywhere (A/B comparisons)."""
    return os.environ.get(ENV, "ours") == "tvm"


@functools.cache
def standalone() -> str:
    """The launcher on its own in a shared library (once per process, removed at exit): the object `compiled`
    linked by `fcompile` with nothing else."""
    path = os.path.join(_scratch(), "parallel_launch.so")
    try:
        fcompile(launcher=compiled())(path, [])
    except (RuntimeError, OSError) as e:  # TVM's cc raises RuntimeError with the linker's output
        raise _failed(str(e)) from e
    return path


def register(path: str | None = None) -> bool:
    """Make our launcher the one TVM gives every module it loads or JIT-compiles from now on in this process
    (`path`: the launcher compiled on its own, `standalone()` by default). Modules loaded before keep theirs. False,
    registering nothing, when PRUNE_COMPILE_TVM_LAUNCHER=tvm."""
    if opted_out():
        return False
    if _registered:
        return True
    # TVM's runtime registers its own launcher when it loads: after that, or TVM's would replace ours
    import tvm  # noqa: F401
    from tvm_ffi import libinfo

    from ...errors import BackendError

    lib = ctypes.CDLL(path or standalone())
    ffi = ctypes.CDLL(libinfo.find_libtvm_ffi())
    ffi.TVMFFIEnvModRegisterContextSymbol.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    ffi.TVMFFIEnvModRegisterContextSymbol.restype = ctypes.c_int
    if ffi.TVMFFIEnvModRegisterContextSymbol(POINTER_SYMBOL.encode(), _address(lib)) != 0:
        raise BackendError("tvm-ffi refused to register our parallel launcher")
    _registered.append(lib)
    return True


def registered_launches() -> int | None:
    """How many parallel loops the launcher `register` registered has run in this process (None: none registered)."""
    if not _registered:
        return None
    count = getattr(_registered[0], LAUNCHES_SYMBOL)
    count.restype = ctypes.c_uint64
    return int(count())


def _address(lib: ctypes.CDLL) -> int:
    return ctypes.cast(getattr(lib, LAUNCH_SYMBOL), ctypes.c_void_p).value


def _pointer_and_ours(path: str) -> tuple[ctypes.c_void_p, int | None] | None:
    """The loaded library's launcher pointer and our launcher's address in it (None: the library has none, built
    before our launcher or for another target); None when it has no pointer (no parallel loops) or synchronizes with
    TVM's barrier."""
    try:
        lib = ctypes.CDLL(os.path.abspath(path))  # dlopen of a loaded library: the same handle, no second copy
    except OSError:  # TVM loaded it, so this does not happen; if it did, TVM's launcher still runs the library
        return None
    if not hasattr(lib, POINTER_SYMBOL) or hasattr(lib, BARRIER_SYMBOL):
        return None
    return ctypes.c_void_p.in_dll(lib, POINTER_SYMBOL), _address(lib) if hasattr(lib, LAUNCH_SYMBOL) else None


def install(path: str) -> bool:
    """Point the library's launcher at ours. `path` must already be loaded by TVM. Keeps a launcher `register`
    registered, which TVM gave the library when it loaded (one pool per process). False, with TVM's launcher left in
    place, when the library has no launcher of ours and none is registered, has no parallel loops, uses TVM's
    barrier, or PRUNE_COMPILE_TVM_LAUNCHER=tvm."""
    found = None if opted_out() else _pointer_and_ours(path)
    if found is None:
        return False
    pointer, ours = found
    if pointer.value in _registered_addresses():
        return True
    if ours is None:
        return False
    pointer.value = ours
    return True


def install_remote(module) -> None:
    """Point a library loaded on a board over TVM's RPC at the launcher it carries, through its own
    INSTALL_FUNCTION (nothing of ours runs in the board's server to do it otherwise); nothing when
    PRUNE_COMPILE_TVM_LAUNCHER=tvm."""
    if not opted_out():
        module.get_function(INSTALL_FUNCTION, query_imports=True)()


def quiet_remote_pool(module) -> None:
    """Keep TVM's pool in the board's process that loaded `module` (over TVM's RPC) from spinning, through the
    module's QUIET_POOL_FUNCTION, before the pool first runs there; nothing when PRUNE_COMPILE_TVM_LAUNCHER=tvm
    (TVM's pool then runs the code timed, and spins as it does in use)."""
    if not opted_out():
        module.get_function(QUIET_POOL_FUNCTION, query_imports=True)()


def installed(path: str) -> bool:
    """Whether the loaded library at `path` runs its parallel loops through our launcher (its own or a registered
    one)."""
    found = _pointer_and_ours(path)
    return found is not None and found[0].value in {found[1], *_registered_addresses()} - {None}


def _registered_addresses() -> set[int]:
    return {_address(lib) for lib in _registered}
