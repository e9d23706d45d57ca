"""What this machine's CPU can run, as the kernel reports it (/proc/cpuinfo), for code compiled for the host.

Why not the CPU's name alone: LLVM names the host CPU from its family and model (AMD family 25 model 17 is
"znver4"), and that name implies every feature of the chip. A hypervisor may hide some from its guest: a Zen 4 VM
here reports no AVX-512, so code compiled for "znver4" died with SIGILL at its first AVX-512 instruction. The
kernel's flags list what the guest may use.
"""

from __future__ import annotations

import os
import platform

# LLVM's name of an x86 feature -> the kernel's flag, where they differ beyond underscores (avx512_vnni is
# avx512vnni).
_KERNEL_FLAG = {"bmi": "bmi1", "lzcnt": "abm", "sha": "sha_ni", "pclmul": "pclmulqdq", "sse4.1": "sse4_1",
                "sse4.2": "sse4_2", "rdrnd": "rdrand", "sahf": "lahf_lm"}
# The instruction-set extensions a compiled kernel may use (AVX-512's all start with "avx512").
_ISA = ("avx", "avx2", "fma", "f16c", "avxvnni", "vaes", "vpclmulqdq", "gfni", "bmi", "bmi2", "lzcnt", "popcnt",
        "movbe", "sse4.1", "sse4.2", "ssse3", "sse4a", "sha", "pclmul", "aes", "adx")


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The kernel's flags of this CPU (`cpuinfo`: the text of /proc/cpuinfo, read when None); None where there is
    no such file."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    return set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                     if line.startswith(("flags", "Features"))), []))


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def hidden_features(llvm_features: set[str], flags: set[str] | None) -> list[str]:
    """The x86 extensions among `llvm_features` (what LLVM's name of the host CPU implies) that the kernel's
    `flags` do not list, sorted: to be turned off in the target. Empty when the flags are unknown."""
    if flags is None:
        return []
    present = {f.replace("_", "") for f in flags}
    checked = [f for f in llvm_features if f in _ISA or f.startswith("avx512")]
    return sorted(f for f in checked if _KERNEL_FLAG.get(f, f).replace("_", "").replace(".", "") not in present)


def l2_bytes_per_core(cache_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Bytes of level-2 cache per core of this CPU (cpu0's, divided among the CPUs that share it: Intel's E-cores
    share one per four), from the kernel's cache description (`cache_dir`); None where it gives none."""
    try:
        entries = sorted(os.listdir(cache_dir))
    except OSError:
        return None
    for entry in entries:
        level, kind, size, shared = (_read(os.path.join(cache_dir, entry, name))
                                     for name in ("level", "type", "size", "shared_cpu_list"))
        if level != "2" or kind == "Instruction" or size is None:
            continue
        size_bytes = _bytes(size)
        return size_bytes // _cpu_count(shared or "") if size_bytes else None
    return None


def _read(path: str) -> str | None:
    """A sysfs file's text, stripped; None when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _bytes(size: str) -> int | None:
    """'1024K' -> 1048576 (the kernel's cache sizes); None when unreadable."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    digits, unit = (size[:-1], units[size[-1]]) if size[-1:] in units else (size, 1)
    return int(digits) * unit if digits.isdigit() else None


def _cpu_count(cpu_list: str) -> int:
    """CPUs in a kernel CPU list ('0-3,8'); 1 when empty."""
    count = 0
    for part in filter(None, cpu_list.split(",")):
        low, _, high = part.partition("-")
        count += int(high) - int(low) + 1 if high else 1
    return count or 1
