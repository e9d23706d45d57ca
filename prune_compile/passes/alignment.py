"""Channel alignment: which pruned convolutions fell off the CPU runtimes' blocked kernels.

CPU runtimes run convolutions in channel blocks, and only channel counts that fit their blocks take those kernels:
ONNX Runtime's NCHWc kernels take multiples of 4 (1.31 on AVX-512: a depthwise conv's channels, a dense conv's
input; padded with zeros to its 16-float block; asked of ORT by `backends.ort.nchwc_alignment`), our TVM cpu kernels
multiples of 8 on x86 (the AVX-512 vector or half of it, `conv_nchwc.channel_block`) and of 4 on NEON. Any other
count runs a generic kernel between layout reorders, and a plan without `round_to` leaves such counts (30% of 32
channels keeps 23): the pruned model can be slower than the original with half its MACs. torchvision's mobilenet_v2
at ratio 0.3 ran at 0.70-0.95x the original's speed on ONNX Runtime (29 of 52 convs plain; Zen 5, 2 threads) and at
1.19-1.53x with `--round-to` 4, 8 or 16. The report names such convs and the `--round-to` that avoids them.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass

from ..ir import Graph

NEON_BLOCK = 4  # float32 lanes of a 128-bit NEON register (the arm target)
TVM_X86_BLOCK = 8  # the smallest channel block of our TVM cpu kernels on AVX2 and AVX-512


@dataclass(frozen=True)
class MisalignedConv:
    node: str
    before: int  # output channels of the original conv (a multiple of the block)
    after: int  # output channels kept (not one)


def host_vector_lanes(cpuinfo: str | None = None) -> int:
    """float32 lanes of this CPU's vectors: 16 with AVX-512F, 8 with AVX, 4 otherwise (NEON, SSE). `cpuinfo`: the
    text of /proc/cpuinfo (read when None; where there is none, an x86 machine is taken to have AVX)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return 8 if platform.machine().lower() in ("x86_64", "amd64") else NEON_BLOCK
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith(("flags", "Features"))), [])
    if "avx512f" in flags:
        return 16
    if "avx" in flags:
        return 8
    return NEON_BLOCK


def runtime_blocks(targets: Sequence[str], ort_alignment: int, lanes: int) -> dict[str, int]:
    """The channel multiple each CPU runtime of the outputs needs: ONNX Runtime's (it runs the exported ONNX; 0:
    no blocked kernels here, left out), TVM's for the cpu target on this host, for the arm target NEON's. A GPU
    target adds nothing."""
    blocks = {"ONNX Runtime": ort_alignment} if ort_alignment > 1 else {}
    if "cpu" in targets:
        blocks["TVM cpu"] = min(lanes, TVM_X86_BLOCK)
    if "arm" in targets:
        blocks["TVM arm"] = NEON_BLOCK
    return blocks


def misaligned_convs(before: Graph, after: Graph, block: int) -> list[MisalignedConv]:
    """Convs of `after` whose output channels are not a multiple of `block` while the same conv's in `before` were:
    pruning moved them off the blocked kernels (a count that was never aligned is not the plan's doing)."""
    if block <= 1:
        return []
    original = {n.name: n.inputs[1].shape[0] for n in before.nodes if _is_conv(n)}
    out = []
    for n in after.nodes:
        if not _is_conv(n) or n.name not in original:
            continue
        was, kept = original[n.name], n.inputs[1].shape[0]
        if was % block == 0 and kept % block:
            out.append(MisalignedConv(n.name, int(was), int(kept)))
    return out


def _is_conv(node) -> bool:
    return (node.op == "conv" and len(node.inputs) > 1 and node.inputs[1] is not None
            and node.inputs[1].is_constant and node.inputs[1].shape is not None)


def alignment_warning(misaligned: Sequence[MisalignedConv], blocks: dict[str, int], lanes: int, total_convs: int,
                      shown: int = 4) -> str:
    """One line for the CLI and the report: how many convs, a few of them, which runtimes, and the option."""
    block = max(blocks.values())
    examples = ", ".join(f"{m.node} {m.after} of {m.before}" for m in misaligned[:shown])
    more = f", and {len(misaligned) - shown} more" if len(misaligned) > shown else ""
    needs = ", ".join(f"{name} {b}" for name, b in blocks.items())
    lanes_note = f" (multiples of {lanes}, the vector width, also waste no lanes)" if lanes > block else ""
    return (f"{len(misaligned)} of {total_convs} convolutions keep output channel counts that are not multiples of "
            f"{block} ({examples}{more}): CPU runtimes run convs on such counts outside their blocked kernels "
            f"(multiples needed: {needs}), and the pruned model can run slower than the original; "
            f"--round-to {block} keeps every count on the blocks{lanes_note}")
