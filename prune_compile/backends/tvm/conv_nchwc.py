"""Dense convolutions in NCHW[x]c with a register-blocked CPU schedule, for tuned CPU builds (`--conv-layout NCHWc`).

Why: MetaSchedule's generic multi-level tiling on a plain NCHW conv vectorizes along the output width, which for
pruned ResNet shapes (W = 56, 28, 14, 7) rarely fills a vector register, and its search space is too large for
the trials a 2-core machine affords. Blocking the channels by the vector width (NCHW8c on AVX2, NCHW16c on
AVX-512, NCHW4c on NEON) makes the output channels the innermost, contiguous axis, the same layout ONNX Runtime's
MLAS kernels use; the kernel is pre-packed to OIHW[i]i[o]o once at build time (constant folding).

What:
- `convert_layout`: Relax ConvertLayout with a per-call choice: groups == 1 convs whose output channels divide by the
  block go to NCHW[ib]c / OIHW[ib]i[ob]o (an input count with no channel block, RGB, is read as NCHW in blocks of ib: no
  transform pass before the stem; pruned mobilenet_v2 on Zen 5 ran 4.4% faster), depthwise convs (one filter per
  channel) to NCHW[b]c / OIHW1i[b]o; other convs (grouped, odd widths) stay NCHW. On AVX-512 a count only 8 divides
  (planned in steps of 8) takes 8-channel blocks rather than staying NCHW (`channel_block`). Elementwise ops, pooling
  and means follow the blocked layout, so transforms only appear at the layout's borders.
- Where 512-bit FMAs run at twice the 256-bit rate (Zen 5; not Zen 4), a dense conv in 8-channel blocks on AVX-512
  computes them in pairs, one 16-lane vector each, the last pair padded with zero filters, and writes the result
  back into its 8-channel blocks in the tile's write-back (`pairs_half_blocks`, `paired_kernel`): the layout, and
  every op around the conv, is as before.
- `legalize`: our TE computes for the blocked dense and depthwise convs, tagged with the schedule rule below.
- The schedule rule (MetaSchedule's custom-rule hook): for each register tile (output-channel blocks × rows ×
  columns whose accumulators fit the vector registers; for dense convs only those a cycle model of the FMA loop,
  `fma_cycles`, puts within 1.5x of the best) one design space: tile loops parallel, reduction over
  input-channel blocks / kernel rows / columns / channels-in-block, the tile fully unrolled with the channel block
  vectorized, accumulators in registers, the epilogue (bias, residual, activation, also one that reads its input
  twice: hardswish, SiLU) fused into the tile's write-back.
  The search then picks a tile and the unrolling; measured on a 32→32 3x3 56x56 conv, 2 cores: 0.78 ms after 16
  trials, where MetaSchedule's generic NCHW space reached 1.21 ms after 32 (ONNX Runtime: 0.78 ms).
  Padded convs get each tile twice: the padded input in a parallel pass of its own, or written row by row inside
  the conv's parallel loop. A depthwise conv is memory-bound, and the separate pass moves the input through memory
  twice more: 48 channels, 112x112, stride 2, 64 trials: 0.242 ms with the pass, 0.074 ms padded in the loop
  (ONNX Runtime's whole model: 0.16-0.20 ms). Dense convs re-pad shared rows in the loop, and it still won on two of
  four pruned resnet18 residual convs (Zen 5, one tuning run each, best of each placement: 32->32 56x56 0.1149 vs
  0.1179 ms, 128->128 14x14 0.1085 vs 0.1125; 64->64 28x28 even; 256->256 7x7 0.1192 vs 0.1139, the pass won).
- Dense convs with a spatial kernel reduce their input channels one channel block per pass over a strip of output
  rows, as MLAS does (`in_block_passes`): the pass's weights stay in L1 across the strip's tiles instead of every
  tile streaming all of them from L2; 2-16% faster on the pruned resnet18 convs. 1x1 convs are offered both orders.
- Output sizes no fast tile divides (7x7: 7-pixel tiles of one channel block are load-bound) are computed as one
  flat axis of pixels rounded up so that one does (`pixel_count`: 49 -> 50, 4 channel blocks x 2 pixels), the
  extra pixels dropped in a pass that puts the pixels back into rows and columns and runs the epilogue.
"""

from __future__ import annotations

RULE = "prune_compile_conv2d_nchwc"
PAIRED = "prune_compile_paired_blocks"  # block annotation: the conv computes pairs of half-width blocks
UNPAIR = "conv2d_nchwc_unpair"  # the block that puts a paired conv's result back into half-width blocks
MAX_SPACES = 12
MIN_PARALLEL = 8  # parallel iterations a schedule should leave (2 cores here: 4 each)


def vector_lanes(target) -> int:
    """float32 lanes of the target's vector registers: 16 (AVX-512), 8 (AVX/AVX2), 4 (NEON and the rest)."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return 0
    if codegen.target_has_features("avx512f", target):
        return 16
    if codegen.target_has_features("avx", target):
        return 8
    return 4


def vector_registers(lanes: int) -> int:
    """Architectural vector registers: 32 on AVX-512 and AArch64, 16 on AVX2."""
    return 16 if lanes == 8 else 32


def channel_block(channels: int, lanes: int) -> int:
    """The channel block of a blocked layout: the full vector when it divides `channels`; on AVX-512 a half vector
    when only that divides (8: one 256-bit register, which Zen 4 runs at the FLOPs per cycle of a double-pumped
    512-bit one; the register tiles then budget 16 registers, as on AVX2), so that a count planned in steps of 8
    keeps the blocked schedule instead of falling back to NCHW; 0 when neither divides."""
    if channels % lanes == 0:
        return lanes
    if lanes >= 16 and channels % (lanes // 2) == 0:
        return lanes // 2
    return 0


def pairs_half_blocks(lanes: int) -> bool:
    """Whether dense convs whose output channels only a half vector divides (8 mod 16 on AVX-512: 24, 40, ...) compute
    their blocks in pairs, as full vectors, the last pair padded with zero filters (`paired_kernel`). Where the
    cores run 512-bit FMAs at twice the 256-bit rate (`fma_peak.wide_vector_speedup`: Zen 5 2.0): a 96->24 3x3 conv
    at 160x160 (PP-OCRv4 det's FPN) ran 4.96 ms in 8-channel blocks, 3.69 ms with 32 output channels. Where they
    do not (Zen 4: one 512-bit FMA is two 256-bit ones), the padding would only add work."""
    if lanes < 16:
        return False
    from ..fma_peak import PeakUnavailable, wide_vector_speedup

    try:
        return wide_vector_speedup() >= 1.5
    except PeakUnavailable:  # no compiler: the half-width blocks, which run everywhere at least as well as before
        return False


def input_block(in_channels: int, lanes: int) -> int:
    """The input-channel block: the producer's channel block when the count has one (no transform between the two
    convs), else the largest divisor of the count that fits in the vector (3 for RGB)."""
    block = channel_block(in_channels, lanes)
    if block:
        return block
    if in_channels < lanes:
        return in_channels
    return max(d for d in range(1, lanes + 1) if in_channels % d == 0)


def conv_layouts(call, lanes: int) -> dict[str, list[str]]:
    """ConvertLayout's choice for one conv2d call: (data, kernel, output) layouts (see module doc)."""
    attrs = call.attrs
    out_c, in_per_group = (int(v) for v in list(call.args[1].ty.shape)[:2])
    keep = {"relax.nn.conv2d": ["NCHW", "OIHW"]}
    ob = channel_block(out_c, lanes)
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or not ob or len(call.args[0].ty.shape) != 4:
        return keep
    if attrs.groups == 1:
        ib = input_block(in_per_group, lanes)
        # An input count without a channel block (RGB) comes from an NCHW producer: read it as it is rather than
        # transform it into NCHW[ib]c in a pass of its own (resnet18's 224x224 RGB input: 0.022 ms, 1% of the model)
        data = f"NCHW{ib}c" if channel_block(in_per_group, lanes) else "NCHW"
        return {"relax.nn.conv2d": [data, f"OIHW{ib}i{ob}o", f"NCHW{ob}c"]}
    if attrs.groups == out_c and in_per_group == 1:  # depthwise
        return {"relax.nn.conv2d": [f"NCHW{ob}c", f"OIHW1i{ob}o", f"NCHW{ob}c"]}
    return keep


def _block(layout: str) -> int:
    """The channel block of a data layout ("NCHW16c": 16, "NCHW": 0)."""
    return int(layout[4:-1]) if layout.endswith("c") else 0


def output_block(call, lanes: int) -> int:
    """The channel block of a conv2d call's output after `convert_layout` (0: it stays NCHW)."""
    layouts = conv_layouts(call, lanes)["relax.nn.conv2d"]
    return _block(layouts[2]) if len(layouts) == 3 else 0


def data_block(call, lanes: int) -> int:
    """The channel block a conv2d call reads its input in after `convert_layout` (0: NCHW)."""
    return _block(conv_layouts(call, lanes)["relax.nn.conv2d"][0])


def convert_layout(mod, lanes: int):
    """Blocked layouts for the dense convolutions of `mod` (see module doc); returns the new module. Ops TVM's
    layout inference gets wrong in blocked layouts are guarded first (`layout_guard`)."""
    from tvm import relax

    from .blocked_resize import pools_as_resizes, resizes_as_pools
    from .layout_guard import guarded_for_blocked_layouts, transpose_layouts

    def layouts(call) -> dict[str, list[str]]:
        if call.op.name == "relax.nn.conv2d":
            return conv_layouts(call, lanes)
        return transpose_layouts(call) if call.op.name == "relax.nn.conv2d_transpose" else {}

    mod, resizes = resizes_as_pools(mod)  # TVM's resize rule takes no blocked layout; its stand-in's does
    mod = guarded_for_blocked_layouts(mod, lambda call: output_block(call, lanes),
                                      lambda call: data_block(call, lanes))
    return pools_as_resizes(relax.transform.ConvertLayout({}, layout_cb=layouts)(mod), resizes)


def _window(data, kernel, strides, padding, dilation):
    """The sliding window both blocked convs share: (padded input, output rows, output columns, kh and kw reduce
    axes, input row of (oh, kh), input column of (ow, kw)). Unpadded convs read the input directly."""
    from tvm import te, topi

    h, w = (int(v) for v in list(data.shape)[2:4])
    kh_, kw_ = (int(v) for v in list(kernel.shape)[2:4])
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(v) for v in padding)
    out_h = (h + pt + pb - (kh_ - 1) * dh - 1) // sh + 1
    out_w = (w + pl + pr - (kw_ - 1) * dw - 1) // sw + 1
    tail = (0,) * (len(data.shape) - 4)  # the channel block of a blocked input
    padded = (topi.nn.pad(data, (0, 0, pt, pl, *tail), (0, 0, pb, pr, *tail), name="data_pad")
              if pt + pl + pb + pr else data)
    kh, kw = te.reduce_axis((0, kh_), "kh"), te.reduce_axis((0, kw_), "kw")
    return padded, out_h, out_w, kh, kw, (lambda oh, k: oh * sh + k * dh), (lambda ow, k: ow * sw + k * dw)


def _conv2d_nchwc(data, kernel, strides, padding, dilation, out_dtype, out_blocks: int = 0):
    """The blocked dense conv. `out_blocks` > 0: `kernel` holds pairs of half-width output blocks (`paired_kernel`);
    the conv computes each pair as one vector, its lanes as two axes (pair half, channel) that the schedule rule
    fuses, and the result is put back into `out_blocks` half-width blocks, the padded filters' outputs dropped."""
    from tvm import te

    padded, out_h, out_w, kh, kw, row, col = _window(data, kernel, strides, padding, dilation)
    ib = int(kernel.shape[4])
    icb = te.reduce_axis((0, int(kernel.shape[1])), "icb")
    ici = te.reduce_axis((0, ib), "ici")
    n_, ocb_, ob = int(data.shape[0]), int(kernel.shape[0]), int(kernel.shape[5])
    lanes = (2, ob // 2) if out_blocks else (ob,)  # a pair: (which half, channel in it)
    attrs = {"schedule_rule": RULE, PAIRED: 1} if out_blocks else {"schedule_rule": RULE}

    def read(n, cb, h, w, c):  # an NCHW input (see conv_layouts) is read in channel blocks of `ib`
        return padded[n, cb * ib + c, h, w] if len(data.shape) == 4 else padded[n, cb, h, w, c]

    def weight(ocb, lane):  # the kernel vector's lane of output channel (pair half, channel) or channel
        return kernel[ocb, icb, kh, kw, ici, lane[0] * lanes[1] + lane[1] if out_blocks else lane[0]]

    def block(cb, c):  # output block `cb`'s channel `c` in the conv's (paired) blocks
        return (cb // 2, cb % 2, c) if out_blocks else (cb, c)

    out_shape = (n_, out_blocks or ocb_, out_h, out_w, lanes[-1])
    pixels = pixel_count(ocb_, out_h, out_w, vector_registers(ob))
    if not pixels:
        conv = te.compute(
            (n_, ocb_, out_h, out_w, *lanes),
            lambda n, ocb, oh, ow, *lane: te.sum(
                read(n, icb, row(oh, kh), col(ow, kw), ici).astype(out_dtype)
                * weight(ocb, lane).astype(out_dtype), axis=[icb, kh, kw, ici]),
            name="conv2d_nchwc", attrs=attrs)
        if not out_blocks:
            return conv
        return te.compute(out_shape, lambda n, cb, oh, ow, c: conv[n, block(cb, c)[0], oh, ow, *block(cb, c)[1:]],
                          name=UNPAIR)
    # Output pixels as one axis, `pixels` of them: those past the last read the last pixel's window (clamped, no
    # read outside the input) and are dropped when the result is unfused back into rows and columns.
    last = out_h * out_w - 1

    def window(p):
        q = te.min(p, last) if pixels > last + 1 else p
        return q // out_w, q % out_w

    flat = te.compute(
        (n_, ocb_, pixels, *lanes),
        lambda n, ocb, p, *lane: te.sum(
            read(n, icb, row(window(p)[0], kh), col(window(p)[1], kw), ici).astype(out_dtype)
            * weight(ocb, lane).astype(out_dtype), axis=[icb, kh, kw, ici]),
        name="conv2d_nchwc", attrs=attrs)
    return te.compute(out_shape,
                      lambda n, cb, oh, ow, c: flat[n, block(cb, c)[0], oh * out_w + ow, *block(cb, c)[1:]],
                      name="conv2d_nchwc_unflatten")


def paired_kernel(kernel):
    """A dense conv's kernel in half-width output blocks (OIHW[i]i8o, an odd number of them) as pairs of blocks
    (OIHW[i]i16o), the last pair padded with zero filters (see `pairs_half_blocks`). A call of its own in the
    model: its input is a constant, so constant folding packs it once at build time."""
    from tvm import te, tirx

    blocks, half = int(kernel.shape[0]), int(kernel.shape[5])

    def value(p, i, h, w, ii, c):
        b = p * 2 + c // half
        return tirx.if_then_else(b < blocks, kernel[te.min(b, blocks - 1), i, h, w, ii, c % half],
                                 tirx.const(0, kernel.dtype))

    return te.compute(((blocks + 1) // 2, *(int(d) for d in kernel.shape[1:5]), 2 * half), value,
                      name="kernel_pairs")


def _depthwise_nchwc(data, kernel, strides, padding, dilation, out_dtype):
    from tvm import te

    padded, out_h, out_w, kh, kw, row, col = _window(data, kernel, strides, padding, dilation)
    return te.compute(
        (int(data.shape[0]), int(data.shape[1]), out_h, out_w, int(data.shape[4])),
        lambda n, cb, oh, ow, ci: te.sum(
            padded[n, cb, row(oh, kh), col(ow, kw), ci].astype(out_dtype)
            * kernel[cb, 0, kh, kw, 0, ci].astype(out_dtype), axis=[kh, kw]),
        name="depthwise_nchwc", attrs={"schedule_rule": RULE})


def legalize(bb, call, lanes: int = 0, winograd=None):
    """LegalizeOps hook for relax.nn.conv2d: blocked convs get our computes; the rest are left to TVM's default.
    `lanes`: the vector width when dense convs in half-width blocks compute them in pairs (`pairs_half_blocks`).
    `winograd` (a conv_winograd.Machine, None: off): 3x3 stride-1 convs where it pays on that machine by F(4x4, 3x3)
    (conv_winograd)."""
    from . import conv_winograd

    attrs = call.attrs
    if len(call.args[1].ty.shape) != 6:  # only `conv_layouts` blocks kernels
        return call
    if winograd is not None and conv_winograd.applies(call, winograd):
        return conv_winograd.legalize(bb, call)
    kernel_shape = [int(d) for d in call.args[1].ty.shape]
    out_dtype = str(attrs.out_dtype) if attrs.out_dtype else str(call.args[0].ty.dtype)
    args = (attrs.strides, attrs.padding, attrs.dilation, out_dtype)
    if attrs.groups != 1:
        return bb.call_te(_depthwise_nchwc, call.args[0], call.args[1], *args, primfunc_name_hint="depthwise_nchwc")
    blocks, block = kernel_shape[0], kernel_shape[5]
    if 2 * block == lanes and blocks >= 3:  # an odd count: 8 mod 16 channels (see `pairs_half_blocks`)
        kernel = bb.emit(bb.call_te(paired_kernel, call.args[1], primfunc_name_hint="kernel_pairs"))
        return bb.call_te(_conv2d_nchwc, call.args[0], kernel, *args, blocks, primfunc_name_hint="conv2d_nchwc")
    return bb.call_te(_conv2d_nchwc, call.args[0], call.args[1], *args, primfunc_name_hint="conv2d_nchwc")


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def fma_cycles(tile: tuple[int, int, int]) -> float:
    """Modelled cycles per FMA of a dense conv's register tile: each input-channel step issues a×b×c FMAs (two per
    cycle), loads `a` kernel vectors and broadcasts b×c inputs (two loads per cycle), and each accumulator waits
    for its previous FMA (latency 4). Fewer than 8 accumulators leave the FMA units idle; one output-channel block
    makes it load-bound. Measured on 2 cores, 8-lane AVX2, 32->32 56x56 and 256->256 7x7 3x3 convs, the order
    holds: (4, 2, 1) 0.34 ms, (1, 1, 8) 0.43; (1, 1, 7) 0.42, (4, 1, 1) 0.64, (2, 1, 1) 1.15, (1, 1, 1) 2.2."""
    a, b, c = tile
    accumulators = a * b * c
    return max(accumulators / 2, (a + b * c) / 2, 4) / accumulators


def register_tiles(oc_blocks: int, rows: int, cols: int, registers: int,
                   dense: bool = True) -> list[tuple[int, int, int]]:
    """(output-channel blocks, rows, columns) tiles that divide the output, at most `registers` - 4 accumulators:
    the operands need the rest, and 14-accumulator tiles on 16 registers spilled (1.7-4x slower than the best
    8-accumulator tile on three dense shapes, never the best of five depthwise ones). Dense convs: ordered by
    `fma_cycles` (ties: more accumulators first), those within 1.5x of the best (the rest never won a
    measurement, and each costs tuning trials). Depthwise convs (memory-bound, the model does not apply): largest
    first."""
    tiles = [(a, b, c) for a in _divisors(oc_blocks, 4) for b in _divisors(rows, 4) for c in _divisors(cols, 16)
             if a * b * c <= registers - 4]
    if dense:
        best = min(fma_cycles(t) for t in tiles)
        tiles = [t for t in tiles if fma_cycles(t) <= 1.5 * best]
        tiles.sort(key=lambda t: (fma_cycles(t), -t[0] * t[1] * t[2], t[1], t[2]))
    else:
        tiles.sort(key=lambda t: (-t[0] * t[1] * t[2], t[1], t[2]))
    return tiles[:MAX_SPACES]


def pixel_count(oc_blocks: int, out_h: int, out_w: int, registers: int) -> int:
    """0 when a register tile dividing (rows, columns) is within 10% of the fastest tile any shape could have (by
    `fma_cycles`); else the number of output pixels to compute as one flat axis, the output's and at most 10% more
    (dropped), for a tile dividing it to be the fastest; 0 when none is. A 256-channel 7x7 conv (32 channel blocks,
    16 registers) divides only into 7-pixel tiles of one channel block (load-bound: 0.42 ms against ONNX Runtime's
    0.30); as 50 pixels it takes 4 channel blocks x 2 pixels."""
    best = min(fma_cycles((a, 1, m)) for a in _divisors(oc_blocks, 4) for m in range(1, (registers - 4) // a + 1))

    def cost(rows: int, cols: int) -> float:
        tiles = register_tiles(oc_blocks, rows, cols, registers)
        return fma_cycles(tiles[0]) if tiles else float("inf")

    if cost(out_h, out_w) <= 1.1 * best:
        return 0
    total = out_h * out_w
    return next((p for p in range(total, total + total // 10 + 1) if cost(1, p) <= best * (1 + 1e-9)), 0)


def inline_all(sch, candidates) -> None:
    """compute_inline each block `candidates()` lists until none inlines (a function's outputs and reductions
    cannot be). Each inlining invalidates the inlined block, so the list is asked for again after it."""
    inlined = True
    while inlined:
        inlined = False
        for candidate in candidates():
            try:
                sch.compute_inline(candidate)
            except Exception:  # not inlinable: left to the caller
                continue
            inlined = True
            break


def _downstream(sch, block) -> list:
    """Every block that reads what `block` writes, directly or through others."""
    found, todo = [], list(sch.get_consumers(block))
    while todo:
        later = todo.pop()
        if not any(sch.get(later).same_as(sch.get(b)) for b in found):
            found.append(later)
            todo += list(sch.get_consumers(later))
    return found


def inline_epilogue(sch, block) -> None:
    """Fuse the elementwise ops that follow `block` (bias, residual, activation) into its loop nest. An activation
    that reads its input twice branches (hardswish x * relu6(x + 3) / 6, SiLU x * sigmoid(x)): its inner blocks are
    inlined into their consumers first, leaving one block to fuse. Unfused, the rest ran after the conv as a serial
    scalar loop nest (our rules leave the root unscheduled): PP-LCNet's 16-channel 320x320 depthwise conv with
    hardswish took 1.5-2.9 ms, 0.35 fused. What cannot be fused still runs as a parallel pass (`_parallel_rows`)."""
    inline_all(sch, lambda: _downstream(sch, block))  # outputs and reductions stay: fused or passed below
    while True:
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            break
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # not elementwise: it stays a separate loop nest
            break
    for later in _downstream(sch, block):
        if len(sch.get_loops(later)) in (4, 5):  # NCHW or NCHW[x]c rows
            _parallel_rows(sch, later)


def _parallel_rows(sch, block) -> None:
    """An elementwise pass of its own: parallel over rows, the channel block vectorized. Parallel over rows, not
    over every vector: one index computation per row instead of a division per vector (a 32->32 3x3 conv's pad
    pass on 56x56, 2 cores: 0.031 ms of 0.339, 0.018 over rows)."""
    loops = sch.get_loops(block)
    # rows are (n, c, h) either way: blocked (n, c, h, w, c-in-block) runs its columns in order, NCHW (n, c, h, w)
    # vectorizes the row
    sch.parallel(sch.fuse(*loops[:3]))
    sch.vectorize(loops[-1])
    sch.annotate(block, "schedule_rule", "None")


def sampled_unroll(sch, loop) -> None:
    """The one choice our rules leave to the search besides the design space (tuning.distinct_schedules counts
    it): how far `loop` and the loops inside it unroll."""
    sch.annotate(loop, "pragma_auto_unroll_max_step", sch.sample_categorical([0, 16, 512], [0.34, 0.33, 0.33]))
    sch.annotate(loop, "pragma_unroll_explicit", 1)


def scheduled(sch, rule_block, *others) -> None:
    """Mark a function one of our rules scheduled: `rule_block` (its annotation named the rule), the `others` and
    the root as "None", which MetaSchedule's generic rules (and the root's parallelize / vectorize / unroll
    postprocessing) leave alone."""
    for block in others:
        sch.annotate(block, "schedule_rule", "None")
    sch.unannotate(rule_block, "schedule_rule")
    sch.annotate(rule_block, "schedule_rule", "None")
    sch.annotate(sch.get_sblock("root"), "schedule_rule", "None")


def in_block_passes(kernel_pixels: int, in_blocks: int) -> list[int | None]:
    """How many input-channel blocks a dense conv's pass over a strip of output rows reduces (None: all of them,
    tile by tile): the choices a design space is offered. MLAS's loop order (one block per pass: that pass's
    weights, 4 channel blocks x 3x3 x 8 x 8 floats = 9 KB, stay in L1 while every tile of the strip runs; partial
    sums accumulate in the strip's buffer) won on every spatial kernel measured, 2 cores, interleaved: 3x3
    32->32 56x56 0.319 vs 0.326 ms, 64->64 28x28 0.313 vs 0.335, 128->128 14x14 0.305 vs 0.327 (p10), 256->256
    7x7 0.313 vs 0.374, stride 2 64->64 to 28x28 0.362 vs 0.408. A 1x1 conv's pass is only 8 steps deep per
    block: neither order always won (384->64 14x14: 4 blocks a pass 0.053 vs 0.061; 64->384 14x14: all blocks
    0.050 vs 0.055; 160->960 7x7: even), so both are offered."""
    if in_blocks == 1:
        return [None]
    if kernel_pixels > 1:
        return [1]
    per_pass = _divisors(in_blocks, 4)[-1]
    return [None] if per_pass == in_blocks else [None, per_pass]


def _write_back(sch, block, flat: bool):
    """The accumulators' write-back block, the conv's epilogue fused into it (or, over `flat` pixels, into the pass
    that unflattens them): the same in every design space, so done once before they are copied (each compute_inline
    analyses the whole function)."""
    write = sch.cache_write(block, 0, "global")
    if flat:
        (unflatten,) = sch.get_consumers(write)
        inline_epilogue(sch, unflatten)
        _parallel_rows(sch, unflatten)
        return write
    later = sch.get_consumers(write)  # none: the conv is the function's output
    if later and sch.get(later[0]).name_hint == UNPAIR:  # paired blocks: back to half-width ones
        sch.compute_inline(write)  # from the accumulators, in the tile's write-back
        write = later[0]
    inline_epilogue(sch, write)
    return write


def _schedule(sch, block, write, tile: tuple[int, int, int], pad_in_tile: bool = False,
              in_blocks: int | None = None):
    """One design space (`write`: `_write_back`'s block): `tile` fixed, the unrolling of the kernel loop left to
    the search. `pad_in_tile`: the padded input rows each parallel iteration reads are written under that iteration
    (still in cache when the conv reads them) instead of in a pass of their own over the whole input. `in_blocks`
    (dense convs, see `in_block_passes`): each parallel iteration (a strip of rows; flat pixels: every pixel of its
    channel blocks) reduces that many input-channel blocks per pass over its tiles, the strip written back (and its
    epilogue run) after the last pass. Convs over flat pixels (see `pixel_count`) tile (channel blocks, pixels)
    with `tile`'s rows 1, and their epilogue runs in the pass that unflattens the pixels, since a tile's pixels are
    not a rectangle of the output."""
    a, b, c = tile
    loops = sch.get_loops(block)
    flat = len(loops) == 8  # (n, ocb, pixel, oci) + 4 reductions; dense: 5 + 4, depthwise: 5 + (kh, kw)
    if flat:
        n, ocb, ow, oci, *reductions = loops
        pixels = (ow,)
    else:
        n, ocb, oh, ow, oci, *reductions = loops
        pixels = (oh, ow)
    ocb_o, ocb_i = sch.split(ocb, [None, a])
    splits = [sch.split(loop, [None, f]) for loop, f in zip(pixels, (c,) if flat else (b, c), strict=True)]
    outer, inner = [o for o, _ in splits], [i for _, i in splits]
    if in_blocks:
        passes, icb = sch.split(reductions[0], [None, in_blocks])
        reductions = [icb, *reductions[1:]]
        parallel = [n, ocb_o] if flat else [n, ocb_o, *outer[:-1]]
        serial = [passes, *(outer if flat else outer[-1:])]
    else:
        # parallel over (image, channel blocks, rows); the columns of a row run in order. Flat: over every tile.
        parallel, serial = [n, ocb_o, *outer[:1 if flat else -1]], ([] if flat else outer[-1:])
    sch.reorder(*parallel, *serial, *reductions, ocb_i, *inner, oci)
    rows = sch.fuse(*parallel)
    sch.parallel(rows)
    for loop in (ocb_i, *inner):
        sch.unroll(loop)
    sch.vectorize(oci)
    sampled_unroll(sch, reductions[-2])  # kw of a dense conv (unrolls the in-channel loop), kh of a depthwise one
    sch.reverse_compute_at(write, rows if flat or in_blocks else outer[-1], preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(write)[-1])
    # The padded input: its own parallel pass. Left to the generic rules it was sometimes computed inside the
    # conv's parallel loop with a nested parallel loop of its own, which measured 0.8 ms in tuning and ran 1.7 ms
    # in the model.
    for producer in sch.get_producers(block):
        if pad_in_tile:
            sch.compute_at(producer, rows, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(producer)[-1])
            sch.annotate(producer, "schedule_rule", "None")
        else:
            _parallel_rows(sch, producer)
    scheduled(sch, block, write)
    return sch


def schedule_rule(sch, block):
    loops = sch.get_loops(block)
    if PAIRED in sch.get(block).annotations:  # the two lane axes of a pair (see `_conv2d_nchwc`) are one vector
        sch.fuse(*loops[-6:-4])
        loops = sch.get_loops(block)
    extents = [int(sch.get(loop).extent) for loop in loops]
    depthwise = len(loops) == 7  # no input-channel reduction: channel blocks share nothing, tile rows × columns only
    flat = len(loops) == 8  # output pixels as one axis: tiles of (channel blocks, 1 row, pixels)
    lanes = extents[3 if flat else 4]
    rows, cols = (1, extents[2]) if flat else (extents[2], extents[3])
    tiles = register_tiles(1 if depthwise else extents[1], rows, cols, vector_registers(lanes), dense=not depthwise)
    # the padded input in a pass of its own, or its rows written inside the parallel loop that reads them (still in
    # cache; a dense conv re-pads the rows a strip's window shares with its neighbours, and re-pads them once per
    # group of output-channel blocks). Flat pixels run parallel over channel-block groups only: every group would
    # re-pad the whole input, so they keep the pass.
    placements = (False, True) if sch.get_producers(block) and (depthwise or not flat) else (False,)
    write = _write_back(sch, block, flat)
    spaces = []
    for tile in tiles or [(1, 1, 1)]:
        passes: list[int | None] = [None]
        if not depthwise:
            in_blocks, kh, kw = extents[4:7] if flat else extents[5:8]
            passes = in_block_passes(kh * kw, in_blocks)
            # flat pixels in passes run parallel over channel-block groups only: too few to share out, keep the
            # tile-by-tile order too
            if flat and None not in passes and extents[0] * extents[1] // tile[0] < MIN_PARALLEL:
                passes.append(None)
        spaces += [_schedule(sch.copy(), block, write, tile, pad, p) for pad in placements for p in passes]
    return spaces
