"""MetaSchedule tuning: budget allocation, a tiny model tuned end to end (TVM == ONNX Runtime on the tuned
library), the persistent database (a second build of the same graph + target runs 0 trials, in a fresh process
through the CLI), and the RPC runner through a local tracker."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from prune_compile.backends import ort
from prune_compile.backends import tvm as tvm_backend
from prune_compile.backends.tvm import allocate_trials, tuning
from prune_compile.backends.tvm.targets import resolve_conv_layout
from prune_compile.backends.tvm.tuning import DATABASE_FILES, always_tuned, first_round, memory_heavy, task_traffic

from .rpc_board import rpc_board

pytestmark = pytest.mark.serial  # tuning times candidates on this machine
RTOL = 1e-4
# a tuned blocked build's pipeline, and how many of its kernels compute convs by Winograd's F(4x4, 3x3)
PIPELINE = re.compile(r"metaschedule, NCHW\d+c(, Winograd F\(4x4,3x3\) in \d+ kernels)?")


def tiny_model_onnx(path: str) -> None:
    """Conv-BN-ReLU, a residual conv, pooling and a classifier: 4-6 tuning tasks, seconds per trial."""
    import torch

    from prune_compile.ir import export_onnx
    from prune_compile.ir.fx_importer import import_torch_module

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(16)
            self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, image):
            y = torch.relu(self.bn1(self.conv1(image)))
            y = torch.relu(self.conv2(y) + y)
            return self.fc(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Tiny().eval()
    graph = import_torch_module(model, (torch.randn(1, 3, 32, 32),), name="Tiny")
    with open(path, "wb") as f:
        f.write(export_onnx(graph).SerializeToString())


@pytest.mark.parametrize("weights,total,expected_sum", [([5.0, 1.0, 1.0], 64, 64), ([1.0] * 10, 24, 24),
                                                        ([3.0, 2.0], 5, 5), ([1.0], 0, 0)])
def test_allocate_trials_spends_the_budget_exactly(weights, total, expected_sum) -> None:
    alloc = allocate_trials(weights, total, floor=8)
    assert sum(alloc) == expected_sum
    given = [a for a in alloc if a]
    if total >= 8:
        assert all(a >= 8 for a in given)  # every tuned task gets one search round
    # Heavier tasks never get fewer trials than lighter ones.
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    assert all(alloc[a] >= alloc[b] for a, b in zip(order, order[1:], strict=False) if weights[a] > weights[b])


def test_allocate_trials_skips_negligible_tasks() -> None:
    alloc = allocate_trials([1000.0, 500.0, 1.0, 0.5], 200, floor=8)
    assert alloc[2] == alloc[3] == 0 and sum(alloc) == 200


def test_allocate_trials_always_tunes_light_convolutions() -> None:
    # a 1x1 downsampling conv is far below MIN_SHARE of the FLOPs, yet untuned it costs as much as a big conv
    alloc = allocate_trials([1000.0, 500.0, 1.0, 0.5], 200, floor=8, always={2})
    assert alloc[2] == 8 and alloc[3] == 0 and sum(alloc) == 200


@pytest.mark.parametrize("task,tuned", [
    ("fused_conv2d_nchwc9_add7_relu4", True), ("fused_matmul_add9", True), ("max_pool2d", True),
    ("adaptive_avg_pool2d", True), ("te_layout_transform", True), ("fused_depthwise_nchwc3_add11", True),
    ("fused_add_relu", False), ("reshape", False)])
def test_light_convs_pools_and_layout_transforms_are_always_tuned(task, tuned) -> None:
    assert always_tuned(task) is tuned


def test_tasks_moving_a_share_of_the_bytes_are_tuned_however_few_flops_they_have() -> None:
    # a resize over a whole feature map: no FLOPs to speak of, 5% of the bytes; a reshape of a vector: neither
    assert memory_heavy([900.0, 50.0, 1.0, 49.0]) == {0, 1, 3}
    assert memory_heavy([0.0, 0.0]) == set()


def test_task_traffic_counts_every_buffer_once_per_call() -> None:
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a = te.placeholder((4, 8), name="a")
    b = te.compute((4, 8), lambda i, j: a[i, j] * 2, name="b")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b])})
    task = ms.ExtractedTask("double", mod, tvm.target.Target({"kind": "llvm"}), [mod], 3)
    assert task_traffic(task) == 2 * 4 * 8 * 4 * 3


def test_allocate_trials_prefers_heavy_tasks_when_short() -> None:
    alloc = allocate_trials([1.0, 100.0, 10.0, 0.5], 16, floor=8)
    assert alloc == [0, 8, 8, 0]


@pytest.mark.parametrize("layout,target,tuned,expected", [
    ("auto", "cpu", True, "NCHWc"), ("auto", "cpu", False, "NCHW"), ("auto", "arm", True, "NCHW"),
    ("auto", "gpu", True, "NCHW"), ("NHWC", "cpu", False, "NHWC"), ("NCHW", "cpu", True, "NCHW")])
def test_auto_conv_layout_blocks_channels_for_tuned_cpu_builds_only(layout, target, tuned, expected) -> None:
    assert resolve_conv_layout(layout, target, tuned) == expected


def test_unknown_conv_layout_is_a_usage_error() -> None:
    from prune_compile.errors import UsageError

    with pytest.raises(UsageError, match="--conv-layout NWHC"):
        resolve_conv_layout("NWHC", "cpu", True)


def test_first_round_takes_half_the_budget_by_flops_and_leaves_the_rest_to_measurements() -> None:
    weights = [900.0, 500.0, 300.0, 100.0, 50.0]
    needs, left = first_round(weights, 1200, [0] * 5)
    assert sum(needs) == 600 and left == 600
    assert needs == allocate_trials(weights, 600)


def test_first_round_gives_small_budgets_to_flops_alone() -> None:
    # every task worth tuning needs one search round before anything can be measured
    needs, left = first_round([900.0, 500.0, 300.0], 24, [0] * 3)
    assert needs == [8, 8, 8] and left == 0


def test_first_round_runs_nothing_on_a_rebuild_and_tops_up_a_larger_budget() -> None:
    weights = [900.0, 500.0, 300.0, 100.0, 50.0]
    needs, left = first_round(weights, 400, [0] * 5)
    spent = [n + s for n, s in zip(needs, allocate_trials(weights, left), strict=True)]  # both rounds ran
    assert sum(spent) == 400
    assert first_round(weights, 400, spent) == ([0] * 5, 0)
    more, left = first_round(weights, 1200, spent)
    assert sum(spent) + sum(more) + left == 1200 and left >= 8
    # a task another graph tuned past this graph's share runs nothing in the first round
    needs, left = first_round(weights, 1200, [1000, 0, 0, 0, 0])
    assert needs[0] == 0 and left == 0


class _Timings:
    """A stand-in runtime module whose time evaluator returns scripted single-call times (seconds)."""

    entry_name = "main"

    def __init__(self, calls: list[float]) -> None:
        self.calls, self.repeats = calls, []

    def time_evaluator(self, _name, _device, number, repeat, **_kw):
        assert number == 1  # single calls, or a disturbed call hides inside a mean
        self.repeats.append(repeat)
        results = [self.calls[i % len(self.calls)] for i in range(repeat)]
        return lambda *_args: type("Profile", (), {"results": results})()


def test_candidates_are_timed_by_the_median_of_single_calls() -> None:
    """Two in five calls disturbed (a neighbour took the core): the mean would read 0.46 ms, the median reads the
    kernel's 0.1 ms. As many calls as fill ~RUN_SECONDS, within RUN_CALLS; one reading per argument set."""
    import tvm

    module = _Timings([1e-4, 1e-3, 1e-4, 1e-3, 1e-4])
    assert tuning._time_candidate(module, tvm.cpu(), None, [()]) == [pytest.approx(1e-4)]
    assert module.repeats == [3, round(tuning.RUN_SECONDS / 1e-4)]  # the probe's median: 0.1 ms
    assert tuning.RUN_CALLS[0] < round(tuning.RUN_SECONDS / 1e-4) < tuning.RUN_CALLS[1]
    fast, slow = _Timings([1e-6]), _Timings([1.0])
    assert tuning._time_candidate(fast, tvm.cpu(), None, [(), ()]) == [pytest.approx(1e-6)] * 2
    assert fast.repeats == [3, tuning.RUN_CALLS[1]] * 2
    assert tuning._time_candidate(slow, tvm.cpu(), None, [()]) == [pytest.approx(1.0)]
    assert slow.repeats == [3, tuning.RUN_CALLS[0]]


def test_a_candidate_clearly_slower_than_its_tasks_fastest_is_timed_for_ten_calls(monkeypatch) -> None:
    """Racing (`race`: the task's key): once a task has a reading, a candidate whose probe and then RUN_CALLS[0]
    calls both read over RACE_RATIO x it stops there; one near the fastest, or whose first calls only looked slow,
    is timed in full. Each task races against its own readings; without a key nothing races."""
    import tvm

    monkeypatch.setattr(tuning, "_FASTEST", {})
    full = math.ceil(tuning.RUN_SECONDS / 1e-4)
    first = _Timings([1e-4])
    assert tuning._time_candidate(first, tvm.cpu(), None, [()], race="a") == [pytest.approx(1e-4)]
    assert first.repeats == [3, full]  # nothing to race against yet
    slow = _Timings([2e-4])
    assert tuning._time_candidate(slow, tvm.cpu(), None, [()], race="a") == [pytest.approx(2e-4)]
    assert slow.repeats == [3, tuning.RUN_CALLS[0]]
    near = _Timings([1.2e-4])
    tuning._time_candidate(near, tvm.cpu(), None, [()], race="a")
    assert near.repeats == [3, math.ceil(tuning.RUN_SECONDS / 1.2e-4)]
    # a probe disturbed (two of three calls), then ten quiet calls: timed in full
    disturbed = _Timings([5e-4, 5e-4, 9e-5] + [9e-5] * 12)
    assert tuning._time_candidate(disturbed, tvm.cpu(), None, [()], race="a") == [pytest.approx(9e-5)]
    assert disturbed.repeats[:2] == [3, tuning.RUN_CALLS[0]] and len(disturbed.repeats) == 3
    assert tuning._FASTEST == {"a": pytest.approx(9e-5)}  # the fastest reading so far, full or not
    other = _Timings([2e-4])  # another task: its own race
    tuning._time_candidate(other, tvm.cpu(), None, [()], race="b")
    assert other.repeats == [3, math.ceil(tuning.RUN_SECONDS / 2e-4)]
    unkeyed = _Timings([1e-3])
    tuning._time_candidate(unkeyed, tvm.cpu(), None, [()])
    assert unkeyed.repeats == [3, math.ceil(tuning.RUN_SECONDS / 1e-3)] and set(tuning._FASTEST) == {"a", "b"}


def test_distinct_schedules_multiply_categorical_choices_and_give_up_on_any_other_sample() -> None:
    from tvm import te
    from tvm.s_tir import Schedule

    a = te.placeholder((64, 64), name="a")
    sch = Schedule(te.create_prim_func([a, te.compute((64, 64), lambda i, j: a[i, j] * 2, name="b")]))
    two = sch.copy()
    two.sample_categorical([0, 16, 512], [0.34, 0.33, 0.33])
    two.sample_categorical([1, 2], [0.5, 0.5])
    assert tuning.distinct_schedules([sch, two]) == 1 + 6
    tiled = sch.copy()
    tiled.sample_perfect_tile(tiled.get_loops(tiled.get_sblock("b"))[0], n=2)  # MetaSchedule's generic tiling
    assert tuning.distinct_schedules([two, tiled]) is None


def test_the_database_is_parsed_again_only_when_its_files_changed(tmp_path) -> None:
    """A process that tuned in a directory reuses its JSONDatabase while the files are as it left them (the
    latency table opens it once per layer shape: parsing 60 MB each time was most of a TVM search); records
    another process appended are read."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    directory = str(tmp_path)
    first = tuning._open_database(directory)
    tuning._opened[directory] = (first, tuning._files_signature(directory))  # what tune() leaves
    assert tuning._open_database(directory) is first
    a = te.placeholder((8,), name="a")
    mod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((8,), lambda i: a[i] * 2, name="b")])})
    other = ms.database.JSONDatabase(path_workload=os.path.join(directory, tuning.DATABASE_FILES[0]),
                                     path_tuning_record=os.path.join(directory, tuning.DATABASE_FILES[1]))
    other.commit_workload(mod)  # another process's workload
    again = tuning._open_database(directory)
    assert again is not first and again.has_workload(mod) and not first.has_workload(mod)


def test_a_task_a_revised_rule_schedules_has_a_new_ledger_key(monkeypatch) -> None:
    """A database tuned before the Winograd rule gained its tile-group spaces says its tasks are tuned: their ledger
    key carries the rule's revision, so they are tuned again (other tasks keep their keys and records)."""
    from types import SimpleNamespace

    import tvm
    from tvm import te, topi

    from prune_compile.backends.tvm import conv_winograd

    data = te.placeholder((1, 2, 8, 8, 16), name="data")
    weights = te.placeholder((36, 2, 2, 16, 16), name="weights")
    conv = conv_winograd.conv2d_winograd(data, weights, (1, 1, 1, 1), "float32")
    winograd = SimpleNamespace(task_name="conv2d_winograd",
                               dispatched=[tvm.IRModule({"main": te.create_prim_func([data, weights, conv])})])
    plain = SimpleNamespace(task_name="relu",
                            dispatched=[tvm.IRModule({"main": te.create_prim_func([data, topi.nn.relu(data)])})])
    key, plain_key = tuning.task_key(winograd), tuning.task_key(plain)
    assert key.endswith(f":{conv_winograd.RULE}={conv_winograd.SPACES_REVISION}") and plain_key.count(":") == 1
    monkeypatch.setattr(conv_winograd, "SPACES_REVISION", conv_winograd.SPACES_REVISION - 1)
    assert tuning.task_key(winograd) != key and tuning.task_key(plain) == plain_key


def test_one_function_numbered_differently_in_two_models_has_one_ledger_key(tmp_path) -> None:
    """Relax numbers a module's functions: the latency table's one-layer model calls its fused conv
    fused_conv2d_winograd_add_relu, the whole model fused_conv2d_winograd1_add3_relu2, same function. The ledger
    key drops the numbers (the hash says which function it is), so the whole-model build finds the table's trials;
    a ledger written with numbered keys reads as the same families (the larger count where two merge)."""
    from types import SimpleNamespace

    import tvm
    from tvm import te, topi

    data = te.placeholder((1, 2, 8, 8, 16), name="data")
    relu = tvm.IRModule({"main": te.create_prim_func([data, topi.nn.relu(data)])})
    sigmoid = tvm.IRModule({"main": te.create_prim_func([data, topi.sigmoid(data)])})
    table = tuning.task_key(SimpleNamespace(task_name="fused_conv2d_nchwc_add_relu", dispatched=[relu]))
    whole = tuning.task_key(SimpleNamespace(task_name="fused_conv2d_nchwc6_add7_relu4", dispatched=[relu]))
    other = tuning.task_key(SimpleNamespace(task_name="fused_conv2d_nchwc6_add7_relu4", dispatched=[sigmoid]))
    assert table == whole and other != whole and table.startswith("fused_conv2d_nchwc_add_relu:")
    assert tuning.task_family("max_pool2d") == "max_pool2d" and tuning.task_family("layout_transform15") == \
        "layout_transform"
    digest = whole.split(":")[1]
    (tmp_path / tuning.LEDGER).write_text(json.dumps({"trials": {
        f"fused_conv2d_nchwc1_add3_relu2:{digest}": 8, f"fused_conv2d_nchwc6_add7_relu4:{digest}": 24,
        f"conv2d_winograd2:{digest}:prune_compile_conv2d_winograd=3": 16}}))
    assert tuning._load_ledger(str(tmp_path)) == {
        f"fused_conv2d_nchwc_add_relu:{digest}": 24, f"conv2d_winograd:{digest}:prune_compile_conv2d_winograd=3": 16}


@pytest.mark.serial  # tuning times candidates
def test_a_task_is_tuned_for_no_more_schedules_than_its_design_spaces_hold(tmp_path, monkeypatch, capfd) -> None:
    """The tiny model's convs, which our rule schedules, with a budget of 400: no task is asked for more trials than
    its design spaces hold schedules (it once spent five empty search rounds of 15-20 s on every such task, in
    every tuning round), and a larger budget on the same database tunes none of them again. MetaSchedule's task
    tables stay in its logs for such a task too (it is searched for the trials left, its loggers set up again)."""
    import onnx
    from tvm.s_tir import meta_schedule as ms

    from prune_compile.backends.tvm.build import lower_model

    asked: list[tuple[str, int, int | None]] = []  # (task, trials asked for, schedules its spaces hold)
    tune_tasks = ms.tune_tasks

    def spy(**kwargs):
        (context,) = kwargs["tasks"]
        spaces = context.generate_design_space()
        asked.append((context.task_name, kwargs["max_trials_per_task"], tuning.distinct_schedules(spaces)))
        return tune_tasks(**kwargs)

    monkeypatch.setattr(ms, "tune_tasks", spy)
    tiny_model_onnx(str(tmp_path / "tiny.onnx"))
    model = onnx.load(str(tmp_path / "tiny.onnx"))
    db = str(tmp_path / "db")
    summary = lower_model(model, "cpu", tuning=tvm_backend.TuningOptions(trials=400, database=db))[3]
    shown = capfd.readouterr()
    assert "Total latency" not in shown.out + shown.err
    convs = [(name, trials, held) for name, trials, held in asked if "conv2d" in name]
    assert convs and all(held is not None and trials <= held for _, trials, held in convs), convs
    assert summary.trials_run < 400
    # the summary says why: the trials the exhausted tasks' shares held and were not needed
    assert summary.tasks_exhausted >= 1
    assert summary.trials_unneeded > 0 and summary.trials_run + summary.trials_unneeded <= 400
    asked.clear()
    again = lower_model(model, "cpu", tuning=tvm_backend.TuningOptions(trials=800, database=db))[3]
    assert not [name for name, *_ in asked if "conv2d" in name], asked
    assert again.trials_unneeded > 0 and again.to_json()["tasks_exhausted"] == again.tasks_exhausted >= 1


@pytest.mark.serial  # tuning times candidates
def test_a_task_design_spaces_are_generated_once_each_time_it_is_tuned(tmp_path, monkeypatch) -> None:
    """Our rules write a conv's design spaces in Python (0.14 s for a resnet18 conv, 3% of an 8-trial latency-table
    entry): tuning counts a task's schedules on its spaces (`distinct_schedules`) and the search starts from those
    same spaces, instead of MetaSchedule generating them again (twice per task before)."""
    import onnx

    from prune_compile.backends.tvm import conv_nchwc, conv_winograd
    from prune_compile.backends.tvm.build import lower_model

    generated: list[str] = []
    for module in (conv_nchwc, conv_winograd):
        def spy(*args, _rule=module.schedule_rule, _name=module.RULE, **kwargs):
            generated.append(_name)
            return _rule(*args, **kwargs)

        monkeypatch.setattr(module, "schedule_rule", spy)
    runs: list[str] = []
    run = tuning._Session.run

    def counted(self, task, need, key):
        runs.append(task.task_name)
        return run(self, task, need, key)

    monkeypatch.setattr(tuning._Session, "run", counted)
    tiny_model_onnx(str(tmp_path / "tiny.onnx"))
    summary = lower_model(onnx.load(str(tmp_path / "tiny.onnx")), "cpu",
                          tuning=tvm_backend.TuningOptions(trials=48, database=str(tmp_path / "db")))[3]
    convs = [name for name in runs if "conv2d" in name]
    assert conv_winograd.RULE in generated and conv_nchwc.RULE in generated  # both rules' tasks tuned
    assert len(generated) == len(convs), (generated, runs)
    assert summary.trials_valid >= 8


@pytest.mark.serial  # tuning times candidates
def test_each_task_races_its_candidates_against_its_own_fastest(tmp_path, monkeypatch) -> None:
    """Every task is searched with the runner's evaluator keyed by the task's ledger key, and the runner's worker
    keeps each such task's fastest reading, which is at most the best record the database got for it."""
    import onnx
    from tvm.s_tir import meta_schedule as ms

    from prune_compile.backends.tvm.build import lower_model

    raced: dict[str, str] = {}  # task name -> the race key its candidates were timed under
    tune_tasks, run = ms.tune_tasks, tuning._Session.run

    def spy(*args, runner, tasks, **kwargs):
        raced[tasks[0].task_name] = runner.f_run_evaluator.keywords["race"]
        return tune_tasks(*args, runner=runner, tasks=tasks, **kwargs)

    keys: dict[str, str] = {}

    def keyed(self, task, need, key):
        keys[task.task_name] = key
        return run(self, task, need, key)

    monkeypatch.setattr(ms, "tune_tasks", spy)
    monkeypatch.setattr(tuning._Session, "run", keyed)
    tiny_model_onnx(str(tmp_path / "tiny.onnx"))
    summary = lower_model(onnx.load(str(tmp_path / "tiny.onnx")), "cpu",
                          tuning=tvm_backend.TuningOptions(trials=24, database=str(tmp_path / "db")))[3]
    tuned = {t["task"]: t["best_ms"] for t in summary.per_task if t["run"]}
    assert tuned and set(raced) == set(tuned) and all(raced[name] == keys[name] for name in tuned), (raced, keys)
    fastest: dict[str, float] = {}
    for (target_name, rpc, *_), (_, runner) in tuning._WORKERS.items():
        if target_name == "cpu" and rpc is None:
            fastest.update(runner.pool.submit(functools.partial(getattr, tuning, "_FASTEST")).result())
    for name, best_ms in tuned.items():  # at the summary's precision (best_ms is rounded to 6 decimals)
        assert 0 < round(fastest[raced[name]] * 1e3, 6) <= best_ms, (name, fastest, best_ms)


def test_tiny_model_tunes_and_second_build_runs_zero_trials(tmp_path) -> None:
    model = str(tmp_path / "tiny.onnx")
    tiny_model_onnx(model)
    db = str(tmp_path / "db")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.monotonic()
    cli = [sys.executable, "-m", "prune_compile.cli", model]
    first = subprocess.run([*cli, "-o", str(tmp_path / "a"),
                            "--ratio", "0.5", "--target", "cpu", "--tune", "24", "--tune-db", db, "--json"],
                           capture_output=True, text=True, env=env, timeout=900)
    elapsed = time.monotonic() - started
    assert first.returncode == 0, first.stderr[-2000:]
    report = json.loads(first.stdout)  # stdout is the JSON alone: MetaSchedule's tables stay in its logs
    tuning = json.loads((tmp_path / "a" / "timings.json").read_text())["tuning"]["cpu"]  # what this run did
    assert report["targets"]["cpu"]["tuning"]["trials_requested"] == 24
    pipeline = report["targets"]["cpu"]["pipeline"]
    assert PIPELINE.fullmatch(pipeline), pipeline  # auto: blocked for tuned cpu builds
    assert tuning["trials_requested"] == 24 and tuning["tasks_tuned"] >= 1
    assert tuning["trials_run"] >= 8 and tuning["trials_valid"] >= 8
    ran = [t for t in tuning["per_task"] if t["run"]]
    # each task its share, or as many schedules as its design spaces hold (`distinct_schedules`), if fewer
    assert 8 <= sum(t["run"] for t in ran) <= 24 and all(t["best_ms"] > 0 for t in ran)
    assert report["targets"]["cpu"]["verification"]["max_relative_error"] <= RTOL
    assert elapsed < 300, f"tuning the tiny model took {elapsed:.0f} s"

    second = subprocess.run([*cli, "-o", str(tmp_path / "b"),
                             "--ratio", "0.5", "--target", "cpu", "--tune", "24", "--tune-db", db, "--json"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    again = json.loads(second.stdout)["targets"]["cpu"]
    activity = json.loads((tmp_path / "b" / "timings.json").read_text())["tuning"]["cpu"]
    assert activity["trials_run"] == 0 and activity["tasks_tuned"] == 0
    assert again["pipeline"] == pipeline
    # report.json depends on the inputs only, not on how much tuning this run had left to do
    assert (tmp_path / "a" / "report.json").read_bytes() == (tmp_path / "b" / "report.json").read_bytes()
    # Same records applied: the two libraries compute the same function as ONNX Runtime.
    x = {"image": np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    expected = ort.run(str(tmp_path / "b" / "model.pruned.onnx"), x)
    got = tvm_backend.run_library(str(tmp_path / "b" / "model.cpu.so"), x, ["image"])
    assert ort.relative_error(expected, got) <= RTOL
    # The records MetaSchedule committed through our database (tuning_database.py), read by TVM's JSONDatabase:
    # every workload's best schedule is the same module either way.
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from prune_compile.backends.tvm.tuning_database import open_database

    (directory,) = [os.path.join(db, d) for d in os.listdir(db)]
    paths = [os.path.join(directory, f) for f in DATABASE_FILES]
    ours, theirs = open_database(*paths), ms.database.JSONDatabase(*paths)
    assert len(ours) == len(theirs) >= 8
    with open(paths[0]) as f:
        workloads = [ms.database.Workload.from_json(json.loads(line)).mod for line in f]
    target = tvm.target.Target({"kind": "llvm"})
    best = [(ours.query_schedule(mod, target, "main"), theirs.query_schedule(mod, target, "main")) for mod in workloads]
    assert sum(a is not None for a, _ in best) >= 1
    assert all((a is None) == (b is None) and (a is None or tvm_ffi.structural_equal(a.mod, b.mod)) for a, b in best)


def test_a_failing_tuning_task_is_a_backend_error_naming_the_task(tmp_path, monkeypatch) -> None:
    """MetaSchedule's errors reach us as the exception types tvm_ffi maps TVM's errors to; the handler once caught
    `tvm.error.TVMError`, which TVM 0.27 no longer has, so a failing task surfaced as an AttributeError about
    tvm.error instead of the task and its error."""
    import onnx
    from tvm.s_tir import meta_schedule as ms

    from prune_compile.errors import BackendError

    def failing(**kwargs):
        raise ValueError("TensorRegion pattern match failed: v_cb % 2 * 8 + v_c")

    monkeypatch.setattr(ms, "tune_tasks", failing)
    tiny_model_onnx(str(tmp_path / "tiny.onnx"))
    with pytest.raises(BackendError, match=r"MetaSchedule failed on task \w+: .*pattern match failed"):
        tvm_backend.build(onnx.load(str(tmp_path / "tiny.onnx")), "cpu", str(tmp_path / "m.so"),
                          tuning=tvm_backend.TuningOptions(trials=8, database=str(tmp_path / "db")))
    assert not (tmp_path / "m.so").exists()


def test_meta_schedules_logger_setup_runs_with_foreign_handlers_on_its_logger(tmp_path) -> None:
    """MetaSchedule's per-task logger setup (dictConfig) crashes on handlers it did not create: CI hit it on
    pytest's unnamed capture handlers. Tuning runs it with those detached, and puts them back afterwards. (The
    in-process tuning in test_tuning_measures_through_an_rpc_tracker goes through it with pytest's handlers.)"""
    import logging

    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    from prune_compile.backends.tvm.tuning import MS_LOGGER, _own_handlers_only

    logger = logging.getLogger(MS_LOGGER)
    unnamed, named = logging.NullHandler(), logging.NullHandler()
    named.set_name("my-app")
    for handler in (unnamed, named):
        logger.addHandler(handler)
        try:
            for run in ("a", "b"):  # the second setup also sees the first one's handlers
                with _own_handlers_only():
                    get_loggers_from_work_dir(str(tmp_path / run), ["task"])
                assert handler in logger.handlers
            with pytest.raises((AttributeError, ValueError)):  # what the setup does without the guard
                get_loggers_from_work_dir(str(tmp_path / "bare"), ["task"])
        finally:
            logger.removeHandler(handler)


@pytest.mark.big
def test_tuning_measures_through_an_rpc_tracker(tmp_path) -> None:
    """The runner path used for real boards: a tracker and a server on loopback, candidates measured remotely."""
    import onnx

    model = str(tmp_path / "tiny.onnx")
    tiny_model_onnx(model)
    with rpc_board("test-board") as port:
        options = tvm_backend.TuningOptions(trials=8, database=str(tmp_path / "db"),
                                            rpc=tvm_backend.RPCSettings(f"127.0.0.1:{port}", "test-board"))
        result = tvm_backend.build(onnx.load(model), "cpu", str(tmp_path / "m.so"), tuning=options)
    assert result.tuning["trials_valid"] >= 4  # measured on the RPC server (failed candidates do not count)
    x = {"image": np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    assert ort.relative_error(ort.run(model, x), tvm_backend.run_library(result.path, x, ["image"])) <= RTOL
