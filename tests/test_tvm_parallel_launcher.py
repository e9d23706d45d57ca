"""Our parallel launcher (backends/tvm/parallel_launch.c): every share of a launch runs exactly once, errors come
back, nested launches run serially, and the caller never waits for a thread that has not started (a forked child
has no workers at all: TVM's static split would wait forever). Timing under a busy neighbour is a benchmark
(tools/bench_latency.py --compare), not a test."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import pytest

from prune_compile.backends.tvm import ARM_CROSS_COMPILER, parallel_launcher

from .rpc_board import qemu_python, rpc_board

pytestmark = pytest.mark.serial  # the launcher's tests time threads and tune
_HARNESS = r"""
import ctypes, os, signal, sys, threading

class Env(ctypes.Structure):
    _fields_ = [("sync_handle", ctypes.c_void_p), ("num_task", ctypes.c_int32)]

LAMBDA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(Env), ctypes.c_void_p)
lib = ctypes.CDLL(sys.argv[1])
lib.prune_compile_parallel_launch.argtypes = [LAMBDA, ctypes.c_void_p, ctypes.c_int]
threads = lib.prune_compile_parallel_threads()
seen, lock = [], threading.Lock()

def record(task_id, env, _data):
    with lock:
        seen.append((task_id, env.contents.num_task, threading.get_ident()))
    return 0

def launch(fn, num_task=0):
    seen.clear()
    return lib.prune_compile_parallel_launch(fn, None, num_task)

def check_once(num_task=0):
    assert launch(RECORD, num_task) == 0
    shares = num_task or threads
    assert sorted(t for t, _, _ in seen) == list(range(shares)), seen
    assert {n for _, n, _ in seen} == {shares}, seen

RECORD = LAMBDA(record)
mode = sys.argv[2]
if mode == "shares":
    assert threads == int(os.environ["TVM_NUM_THREADS"]), threads
    for _ in range(300):
        check_once()
    check_once(num_task=7)
    workers = {ident for _, _, ident in seen}
    failing = LAMBDA(lambda task_id, env, data: -1 if task_id == 1 else 0)
    assert lib.prune_compile_parallel_launch(failing, None, 0) == -1
    check_once()  # the error does not outlive its launch

    def nested(task_id, env, _data):
        inner = lib.prune_compile_parallel_launch(RECORD, None, 0)  # runs serially: one share of one
        return inner

    NESTED = LAMBDA(nested)
    seen.clear()
    assert lib.prune_compile_parallel_launch(NESTED, None, 0) == 0
    assert sorted(t for t, _, _ in seen) == [0] * threads and {n for _, n, _ in seen} == {1}, seen
elif mode == "fork":
    check_once()  # the pool is running
    pid = os.fork()
    if pid == 0:  # no worker threads in the child: the caller runs every share itself
        signal.alarm(30)  # or dies: a child left waiting would spin on after the test gave up
        check_once()
        assert {ident for _, _, ident in seen} == {threading.get_ident()}, seen
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
print("ok")
"""


def _compile(tmp_path, language: str | None) -> str:
    """The launcher alone as a shared library, compiled by the function `build` exports with (TVM's default
    compiler and our options); `language` "c" forces C, as the aarch64 cross compiler and a plain `cc` compile it."""
    out = str(tmp_path / f"launch-{language or 'default'}.so")
    parallel_launcher.fcompile()(out, [], options=["-x", language] if language else None)
    return out


def _run(lib: str, mode: str, threads: int = 3, python: list[str] | None = None, env: dict | None = None) -> None:
    env = dict(env or os.environ, TVM_NUM_THREADS=str(threads))
    proc = subprocess.run([*(python or [sys.executable]), "-c", _HARNESS, lib, mode], env=env, capture_output=True,
                          text=True, timeout=600 if python else 60)  # emulated Python starts in seconds, not ms
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# as export_library compiles it (C++ where the default compiler is g++), and as C
@pytest.mark.parametrize("language", [None, "c"])
def test_every_share_runs_once_errors_come_back_and_nested_launches_run_serially(tmp_path, language) -> None:
    _run(_compile(tmp_path, language), "shares")


def test_the_caller_never_waits_for_a_thread_that_has_not_started(tmp_path) -> None:
    _run(_compile(tmp_path, None), "fork", threads=2)


@pytest.mark.big
def test_the_launcher_cross_compiled_for_aarch64_runs_every_share_once_under_qemu(tmp_path, arm_sysroot) -> None:
    """`arm` libraries link it with the aarch64 cross compiler (as C). Under qemu user-mode emulation the threads
    are real, but the host's memory ordering is stronger than aarch64's: this checks that it builds and runs there,
    not its barriers."""
    lib = str(tmp_path / "launch-aarch64.so")
    parallel_launcher.fcompile(ARM_CROSS_COMPILER)(lib, [])
    with open(lib, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHOME"}
    env.update(PYTHONNOUSERSITE="1", PYTHONPATH="")
    python = ["qemu-aarch64-static", "-L", arm_sysroot, os.path.join(arm_sysroot, "usr/bin/python3.11")]
    _run(lib, "shares", python=python, env=env)


def test_a_library_without_our_launcher_keeps_tvms(tmp_path) -> None:
    lib = _compile(tmp_path, None)  # has the launcher but no generated code, so no pointer to set
    assert not parallel_launcher.install(lib)
    assert not parallel_launcher.installed(lib)


# one parallel loop, compiled in memory (JIT) or exported with TVM's default compile (no launcher of ours linked in)
_PARALLEL_FUNC = r"""
import numpy as np
import tvm
from tvm import s_tir, te

a = te.placeholder((64, 256), "float32", name="a")
b = te.compute((64, 256), lambda i, j: a[i, j] + 1.0, name="b")
sch = s_tir.Schedule(te.create_prim_func([a, b]))
sch.parallel(sch.get_loops(sch.get_sblock("b"))[0])
func = sch.mod["main"]
x, y = tvm.runtime.tensor(np.ones((64, 256), "float32")), tvm.runtime.tensor(np.zeros((64, 256), "float32"))
"""

_REGISTERED = _PARALLEL_FUNC + r"""
import sys
from prune_compile.backends.tvm import parallel_launcher as p

out = sys.argv[1]
if not p.register():
    assert p.registered_launches() is None
    print("opted out")
    sys.exit(0)
assert p.registered_launches() == 0
jit = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target({"kind": "llvm"}))
jit["main"](x, y)
assert p.registered_launches() == 1 and (y.numpy() == 2).all()
jit.export_library(out)
loaded = tvm.runtime.load_module(out)  # plain TVM loading
assert p.installed(out) and p.install(out)  # the registered launcher is kept: one pool per process
loaded["main"](x, y)
assert p.registered_launches() == 2
print("ok")
"""


def test_a_registered_launcher_runs_jit_compiled_and_loaded_modules(tmp_path) -> None:
    """`register` (the latency search's in-process timing) makes ours the launcher of every module TVM compiles in
    memory or loads afterwards, libraries built without it included; opted out, it registers nothing."""
    args = [sys.executable, "-c", _REGISTERED, str(tmp_path / "plain.so")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    env = dict(os.environ, **{parallel_launcher.ENV: "tvm"})
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "opted out", proc.stderr


def test_the_tuners_runner_times_candidates_with_our_launcher(tmp_path) -> None:
    """MetaSchedule's runner worker registers our launcher when it starts, so the candidate kernels it times run
    their parallel loops through it (as the libraries we build do); TVM's own pool, left with filling the arguments,
    does not spin after a fill (its spinning threads slowed candidates' first calls 2-4x)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from prune_compile.backends.tvm import tuning

    scope: dict = {}
    exec(_PARALLEL_FUNC, scope)  # noqa: S102 (the same function as the subprocess tests)
    artifact = str(tmp_path / "candidate.so")
    tvm.compile(tvm.IRModule({"main": scope["func"]}), target=tvm.target.Target({"kind": "llvm"})).export_library(
        artifact)
    runner = tuning._runner("cpu", None)
    try:
        args_info = ms.arg_info.ArgInfo.from_prim_func(scope["func"])
        (future,) = runner.run([ms.runner.RunnerInput(artifact, "cpu", args_info)])
        result = future.result()
        assert result.error_msg is None and result.run_secs, result.error_msg
        # the worker process that timed it: its registered launcher ran every timed call
        launches = runner.pool.submit(parallel_launcher.registered_launches).result()
        assert launches is not None and launches >= len(result.run_secs), launches
        assert runner.pool.submit(functools.partial(os.getenv, tuning.SPIN_ENV)).result() == "0"
    finally:
        runner.pool.shutdown()


def _time_on_board(target_name: str, port: int, key: str, artifact: str, func, scope: dict) -> None:
    """What the RPC runner does with `artifact` (a candidate of `func`), raced as a task's candidates are, then the
    same in a session of our own (each session is a process of the server's, started without a spin count) to read
    how many launches our launcher ran there and what spin count TVM's pool was left to read."""
    import tvm
    from tvm import rpc
    from tvm.s_tir import meta_schedule as ms

    from prune_compile.backends.tvm import tuning

    runner = tuning._runner(target_name, tuning.RPCSettings(f"127.0.0.1:{port}", key))
    try:
        assert runner.f_upload_module is tuning._upload_remote_candidate
        tuning._racing(runner, "task")
        (future,) = runner.run([ms.runner.RunnerInput(artifact, "cpu", ms.arg_info.ArgInfo.from_prim_func(func))])
        result = future.result()
        assert result.error_msg is None and result.run_secs, result.error_msg
        fastest = runner.pool.submit(functools.partial(getattr, tuning, "_FASTEST")).result()
        # the race's reading, kept in the runner's worker
        assert fastest.get("task") == min(float(t) for t in result.run_secs), fastest
    finally:
        runner.pool.shutdown()
    session = rpc.connect_tracker("127.0.0.1", port).request(key, session_timeout=600)
    remote = tuning._upload_remote_candidate(session, artifact, os.path.basename(artifact))
    # the spin count TVM's pool will read there, set before MetaSchedule fills the arguments (the pool's first work)
    assert remote.get_function(parallel_launcher.QUIET_POOL_FUNCTION, query_imports=True)() == 0
    count = remote.get_function(parallel_launcher.LAUNCHES_FUNCTION, query_imports=True)
    device = session.cpu(0)
    x, y = (tvm.runtime.tensor(scope[n].numpy(), device) for n in ("x", "y"))
    times = tuning._time_remote_candidate(session, remote, device, None, [[x, y]])
    assert len(times) == 1 and (y.numpy() == 2).all()
    assert count() >= 13  # the 3-call probe and at least 10 timed calls, every one through our launcher


def _without_spin_count(env: dict[str, str]) -> dict[str, str]:
    from prune_compile.backends.tvm.threads import SPIN_ENV

    return {k: v for k, v in env.items() if k != SPIN_ENV}


def test_a_board_tuned_over_rpc_times_candidates_with_our_launcher(tmp_path) -> None:
    """Over TVM's RPC the board's server loads each candidate with plain TVM: the candidate carries our launcher
    (`_export_remote`), and the runner's upload function installs it through the candidate's own function, which
    also keeps TVM's pool there from spinning, before MetaSchedule fills the arguments; the board's candidates race
    as the local runner's do (a tracker and a server on loopback stand in for the board)."""
    import tvm

    from prune_compile.backends.tvm import tuning

    scope: dict = {}
    exec(_PARALLEL_FUNC, scope)  # noqa: S102 (the same function as the subprocess tests)
    target = tvm.target.Target({"kind": "llvm"})
    # as tuning's builder exports candidates: the launcher's object compiled once (parallel_launcher.compiled)
    artifact = tuning._export_remote(tuning._build_candidate(tvm.IRModule({"main": scope["func"]}), target, None),
                                     launcher=parallel_launcher.compiled())
    try:
        with rpc_board("board", env=_without_spin_count(os.environ)) as port:
            _time_on_board("cpu", port, "board", artifact, scope["func"], scope)
    finally:  # in a tuning run MetaSchedule's RemoveBuildArtifact callback does this
        shutil.rmtree(os.path.dirname(artifact))


@pytest.mark.big
def test_an_aarch64_board_under_qemu_times_candidates_with_our_launcher(tmp_path, arm_sysroot) -> None:
    """The same with an aarch64 board: the candidate cross-compiled with the launcher, the RPC server an aarch64
    Python under qemu (~30 s to start)."""
    import tvm

    from prune_compile.backends.tvm import tuning

    scope: dict = {}
    exec(_PARALLEL_FUNC, scope)  # noqa: S102 (the same function as the subprocess tests)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    artifact = tuning._export_remote(tuning._build_candidate(tvm.IRModule({"main": scope["func"]}), target, None),
                                     ARM_CROSS_COMPILER, parallel_launcher.compiled(ARM_CROSS_COMPILER))
    python, env = qemu_python(arm_sysroot, str(tmp_path))
    try:
        with rpc_board("aarch64-board", python, _without_spin_count(env), timeout=300) as port:
            _time_on_board("arm", port, "aarch64-board", artifact, scope["func"], scope)
    finally:
        shutil.rmtree(os.path.dirname(artifact))


@pytest.mark.parametrize("compiler", ["prune-compile-no-such-compiler", "false"])
def test_a_launcher_that_does_not_compile_is_an_error_naming_the_way_out(compiler) -> None:
    """No such compiler, or one that fails: the error names our source and PRUNE_COMPILE_TVM_LAUNCHER=tvm."""
    from prune_compile.errors import BackendError

    with pytest.raises(BackendError, match=r"compiling our parallel launcher \(.*parallel_launch\.c\) failed.*"
                                           r"PRUNE_COMPILE_TVM_LAUNCHER=tvm keeps TVM's launcher"):
        parallel_launcher.compiled(compiler)
