"""The machine's float32 FMA peak (GFLOP/s), measured: fma_peak.c compiled for this CPU (-march=native) and run.

A model's MACs per second over this peak says how much of the cores it uses: what is left to gain in the kernels,
and what only fewer MACs can buy (pruned resnet18 on the 2-core Zen 5 host: ONNX Runtime and tuned TVM both at
~0.85-0.9, where which of the two is 2% faster is noise; mobilenet_v2's depthwise convs, memory-bound, ~0.5). The
`measure` pass reports it per engine, before and after pruning; tools/bench_latency.py per engine and variant.
The peak is the fastest of `repeats` runs, each the sum of its threads' fastest ~0.2 ms blocks (see fma_peak.c): a
process sharing a core read the average at half the quiet value, and a model timed by its fastest runs then seemed to
outrun the FMA pipes (fraction 1.16 in a loaded test run); the fastest block reads the quiet value beside it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fma_peak.c")


class PeakUnavailable(RuntimeError):
    """No C compiler, or the probe failed: the caller reports it instead of a fraction."""


def compile_probe(directory: str, vector_bytes: int | None = None) -> str:
    """The probe compiled into `directory`, for this CPU. $CC, else cc (TVM links the libraries it builds with one
    too). `vector_bytes` 32 on an AVX-512 CPU: the probe runs half-width vectors (else: the widest)."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise PeakUnavailable(f"no C compiler ({compiler}) to build {os.path.basename(SOURCE)}")
    binary = os.path.join(directory, f"fma_peak{vector_bytes or ''}")
    # -ffp-contract=fast: `a * b + c` on vectors becomes one FMA (GCC's default outside ISO mode; clang's is "on")
    cmd = [compiler, "-O2", "-march=native", "-ffp-contract=fast", "-o", binary, SOURCE, "-lpthread"]
    if vector_bytes:
        cmd.insert(1, f"-DVECTOR_BYTES={vector_bytes}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise PeakUnavailable(f"{' '.join(cmd)} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    return binary


def run_probe(binary: str, threads: int, seconds: float) -> dict:
    proc = subprocess.run([binary, str(threads), str(seconds)], capture_output=True, text=True,
                          timeout=60 + 10 * seconds)
    if proc.returncode != 0:
        raise PeakUnavailable(f"{os.path.basename(binary)} failed: {proc.stderr.strip()[:300]}")
    return json.loads(proc.stdout)


def measure(threads: int, seconds: float = 0.3, repeats: int = 3) -> dict:
    """{"gflops": the fastest run's, "readings_gflops": every run's, "sustained_gflops": the fastest run's average
    rate, "vector_bytes", "fused", "threads"}."""
    with tempfile.TemporaryDirectory(prefix="fma-peak-") as directory:
        binary = compile_probe(directory)
        runs = [run_probe(binary, threads, seconds) for _ in range(repeats)]
    best = max(runs, key=lambda r: r["gflops"])
    return {"gflops": best["gflops"], "readings_gflops": [r["gflops"] for r in runs],
            "per_thread_gflops": best["per_thread_gflops"], "sustained_gflops": best["sustained_gflops"],
            "vector_bytes": best["vector_bytes"],
            "fused": bool(best["fused"]), "threads": threads}


@functools.cache
def wide_vector_speedup(seconds: float = 0.1) -> float:
    """One core's FMA rate in 512-bit vectors over its rate in 256-bit ones (1.0 where the widest vectors are not
    512-bit). About 2 where the core has full-width 512-bit FMA pipes (Zen 5, Intel server parts with two FMA
    units), about 1 where a 512-bit FMA takes both 256-bit pipes (Zen 4) or one fused port (Intel client parts).
    The fastest of three runs each; once per process."""
    with tempfile.TemporaryDirectory(prefix="fma-peak-") as directory:
        wide = [run_probe(compile_probe(directory), 1, seconds) for _ in range(3)]
        if wide[0]["vector_bytes"] != 64:
            return 1.0
        half = [run_probe(compile_probe(directory, 32), 1, seconds) for _ in range(3)]
    return max(r["gflops"] for r in wide) / max(r["gflops"] for r in half)


def fraction(macs: int, median_ms: float, peak: dict) -> float:
    """`macs` in `median_ms` as a fraction of the peak (2 FLOPs a MAC)."""
    return round(2 * macs / (median_ms * 1e6) / peak["gflops"], 4)
