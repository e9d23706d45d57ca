"""Latencies for the latency-aware planner measured on what TVM compiles for a CPU target, tuned: this machine's
(`cpu`), or a board's (`arm`, or `cpu` on another machine) over TVM's RPC.

The planner (passes/latency.py) asks for two kinds of numbers, and this answers both from the tuning database
that the final build uses too:
- **a layer** (`layer`): the one-layer model is lowered as the build lowers it (layouts, legalization, fusion)
  and tuned with `trials_per_layer` trials; its latency is what MetaSchedule measured for the layer's kernels
  (best schedule × calls). A conv comes with the bias, residual add and activation the whole model fuses into its
  kernel (`layer_epilogues`), so the entry is a task of the whole model's build too, which reuses its records.
  The layout transforms at the one-layer model's borders are not tuned and not counted:
  inside a whole model they are not there. No code is generated, nothing else runs.
- **a whole model** (`__call__`): compiled with `trials_per_layer` × its weight layers, then timed in this
  process with TVM's time evaluator (the fastest of the repeats, like the ONNX Runtime timer), its parallel loops
  run by our launcher as in the libraries we build (parallel_launcher.register).
With `rpc` (a tracker and a device key, as `--tune` uses them) both are measured on the board: tuning's runner times
the candidates there, and a whole model is exported as the build exports it (cross-compiled, our launcher linked
in), uploaded and timed by the board's time evaluator (`BoardModels`).
Records persist in the database (`database`, keyed by target, threads and timing): a second plan for the same model, or
a model sharing layer shapes, re-tunes nothing, and the final `--tune` build of the chosen plan starts from the
records its bisection steps left.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from ...errors import BackendError, UsageError
from ...recent_models import RecentModels
from .board_timing import BoardModels, repeats, warm_up_runs
from .targets import DEFAULT_OPTIONS, TargetOptions
from .tuning import MIN_TRIALS_PER_TASK, RPCSettings, TuningOptions

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
ENGINE = "tvm-cpu"
TIMED_TARGETS = ("cpu", "arm")  # CPU targets: their kernels' time is what tuning measured (a GPU's is not, yet)
# the latency engines and the target whose code each times
ENGINE_TARGETS = {"tvm": "cpu", "tvm-arm": "arm"}


@dataclass
class TvmTimer:
    """`timer(proto, feeds, min_seconds) -> ms` and `timer.layer(proto, feeds) -> ms` for passes/latency.py."""

    target_options: TargetOptions = DEFAULT_OPTIONS
    database: str | None = None
    trials_per_layer: int = 16
    target: str = "cpu"
    rpc: RPCSettings | None = None  # measure on this board (layers and whole models); None: this machine
    # a table entry is a tuning run (~7 s with Winograd): the search measures only the moves its estimates rank
    # first (passes/latency.py, best_move); False measures every candidate, as the ONNX Runtime table does
    lazy_table: bool = True
    # a conv's entry is its kernel as the whole model fuses it (bias, residual add, activation: passes/latency.py,
    # conv_epilogue): the same tuning task, so whole-model builds reuse the table's records
    layer_epilogues: bool = True
    # the whole model runs its kernels slower than their tuning runs measured them alone, and has little besides its
    # kernels (resnet18, 224², against 6.9 ms as tuned: 10.0 ms whole in session 56's hour, 7.3-7.7 ms in session
    # 57's; per kernel 1.0-1.1x for most convs, 1.7-1.8x for Winograd convs streaming 9.6 MB of weights, 3.7x for
    # the classifier): what it takes beyond the table's sum is a share of the kernels' time, not a constant
    # (passes/latency.py, LatencyTable.predicted_ms)
    overhead_scales: bool = True
    engine: str = ENGINE
    measured_on: str = "this machine"
    models_timed: int = 0
    trials_run: int = 0
    layers_tuned: int = 0
    _compiled: dict = field(default_factory=dict, repr=False)  # model bytes' digest → executable (re-timing)
    # each model object's digest: a resnet18's bytes took 57 ms to serialize and 33 ms to hash, for every 0.2 s slice
    # of the search's pairs (50 s of an 18-minute search)
    _digests: RecentModels = field(default_factory=RecentModels, repr=False)
    _board: BoardModels | None = field(default=None, repr=False)
    _directory: tempfile.TemporaryDirectory | None = field(default=None, repr=False)  # board libraries, by digest

    def __post_init__(self) -> None:
        if self.trials_per_layer < MIN_TRIALS_PER_TASK:
            raise BackendError(f"--latency-trials {self.trials_per_layer}: TVM latencies need at least "
                               f"{MIN_TRIALS_PER_TASK} trials per layer (one search round)")
        if self.target not in TIMED_TARGETS:
            raise UsageError(f"the TVM latency engine times {' and '.join(TIMED_TARGETS)} code, not {self.target}")
        require_board(self.target, self.rpc)
        self.engine = f"tvm-{self.target}"
        if self.rpc is not None:
            self._board = BoardModels(self.rpc)
            self.measured_on = self._board.measured_on
            self._directory = tempfile.TemporaryDirectory(prefix="prune-compile-board-")

    def close(self) -> None:
        """Free the board for others (tuning and timing after the search ask the tracker for it): a session the
        timer still held, until Python collected it, kept the compile step's tuning waiting for good."""
        if self._board is not None:
            self._board.release()

    def _tuning(self, proto) -> TuningOptions:
        layers = sum(1 for n in proto.graph.node if n.op_type in WEIGHT_OPS)
        if self._board is not None:  # tuning's runner needs the board: a session held here would keep it waiting
            self._board.release()
        return TuningOptions(trials=self.trials_per_layer * max(layers, 1), database=self.database, rpc=self.rpc)

    def layer(self, proto, feeds) -> float:
        from .build import lower_model

        _, _, _, summary = lower_model(proto, self.target, self.target_options, self._tuning(proto),
                                       weights_unused=True)  # the table reads tuning's measurements only
        self.trials_run += summary.trials_run
        self.layers_tuned += 1
        kernels = [t for t in summary.per_task if t["best_ms"] is not None]
        if not kernels:  # nothing measured (a layer TVM schedules without tuning): time the model instead
            return self(proto, feeds, 0.2)
        return float(sum(t["best_ms"] * t["calls"] for t in kernels))

    def __call__(self, proto, feeds, min_seconds: float | None = None) -> float:
        import tvm
        from tvm import relax

        from . import parallel_launcher
        from .build import compile_model, export_library

        if self._board is None:
            parallel_launcher.register()  # before the executable is JIT-compiled: TVM fills its launcher in then
        digest = self._digests.get(proto, _digest)
        if digest not in self._compiled:
            executable, _, _, summary = compile_model(proto, self.target, self.target_options, self._tuning(proto))
            self.trials_run += summary.trials_run if summary else 0
            self._compiled[digest] = executable
        executable = self._compiled[digest]
        seconds = 0.15 if min_seconds is None else min_seconds
        if self._board is not None:
            path = os.path.join(self._directory.name, f"{digest[:24]}.so")
            if not os.path.exists(path):
                export_library(executable, self.target, path)
            ms = min(self._board.times(path, _inputs(proto, feeds), seconds))
            self.models_timed += 1
            return ms
        dev = tvm.cpu()
        vm = relax.VirtualMachine(executable, dev)
        args = [tvm.runtime.tensor(a, dev) for a in _inputs(proto, feeds)]
        each = _warm_up(functools.partial(vm["main"], *args))
        result = vm.time_evaluator("main", dev, number=1, repeat=repeats(seconds, each))(*args)
        self.models_timed += 1
        return float(min(result.results)) * 1e3


def require_board(target: str, rpc: RPCSettings | None) -> None:
    """Code for a target other than this machine's `cpu` is timed on its device: an RPC one must be named."""
    if target != "cpu" and rpc is None:
        raise UsageError(f"--latency-engine tvm-{target} measures on the board: pass --rpc-tracker HOST:PORT and "
                         "--rpc-key KEY of a TVM RPC tracker that has it")


def _warm_up(run) -> float:
    """Call `run` as many times as `warm_up_runs` says for the seconds a call has taken so far (a board's rule,
    without its probe); seconds a call."""
    started, runs = time.perf_counter(), 0
    while runs == 0 or runs < warm_up_runs(max((time.perf_counter() - started) / runs, 1e-9)):
        run()
        runs += 1
    return max((time.perf_counter() - started) / runs, 1e-6)


def _digest(proto) -> str:
    return hashlib.sha256(proto.SerializeToString()).hexdigest()


def _inputs(proto, feeds) -> list[np.ndarray]:
    """The model's inputs in its order (initializers listed as inputs excluded)."""
    initializers = {i.name for i in proto.graph.initializer}
    try:
        return [np.ascontiguousarray(feeds[i.name]) for i in proto.graph.input if i.name not in initializers]
    except KeyError as e:
        raise BackendError(f"no example input for model input {e}") from None
