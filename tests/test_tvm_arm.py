"""ARM: cross-compile a pruned model for aarch64 and run it under qemu user-mode emulation with an arm64 Python and
the arm64 TVM runtime wheel; outputs must equal the x86 build's. The test installs what it needs
(tools/setup_arm_emulation.sh: apt packages, an arm64 sysroot outside the repository)."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from prune_compile.api import run
from prune_compile.backends import ort
from prune_compile.backends import tvm as tvm_backend

from .rpc_board import qemu_python, rpc_board

ROOT = os.path.join(os.path.dirname(__file__), "..")
DEFAULT_MODEL = os.path.join(ROOT, "prune_compile", "data", "default_model.onnx")

RUNNER = """
import sys, numpy as np, tvm
from tvm import relax
lib, x_path, out_path = sys.argv[1:4]
vm = relax.VirtualMachine(tvm.runtime.load_module(lib), tvm.cpu())
out = vm["main"](tvm.runtime.tensor(np.load(x_path), tvm.cpu()))
np.save(out_path, out.numpy())
"""


def _run_under_qemu(tmp_path, arm_sysroot: str, library: str, x: np.ndarray) -> np.ndarray:
    """The library's output for `x` from an aarch64 Python and TVM runtime under qemu."""
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "runner.py").write_text(RUNNER)
    python, env = qemu_python(arm_sysroot, str(tmp_path))
    proc = subprocess.run([python, str(tmp_path / "runner.py"), library, str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(tmp_path / "y.npy")


@pytest.mark.big
def test_pruned_model_cross_compiled_for_arm_runs_under_qemu_like_x86(tmp_path, arm_sysroot: str) -> None:
    out = tmp_path / "out"
    result = run(DEFAULT_MODEL, out, ratio=0.5, targets=["arm", "cpu"],
                 target_options=tvm_backend.TargetOptions(arm_board="rasp4"))
    assert "aarch64-linux-gnu" in result.report["targets"]["arm"]["target"]
    assert "cortex-a72" in result.report["targets"]["arm"]["target"]
    library = (out / "model.arm.so").read_bytes()
    assert library[:4] == b"\x7fELF" and int.from_bytes(library[18:20], "little") == 183  # EM_AARCH64
    assert b"prune_compile_parallel_launch\0" in library  # it carries our launcher, as cpu libraries do

    x = np.random.default_rng(5).standard_normal((1, 3, 64, 64)).astype(np.float32)
    arm_out = _run_under_qemu(tmp_path, arm_sysroot, str(out / "model.arm.so"), x)
    x86_out = tvm_backend.run_library(str(out / "model.cpu.so"), {"image": x}, ["image"])[0]
    assert ort.relative_error([x86_out], [arm_out]) <= 1e-5
    assert ort.relative_error(ort.run(str(out / "model.pruned.onnx"), {"image": x}), [arm_out]) <= 1e-4


@pytest.mark.big
@pytest.mark.serial  # tuning times candidates on the emulated board
def test_arm_tuning_measures_on_an_aarch64_board_over_rpc(tmp_path, arm_sysroot: str) -> None:
    """`--target arm --tune N --rpc-tracker ... --rpc-key ...`: candidates cross-compiled here, timed on the board
    (an aarch64 Python and TVM under qemu behind a tracker on loopback), and the tuned library computes what ONNX
    Runtime computes on the pruned model. The generic board gives no core count: tuning needs --num-cores."""
    out = tmp_path / "out"
    python, env = qemu_python(arm_sysroot, str(tmp_path))
    with rpc_board("aarch64-board", python, env, timeout=300) as port:
        result = run(DEFAULT_MODEL, out, ratio=0.5, targets=["arm"], tune=8, tune_db=tmp_path / "db",
                     rpc=tvm_backend.RPCSettings(f"127.0.0.1:{port}", "aarch64-board"),
                     target_options=tvm_backend.TargetOptions(num_cores=2))
    tuning = result.timings["tuning"]["arm"]  # what this run did (timings.json)
    assert tuning["trials_run"] == 8 and tuning["trials_valid"] >= 4, tuning
    x = np.random.default_rng(6).standard_normal((1, 3, 64, 64)).astype(np.float32)
    arm_out = _run_under_qemu(tmp_path, arm_sysroot, str(out / "model.arm.so"), x)
    assert ort.relative_error(ort.run(str(out / "model.pruned.onnx"), {"image": x}), [arm_out]) <= 1e-4


@pytest.mark.big
@pytest.mark.parametrize("op, kwargs", [("LSTM", {"peepholes": False, "hidden": 37}),
                                        ("GRU", {"hidden": 37}), ("RNN", {"activations": ["Relu", "Relu"]})])
def test_recurrent_steps_kernel_cross_compiled_for_arm_agrees_with_onnx_runtime(tmp_path, arm_sysroot: str, op: str,
                                                                                kwargs: dict) -> None:
    """The one-kernel recurrence (recurrent_steps.py) on aarch64: 64-column passes of NEON registers and a tail,
    directions on two threads."""
    from .test_recurrent_unroll import _feeds, _model

    model = _model(op, "bidirectional", outputs=("y",), **kwargs)  # (the runner saves one output)
    library = str(tmp_path / "steps.arm.so")
    tvm_backend.build(model, "arm", library)
    assert f"{op.lower()}_steps".encode() in open(library, "rb").read()  # the kernel, not the unrolled steps
    x = _feeds(model)["x"]
    arm_out = _run_under_qemu(tmp_path, arm_sysroot, library, x)
    assert ort.relative_error(ort.run(model, {"x": x}), [arm_out]) <= 1e-5


@pytest.mark.big
def test_vector_math_cross_compiled_for_arm_agrees_with_onnx_runtime(tmp_path, arm_sysroot: str) -> None:
    """exp, tanh and erf as vector arithmetic (vector_math.py) in NEON registers, libm's scalar functions unused."""
    from .test_tvm_vector_math import chained_model

    model = chained_model(["SiLU", "Tanh", "GELU via Erf", "Softmax over channels"], [1, 8, 12, 20],
                          conv_channels=32, scale=8.0)
    library = str(tmp_path / "activations.arm.so")
    tvm_backend.build(model, "arm", library)
    assert not any(f"\0{name}\0".encode() in open(library, "rb").read() for name in ("expf", "tanhf", "erff"))
    x = np.random.default_rng(6).standard_normal((1, 8, 12, 20)).astype(np.float32)
    arm_out = _run_under_qemu(tmp_path, arm_sysroot, library, x)
    assert ort.relative_error(ort.run(model, {"input": x}), [arm_out]) <= 1e-4
