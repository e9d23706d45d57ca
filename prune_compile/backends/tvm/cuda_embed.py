"""Embed compiled CUDA device code (a fatbin for one sm_XX) into an exported TVM library.

The PyPI wheel of TVM 0.27 is built without the CUDA runtime, so its CUDA codegen returns a fallback module that
carries only CUDA C source: a library exported as is would need nvcc or NVRTC on the deployment machine and could
fail there for the first time. (Its LLVM NVPTX codegen is no way out: it emits calls with the wrong arity.)

What we do instead: compile that source with nvcc here, for the requested architecture (SASS plus PTX of the same
compute capability, so newer GPUs can JIT it), and rewrite the fallback module's serialized entry from
`("cuda", fmap, source)` to `("fatbin", fmap, fatbin)` while packing the library's imports. That is exactly what a
CUDA-enabled TVM writes for a module it compiled itself, so any TVM CUDA runtime loads it without a compiler.
The blob layout is checked field by field; anything unexpected is an error, never a guess.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile

from ...errors import BackendError

FATBIN_MAGIC = 0xBA55ED50  # first u32 of a fatbin (fatBinaryHeader.magic)


def _read_u64(blob: bytes, pos: int) -> tuple[int, int]:
    if pos + 8 > len(blob):
        raise BackendError("TVM library blob is truncated (unexpected layout; not embedding CUDA code)")
    return struct.unpack_from("<Q", blob, pos)[0], pos + 8


def _read_str(blob: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = _read_u64(blob, pos)
    if pos + n > len(blob):
        raise BackendError("TVM library blob is truncated (unexpected layout; not embedding CUDA code)")
    return blob[pos:pos + n], pos + n


def _pack_str(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _cuda_entries(blob: bytes) -> list[tuple[int, bytes, int, int]]:
    """Each `cuda` module entry of a packed blob (u64 len, "cuda", u64 payload len, payload = fmt, fmap, code) as
    (offset of the payload length, fmt, offset after fmt, payload end)."""
    found, pos = [], 0
    needle = _pack_str(b"cuda")
    while (pos := blob.find(needle, pos)) != -1:
        length_at = pos + len(needle)
        length, body = _read_u64(blob, length_at)
        if 8 <= length and body + length <= len(blob):
            fmt, after = _read_str(blob, body)
            found.append((length_at, fmt, after, body + length))
        pos += 1
    return found


def patch_cuda_entry(blob: bytes, source: bytes, fatbin: bytes) -> bytes:
    """Replace the one CUDA fallback entry holding `source` with one holding `fatbin`; fix the length fields."""
    total, _ = _read_u64(blob, 0)
    if total != len(blob) - 8:
        raise BackendError("TVM library blob has an unexpected header; not embedding CUDA code")
    n = len(source)
    matches = [(length_at, end, blob[after:end - n - 8]) for length_at, fmt, after, end in _cuda_entries(blob)
               if fmt == b"cuda" and end - n - 8 >= after and blob[end - n:end] == source
               and struct.unpack_from("<Q", blob, end - n - 8)[0] == n]
    if len(matches) != 1:
        raise BackendError(f"expected one CUDA source module in the TVM library, found {len(matches)}; "
                           "not embedding CUDA code")
    length_at, end, fmap = matches[0]
    payload = _pack_str(b"fatbin") + fmap + _pack_str(fatbin)
    out = blob[8:length_at] + struct.pack("<Q", len(payload)) + payload + blob[end:]
    return struct.pack("<Q", len(out)) + out


def read_cuda_entry(blob: bytes) -> tuple[str, bytes]:
    """(format, code) of the single CUDA module in a packed library blob (tests and `inspect`)."""
    for _, fmt, after, end in _cuda_entries(blob):
        if fmt in (b"cuda", b"fatbin", b"cubin", b"ptx"):
            # The code is the payload's last field; the function map before it has no length of its own.
            for cut in range(after, end - 7):
                if struct.unpack_from("<Q", blob, cut)[0] == end - cut - 8:
                    return fmt.decode(), blob[cut + 8:end]
    raise BackendError("no CUDA module in the TVM library")


def library_blob(path: str) -> bytes:
    """The packed module blob TVM's loader reads from a built library (symbol __tvm_ffi__library_bin)."""
    import ctypes

    import tvm  # noqa: F401  (its runtime symbols resolve the library's undefined ones)

    lib = ctypes.CDLL(os.path.abspath(path), mode=ctypes.RTLD_LOCAL)
    head = ctypes.c_uint64.in_dll(lib, "__tvm_ffi__library_bin").value
    return ctypes.string_at(ctypes.addressof(ctypes.c_char.in_dll(lib, "__tvm_ffi__library_bin")), head + 8)


def compile_fatbin(source: str, arch: str, nvcc: str, timeout: float = 1800) -> bytes:
    """nvcc: CUDA C source → fatbin with SASS for `arch` (sm_XX) and PTX of the same compute capability."""
    compute = "compute_" + arch.split("_", 1)[1]
    with tempfile.TemporaryDirectory(prefix="prune-compile-cuda-") as tmp:
        src, out = os.path.join(tmp, "kernels.cu"), os.path.join(tmp, "kernels.fatbin")
        with open(src, "w") as f:
            f.write(source)
        cmd = [nvcc, "--fatbin", "-O3", "-std=c++17", f"-gencode=arch={compute},code={arch}",
               f"-gencode=arch={compute},code={compute}", "-o", out, src]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BackendError(f"nvcc did not finish compiling the device code in {timeout:.0f} s") from e
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise BackendError(f"nvcc failed on the generated device code for {arch}: {' | '.join(tail)[:400]}")
        with open(out, "rb") as f:
            data = f.read()
    if len(data) < 4 or struct.unpack_from("<I", data, 0)[0] != FATBIN_MAGIC:
        raise BackendError("nvcc did not produce a fatbin")
    return data


def cuda_source_of(executable_module) -> str | None:
    """The CUDA C source of the (single) CUDA fallback module in an executable's import tree, if any."""
    found = []

    def walk(m):
        if m.kind == "cuda":
            found.append(m.inspect_source("cuda"))
        for i in m.imports:
            walk(i)

    walk(executable_module)
    if len(found) > 1:
        raise BackendError(f"expected at most one CUDA module in the build, found {len(found)}")
    return str(found[0]) if found and found[0] else None


def make_fpack_imports(source: str, fatbin: bytes):
    """An `fpack_imports` hook for `export_library` that packs the imports with the CUDA entry patched."""

    def fpack_imports(module, is_system_lib, prefix, workspace_dir):
        import tvm_ffi

        blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy().tobytes()
        patched = patch_cuda_entry(blob, source.encode(), fatbin)
        c_text = tvm_ffi.get_global_func("runtime.ModulePackImportsToC")(module, is_system_lib, prefix)
        head, sep, _ = c_text.partition(f"[{len(blob)}] = {{")
        if not sep:
            raise BackendError("unexpected layout of TVM's packed-imports C file; not embedding CUDA code")
        path = os.path.join(workspace_dir, f"{prefix}devc.c")
        with open(path, "w") as f:
            f.write(head)
            f.write(f"[{len(patched)}] = {{\n")
            for i in range(0, len(patched), 32):
                f.write("  " + ",".join(str(b) for b in patched[i:i + 32]) + ",\n")
            f.write("};\n#ifdef __cplusplus\n}\n#endif\n")
        return path

    return fpack_imports
