"""A TVM RPC tracker and one server on loopback, standing in for a board (tuning's RPC runner path). The server is
TVM's own `tvm.exec.rpc_server`, this machine's Python or an aarch64 one under qemu (`qemu_python`)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

# TVM's RPC server starts its session workers with `sys.executable`: under qemu that is an aarch64 binary the kernel
# cannot exec here (no binfmt registration), so the server is started with sys.executable set to a wrapper that
# runs the same Python under qemu
_QEMU_SERVER = """
import runpy, sys
sys.executable = sys.argv.pop(1)
runpy.run_module("tvm.exec.rpc_server", run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(port: int, key: str, timeout: float) -> None:
    from tvm import rpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the tracker may not listen yet
            if key in str(rpc.connect_tracker("127.0.0.1", port).summary()):
                return
        time.sleep(1)
    raise AssertionError(f"no RPC server registered as {key!r} within {timeout} s")


def qemu_python(sysroot: str, directory: str) -> tuple[str, dict[str, str]]:
    """(executable, environment) that run the aarch64 Python of `sysroot` (tests/conftest.py's arm_sysroot) under
    qemu: the executable is a wrapper script, written to `directory`."""
    wrapper = os.path.join(directory, "python-aarch64")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec qemu-aarch64-static -L "{sysroot}" "{sysroot}/usr/bin/python3.11" "$@"\n')
    os.chmod(wrapper, 0o755)
    env = dict(os.environ, PYTHONPATH=os.path.join(sysroot, "site"), PYTHONNOUSERSITE="1")
    env.pop("PYTHONHOME", None)
    return wrapper, env


@contextlib.contextmanager
def rpc_board(key: str, python: str | None = None, env: dict[str, str] | None = None,
              timeout: float = 60) -> Iterator[int]:
    """Start a tracker and a server registered as `key` (run by `python`, this machine's by default); yields the
    tracker's port. Both are stopped on exit."""
    port = free_port()
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                                str(port), "--port-end", str(port + 1)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        if python is None:
            command = [sys.executable, "-m", "tvm.exec.rpc_server"]
        else:
            command = [python, "-c", _QEMU_SERVER, python]
        server = subprocess.Popen([*command, "--tracker", f"127.0.0.1:{port}", "--key", key, "--host", "127.0.0.1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wait_for_server(port, key, timeout)
        yield port
    finally:
        for proc in (server, tracker):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
