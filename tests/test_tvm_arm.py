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
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(os.environ, PYTHONPATH=os.path.join(arm_sysroot, "site"), PYTHONNOUSERSITE="1")
    env.pop("PYTHONHOME", None)
    proc = subprocess.run(["qemu-aarch64-static", "-L", arm_sysroot, os.path.join(arm_sysroot, "usr/bin/python3.11"),
                           str(tmp_path / "runner.py"), str(out / "model.arm.so"), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    arm_out = np.load(tmp_path / "y.npy")
    x86_out = tvm_backend.run_library(str(out / "model.cpu.so"), {"image": x}, ["image"])[0]
    assert ort.relative_error([x86_out], [arm_out]) <= 1e-5
    assert ort.relative_error(ort.run(str(out / "model.pruned.onnx"), {"image": x}), [arm_out]) <= 1e-4
