"""End-to-end CLI: outputs, determinism, exit codes, and no half-written files on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from prune_compile.cli import main

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "prune_compile", "data", "default_model.onnx")
OUTPUTS = ["model.pruned.onnx", "plan.json", "report.html", "report.json", "timings.json"]


def _cli(*args: str) -> int:
    return main(list(args))


def test_default_model_writes_pruned_onnx_and_report(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert _cli(DEFAULT_MODEL, "-o", str(out), "--ratio", "0", "--target", "none") == 0
    assert sorted(os.listdir(out)) == OUTPUTS
    report = json.loads((out / "report.json").read_text())
    assert report["graph"]["opaque"] == 0
    assert report["verification"]["max_relative_error"] <= 1e-5
    assert report["input_shapes"] == {"image": [1, 3, 64, 64]}
    model = onnx.load(out / "model.pruned.onnx")
    onnx.checker.check_model(model)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("options", [[], ["--ratio", "0.4", "--policy", "sensitivity", "--round-to", "4"],
                                     ["--target-macs", "2", "--policy", "global", "--importance", "random"]])
def test_outputs_are_byte_identical_across_runs(tmp_path, options) -> None:
    for name in ("a", "b"):
        assert _cli(DEFAULT_MODEL, "-o", str(tmp_path / name), "-q", *options) == 0
    # timings.json is the one file that may differ (times, timestamp); the html shows no timings when none measured
    for f in ("model.pruned.onnx", "plan.json", "report.json", "report.html"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert json.loads((tmp_path / "a" / "timings.json").read_text())["format"] == "prune-compile.timings/1"


def test_torch_factory_model_and_json_output(tmp_path, capsys) -> None:
    code = _cli("torchvision.models:squeezenet1_1", "-o", str(tmp_path / "o"), "--input-shape", "x=1,3,64,64",
                "--json")
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["kind"] == "torch"
    assert report["verification"]["max_relative_error"] <= 1e-5


def test_console_script_runs_as_a_process(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "prune_compile.cli", DEFAULT_MODEL, "-o", str(tmp_path / "o"),
                           "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outputs"]["onnx"] == "model.pruned.onnx"


def test_the_cli_imports_no_engine_before_a_run_needs_one() -> None:
    """Starting costs 0.2 s; importing TVM alone costs 2.5 s (a module of the TVM backend that imported it at load
    time made every run pay it, `--help` and ONNX-only runs too)."""
    code = ("import sys, prune_compile.cli, prune_compile.api, prune_compile.backends.tvm.tuning; "
            "print(sorted(m for m in ('tvm', 'torch', 'onnxruntime') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)


def _dynamic_model(path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def _custom_domain_model(path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="org.acme", name="frob")],
                              "g", [x], [y])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("org.acme", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), path)


def _truncated(path) -> None:
    data = open(DEFAULT_MODEL, "rb").read()
    path.write_bytes(data[: len(data) // 3])


def _wrong_type(path) -> None:
    path.write_text("not a model")


@pytest.mark.parametrize("make,name,extra,code,message", [
    (_truncated, "cut.onnx", [], 3, "not a readable ONNX model"),
    (_wrong_type, "model.txt", [], 2, "unknown model file type"),
    (_custom_domain_model, "custom.onnx", [], 3, "'org.acme'"),
    (_dynamic_model, "dyn.onnx", [], 3, "dynamic dim 'batch'.*--input-shape x=N,4"),
    (_dynamic_model, "dyn.onnx", ["--input-shape", "x=2,4"], 0, ""),
    (_dynamic_model, "dyn.onnx", ["--input-shape", "x=2"], 2, "rank 1"),
    (_dynamic_model, "dyn.onnx", ["--input-shape", "x=a,b"], 2, "integers"),
    (None, "missing.onnx", [], 2, "does not exist"),
    (None, "not_a_module_anywhere:factory", [], 2, "cannot import module"),
    (_dynamic_model, "dyn.onnx", ["--input-shape", "x=2,4", "--ratio", "1.0"], 2, r"--ratio 1.0: must be in \[0, 1\)"),
    (_dynamic_model, "dyn.onnx", ["--input-shape", "x=2,4", "--ratio", "-0.1"], 2, "must be in"),
])
def test_bad_input_gives_one_line_error_exit_code_and_no_outputs(tmp_path, capsys, make, name, extra, code,
                                                                  message) -> None:
    import re

    path = tmp_path / name
    if make is not None:
        make(path)
    out = tmp_path / "out"
    spec = str(path) if make is not None or name.endswith(".onnx") else name
    assert _cli(spec, "-o", str(out), *extra) == code
    err = capsys.readouterr().err
    if code:
        assert err.startswith("prune-compile: error:") and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), err
        assert "Traceback" not in err
        assert not out.exists(), "a failed run must leave no output directory behind"
    else:
        assert sorted(os.listdir(out)) == OUTPUTS


def test_output_path_that_is_a_file_is_a_usage_error(tmp_path, capsys) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    assert _cli(DEFAULT_MODEL, "-o", str(target)) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_pruning_writes_plan_and_passes_the_oracle(tmp_path) -> None:
    out = tmp_path / "o"
    assert _cli(DEFAULT_MODEL, "-o", str(out), "--ratio", "0.5", "-q") == 0
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert report["pruning"]["pruned_groups"] > 0
    assert report["cost"]["macs_ratio"] > 2.5
    assert report["verification"]["exact"] and report["verification"]["max_relative_error"] <= 1e-4
    removed = [g for g in plan["groups"] if g["removed"]]
    assert removed and all(g["prunable"] for g in removed)
    # Names are the input model's own initializer names, checkable against the original file.
    names = {i.name for i in onnx.load(DEFAULT_MODEL).graph.initializer}
    assert all(m["param"] in names for g in plan["groups"] for m in g["members"])
    # Each parameter shrinks along each axis by what the groups touching it removed there (a consumer can read
    # several groups, e.g. after a concat).
    removed_per_axis: dict[tuple[str, int], set[int]] = {}
    for g in removed:
        for m in g["members"]:
            removed_per_axis.setdefault((m["param"], m["axis"]), set()).update(m["removed"])
    original = {i.name: i for i in onnx.load(DEFAULT_MODEL).graph.initializer}
    pruned = {i.name: i for i in onnx.load(out / "model.pruned.onnx").graph.initializer}
    for (param, axis), idx in removed_per_axis.items():
        assert pruned[param].dims[axis] == original[param].dims[axis] - len(idx), (param, axis)


def test_policy_options_reach_the_report(tmp_path, capsys) -> None:
    out = tmp_path / "o"
    assert _cli(DEFAULT_MODEL, "-o", str(out), "--policy", "global", "--importance", "bn_scale", "--round-to", "8",
                "--target-macs", "2.5", "--ignore", "nothing.matches.*", "-q") == 0
    err = capsys.readouterr().err
    assert "warning: --ignore nothing.matches.* matches no parameter" in err
    pruning = json.loads((out / "report.json").read_text())["pruning"]
    assert pruning["policy"] == "global" and pruning["importance"] == "bn_scale" and pruning["round_to"] == 8
    assert pruning["warnings"] and pruning["target_macs"] == 2.5
    macs_ratio = json.loads((out / "report.json").read_text())["cost"]["macs_ratio"]
    assert macs_ratio >= 2.5 * 0.98


def test_sensitivity_policy_reports_curves(tmp_path) -> None:
    out = tmp_path / "o"
    assert _cli(DEFAULT_MODEL, "-o", str(out), "--policy", "sensitivity", "--target-macs", "2", "-q") == 0
    report = json.loads((out / "report.json").read_text())
    curves = report["pruning"]["sensitivity"]["curves"]
    assert len(curves) == report["pruning"]["prunable"]
    assert all(c["ratios"] and len(c["damage"]) == len(c["ratios"]) == len(c["macs_saved"]) for c in curves)
    assert abs(report["cost"]["macs_ratio"] / 2 - 1) <= 0.02
    assert report["verification"]["max_relative_error"] <= 1e-4


@pytest.mark.parametrize("args,needle", [(["--round-to", "0"], "--round-to"), (["--override", "conv*"], "--override"),
                                         (["--override", "conv*=1.5"], "--override"),
                                         (["--target-macs", "0.5"], "--target-macs"),
                                         (["--max-ratio", "1.0"], "--max-ratio"),
                                         (["--policy", "global", "--target-macs", "900"], "unreachable")])
def test_planning_option_errors_exit_2(tmp_path, capsys, args, needle) -> None:
    assert _cli(DEFAULT_MODEL, "-o", str(tmp_path / "o"), *args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_gpu_without_nvcc_exits_4_naming_the_toolkit(tmp_path, capsys, monkeypatch) -> None:
    from prune_compile.backends.tvm import targets

    monkeypatch.setattr(targets, "find_nvcc", lambda: None)
    assert _cli(DEFAULT_MODEL, "-o", str(tmp_path / "o"), "--target", "gpu") == 4
    err = capsys.readouterr().err
    assert "nvcc" in err and "nvidia-cuda-toolkit" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needle", [(["--target", "gpu", "--gpu-arch", "volta"], "--gpu-arch"),
                                         (["--target", "cpu", "--tune", "-1"], "--tune"),
                                         (["--target", "cpu", "--rpc-tracker", "localhost:9190"], "--rpc-key"),
                                         (["--target", "cpu", "--rpc-tracker", "nohost", "--rpc-key", "k"],
                                          "HOST:PORT"),
                                         # the generic board has no core count, which tuning a CPU needs
                                         (["--target", "arm", "--tune", "8", "--rpc-tracker", "localhost:9190",
                                           "--rpc-key", "k"], "--num-cores")])
@pytest.mark.parametrize("model", ["default", "missing"])
def test_backend_option_errors_exit_2(tmp_path, capsys, monkeypatch, args, needle, model) -> None:
    """Before any work: with a model path that does not exist, the option error still comes first."""
    from prune_compile.backends.tvm import targets

    # toolchains present: the option is at fault
    monkeypatch.setattr(targets, "find_nvcc", lambda: "/usr/bin/true")
    which = targets.shutil.which
    monkeypatch.setattr(targets.shutil, "which", lambda name: "/usr/bin/true" if name == targets.ARM_CROSS_COMPILER
                        else which(name))
    path = DEFAULT_MODEL if model == "default" else str(tmp_path / "missing.onnx")
    assert _cli(path, "-o", str(tmp_path / "o"), *args) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_arm_without_cross_compiler_exits_4_naming_the_package(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no aarch64-linux-gnu-gcc on this PATH
    assert _cli(DEFAULT_MODEL, "-o", str(tmp_path / "o"), "--target", "arm") == 4
    err = capsys.readouterr().err
    assert "apt-get install gcc-aarch64-linux-gnu" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".so")]


def test_argparse_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        _cli(DEFAULT_MODEL)  # no -o
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        _cli(DEFAULT_MODEL, "-o", "x", "--target", "tpu")
    assert e.value.code == 2


def test_pt2_exported_program(tmp_path, capsys) -> None:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    model.eval()
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 6, 6),)), str(path))
    assert _cli(str(path), "-o", str(tmp_path / "o"), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["kind"] == "torch"
    assert report["input_shapes"] == {"input": [1, 3, 6, 6]}
    assert report["verification"]["max_relative_error"] <= 1e-5
    assert _cli(str(path), "-o", str(tmp_path / "p"), "--input-shape", "input=1,3,8,8") == 2
    assert "fixed at export" in capsys.readouterr().err


def test_json_stdout_holds_only_the_report_whatever_the_libraries_print(tmp_path, capfd, monkeypatch) -> None:
    # onnx-graphsurgeon printed its warnings on stdout; a library printing from C writes to fd 1 directly.
    from prune_compile.ir import onnx_importer

    fold = onnx_importer._fold_constants

    def noisy_fold(*args, **kwargs):
        print("[W] a library's warning")
        os.write(1, b"a C library's chatter\n")
        return fold(*args, **kwargs)

    monkeypatch.setattr(onnx_importer, "_fold_constants", noisy_fold)
    assert _cli(DEFAULT_MODEL, "-o", str(tmp_path / "o"), "--ratio", "0.5", "--json") == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["pruning"]["ratio"] == 0.5
    assert "a library's warning" in err and "a C library's chatter" in err
    assert _cli(DEFAULT_MODEL, "-o", str(tmp_path / "p"), "--ratio", "0.5") == 0
    out, _ = capfd.readouterr()
    assert out.startswith("model ") and "chatter" not in out


def test_no_winograd_reaches_the_tvm_target_options() -> None:
    from prune_compile import cli

    parser = cli.build_parser()
    assert cli._target_options(parser.parse_args(["m.onnx", "-o", "out"])).winograd is True
    assert cli._target_options(parser.parse_args(["m.onnx", "-o", "out", "--no-winograd"])).winograd is False
