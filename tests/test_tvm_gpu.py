"""GPU target: compile for sm_90 with embedded device code (a fatbin nvcc made for that architecture, not CUDA
source left for the deployment machine). Runs only where a GPU and a CUDA-enabled TVM runtime exist."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import onnx
import pytest

from prune_compile.backends import tvm as tvm_backend
from prune_compile.backends.tvm.cuda_embed import FATBIN_MAGIC, library_blob, read_cuda_entry
from prune_compile.backends.tvm.targets import find_nvcc

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "prune_compile", "data", "default_model.onnx")
needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="no CUDA toolkit (nvcc) on this machine")


@needs_nvcc
def test_gpu_library_embeds_an_sm90_fatbin(tmp_path) -> None:
    path = str(tmp_path / "model.gpu.so")
    result = tvm_backend.build(onnx.load(DEFAULT_MODEL), "gpu", path,
                               tvm_backend.TargetOptions(gpu_arch="sm_90"))
    assert result.device_code["format"] == "fatbin" and result.device_code["arch"] == "sm_90"
    fmt, code = read_cuda_entry(library_blob(path))
    assert fmt == "fatbin"
    assert int.from_bytes(code[:4], "little") == FATBIN_MAGIC
    assert b"__global__" not in code  # device code, not CUDA source
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(os.path.realpath(find_nvcc())),
                                                            "cuobjdump")
    if os.access(cuobjdump, os.X_OK):
        fatbin = tmp_path / "kernels.fatbin"
        fatbin.write_bytes(code)
        listing = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", str(fatbin)], capture_output=True,
                                 text=True, timeout=120)
        assert listing.returncode == 0, listing.stderr
        assert "sm_90" in listing.stdout  # SASS for the requested architecture
        assert ".ptx" in listing.stdout  # and PTX for newer GPUs


def test_gpu_arch_is_validated() -> None:
    from prune_compile.errors import UsageError

    with pytest.raises(UsageError, match="sm_XX"):
        tvm_backend.target_dict("gpu", tvm_backend.TargetOptions(gpu_arch="hopper"))


def _cuda_runtime_available() -> bool:
    try:
        tvm_backend.cuda_device()
        return True
    except Exception:
        return False


@needs_nvcc
@pytest.mark.skipif(not _cuda_runtime_available(), reason="no GPU or no CUDA-enabled TVM runtime here")
def test_gpu_library_runs_and_matches_onnx_runtime(tmp_path) -> None:  # pragma: no cover - GPU machines only
    from prune_compile.backends import ort

    path = str(tmp_path / "model.gpu.so")
    tvm_backend.build(onnx.load(DEFAULT_MODEL), "gpu", path)
    x = {"image": np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    got = tvm_backend.run_library(path, x, ["image"], device="cuda")
    assert ort.relative_error(ort.run(DEFAULT_MODEL, x), got) <= 1e-4


def test_loading_for_cuda_names_what_is_missing(tmp_path, monkeypatch) -> None:
    """Where TVM's CUDA runtime cannot load (no driver, no libcudart, an install without the CUDA sidecar): a
    BackendError naming the missing piece, not a crash or a CPU fallback. The sidecar's absence is simulated, so
    this runs on every machine; on one without a GPU the real load fails the same way."""
    import tvm
    import tvm_ffi

    from prune_compile.errors import BackendError

    path = str(tmp_path / "model.cpu.so")
    tvm_backend.build(onnx.load(DEFAULT_MODEL), "cpu", path)
    if not _cuda_runtime_available():
        with pytest.raises(BackendError, match=r"CUDA (runtime cannot be loaded: .*libcud|device)"):
            tvm_backend.load_library(path, "cuda")
    real = tvm_ffi.get_global_func
    monkeypatch.setattr(tvm_ffi, "get_global_func", lambda name, allow_missing=False:
                        None if name == "device_api.cuda" else real(name, allow_missing=allow_missing))
    monkeypatch.setattr(tvm.libinfo, "find_libtvm_runtime", lambda: str(tmp_path / "libtvm_runtime.so"))
    with pytest.raises(BackendError, match=r"CUDA runtime cannot be loaded: .*libtvm_runtime_cuda\.so"):
        tvm_backend.load_library(path, "cuda")
