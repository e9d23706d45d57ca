"""The cpu target runs on this machine: features the CPU's name implies but the kernel does not list (a hypervisor
hides AVX-512 from a Zen 4 guest) are turned off, so compiled code never meets an instruction the CPU refuses."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from prune_compile.host_cpu import _ISA, cpu_flags, hidden_features, l2_bytes_per_core

# A Zen 4 guest's /proc/cpuinfo (flags trimmed to the instruction sets) and what LLVM's "znver4" implies.
ZEN4_GUEST = ("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: fpu sse sse2 pni pclmulqdq ssse3 fma cx16 "
              "sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand lahf_lm abm sse4a bmi1 avx2 bmi2 adx sha_ni vaes "
              "vpclmulqdq\n")
ZNVER4 = {"adx", "aes", "avx", "avx2", "avx512bf16", "avx512bitalg", "avx512bw", "avx512cd", "avx512dq", "avx512f",
          "avx512ifma", "avx512vbmi", "avx512vbmi2", "avx512vl", "avx512vnni", "avx512vpopcntdq", "bmi", "bmi2",
          "cx16", "f16c", "fma", "gfni", "lzcnt", "movbe", "pclmul", "popcnt", "rdrnd", "sahf", "sha", "sse4.1",
          "sse4.2", "sse4a", "ssse3", "vaes", "vpclmulqdq", "xsave", "64bit"}
ZEN4_HOST = ZEN4_GUEST.replace("vpclmulqdq\n", "vpclmulqdq avx512f avx512dq avx512cd avx512bw avx512vl avx512ifma "
                               "avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg avx512_vpopcntdq avx512_bf16 gfni\n")


def test_what_a_hypervisor_hides_is_turned_off() -> None:
    assert hidden_features(ZNVER4, cpu_flags(ZEN4_GUEST)) == sorted(
        [f for f in ZNVER4 if f.startswith("avx512")] + ["gfni"])


def test_nothing_is_turned_off_on_the_chip_itself_or_without_flags() -> None:
    assert hidden_features(ZNVER4, cpu_flags(ZEN4_HOST)) == []  # names as the kernel writes them (avx512_vnni)
    assert hidden_features(ZNVER4, None) == []
    assert hidden_features({"xsave", "64bit", "cx16"}, set()) == []  # not instruction sets a kernel is built with


def test_the_cpu_target_asks_only_for_what_this_machine_lists() -> None:
    from tvm.target import codegen

    from prune_compile.backends.tvm.targets import make_target
    from prune_compile.host_cpu import is_x86

    flags = cpu_flags()
    assert flags is not None and is_x86()  # the machines this runs on: Linux, x86-64
    target = make_target("cpu")
    features = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    assert hidden_features(features, flags) == []
    assert {f for f in features if f in _ISA or f.startswith("avx512")}  # the check saw the features at all


def test_an_odd_width_matmul_compiled_for_the_host_runs(tmp_path) -> None:
    """On the Zen 4 guest this died with SIGILL (an AVX-512 instruction) before the features were checked."""
    from prune_compile.backends import ort
    from prune_compile.backends import tvm as tvm_backend

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3, 5])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    lib = str(tmp_path / "mm.so")
    tvm_backend.build(model, "cpu", lib)
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 3, 3)).astype(np.float32)}
    assert ort.relative_error(ort.run(model, feeds), tvm_backend.run_library(lib, feeds, ["x"])) <= 1e-5


def _cache(root, entries) -> str:
    for i, (level, kind, size, shared) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (d / name).write_text(value + "\n")
    return str(root)


def test_l2_per_core_is_the_level_2_cache_divided_among_the_cpus_sharing_it(tmp_path) -> None:
    own = _cache(tmp_path / "zen5", [("1", "Data", "48K", "0"), ("1", "Instruction", "32K", "0"),
                                     ("2", "Unified", "1024K", "0"), ("3", "Unified", "32768K", "0-1")])
    assert l2_bytes_per_core(own) == 1 << 20
    shared = _cache(tmp_path / "ecores", [("1", "Data", "32K", "4"), ("2", "Unified", "2048K", "4-7")])
    assert l2_bytes_per_core(shared) == 512 << 10
    assert l2_bytes_per_core(_cache(tmp_path / "mixed", [("2", "Unified", "2M", "0,2")])) == 1 << 20
    assert l2_bytes_per_core(_cache(tmp_path / "l1only", [("1", "Data", "32K", "0")])) is None
    assert l2_bytes_per_core(str(tmp_path / "absent")) is None
