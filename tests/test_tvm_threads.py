"""TVM's CPU thread pool and our parallel launcher's use every available core (TVM's own default on x86 is half the
logical CPUs: one thread on this project's 2-vCPU machines), the user's TVM_NUM_THREADS wins, and tuning measures
with the target's cores."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from prune_compile.backends.tvm import threads
from prune_compile.backends.tvm.tuning import RPCSettings, database_dir, measuring_threads

pytest.importorskip("tvm")

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "prune_compile", "data", "default_model.onnx")

_SCRIPT = """
import json, sys
import numpy as np
import onnx
from prune_compile.backends import tvm as t
from prune_compile.backends.tvm.threads import runtime_threads
lib = sys.argv[1]
t.build(onnx.load(sys.argv[2]), "cpu", lib)
t.run_library(lib, {"image": np.zeros((1, 3, 64, 64), np.float32)}, ["image"])
import ctypes
ours = ctypes.CDLL(lib).prune_compile_parallel_threads()  # our launcher's pool (backends/tvm/parallel_launch.c)
assert ours == runtime_threads(), (ours, runtime_threads())
print(json.dumps(runtime_threads()))
"""


def _threads_in_fresh_process(tmp_path, env_threads: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k not in (threads.ENV, "OMP_NUM_THREADS")}
    if env_threads is not None:
        env[threads.ENV] = env_threads
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "m.so"), DEFAULT_MODEL], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])


def test_build_and_run_use_every_available_core(tmp_path) -> None:
    assert _threads_in_fresh_process(tmp_path, None) == threads.available_cores()


def test_the_users_tvm_num_threads_wins(tmp_path) -> None:
    assert _threads_in_fresh_process(tmp_path, "1") == 1


def test_thread_env_sets_and_restores(monkeypatch) -> None:
    monkeypatch.delenv(threads.ENV, raising=False)
    with threads.thread_env(3):
        assert os.environ[threads.ENV] == "3"
    assert threads.ENV not in os.environ
    monkeypatch.setenv(threads.ENV, "5")
    with threads.thread_env(2):
        assert os.environ[threads.ENV] == "2"
    assert os.environ[threads.ENV] == "5"


def test_tuning_measures_with_the_targets_cores_and_keys_the_database_by_them(monkeypatch) -> None:
    from prune_compile.backends.tvm import TargetOptions, make_target

    cpu = make_target("cpu", TargetOptions(num_cores=2))
    assert measuring_threads(cpu, None) == 2
    assert measuring_threads(cpu, RPCSettings("localhost:9190", "board")) is None  # the device measures
    # Records measured with one thread rank schedules for one thread: they must not serve a two-thread build.
    assert database_dir("/db", "cpu", str(cpu), 1) != database_dir("/db", "cpu", str(cpu), 2)
    assert database_dir("/db", "cpu", str(cpu), None) != database_dir("/db", "cpu", str(cpu), 2)
    # CPU candidates timed on a board (median of single calls, our launcher) are not records of the earlier timing
    # (the mean over 100 ms, TVM's launcher), which the target alone keyed; GPU candidates are still timed that way
    arm = make_target("arm", TargetOptions(num_cores=4))
    gpu = make_target("gpu")
    for name, target in (("arm", arm), ("gpu", gpu)):
        legacy = os.path.join("/db", f"{name}-{hashlib.sha256(str(target).encode()).hexdigest()[:12]}")
        assert (database_dir("/db", name, str(target), None) == legacy) == (name == "gpu")
    # records of an earlier generation of our CPU schedule rules replay its schedules: a database of their own
    from prune_compile.backends.tvm import tuning

    now = database_dir("/db", "cpu", str(cpu), 2)
    monkeypatch.setattr(tuning, "CPU_RULES", tuning.CPU_RULES - 1)
    assert database_dir("/db", "cpu", str(cpu), 2) != now
    assert database_dir("/db", "gpu", str(gpu), None) == os.path.join(
        "/db", f"gpu-{hashlib.sha256(str(gpu).encode()).hexdigest()[:12]}")
