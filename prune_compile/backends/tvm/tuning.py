"""MetaSchedule tuning with a persistent database, sized for small machines.

- **Builder**: MetaSchedule's default builder imports `tvm.s_tir.tensor_intrin` in every worker (~25 s here) and
  hits its 30 s timeout. Ours (`_build_candidate`) only strips layout-rewrite blocks and calls `tvm.tirx.build`
  (skipping the passes the library's build skips, cpu_passes.py), with a longer timeout, in workers kept between
  batches (candidate_builder.py), which also link local candidates (`_export_local`: the runner only loads them).
- **Search**: a task is searched by MetaSchedule's evolutionary search with its XGBoost cost model only when its
  trials can train the model; below the model's warm-up its predictions are random, and the population is sampled
  once without breeding (search_strategy.py).
- **Budget**: half the trial budget is split across tasks by their share of FLOPs (× how often each runs), the other
  half by their share of the measured run time once every task has had a round, with a floor so that every task
  that gets trials gets enough for one search round. Tasks are tuned one at a time, which gives an honest progress
  bar and keeps each task to its share.
- **Database**: one directory per target (JSON workloads + records, shared by every graph built for that target,
  so pruned variants with repeated shapes reuse records; read a workload at a time, tuning_database.py) plus a
  ledger of trials already spent per task. A rebuild asks only for the trials a task has not had yet: the same
  graph and target a second time runs 0 trials.
- **Runner**: local, or TVM RPC through a tracker (`RPCSettings`) to measure on a real board or a device farm. The
  local runner measures with the target's `num-cores` threads (see threads.py: TVM's default here is one), and the
  database directory is keyed by that count too: a record measured with other threads ranks schedules wrongly. Its
  worker runs candidates with our parallel launcher, as the libraries we build do (parallel_launcher.register), and
  reads each as the median of single calls (`_time_candidate`; the directory is keyed by that too), so a neighbour
  process that takes a core now and then does not make candidates look slow. A candidate clearly slower than its
  task's fastest so far is timed for a few calls only (`RACE_RATIO`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ...errors import BackendError, UsageError
from . import parallel_launcher
from .targets import ARM_CROSS_COMPILER
from .threads import ENV as THREADS_ENV
from .threads import SPIN_ENV, thread_env

MIN_TRIALS_PER_TASK = 8
MIN_SHARE = 0.005  # of the model's FLOPs or bytes: lighter tasks keep TVM's default schedule, unless `always_tuned`
# Reductions whose default schedule is far slower than their FLOPs say, and memory-bound passes over whole feature
# maps, which the default leaves single-threaded: pruned resnet18's stem max pool (0.1% of the FLOPs) ran 0.14 ms
# untuned, 2.4% of the model and twice ONNX Runtime's pool; the input's layout transform 0.07 ms.
ALWAYS_TUNED = ("conv", "depthwise", "matmul", "dense", "pool", "layout_transform")
BUILD_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 60.0
RUN_SECONDS = 0.1  # how long a candidate is timed for (MetaSchedule's default evaluator: at least 100 ms of calls)
RUN_CALLS = (10, 2000)  # single calls timed per candidate, at least and at most
# A candidate whose first calls read more than RACE_RATIO x the fastest candidate of its task so far is timed for
# RUN_CALLS[0] calls only (`_time_candidate`): it will not be the task's pick, and the cost model ranks it as well
# by ten calls. Half the candidates of two pruned-resnet18 tunings read more than 1.25x the best before them.
RACE_RATIO = 1.25
# how CPU candidates are timed, here and on a board (`_time_candidate`, with our launcher): part of the database's key
CPU_TIMING = "median-of-calls"
# The generation of our CPU schedule rules, also part of the key: a record replays the schedule it was measured with,
# so when a rule changes what its spaces do, earlier records would keep the old schedules (and a ledger that says the
# task is tuned). 2: epilogues that branch (hardswish, SiLU) fused into the conv instead of a serial pass after it.
CPU_RULES = 2
CPU_TARGETS = ("cpu", "arm")  # GPU candidates keep MetaSchedule's export and timing
LEDGER = "ledger.json"
MS_LOGGER = "tvm.s_tir.meta_schedule"


@dataclass(frozen=True)
class RPCSettings:
    """Where candidates are measured when not on this machine: a TVM RPC tracker and the device key."""

    tracker: str  # host:port
    key: str
    session_timeout_s: int = 120

    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.tracker.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UsageError(f"--rpc-tracker {self.tracker}: expected HOST:PORT")
        return host, int(port)

    def check_device(self, timeout_s: float = 10.0) -> None:
        """Raise before any work when the tracker does not answer or has no server under the key: TVM's client
        retries an absent tracker every 5 s for as long as the run goes on (a mistyped port hung a run for 10
        minutes), and a request for an absent key waits for good. A busy device is still registered."""
        import socket

        host, port = self.host_port()
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError as e:
            raise UsageError(f"--rpc-tracker {self.tracker}: no tracker answers there ({e.strerror or e})") from None
        from tvm import rpc

        try:
            servers = rpc.connect_tracker(host, port).summary().get("server_info", [])
        except Exception as e:
            raise UsageError(f"--rpc-tracker {self.tracker}: not a TVM RPC tracker ({e})") from None
        keys = sorted({s["key"].split(":", 1)[1] for s in servers if str(s.get("key", "")).startswith("server:")})
        if self.key not in keys:
            raise UsageError(f"--rpc-key {self.key}: no device registered under it at tracker {self.tracker} "
                             f"(registered: {', '.join(keys) or 'none'})")


@dataclass
class TuningOptions:
    trials: int = 0
    database: str | None = None  # root directory; default: default_database_root()
    rpc: RPCSettings | None = None
    seed: int = 0
    progress: Callable[..., None] | None = None  # prune_compile.progress protocol


@dataclass
class TuningSummary:
    trials_requested: int
    trials_run: int
    trials_valid: int  # candidates that built and ran (the rest failed to build, run or verify)
    tasks: int
    tasks_tuned: int
    database: str
    per_task: list[dict] = field(default_factory=list)
    # trials a task's share held that its design spaces had no unmeasured schedule for (`distinct_schedules`), and
    # how many tasks that was: why a run can end well under its budget
    trials_unneeded: int = 0
    tasks_exhausted: int = 0

    def to_json(self) -> dict:
        return {"trials_requested": self.trials_requested, "trials_run": self.trials_run,
                "trials_valid": self.trials_valid, "tasks": self.tasks,
                "tasks_tuned": self.tasks_tuned, "database": self.database, "per_task": self.per_task,
                "trials_unneeded": self.trials_unneeded, "tasks_exhausted": self.tasks_exhausted}


def default_database_root() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "prune-compile", "tuning")


def database_dir(root: str, target_name: str, target_json: str, threads: int | None = None) -> str:
    """One database per target, thread count (measured here; a board uses its own), timing method and generation
    of our CPU schedule rules: records are only comparable with records measured the same way."""
    key = target_json if threads is None else f"{target_json}|threads={threads}"
    if target_name in CPU_TARGETS:
        key += f"|timing={CPU_TIMING}|rules={CPU_RULES}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(root, f"{target_name}-{digest}")


def measuring_threads(target, rpc: RPCSettings | None) -> int | None:
    """Threads the local runner measures with: the target's cores. None when a remote device measures."""
    if rpc is not None or target.kind.name != "llvm" or "num-cores" not in target.attrs:
        return None
    return int(target.attrs["num-cores"])


def always_tuned(task_name: str) -> bool:
    """Whether a task gets a search round however small its share of the FLOPs (see ALWAYS_TUNED)."""
    return any(op in task_name for op in ALWAYS_TUNED)


def memory_heavy(traffic: list[float]) -> set[int]:
    """The tasks that move at least MIN_SHARE of the model's bytes (`traffic`: each task's buffers × calls): they get
    a search round however few FLOPs they have. Resizes, concats, means and elementwise passes over whole feature
    maps do almost no arithmetic, and TVM's default schedule runs them single-threaded and unvectorized: in
    PP-OCRv4 det (pruned) the FPN's resizes and concat, 4.6% of the bytes, and a squeeze-excitation mean over a
    160x160 map (2.6%, 0.7 ms) never qualified by FLOPs."""
    total = sum(traffic)
    return {i for i, t in enumerate(traffic) if total > 0 and t >= MIN_SHARE * total}


def task_traffic(task) -> float:
    """Bytes the task's kernel reads and writes per call (its buffers, each once) × its calls."""
    buffers = [p for func in task.dispatched[0].functions.values() for p in getattr(func, "params", [])
               if getattr(p, "shape", None) is not None]
    return float(sum(math.prod(int(d) for d in p.shape) * p.dtype.itemsize for p in buffers)) * int(task.weight)


def allocate_trials(weights: list[float], total: int, floor: int = MIN_TRIALS_PER_TASK,
                    always: frozenset[int] | set[int] = frozenset()) -> list[int]:
    """Split `total` trials across tasks in proportion to `weights` (FLOPs × calls), at least `floor` for each
    task that gets any. When the budget cannot give every task its floor, the heaviest tasks get it first. Tasks
    in `always` (convolutions, matmuls) qualify however light they are: TVM's default schedule for them is a
    naive single-threaded loop nest, so a 0.3%-of-FLOPs 1x1 downsampling conv took 9.5% of a tuned resnet18."""
    n = len(weights)
    alloc = [0] * n
    if total <= 0 or n == 0:
        return alloc
    order = sorted(range(n), key=lambda i: (-weights[i], i))
    # Tasks under MIN_SHARE of the work (reshapes, tiny reductions) are not worth a search round.
    wtotal = sum(max(w, 0.0) for w in weights)
    worth = [i for i in order if wtotal <= 0 or i in always or weights[i] >= MIN_SHARE * wtotal] or order[:1]
    chosen = worth[: max(1, min(len(worth), total // floor))]
    wsum = sum(max(weights[i], 0.0) for i in chosen)
    # Proportional shares above the floor, by largest remainder, so the sum is exactly `total`.
    spare = total - floor * len(chosen)
    if spare < 0:  # fewer trials than one floor: all to the heaviest task
        alloc[order[0]] = total
        return alloc
    shares = {i: spare * (max(weights[i], 0.0) / wsum if wsum else 1.0 / len(chosen)) for i in chosen}
    for i in chosen:
        alloc[i] = floor + int(shares[i])
    left = total - sum(alloc)
    for i in sorted(chosen, key=lambda i: (-(shares[i] - int(shares[i])), i))[:left]:
        alloc[i] += 1
    return alloc


def _build_candidate(mod, target, _params):
    """MetaSchedule builder function: what the default does, minus importing every tensor intrinsic, and skipping the
    passes the library's build skips too (cpu_passes.py)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from .cpu_passes import build_context

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    with build_context(target):
        return tvm.tirx.build(mod, target=target)


def _time_candidate(rt_mod, device, _config, repeated_args, race: str | None = None) -> list[float]:
    """MetaSchedule run evaluator: the median of ~RUN_SECONDS of single calls. MetaSchedule's default reports the
    mean over 100 ms of calls, and on a machine where another process takes a core now and then that mean counts
    the other process's share: a candidate timed at such a moment looks slow, is ranked down and trains the cost
    model wrong. The median of single calls is the mean's value on a quiet machine and ignores a minority of
    disturbed calls. Not the fastest call: memory-bound kernels have rare lucky calls (a 400 KB layout transform:
    14 us in a few calls, 29 us in most), and ranking by those picks the wrong schedule.

    `race`: the task's key (`_racing`). A candidate whose probe and then RUN_CALLS[0] calls both read more than
    RACE_RATIO x the task's fastest reading in this worker so far stops there, with that median as its reading
    (the runner's worker is one process, kept between batches and tasks)."""
    medians = []
    for args in repeated_args:
        device.sync()
        each = max(_median_of_calls(rt_mod, device, args, 3), 1e-7)
        fastest = _FASTEST.get(race) if race else None
        if fastest is not None and each > RACE_RATIO * fastest:
            first = _median_of_calls(rt_mod, device, args, RUN_CALLS[0])
            if first > RACE_RATIO * fastest:
                medians.append(first)
                continue
        calls = min(max(math.ceil(RUN_SECONDS / each), RUN_CALLS[0]), RUN_CALLS[1])
        medians.append(_median_of_calls(rt_mod, device, args, calls))
    if race and medians:
        _FASTEST[race] = min(*medians, _FASTEST.get(race, math.inf))
    return medians


_FASTEST: dict[str, float] = {}  # the runner worker's fastest reading of each task (`_time_candidate`'s race)


def _median_of_calls(rt_mod, device, args, calls: int) -> float:
    import numpy as np

    timed = rt_mod.time_evaluator(rt_mod.entry_name, device, number=1, repeat=calls)
    return float(np.median(timed(*args).results))


def _racing(runner, key: str) -> None:
    """Time the next candidates as task `key`'s (`_time_candidate`'s race). The runner's worker and a board's
    session keep TVM's pool from spinning (`_start_runner_worker`, `_upload_remote_candidate`): its spinning slowed a
    candidate's first calls, and a race reads those."""
    evaluator = getattr(runner.f_run_evaluator, "func", runner.f_run_evaluator)
    if evaluator in (_time_candidate, _time_remote_candidate):
        runner.f_run_evaluator = functools.partial(evaluator, race=key)


def _upload_remote_candidate(session, local_path: str, remote_path: str):
    """MetaSchedule RPC upload function: upload and load the candidate (MetaSchedule's default), then, before
    MetaSchedule fills its arguments there, keep TVM's pool in the board's session process from spinning, as the
    local runner's worker does, and install our launcher. The board's RPC server is plain TVM, nothing of ours runs
    there to do it, so the candidate carries both (`_export_remote`); one call of each of its functions does it (a
    candidate without parallel loops keeps TVM's launcher, which it never calls). On a loopback server, with the
    pool spinning after the fill, 13 of 32 candidates read their 3-call probe over 1.3x (up to 4.5x) their later
    calls, 2 of 32 without."""
    session.upload(local_path, remote_path)
    module = session.load_module(remote_path)
    parallel_launcher.quiet_remote_pool(module)
    parallel_launcher.install_remote(module)
    return module


def _time_remote_candidate(_session, rt_mod, device, config, repeated_args, race: str | None = None) -> list[float]:
    """MetaSchedule RPC run evaluator: `_time_candidate`'s timing on the board (the candidate prepared by
    `_upload_remote_candidate`). The race's readings are kept in the runner's worker here."""
    return _time_candidate(rt_mod, device, config, repeated_args, race)


def _candidate_path() -> str:
    """Where an exported candidate goes: a directory of its own, which MetaSchedule removes once it is measured."""
    import tempfile

    return os.path.join(tempfile.mkdtemp(prefix="prune-compile-ms-"), "candidate.so")


def _export_local(mod) -> str:
    """MetaSchedule export function for candidates timed here: a shared library, linked in the builder's workers
    (both cores) rather than by the runner's one worker, which links MetaSchedule's default tar of the object
    before it can load it (21 ms a Winograd candidate, while nothing else runs)."""
    path = _candidate_path()
    mod.export_library(path)
    return path


def _export_remote(mod, compiler: str | None = None, launcher: str | None = None) -> str:
    """MetaSchedule export function for candidates timed over RPC: a shared library linked here (a board has no
    compiler; `compiler`: the cross compiler, None for this machine's), with our launcher linked in (`launcher`: the
    object `parallel_launcher.compiled` made with that compiler, passed from the main process; None compiles the
    source with each candidate)."""
    from tvm.support import cc

    path = _candidate_path()
    if parallel_launcher.opted_out():
        mod.export_library(path, fcompile=cc.cross_compiler(compiler) if compiler else None)
    else:
        mod.export_library(path, fcompile=parallel_launcher.fcompile(compiler, launcher))
    return path


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """Serialize tuning runs that share a database (parallel builds in a build system)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _quiet_meta_schedule() -> None:
    """MetaSchedule prints every task table to stdout (which --json owns). Its console handler takes the level of
    the `tvm.s_tir.meta_schedule` logger when each task's loggers are configured, and configuring resets that
    level to DEBUG: so this runs before each task. The per-task log files in the database's logs/ keep it all."""
    logging.getLogger(MS_LOGGER).setLevel(logging.WARNING)


@contextlib.contextmanager
def _own_handlers_only() -> Iterator[None]:
    """MetaSchedule reconfigures its logger with dictConfig before each task and lists the handlers already on it
    by name: an unnamed one (a test harness's, an application's `addHandler`) crashes it with `'NoneType' object
    has no attribute 'format'`, a foreign named one with `Unable to add handler`. Detach those for the tuning run
    and put them back afterwards."""
    logger = logging.getLogger(MS_LOGGER)
    foreign = [h for h in logger.handlers if not (h.get_name() or "").startswith(MS_LOGGER)]
    for handler in foreign:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in foreign:
            logger.addHandler(handler)


def _load_ledger(directory: str) -> dict[str, int]:
    path = os.path.join(directory, LEDGER)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        ledger: dict[str, int] = {}
        for k, v in data.get("trials", {}).items():  # ledgers written before task_family kept Relax's numbers
            family = _family_key(str(k))
            ledger[family] = max(ledger.get(family, 0), int(v))
        return ledger
    except (OSError, ValueError, AttributeError) as e:
        raise BackendError(f"tuning database ledger '{path}' is unreadable: {e}") from e


def _save_ledger(directory: str, ledger: dict[str, int]) -> None:
    from ...util import atomic_write_text

    atomic_write_text(os.path.join(directory, LEDGER),
                      json.dumps({"format": "prune-compile.tuning-ledger/1", "trials": ledger}, indent=1,
                                 sort_keys=True) + "\n")


def task_family(name: str) -> str:
    """A task's name without the numbers Relax appends to tell a module's functions apart
    (fused_conv2d_nchwc6_add7_relu4 → fused_conv2d_nchwc_add_relu). One function is numbered differently in each
    model it is part of: the latency table's one-layer models and the whole model share their fused conv kernels
    (same hash), and the ledger must say so, or every whole-model build tunes them again."""
    return re.sub(r"(?<=[a-z])\d+(?=_|$)", "", name)


def _family_key(key: str) -> str:
    name, _, rest = key.partition(":")
    return f"{task_family(name)}:{rest}" if rest else key


def task_key(task) -> str:
    """The ledger's name for a task: its family (`task_family`), the hash of its function and, for a task one of our
    rules with revised design spaces schedules, that revision (`rule_revisions`)."""
    import tvm_ffi

    key = f"{task_family(task.task_name)}:{tvm_ffi.structural_hash(task.dispatched[0]) & 0xFFFFFFFFFFFFFFFF:016x}"
    text = task.dispatched[0].script()
    for rule, revision in rule_revisions().items():
        if f'"{rule}"' in text:
            key += f":{rule}={revision}"
    return key


def rule_revisions() -> dict[str, int]:
    """Our schedule rules whose design spaces grew after databases were tuned with them, and the revision: a task
    such a rule schedules gets a new ledger entry, so a database tuned before is tuned again for it, up to the
    schedules its records do not hold (`distinct_schedules`). Its records stay valid: the old spaces are still
    offered. A rule that changes what its spaces do bumps CPU_RULES instead."""
    from . import conv_winograd

    return {conv_winograd.RULE: conv_winograd.SPACES_REVISION}


def _start_runner_worker(launcher: str) -> None:
    """The local runner worker's initializer: candidates run their parallel loops with our launcher
    (parallel_launcher.register), and TVM's own pool, which is left with MetaSchedule's random fill of each
    candidate's arguments, does not spin after it (`SPIN_ENV`, read when the pool starts, on the first fill).
    Spinning, its threads held both cores for tens of milliseconds after every fill, and one candidate in three ran
    its first 10-50 calls 2-4x slow (our launcher's caller took both shares of every loop): the probe then read the
    candidate slow and timed it for fewer calls, and a race (`RACE_RATIO`) would have stopped good candidates."""
    os.environ[SPIN_ENV] = "0"
    parallel_launcher.register(launcher)


def _runner(target_name: str, rpc: RPCSettings | None):
    from tvm.s_tir import meta_schedule as ms

    if rpc is None:
        if target_name != "cpu":
            raise UsageError(f"tuning for --target {target_name} measures on that device: pass --rpc-tracker "
                             "HOST:PORT and --rpc-key KEY of a TVM RPC tracker that has it")
        # the worker times candidates with our launcher, which the libraries we build run with (parallel_launcher)
        initializer = None
        if not parallel_launcher.opted_out():
            initializer = functools.partial(_start_runner_worker, parallel_launcher.standalone())
        return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, f_run_evaluator=_time_candidate,
                                     initializer=initializer)
    host, port = rpc.host_port()
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc.key,
                                 session_timeout_sec=rpc.session_timeout_s)
    if target_name not in CPU_TARGETS:  # a GPU's candidates keep MetaSchedule's upload and timing
        return ms.runner.RPCRunner(rpc_config=config, max_workers=1)
    return ms.runner.RPCRunner(rpc_config=config, max_workers=1, f_upload_module=_upload_remote_candidate,
                               f_run_evaluator=_time_remote_candidate)


def _import_tensor_intrinsics() -> None:
    """Import `tvm.s_tir.tensor_intrin` (every MetaSchedule TuneContext does) with a cheap `inspect.stack`.

    Its ~250 TVMScript functions each call `inspect.stack()`, which reads the source context of every frame and
    searches `sys.modules` for each: in a process that has imported torch (thousands of modules: the CLI on a
    torch model, the test suite) under a deep stack, the import took 270 s instead of ~20. TVMScript reads the
    code context of the third frame only (is it a class body?) and the frames' locals, so the innermost frames
    keep their context and the rest get none."""
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    full = inspect.stack

    def shallow(context: int = 1):
        frames, frame, depth = [], sys._getframe(1), 0
        while frame is not None:
            if depth < 4:
                frames.append(inspect.FrameInfo(frame, *inspect.getframeinfo(frame, context)))
            else:  # no source lookups at all (for import-machinery frames even `context=0` searches modules)
                code = frame.f_code
                frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
            frame, depth = frame.f_back, depth + 1
        return frames

    inspect.stack = shallow
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = full


_WORKERS: dict[tuple, tuple] = {}


def _workers(target_name: str, rpc: RPCSettings | None) -> tuple:
    """The builder and runner, started once per process and kept: each start costs 5-20 s here (every worker
    process imports TVM), which the TVM latency table, tuning one small model per layer shape, paid per shape; the
    builder keeps its workers between batches too (candidate_builder.py). Keyed by the thread count and the launcher
    too: runner workers keep the ones they started with."""
    from .candidate_builder import KeptPoolBuilder

    key = (target_name, rpc, os.environ.get(THREADS_ENV), parallel_launcher.opted_out())
    if key not in _WORKERS:
        export = None  # MetaSchedule's default for a GPU's RPC server: a tar the device links
        if rpc is None:  # this machine's runner (`cpu`)
            export = _export_local
        elif target_name in CPU_TARGETS:  # the launcher compiled here once, not by the builder for each candidate
            compiler = ARM_CROSS_COMPILER if target_name == "arm" else None
            launcher = None if parallel_launcher.opted_out() else parallel_launcher.compiled(compiler)
            export = functools.partial(_export_remote, compiler=compiler, launcher=launcher)
        builder = KeptPoolBuilder(_build_candidate, export, BUILD_TIMEOUT_S, os.cpu_count() or 1)
        _WORKERS[key] = (builder, _runner(target_name, rpc))
    return _WORKERS[key]


def hand_scheduled(task) -> bool:
    """Whether the task's kernel is scheduled by hand (`tirx.is_scheduled`: recurrent_steps.py). It has one schedule,
    so a search has nothing to choose; MetaSchedule would still take it (it checks the module's attributes, not the
    function's) and spend the kernel's share of the FLOPs round re-sampling that one candidate."""
    return any(f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False))
               for f in task.dispatched[0].functions.values())


def distinct_schedules(spaces) -> int | None:
    """How many different schedules a task's design spaces hold when every choice in them is a categorical one (our
    rules': the space fixes the tile, the search picks one of three unrollings): each space's choices multiplied,
    summed over the spaces. None when a space samples anything else (MetaSchedule's generic rules sample tile sizes
    and compute locations: too many to count). Tuning such a task past that number measured nothing more and cost
    five empty search rounds of 15-20 s each (a Winograd conv of pruned resnet18), in each tuning round."""
    total = 0
    for space in spaces:
        choices = 1
        for inst in space.trace.insts:
            if inst.kind.name == "SampleCategorical":
                choices *= len(inst.attrs[0])
            elif inst.kind.name.startswith("Sample"):
                return None
        total += choices
    return total


def first_round(weights: list[float], total: int, already: list[int],
                always: frozenset[int] | set[int] = frozenset()) -> tuple[list[int], int]:
    """The FLOPs round and what it leaves for the measured round: (trials each task runs now, trials left).

    The round gets half of `total`, or enough for one search round on every task worth one when that is more
    (small budgets are all FLOPs). A task runs what it lacks of its share, unless that is less than a search
    round (a rebuild, or a task another graph already tuned). What is left counts every trial the tasks have had,
    here or before: a rebuild has nothing left, a larger budget tops up."""
    by_flops = allocate_trials(weights, total, always=always)
    budget = max(total // 2, min(total, MIN_TRIALS_PER_TASK * sum(1 for a in by_flops if a)))
    needs = []
    for share, done in zip(allocate_trials(weights, budget, always=always), already, strict=True):
        need = share - done
        needs.append(need if need > 0 and need >= min(MIN_TRIALS_PER_TASK, share) else 0)
    left = total - sum(already) - sum(needs)
    return needs, left if left >= MIN_TRIALS_PER_TASK else 0


def _measured_seconds(database, task) -> list[float]:
    """Mean run times of the task's measured records, fastest first (failed candidates are stored too, and
    skipped); no schedule is rebuilt for it."""
    return database.valid_means(task.dispatched[0])


def _best_seconds(database, task) -> float | None:
    """Mean run time of the task's best measured schedule, None when it has none."""
    return next(iter(_measured_seconds(database, task)), None)


def tune(mod, target, target_name: str, options: TuningOptions) -> tuple[object, TuningSummary]:
    """Tune the legalized, fused Relax module `mod` and return (database, summary). Runs under the database lock
    only for the tasks whose ledger says they still need trials.

    Two rounds: the first splits (about) half the budget by FLOPs, which is all there is to go on before
    anything is measured (`first_round`); the second splits what is left by each task's share of the measured
    run time (best schedule × calls). FLOPs misjudge memory-bound kernels: a depthwise conv or a classifier
    matmul at 1-2% of the FLOPs took 6% of a tuned mobilenet_v2 on 9-25 trials."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    root = options.database or default_database_root()
    threads = measuring_threads(target, options.rpc)
    directory = database_dir(root, target_name, str(target), threads)
    report = options.progress or (lambda *_args, **_kw: None)
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if not hand_scheduled(t)]
    keys = [task_key(t) for t in tasks]
    weights = [max(float(estimate_tir_flops(t.dispatched[0])), 1.0) * int(t.weight) for t in tasks]
    heavy = {i for i, t in enumerate(tasks) if always_tuned(t.task_name)} | memory_heavy(
        [task_traffic(t) for t in tasks])
    with _locked(directory), contextlib.ExitStack() as stack:
        database = _open_database(directory)
        ledger = _load_ledger(directory)
        before = len(database)
        already = [ledger.get(key, 0) for key in keys]
        first_needs, second_budget = first_round(weights, options.trials, already, always=heavy)
        todo_keys: set[str] = set()  # tasks trials ran for
        valid_before = _valid_records(database, tasks)
        run_per_task = [0] * len(tasks)
        session = None
        if any(first_needs) or second_budget:
            # Runner workers start inside: they inherit the thread count they measure with.
            stack.enter_context(thread_env(threads))
            stack.enter_context(_own_handlers_only())
            _import_tensor_intrinsics()
            session = _Session(target_name, options, directory, database, ledger, report,
                               total=sum(first_needs) + second_budget)
            for i, need in enumerate(first_needs):
                run_per_task[i] += session.run(tasks[i], need, keys[i]) if need else 0
                if run_per_task[i]:
                    todo_keys.add(keys[i])
            by_time = [(_best_seconds(database, t) or 0.0) * int(t.weight) for t in tasks] if second_budget else []
            if any(by_time):  # tasks never measured (light ones) keep their default schedule
                second = allocate_trials(by_time, second_budget)
                for i, need in enumerate(second):
                    ran = session.run(tasks[i], need, keys[i]) if need >= MIN_TRIALS_PER_TASK else 0
                    if ran:
                        run_per_task[i] += ran
                        todo_keys.add(keys[i])
            report(f"tuning {target_name}: done, {len(todo_keys)} tasks in {session.elapsed():.0f} s", True)
        valid = _valid_records(database, tasks) - valid_before
        if todo_keys and valid == 0:
            raise BackendError(f"MetaSchedule measured no valid candidate in {len(database) - before} trials "
                               f"(every build or run failed); see the logs in {os.path.join(directory, 'logs')}")
        per_task = []
        for task, done, w, run in zip(tasks, already, weights, run_per_task, strict=True):
            best = _best_seconds(database, task)
            per_task.append({"task": task.task_name, "flops": int(w), "calls": int(task.weight), "already": done,
                             "run": run, "best_ms": None if best is None else round(best * 1e3, 6)})
        summary = TuningSummary(options.trials, len(database) - before, valid, len(tasks), len(todo_keys),
                                directory, per_task, session.unneeded if session else 0,
                                len(session.exhausted) if session else 0)
        _opened[directory] = (database, _files_signature(directory))
    return database, summary


DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")
# directory -> (the database this process last used there, its files' sizes and times when it was done with it)
_opened: dict[str, tuple[object, tuple]] = {}


def _files_signature(directory: str) -> tuple:
    """Each database file's (size, mtime), None for a file not there yet."""
    paths = [os.path.join(directory, f) for f in DATABASE_FILES]
    return tuple((os.path.getsize(p), os.path.getmtime(p)) if os.path.exists(p) else None for p in paths)


def _open_database(directory: str):
    """The directory's database (tuning_database.open_database: read on demand), opened again only when its files
    changed since this process last used it: the latency table opens it once per layer shape, and our own commits
    append to the files through the object itself, so unchanged files mean it is current; another process's
    records change them (callers hold the directory's lock)."""
    from .tuning_database import open_database

    cached = _opened.get(directory)
    if cached and cached[1] == _files_signature(directory):
        return cached[0]
    return open_database(*(os.path.join(directory, f) for f in DATABASE_FILES))


class _Session:
    """One tuning run: the builder and runner, and one `tune_tasks` call per task with its own search strategy,
    which keeps each task to its share and gives an honest progress bar."""

    def __init__(self, target_name: str, options: TuningOptions, directory: str, database, ledger: dict[str, int],
                 report: Callable[..., None], total: int) -> None:

        self.target_name, self.options, self.directory = target_name, options, directory
        self.database, self.ledger, self.report = database, ledger, report
        self.total, self.spent, self.count = max(total, 1), 0, 0
        self.unneeded, self.exhausted = 0, set()  # see TuningSummary
        self.started = time.monotonic()
        self.builder, self.runner = _workers(target_name, options.rpc)
        self.work_dir = os.path.join(directory, "logs")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self, task, need: int, key: str) -> int:
        """Tune `task` for `need` trials, at most as many as its design spaces have schedules not yet measured
        (`distinct_schedules`), and record `need` in the ledger. Returns the trials run (0: TVM skips the task, or
        nothing is left to measure)."""
        from tvm.s_tir import meta_schedule as ms

        from .search_strategy import TRIALS_PER_BATCH, search_for

        self.count += 1
        self.report(f"tuning {self.target_name}: task {self.count} {task.task_name} ({need} trials, "
                    f"{self.elapsed():.0f} s)", False, min(self.spent / self.total, 1.0))
        self.spent += need

        def contexts_for(trials: int, space) -> tuple[list, list, object]:
            strategy, cost_model = search_for(trials, self.options.seed)
            _quiet_meta_schedule()  # before every configuration of the task's loggers
            return *ms.relax_integration.extracted_tasks_to_tune_contexts(
                [task], self.work_dir, space=space, strategy=strategy, seed=self.options.seed), cost_model

        contexts, _, _ = contexts_for(need, "post-order-apply")
        if not contexts:  # already scheduled: TVM skips it, and so does a rebuild
            self._spent(key, need)
            return 0
        # The search starts from these spaces instead of generating them again: our rules write each conv's spaces
        # in Python (0.14 s a resnet18 conv, 3% of an 8-trial latency-table entry). The schedule function hands
        # them over unchanged; the postprocessors and mutators are the target's, as PostOrderApply's are.
        spaces = contexts[0].generate_design_space()
        trials = need
        distinct = distinct_schedules(spaces)
        if distinct is not None:
            trials = min(need, distinct - len(_measured_seconds(self.database, task)))
            if trials < need:
                self.unneeded += need - max(trials, 0)
                self.exhausted.add(key)
        if trials <= 0:
            self._spent(key, need)
            return 0
        # searched for what it will run (whether its cost model can learn: search_strategy.py)
        contexts, task_weights, cost_model = contexts_for(trials, ms.space_generator.ScheduleFn(lambda _: spaces))
        _racing(self.runner, key)
        try:
            ms.tune_tasks(tasks=contexts, task_weights=task_weights, work_dir=self.work_dir,
                          max_trials_global=trials, max_trials_per_task=trials,
                          num_trials_per_iter=min(trials, TRIALS_PER_BATCH), builder=self.builder,
                          runner=self.runner, database=self.database, cost_model=cost_model,
                          task_scheduler="round-robin")
        except Exception as e:  # TVM raises the exception types tvm_ffi maps its errors to
            raise BackendError(f"MetaSchedule failed on task {task.task_name}: "
                               f"{str(e).strip().splitlines()[-1][:300]}") from e
        self._spent(key, need)
        return trials

    def _spent(self, key: str, trials: int) -> None:
        self.ledger[key] = self.ledger.get(key, 0) + trials
        _save_ledger(self.directory, self.ledger)


def _valid_records(database, tasks) -> int:
    """Records with measured run times for these tasks."""
    return sum(len(_measured_seconds(database, task)) for task in tasks)


