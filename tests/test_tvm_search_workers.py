"""How tuning searches and builds candidates: the builder's workers live across batches (each start imports TVM,
seconds of CPU), and a task whose trials cannot train MetaSchedule's cost model is searched without breeding."""

from __future__ import annotations

import inspect
import os
import shutil

import pytest

from prune_compile.backends.tvm import ARM_CROSS_COMPILER, candidate_builder, parallel_launcher
from prune_compile.backends.tvm.candidate_builder import KeptPoolBuilder
from prune_compile.backends.tvm.search_strategy import COST_MODEL_WARMUP, TRIALS_PER_BATCH, Unguided, search_for


def _inputs(count: int) -> list:
    import tvm
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def copy(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            b[i] = a[i]

    target = tvm.target.Target({"kind": "llvm"})
    return [BuilderInput(tvm.IRModule({"main": copy}), target) for _ in range(count)]


def _worker_pid(_mod, _target, _params) -> int:
    """A build function whose "artifact" is the worker's pid (the module is pickled by value, as below)."""
    import os

    return os.getpid()


def _fails_or_sleeps(mod, _target, _params) -> None:
    import time

    if mod.functions:
        raise ValueError("no candidate here")
    time.sleep(30)


@pytest.fixture(autouse=True)
def _functions_by_value():
    """The workers get this module's build functions by value: they need not import the tests."""
    import sys

    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


def test_the_builder_keeps_its_workers_between_batches_and_replaces_them_after_max_uses(monkeypatch) -> None:
    monkeypatch.setattr(candidate_builder, "MAX_USES", 3)
    builder = KeptPoolBuilder(_worker_pid, str, timeout_sec=60, max_workers=1)
    try:
        first = [r.artifact_path for r in builder.build(_inputs(2))]
        second = [r.artifact_path for r in builder.build(_inputs(2))]
    finally:
        builder.shutdown()
    assert all(first + second) and first[0] == first[1] == second[0], (first, second)  # one worker, kept
    assert second[1] != second[0]  # its fourth candidate: a new worker


def test_one_builders_workers_are_alive_at_a_time() -> None:
    """A process tuning for two targets (two builders) keeps the workers of the one building now."""
    cpu, arm = (KeptPoolBuilder(_worker_pid, str, timeout_sec=60, max_workers=1) for _ in range(2))
    try:
        (first,) = cpu.build(_inputs(1))
        arm.build(_inputs(1))
        assert cpu._pool is None and arm._pool is not None
        (again,) = cpu.build(_inputs(1))
        assert arm._pool is None and again.artifact_path != first.artifact_path  # started anew
    finally:
        cpu.shutdown()
        arm.shutdown()


def test_a_failed_or_timed_out_candidate_is_an_error_result_and_the_next_batch_builds() -> None:
    import tvm

    builder = KeptPoolBuilder(_fails_or_sleeps, str, timeout_sec=2, max_workers=1)
    try:
        failed = builder.build(_inputs(1))[0]
        (slow,) = _inputs(1)
        slow = type(slow)(tvm.IRModule({}), slow.target)  # no function: sleeps past the timeout
        timed_out = builder.build([slow])[0]
        builder.f_build = _worker_pid
        after = builder.build(_inputs(1))[0]
    finally:
        builder.shutdown()
    assert failed.artifact_path is None and "no candidate here" in failed.error_msg
    assert timed_out.artifact_path is None and "timeout, killed after 2 s" in timed_out.error_msg
    assert after.error_msg is None and after.artifact_path


def test_the_warm_up_is_meta_schedules_own() -> None:
    """Below it XGBModel predicts random numbers: search_for relies on that."""
    from tvm.s_tir.meta_schedule.cost_model import XGBModel

    assert inspect.signature(XGBModel.__init__).parameters["num_warmup_samples"].default == COST_MODEL_WARMUP


@pytest.mark.parametrize("trials", [8, 40, COST_MODEL_WARMUP - 1])
def test_budgets_the_cost_model_cannot_learn_from_are_searched_without_breeding(trials) -> None:
    strategy, model = search_for(trials, seed=0)
    assert isinstance(model, Unguided) and strategy.genetic_num_iters == 0
    # a batch drawn from a population twice its size: measured schedules are kept out of it
    assert strategy.population_size == max(16, 2 * min(trials, TRIALS_PER_BATCH))


def test_budgets_it_can_learn_from_keep_meta_schedules_search() -> None:
    strategy, model = search_for(COST_MODEL_WARMUP, seed=0)
    assert model == "xgb" and strategy.genetic_num_iters > 0


def test_the_unguided_model_draws_from_its_own_seeded_generator() -> None:
    import numpy as np

    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    scores = Unguided._cls(3).predict(None, [None] * 4)
    assert np.array_equal(scores, Unguided._cls(3).predict(None, [None] * 4))
    assert len(scores) == 4 and ((scores >= 0) & (scores < 1)).all()
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global generator untouched


def test_local_candidates_come_back_linked_and_the_runner_only_loads_them(monkeypatch) -> None:
    """MetaSchedule's default export is a tar of the object, which the runner's one worker links before it loads it
    (21 ms a Winograd candidate, serially, while nothing else runs): ours are shared libraries linked in the
    builder's workers, and loading one compiles nothing."""
    import numpy as np
    import tvm
    from tvm.support import cc

    from prune_compile.backends.tvm import tuning

    builder, _ = tuning._workers("cpu", None)
    (result,) = builder.build(_inputs(1))
    assert result.error_msg is None, result.error_msg
    try:
        with open(result.artifact_path, "rb") as f:
            assert f.read(4) == b"\x7fELF"

        def no_link(*_args, **_kwargs):
            raise AssertionError("the runner linked the candidate")

        monkeypatch.setattr(cc, "create_shared", no_link)
        lib = tvm.runtime.load_module(result.artifact_path)
        a = tvm.runtime.tensor(np.arange(4, dtype=np.float32))
        b = tvm.runtime.tensor(np.zeros(4, np.float32))
        lib["main"](a, b)
        np.testing.assert_array_equal(b.numpy(), a.numpy())
    finally:  # in a tuning run MetaSchedule's RemoveBuildArtifact callback does this
        shutil.rmtree(os.path.dirname(result.artifact_path))
    # measured elsewhere, a candidate is linked for its device: a board's by our cross export, a GPU's by its server
    rpc = tuning.RPCSettings("127.0.0.1:9190", "device")
    export = tuning._workers("arm", rpc)[0].f_export
    assert export.func is tuning._export_remote and export.keywords["compiler"] == ARM_CROSS_COMPILER
    # the launcher compiled once for the board, not with every candidate
    assert export.keywords["launcher"] == parallel_launcher.compiled(ARM_CROSS_COMPILER)
    assert os.path.isfile(export.keywords["launcher"])
    assert tuning._workers("gpu", rpc)[0].f_export is None
