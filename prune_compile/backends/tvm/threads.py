"""How many threads TVM's CPU runtime uses.

TVM sizes its thread pool once per process, when it first runs parallel code: `TVM_NUM_THREADS` if set, else half
the logical CPUs on x86 (it assumes every core is hyper-threaded). On a VM whose vCPUs are one thread per core
(this project's 2-vCPU machines) that is one thread, half the machine: every TVM latency, and every MetaSchedule
measurement, ran single-threaded while ONNX Runtime used both cores. We set the variable, unless the user has, to
the cores this process may use before TVM starts its pool, and MetaSchedule's runner workers inherit it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

ENV = "TVM_NUM_THREADS"
SPIN_ENV = "TVM_THREAD_POOL_SPIN_COUNT"  # how long TVM's pool threads spin for work before they sleep


def available_cores() -> int:
    """CPUs this process may run on (the affinity mask: what a container or taskset allows), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ensure_thread_pool(threads: int | None = None) -> int:
    """Ask TVM for `threads` (default: every available core) unless `TVM_NUM_THREADS` is already set. Takes effect
    only if TVM has not started its pool in this process yet. Returns the thread count in force."""
    if ENV not in os.environ:
        os.environ[ENV] = str(threads or available_cores())
    return int(os.environ[ENV])


@contextlib.contextmanager
def thread_env(threads: int | None) -> Iterator[None]:
    """`TVM_NUM_THREADS=threads` for the processes started inside (MetaSchedule's runner workers), restored after:
    candidates must be measured with the thread count the library will run with. None: leave it as it is."""
    if threads is None:
        yield
        return
    saved = os.environ.get(ENV)
    os.environ[ENV] = str(threads)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved


def runtime_threads() -> int:
    """The thread count of TVM's pool in this process (starts the pool if it is not running)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())
