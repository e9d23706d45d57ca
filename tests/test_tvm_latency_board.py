"""The latency policy measured on a board over TVM's RPC (`--latency-engine tvm --rpc-tracker ... --rpc-key ...`,
and `--latency-engine tvm-arm`): layers tuned with tuning's RPC runner, whole models exported as the build exports
them and timed by the board's time evaluator. A tracker and a server on loopback stand in for the board: this
machine's Python, or an aarch64 one under qemu."""

from __future__ import annotations

import json

import pytest

from prune_compile.errors import UsageError
from prune_compile.ir import export_onnx
from prune_compile.passes.policy import PlanningOptions, make_plan

from .oracle import oracle_error
from .rpc_board import free_port, qemu_python, rpc_board
from .test_cli import DEFAULT_MODEL
from .test_latency_policy import _one_group_net


def _plan_on_board(timer, target_latency: float):
    """make_plan with `timer` on _one_group_net; None when its 2-step trajectory cannot reach the target (a noisy
    machine), after the mechanics ran."""
    graph, deps, feeds = _one_group_net()
    options = PlanningOptions(policy="latency", target_latency=target_latency, latency_engine="tvm",
                              latency_trials=8)
    try:
        result = make_plan(graph, deps, options, calibration=feeds, latency_timer=timer)
    except UsageError as e:
        assert "unreachable" in str(e)
        return None
    assert oracle_error(graph, deps, result.plan, feeds) <= 1e-4
    return result


@pytest.mark.big
@pytest.mark.serial  # tuning and timing on the stand-in board, this machine's cores
def test_tvm_latency_engine_measures_layers_and_models_on_an_rpc_device(tmp_path, monkeypatch) -> None:
    """Nothing runs here: an executable run in this process would be JIT-compiled, and that raises; the layers'
    records land in the database of a remote device (no local thread count in its key)."""
    import tvm

    from prune_compile.backends.tvm.latency_timer import TvmTimer
    from prune_compile.backends.tvm.targets import DEFAULT_OPTIONS, make_target
    from prune_compile.backends.tvm.tuning import RPCSettings, database_dir

    def no_local_runs(self):
        raise AssertionError("a model ran in this process, not on the RPC device")

    monkeypatch.setattr(tvm.runtime.Executable, "jit", no_local_runs)
    db = tmp_path / "db"
    with rpc_board("board") as port:
        timer = TvmTimer(database=str(db), trials_per_layer=8, rpc=RPCSettings(f"127.0.0.1:{port}", "board"))
        result = _plan_on_board(timer, 0.7)
    assert timer.layers_tuned == 4 and timer.trials_run > 0 and timer.models_timed >= 2  # 2 layers x kept {16, 8}
    if result is not None:
        assert result.latency["engine"] == "tvm-cpu"
        assert result.latency["measured_on"] == f"RPC device 'board' at tracker 127.0.0.1:{port}"
        assert result.latency["tuning_trials_run"] == timer.trials_run
    target = make_target("cpu", DEFAULT_OPTIONS)
    assert [p.name for p in db.iterdir()] == [database_dir(str(db), "cpu", str(target), None).rsplit("/", 1)[1]]


@pytest.mark.big
@pytest.mark.serial  # tuning times candidates on the emulated board
def test_tvm_arm_latency_engine_plans_on_an_aarch64_board(tmp_path, arm_sysroot: str, capsys) -> None:
    """`--latency-engine tvm-arm`: an aarch64 board under qemu measures every layer and whole model (an aarch64
    library cannot run here), the arm library of the chosen plan is built from the same database, and
    `--measure-latency` times it and the original's on the board."""
    import onnx

    from prune_compile.cli import main

    graph, _, _ = _one_group_net()
    model = tmp_path / "net.onnx"
    onnx.save(export_onnx(graph), model)
    out = tmp_path / "out"
    python, env = qemu_python(arm_sysroot, str(tmp_path))
    with rpc_board("aarch64-board", python, env, timeout=300) as port:
        rc = main([str(model), "-o", str(out), "--policy", "latency", "--target-latency", "0.7x", "--latency-engine",
                   "tvm-arm", "--latency-trials", "8", "--num-cores", "2", "--tune-db", str(tmp_path / "db"),
                   "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "aarch64-board", "--target", "arm",
                   "--tune", "16", "--measure-latency"])
    shown = capsys.readouterr()
    assert rc == 0 or (rc == 2 and "unreachable" in shown.err), shown.err  # 2 steps may not reach 0.7x (noise)
    if rc == 0:
        assert f"ms on RPC device 'aarch64-board' at tracker 127.0.0.1:{port} for target" in shown.out
        planning = json.loads((out / "timings.json").read_text())["planning"]
        assert planning["engine"] == "tvm-arm" and planning["table_entries"] == 4, planning
        assert planning["measured_on"] == f"RPC device 'aarch64-board' at tracker 127.0.0.1:{port}"
        assert planning["tuning_trials_run"] > 0 and planning["models_timed"] >= 2
        assert (out / "model.arm.so").read_bytes()[:4] == b"\x7fELF"
        timings = json.loads((out / "timings.json").read_text())
        # the whole-model builds of the search tuned every task of the chosen plan on the board already
        assert timings["tuning"]["arm"]["trials_run"] == 0
        # --measure-latency: both arm libraries timed on the board (this machine's FMA peak says nothing there)
        board = timings["engines"]["tvm-arm"]
        assert board["measured_on"] == planning["measured_on"] and "fma_peak_fraction" not in board
        assert board["before"]["runs"] >= 7 and board["after"]["median_ms"] < board["before"]["median_ms"], board
        assert f"runs on RPC device 'aarch64-board' at tracker 127.0.0.1:{port})" in shown.out


def test_cli_tvm_arm_latency_engine_needs_a_board(tmp_path, capsys) -> None:
    from prune_compile.cli import main

    args = [DEFAULT_MODEL, "-o", str(tmp_path / "e"), "--policy", "latency", "--target-latency", "0.5x",
            "--latency-engine", "tvm-arm"]
    assert main(args) == 2
    assert "--latency-engine tvm-arm measures on the board: pass --rpc-tracker" in capsys.readouterr().err
    assert main([*args, "--rpc-tracker", "127.0.0.1:9190", "--rpc-key", "board"]) == 2  # generic board: no cores
    assert "tvm-arm tunes every layer it times: --tune for --target arm needs the board's core count: pass " \
           "--num-cores N" in capsys.readouterr().err
    assert main(["--latency-engine", "tvm-arm", "--policy", "uniform", *args[:3], "--ratio", "0.5"]) == 2
    assert "policy 'uniform' does not measure latency" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_an_absent_tracker_or_device_exits_2_before_any_work(tmp_path, capsys) -> None:
    """TVM's client retries an absent tracker every 5 s for as long as the run lasts, and a request for a key no
    server has waits for good: both are said up front (tuning over RPC as well as the latency engine)."""
    from prune_compile.cli import main

    out = tmp_path / "e"
    args = [DEFAULT_MODEL, "-o", str(out), "--policy", "latency", "--target-latency", "0.5x", "--latency-engine",
            "tvm", "--rpc-key", "board", "--rpc-tracker"]
    assert main([*args, f"127.0.0.1:{free_port()}"]) == 2
    assert "no tracker answers there" in capsys.readouterr().err
    with rpc_board("board") as port:
        assert main([*args, f"127.0.0.1:{port}", "--rpc-key", "other"]) == 2
        assert "--rpc-key other: no device registered under it at tracker 127.0.0.1:" in capsys.readouterr().err
        assert main([DEFAULT_MODEL, "-o", str(out), "--target", "cpu", "--tune", "8", "--rpc-tracker",
                     f"127.0.0.1:{port}", "--rpc-key", "other"]) == 2
        assert "(registered: board)" in capsys.readouterr().err
    assert not out.exists()
