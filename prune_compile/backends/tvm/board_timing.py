"""Libraries timed on a board over TVM's RPC: the latency engines' whole models (latency_timer.py) and the measure
pass's arm libraries."""

from __future__ import annotations

import gc
import math
import os

import numpy as np

from ...errors import BackendError
from .tuning import RPCSettings

WARMUP_S = 0.1  # the first runs after a tuning run in this process were 1.5-2x slow, for longer than one call
# ... and after the other model of a pair: for about a dozen runs, 1.1-1.35x at the first, whatever the model's size.
# A slice's fastest run read the same after 16 runs as after 0.1 s (resnet18, whose 0.1 s is 12 runs, mobilenet_v2
# 40, the bundled model 740; session 65)
WARMUP_RUNS = 16


def warm_up_runs(each: float) -> int:
    """Runs of `each` seconds that warm a model up: WARMUP_S of them, at most WARMUP_RUNS (at least 3)."""
    return max(3, min(math.ceil(WARMUP_S / each), WARMUP_RUNS))


def repeats(seconds: float, each: float) -> int:
    """Timed runs that fill `seconds` at `each` seconds a run, 7 to 2000."""
    return int(min(max(7, math.ceil(seconds / each)), 2000))


class BoardModels:
    """Libraries timed on a board over TVM's RPC. The board's server runs plain TVM, so a library is one `build`
    (or `export_library`) wrote for the board's target, with our launcher linked in: uploaded once per session,
    its launcher installed through the library's own function, then timed by the board's time evaluator. The
    session is held between timings (the search alternates two models in 0.2 s slices) and released before any
    tuning: the tracker hands the board to one session at a time, and tuning's runner asks it for one."""

    def __init__(self, rpc: RPCSettings) -> None:
        self.rpc = rpc
        self.measured_on = f"RPC device '{rpc.key}' at tracker {rpc.tracker}"
        self._session = None
        self._loaded: dict[str, tuple] = {}  # library path → (VM, device) in the current session

    def release(self) -> None:
        """End the session (every remote object goes with it): the board is free for the tracker's next request."""
        if self._session is None:
            return
        self._loaded.clear()
        self._session = None
        gc.collect()  # the connection closes when its last reference goes: one in a cycle would hold the board

    def times(self, path: str, inputs: list[np.ndarray], seconds: float, runs: int | None = None) -> list[float]:
        """Milliseconds of each timed run of the library at `path` on `inputs`, after its warm-up runs: `runs`
        runs, or as many as fill `seconds` (7 to 2000)."""
        import tvm

        from .build import _last_line

        vm, dev = self._load(path)
        try:
            vm.set_input("main", *[tvm.runtime.tensor(a, dev) for a in inputs])
            # the stateful call: a function that returns a tuple cannot come back over RPC
            probe = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=3)("main")
            each = max(float(np.median(probe.results)), 1e-6)
            vm.time_evaluator("invoke_stateful", dev, number=1, repeat=warm_up_runs(each))("main")
            timed = vm.time_evaluator("invoke_stateful", dev, number=1,
                                      repeat=runs or repeats(seconds, each))("main")
        except Exception as e:
            self.release()
            raise BackendError(f"timing a model on {self.measured_on} failed: {_last_line(e)}") from e
        return [float(t) * 1e3 for t in timed.results]

    def _load(self, path: str) -> tuple:
        from tvm import relax, rpc

        from . import parallel_launcher
        from .build import _last_line

        if path in self._loaded:
            return self._loaded[path]
        try:
            if self._session is None:
                host, port = self.rpc.host_port()
                self._session = rpc.connect_tracker(host, port).request(self.rpc.key)
            # one name per library in a session: the server's process caches what it loaded by file name
            name = f"{len(self._loaded)}-{os.path.basename(path)}"
            self._session.upload(path, name)
            library = self._session.load_module(name)
            parallel_launcher.install_remote(library)
            dev = self._session.cpu(0)
            self._loaded[path] = relax.VirtualMachine(library, dev), dev
        except Exception as e:
            self.release()
            raise BackendError(f"loading '{os.path.basename(path)}' on {self.measured_on} failed: "
                               f"{_last_line(e)}") from e
        return self._loaded[path]
