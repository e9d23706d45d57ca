"""Channel alignment: which pruned convolutions fell off the CPU runtimes' blocked kernels.

CPU runtimes run convolutions in channel blocks, and only channel counts that fit their blocks take those kernels.
ONNX Runtime's NCHWc kernels (1.31, AVX-512, probed: `backends.ort.nchwc_alignment`) take a depthwise conv whose
channels, and a dense conv whose input channels, are multiples of 4 (a dense input narrower than the vector is read
as NCHW; output channels are zero-padded to the 16-float block). Our TVM kernels (`conv_nchwc.conv_layouts`) block a
conv by its output channels: multiples of 8 on x86 (the AVX-512 vector or half of it), of 4 on NEON. Any other count
runs a plain conv between layout reorders, and a plan without `round_to` leaves such counts (30% of 32 channels
keeps 23): the pruned model can be slower than the original with half its MACs. torchvision's mobilenet_v2 at ratio
0.3 ran at 0.70-0.95x the original's speed on ONNX Runtime (29 of 52 convs plain; Zen 5, 2 threads) and at
1.19-1.53x with `--round-to` 4, 8 or 16. The report names such convs and the `--round-to` that avoids them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..host_cpu import cpu_flags, is_x86
from ..ir import Graph

ORT = "ONNX Runtime"
NEON_BLOCK = 4  # float32 lanes of a 128-bit NEON register (the arm target)
TVM_X86_BLOCK = 8  # the smallest channel block of our TVM cpu kernels on AVX2 and AVX-512


@dataclass(frozen=True)
class MisalignedConv:
    node: str
    side: str  # the count that left the block: "out" (channels written) or "in" (channels read)
    before: int  # that count in the original conv
    after: int  # and in the pruned one
    macs: int  # the pruned conv's
    runtimes: tuple[str, ...]  # the runtimes that ran it blocked before and cannot now


def host_vector_lanes(cpuinfo: str | None = None) -> int:
    """float32 lanes of this CPU's vectors: 16 with AVX-512F, 8 with AVX, 4 otherwise (NEON, SSE). `cpuinfo`: the
    text of /proc/cpuinfo (read when None; where there is none, an x86 machine is taken to have AVX). The same
    answer as `conv_nchwc.vector_lanes` for the cpu target (tested), without importing TVM (seconds) in runs
    that compile nothing."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return 8 if is_x86() else NEON_BLOCK
    if "avx512f" in flags:
        return 16
    if "avx" in flags:
        return 8
    return NEON_BLOCK


def runtime_blocks(targets: Sequence[str], ort_alignment: int, lanes: int) -> dict[str, int]:
    """The channel multiple each CPU runtime of the outputs needs: ONNX Runtime's (it runs the exported ONNX; 0:
    no blocked kernels here, left out), TVM's for the cpu target on this host, for the arm target NEON's. A GPU
    target adds nothing."""
    blocks = {ORT: ort_alignment} if ort_alignment > 1 else {}
    if "cpu" in targets:
        blocks["TVM cpu"] = min(lanes, TVM_X86_BLOCK)
    if "arm" in targets:
        blocks["TVM arm"] = NEON_BLOCK
    return blocks


def _off_block(runtime: str, block: int, lanes: int, out_channels: int, in_channels: int, group: int) -> str | None:
    """Which count keeps `runtime` from running a conv blocked ("out", "in"), or None when it runs it blocked."""
    if runtime != ORT:  # TVM blocks every conv by its output channels
        return "out" if out_channels % block else None
    if group > 1:  # depthwise only; ORT runs other grouped convs plain whatever the counts
        return "out" if group == out_channels == in_channels and out_channels % block else None
    return "in" if in_channels >= lanes and in_channels % block else None


def misaligned_convs(before: Graph, after: Graph, blocks: dict[str, int], lanes: int) -> list[MisalignedConv]:
    """Convs of `after` that a runtime of `blocks` ran in its blocked kernels in `before` and cannot in `after`:
    pruning moved them off (a conv that was never blocked is not the plan's doing)."""
    from .cost import node_macs

    original = {n.name: _channels(n) for n in _convs(before)}
    out = []
    for n in _convs(after):
        if n.name not in original:
            continue
        now = _channels(n)
        moved = [(runtime, side) for runtime, block in blocks.items()
                 if _off_block(runtime, block, lanes, *original[n.name]) is None
                 and (side := _off_block(runtime, block, lanes, *now))]
        if moved:
            side = moved[0][1]
            index = 0 if side == "out" else 1
            out.append(MisalignedConv(n.name, side, int(original[n.name][index]), int(now[index]),
                                      int(node_macs(n)), tuple(runtime for runtime, _ in moved)))
    return out


def _convs(graph: Graph) -> list:
    """The convs with a constant weight (the latency table's weight layers, convs only)."""
    from .latency import weight_layer_nodes

    return [n for n in weight_layer_nodes(graph) if n.op == "conv"]


def _channels(node) -> tuple[int, int, int]:
    """(output channels, input channels, group) of a conv, from its weight [out, in / group, ...]."""
    shape, group = node.inputs[1].shape, int(node.attrs.get("group", 1))
    return int(shape[0]), int(shape[1]) * group, group


def advised_round_to(blocks: dict[str, int], lanes: int) -> int:
    """The `--round-to` the warning advises: the largest block any runtime needs, and at least 8 on x86. ONNX
    Runtime takes multiples of 4 but pads them to its vector block: mobilenet_v2 at ratio 0.3 ran at 0.78x the
    original's latency with `--round-to 4`, 0.67x with 8, 0.66x with 16, 1.24x without (ORT, Zen 5, one interleaved
    `bench_latency --compare` run), and 8 keeps more channels than 16."""
    return max([*blocks.values(), min(lanes, TVM_X86_BLOCK)])


def alignment_warning(misaligned: Sequence[MisalignedConv], blocks: dict[str, int], lanes: int, total_convs: int,
                      total_macs: int, shown: int = 4) -> str:
    """One line for the CLI and the report: per runtime how many convs and how much of the model, a few of them,
    and the option that avoids it."""
    block = advised_round_to(blocks, lanes)
    per_runtime = []
    for runtime in blocks:
        hit = [m for m in misaligned if runtime in m.runtimes]
        if hit:
            share = sum(m.macs for m in hit) / max(total_macs, 1)
            per_runtime.append(f"{runtime} {len(hit)} of {total_convs} ({share:.0%} of the MACs; it needs "
                               f"multiples of {blocks[runtime]})")
    examples = ", ".join(f"{m.node} {m.side} {m.after} of {m.before}" for m in misaligned[:shown])
    more = f", and {len(misaligned) - shown} more" if len(misaligned) > shown else ""
    lanes_note = f" (multiples of {lanes}, the vector width, waste no lanes)" if lanes > block else ""
    return (f"the plan moves convolutions off the CPU runtimes' blocked kernels: {'; '.join(per_runtime)} "
            f"({examples}{more}); such convs run plain between layout reorders, and the pruned model can run slower "
            f"than the original; --round-to {block} keeps every count on the blocks{lanes_note}")


def channel_alignment(before: Graph, after: Graph, targets: Sequence[str] = (),
                      policy: str | None = None) -> dict[str, Any]:
    """What report.json holds in `pruning.channel_alignment`: the runtimes' multiples, the convs `after` moved off
    them, and the warning line; {} when none moved (or no runtime here has blocked kernels), and for plans of the
    latency `policy`, which timed its counts on the engine. `targets`: the compile targets (ONNX Runtime on this
    machine always counts: it runs the exported ONNX)."""
    from ..backends.ort import nchwc_alignment
    from .cost import graph_cost

    if policy == "latency":
        return {}
    lanes = host_vector_lanes()
    blocks = runtime_blocks(targets, nchwc_alignment(), lanes)
    misaligned = misaligned_convs(before, after, blocks, lanes)
    if not misaligned:
        return {}
    convs = sum(1 for n in after.nodes if n.op == "conv")
    return {"block": max(blocks.values()), "round_to": advised_round_to(blocks, lanes), "runtimes": blocks,
            "convs": convs,
            "misaligned": [asdict(m) for m in misaligned],
            "warning": alignment_warning(misaligned, blocks, lanes, convs, graph_cost(after)["macs"])}
