"""3x3 stride-1 dense convs by Winograd's minimal filtering F(4x4, 3x3), in the blocked layout, for tuned CPU builds.

Why: the direct blocked conv (conv_nchwc) runs pruned resnet18's 3x3 convs at 0.82-0.91 of the cores' measured FMA
peak, as ONNX Runtime's MLAS does (MLAS has no Winograd for float32): no schedule makes it much faster. F(4x4, 3x3)
computes a 4x4 output tile from a 6x6 input tile with 36 multiplies per input-output channel pair instead of 144
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). Zen 5, 2 threads, each conv + bias +
ReLU, best design space of each: 32->32 56x56 0.130 -> 0.048 ms, 64->64 28x28 0.120 -> 0.037, 128->128 14x14
0.122 -> 0.061, 256->256 7x7 0.122 -> 0.060, 16->16 112x112 0.122 -> 0.075; a 4x4 output (one tile) 0.047 -> 0.051.

How (channel blocks are the vector lanes throughout):
- `kernel_transform`: U = G g Gᵀ per channel pair, a call of its own on the constant kernel: constant folding
  transforms it once at build time (as conv_nchwc's `paired_kernel`).
- `conv2d_winograd`: the input tiles V = Bᵀ d B (rows, then columns: each a sparse sum of the tile's rows with small
  integer weights, not a matrix multiply), 36 independent products M[ξν] = U[ξν] · V[ξν] over the input channels
  (the only multiplies that grow with both channel counts), the output tiles Y = Aᵀ M A, which the conv's consumers
  (bias, residual, activation) fuse into. The input is padded to whole tiles; outputs past the conv's are dropped.
- Which convs (`pays`): enough tiles to save at least half the multiplies, and, where the transformed weights (4x
  the kernel) do not stay in the cache, enough tiles per call to make up for streaming them: pruned resnet18's
  256->256 7x7 convs stay direct (by F(4, 3) the model ran 0.84x ONNX Runtime's latency, without them 0.73x).
- The schedule rule: the input transform parallel over (image, channel block, tile), the products tiled into
  registers as the direct conv's (output-channel blocks x tiles, `register_tiles`) and parallel over the 36
  products, the output transform and the epilogue parallel over rows of tiles. Or parallel over groups of tiles
  (a rectangle of the map), each group's input transform, products and output transform in turn, in the cache
  (`fused_group`, `_grouped`): otherwise the transformed input (2.25x the input) and the products go to memory
  and back. Groups and the choice of convs are sized by the machine (`Machine`: cores, a core's L2).
Numerics: the transforms scale values by up to 8 and by 1/24: about 1e-5 relative error per conv in float32 (the
direct conv ~1e-7); `--no-winograd` computes every conv directly.
"""

from __future__ import annotations

from dataclasses import dataclass

RULE = "prune_compile_conv2d_winograd"
# of the rule's design spaces (tuning.rule_revisions): 2 added tile groups (`fused_group`), 3 sized them by the
# machine's cores and L2 (`Machine`)
SPACES_REVISION = 3
TILE = 4  # outputs per tile side: m of F(m x m, 3 x 3)
ALPHA = TILE + 2  # input tile side
# Lavin & Gray's F(4, 3) matrices, interpolation points 0, 1, -1, 2, -2 and infinity.
B_T = ((4, 0, -5, 0, 1, 0),
       (0, -4, -4, 1, 1, 0),
       (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0),
       (0, 2, -1, -2, 1, 0),
       (0, 4, 0, -5, 0, 1))
G = ((1 / 4, 0, 0),
     (-1 / 6, -1 / 6, -1 / 6),
     (-1 / 6, 1 / 6, -1 / 6),
     (1 / 24, 1 / 12, 1 / 6),
     (1 / 24, -1 / 12, 1 / 6),
     (0, 0, 1))
A_T = ((1, 1, 1, 1, 1, 0),
       (0, 1, -1, 2, -2, 0),
       (0, 1, 1, 4, 4, 0),
       (0, 1, -1, 8, -8, 1))
MIN_TILES = 4  # one tile (a 4x4 output) ran 10% slower than the direct conv; four (7x7) 2x faster
MIN_SAVING = 2.0  # multiplies saved after padding to whole tiles: 4x for whole tiles, 3.1x at 7x7 and 14x14
FMAS_PER_BYTE = 8  # FMAs the cores run per byte of weights streamed from memory (2 Zen 5 cores: 275 G/s, ~30 GB/s)


@dataclass(frozen=True)
class Machine:
    """What the choice of convs and the tile groups are sized by: the cores the kernels run on (a tile group per
    core at least) and a core's L2 cache (the transformed weights that stay in it between calls; a group's
    transformed inputs take a quarter of it). The defaults are the 2-core Zen 4 and 5 hosts everything here was
    measured on (1 MiB of L2 each); builds for the host read its own, board presets give theirs
    (`build.winograd_machine`)."""

    cores: int = 2
    l2_bytes: int = 1 << 20

    @property
    def group_bytes(self) -> int:
        return self.l2_bytes // 4


HOST_MEASURED = Machine()


def tiles(out_h: int, out_w: int) -> tuple[int, int]:
    """Tile rows and columns covering an output."""
    return -(-out_h // TILE), -(-out_w // TILE)


def pays(out_h: int, out_w: int, channel_pairs: int, images: int = 1, machine: Machine = HOST_MEASURED) -> bool:
    """Whether F(4, 3) beats the direct conv on an output of this size with `channel_pairs` (input x output
    channels, blocks padded). Compute: 36 multiplies per tile and channel pair instead of 144 per 4x4 outputs, on
    every tile, whole or not (MIN_TILES, MIN_SAVING). Memory: the transformed weights are 4x the kernel's (36 floats
    per pair instead of 9) and each is used once per tile; past a core's L2 (`machine`) each call streams them,
    so the cost per pair is the larger of FMAs and bytes x FMAS_PER_BYTE, for both algorithms. Pruned resnet18 on
    Zen 5, the same rounds: its 256->256 7x7 convs (9.4 MB, 4 tiles) by F(4, 3) took the model from 0.73x ONNX
    Runtime's latency to 0.84x; its 128->128 14x14 ones (2.4 MB, 16 tiles) from 0.77x to 0.73x."""
    th, tw = tiles(out_h, out_w)
    tile_count, outputs = th * tw * images, out_h * out_w * images
    if th * tw < MIN_TILES or 4 * outputs / (TILE * TILE * tile_count) < MIN_SAVING:
        return False
    if ALPHA * ALPHA * 4 * channel_pairs <= machine.l2_bytes:
        return True
    return max(ALPHA * ALPHA * tile_count, ALPHA * ALPHA * 4 * FMAS_PER_BYTE) < max(9 * outputs, 9 * 4 * FMAS_PER_BYTE)


def applies(call, machine: Machine = HOST_MEASURED) -> bool:
    """Whether a relax.nn.conv2d call in the blocked layout (a 6-D kernel, see conv_nchwc) is one F(4, 3) computes:
    dense, 3x3, stride 1, no dilation, float32, a blocked input, and a shape `pays` for."""
    attrs = call.attrs
    data, kernel = (call.args[i].ty for i in (0, 1))
    data_shape, kernel_shape = ([int(d) for d in t.shape] for t in (data, kernel))
    if len(kernel_shape) != 6 or len(data_shape) != 5 or attrs.groups != 1:
        return False
    if kernel_shape[2:4] != [3, 3] or any(int(v) != 1 for v in (*attrs.strides, *attrs.dilation)):
        return False
    if str(data.dtype) != "float32" or str(attrs.out_dtype or "float32") != "float32":
        return False
    pt, pl, pb, pr = (int(v) for v in attrs.padding)
    n, h, w = data_shape[0], *data_shape[2:4]
    pairs = data_shape[1] * data_shape[4] * kernel_shape[0] * kernel_shape[5]
    return pays(h + pt + pb - 2, w + pl + pr - 2, pairs, n, machine)


def _combination(matrix, row, value, dtype: str | None = None):
    """sum_a matrix[row][a] * value(a) for a loop variable `row`, as one term per column of the matrix that is not
    all zeros, its coefficient selected by `row` among the column's constants. The schedule unrolls `row`, and the
    simplifier folds each coefficient, then drops the terms it makes 0 and the multiplies by 1.
    Why coefficients and not a sum per row selected by `row`: unrolled, every row carried all six sums until the
    simplifier picked one, and TIR's passes after the unrolling walked them all. A 64-channel 56x56 conv's candidate
    took 444 ms to build, 278 this way; the same arithmetic (outputs equal bit for bit) and run time (1.001x over 42
    design spaces). `dtype`: the values' type where they are expressions (a padded read) rather than tensor
    elements."""
    from tvm import tirx

    total = None
    for a in range(len(matrix[0])):
        column = [weights[a] for weights in matrix]
        if not any(column):
            continue
        v = value(a)
        kind = dtype or v.dtype
        coefficient = tirx.const(float(column[-1]), kind)
        for i in range(len(column) - 2, -1, -1):
            coefficient = tirx.Select(row == i, tirx.const(float(column[i]), kind), coefficient)
        term = coefficient * v
        total = term if total is None else total + term
    return total


def kernel_transform(kernel):
    """U = G g Gᵀ for a blocked kernel OIHW[ib]i[ob]o, as (ALPHA², output blocks, input blocks, ib, ob): the product
    for (ξ, ν) reads U[ξ * ALPHA + ν] (see `conv2d_winograd`)."""
    from tvm import te

    ocb, icb, _, _, ib, ob = (int(d) for d in kernel.shape)
    rows = te.compute((ALPHA, 3, ocb, icb, ib, ob),
                      lambda xi, s, o, i, ii, oo: _combination(G, xi, lambda r: kernel[o, i, r, s, ii, oo]),
                      name="winograd_kernel_rows")
    return te.compute((ALPHA * ALPHA, ocb, icb, ib, ob),
                      lambda e, o, i, ii, oo: _combination(G, e % ALPHA, lambda s: rows[e // ALPHA, s, o, i, ii, oo]),
                      name="winograd_kernel")


def padded_reader(data, before: tuple[int, int], after: tuple[int, int]):
    """`data` (NCHW[b]c) read as if padded with zeros by `before` and `after` (rows, columns), with no pad of its own:
    the reads the input transform makes, as `topi.nn.pad` inlined into it writes them. A pad stage the schedule
    inlines costs its analysis in every design space the search replays: 26 of the 31 ms a Winograd space's trace
    took (64 channels, 56x56), and the search replays 16 or more per batch (the evolutionary one, hundreds)."""
    from tvm import tirx

    h, w = (int(d) for d in data.shape[2:4])
    zero = tirx.const(0, data.dtype)

    def read(n, c, y, x, ci):
        inside = []
        for v, lo, extent, hi in ((y, before[0], h, after[0]), (x, before[1], w, after[1])):
            if lo:
                inside.append(v >= lo)
            if hi:
                inside.append(v < lo + extent)
        value = data[n, c, y - before[0] if before[0] else y, x - before[1] if before[1] else x, ci]
        return tirx.if_then_else(tirx.all(*inside), value, zero) if inside else value

    return read


def conv2d_winograd(data, weights, padding, out_dtype):
    """The conv of blocked `data` (NCHW[ib]c) with a transformed kernel (`kernel_transform`), output NCHW[ob]c."""
    from tvm import te

    n_, cb_, h, w, ib = (int(d) for d in data.shape)
    kb_, ob = int(weights.shape[1]), int(weights.shape[4])
    pt, pl, pb, pr = (int(v) for v in padding)
    out_h, out_w = h + pt + pb - 2, w + pl + pr - 2
    th, tw = tiles(out_h, out_w)
    # whole tiles read ALPHA input rows from each TILE-th: zeros past the conv's own padding (outputs dropped)
    padded = padded_reader(data, (pt, pl), (TILE * th + 2 - h - pt, TILE * tw + 2 - w - pl))
    # tiles by (row, column) and transforms by (ξ, ν) on axes of their own: each buffer index one loop variable,
    # which lets the schedule place a group of tiles' transforms inside the products' loop over groups
    rows = te.compute(
        (ALPHA, ALPHA, n_, cb_, th, tw, ib),
        lambda xi, b, n, c, ty, tx, ci: _combination(
            B_T, xi, lambda a: padded(n, c, ty * TILE + a, tx * TILE + b, ci), data.dtype),
        name="winograd_input_rows")
    inputs = te.compute(
        (ALPHA, ALPHA, n_, cb_, th, tw, ib),
        lambda xi, nu, n, c, ty, tx, ci: _combination(B_T, nu, lambda b: rows[xi, b, n, c, ty, tx, ci]),
        name="winograd_input")
    icb, ici = te.reduce_axis((0, cb_), "icb"), te.reduce_axis((0, ib), "ici")
    products = te.compute(
        (ALPHA, ALPHA, n_, kb_, th, tw, ob),
        lambda xi, nu, n, o, ty, tx, oc: te.sum(
            inputs[xi, nu, n, icb, ty, tx, ici].astype(out_dtype)
            * weights[xi * ALPHA + nu, o, icb, ici, oc].astype(out_dtype), axis=[icb, ici]),
        name="winograd_products", attrs={"schedule_rule": RULE})
    columns = te.compute(
        (n_, kb_, th, tw, TILE, ALPHA, ob),
        lambda n, o, ty, tx, i, nu, oc: _combination(A_T, i, lambda xi: products[xi, nu, n, o, ty, tx, oc]),
        name="winograd_output_rows")
    return te.compute(
        (n_, kb_, out_h, out_w, ob),
        lambda n, o, y, x, oc: _combination(
            A_T, x % TILE, lambda nu: columns[n, o, y // TILE, x // TILE, y % TILE, nu, oc]),
        name="winograd_output")


def legalize(bb, call):
    """The LegalizeOps lowering of a conv `applies` to: the kernel transform (folded), then the conv."""
    weights = bb.emit(bb.call_te(kernel_transform, call.args[1], primfunc_name_hint="winograd_kernel"))
    return bb.call_te(conv2d_winograd, call.args[0], weights, call.attrs.padding, "float32",
                      primfunc_name_hint="conv2d_winograd")


def fused_group(tile_rows: int, tile_columns: int, tiles_per_step: int, in_channels: int,
                machine: Machine = HOST_MEASURED) -> int:
    """Tiles per group for the design space that runs each group of tiles' three steps in turn, its transformed
    inputs and products kept in the cache: the most whose transformed inputs (36 floats per tile and input channel)
    fit in a quarter of a core's L2 (`machine`), in steps of the register tile's `tiles_per_step`, a rectangle of
    tiles (part of a row or whole rows: its input and output are rectangles of the maps) and a group per core at
    least, so that every core has one; 0 when none does. Transforming all tiles first writes the transformed
    input, 2.25x the input, to memory and reads it back: a 48->16 conv at 160x160 (PP-OCRv4 det's pruned FPN,
    40x40 tiles) took 1.14 ms so, 0.51 with its input transforms in groups of 20 or 32 tiles (tuned); the output
    transforms in the groups too took another 5-10% off (same seeds, alone)."""
    count = tile_rows * tile_columns
    fits = [g for g in range(tiles_per_step, count // machine.cores + 1, tiles_per_step)
            if rectangle(tile_rows, tile_columns, g) and ALPHA * ALPHA * 4 * in_channels * g <= machine.group_bytes]
    return max(fits, default=0)


def rectangle(tile_rows: int, tile_columns: int, tiles: int) -> bool:
    """Whether runs of `tiles` consecutive tiles (row by row) are rectangles: part of one row, or whole rows. TVM
    writes back and transforms the bounding box of what a loop computes: a row and a half would be two rows."""
    return tile_columns % tiles == 0 or (tiles % tile_columns == 0 and tile_rows * tile_columns % tiles == 0)


def _schedule(sch, products, tile: tuple[int, int], tiles_parallel: bool):
    """One design space: the products' register tile (`tile`: output-channel blocks, tiles) fixed; parallel over
    the 36 products and output-channel block groups, and over groups of tiles too when `tiles_parallel`; each of
    the three steps a loop nest over all tiles."""
    from .conv_nchwc import scheduled

    inputs, rows, columns, output = _steps(sch, products)
    a, b = tile
    xi, nu, n, o, ty, tx, oc, icb, ici = sch.get_loops(products)
    e, t = sch.fuse(xi, nu), sch.fuse(ty, tx)
    o_outer, o_inner = sch.split(o, [None, a])
    t_outer, t_inner = sch.split(t, [None, b])
    sch.reorder(e, n, o_outer, t_outer, icb, ici, o_inner, t_inner, oc)
    parallel = sch.fuse(e, n, o_outer, t_outer) if tiles_parallel else sch.fuse(e, n, o_outer)
    sch.parallel(parallel)
    write = _register_tile(sch, products, parallel if tiles_parallel else t_outer, icb, ici, o_inner, t_inner, oc)
    xi, nu, n, c, ty, tx, ci = sch.get_loops(inputs)
    sch.reorder(n, c, ty, tx, xi, nu, ci)
    per_tile = sch.fuse(n, c, ty, tx)
    sch.parallel(per_tile)
    _input_tile(sch, inputs, rows, per_tile)
    n, o, y, x, oc = sch.get_loops(output)
    y_tile, y_in = sch.split(y, [None, TILE])
    x_tile, x_in = sch.split(x, [None, TILE])
    sch.reorder(n, o, y_tile, x_tile, y_in, x_in, oc)
    sch.parallel(sch.fuse(n, o, y_tile))
    _output_tile(sch, columns, x_tile, y_in, x_in, oc)
    scheduled(sch, products, rows, inputs, write, columns, output)
    return sch


def _grouped(sch, products, tile: tuple[int, int], group: tuple[int, int]):
    """One design space: parallel over groups of (`group`: rows, columns) tiles, each group's input transform,
    products (register tile `tile`) and output transform in turn, in the cache (`fused_group`). Built from the
    output inwards: each step is computed where the next one reads it (the other way, TVM cannot place the
    output transform, which reads all 36 products of a tile)."""
    from .conv_nchwc import scheduled

    inputs, rows, columns, output = _steps(sch, products)
    a, b = tile
    n, o, y, x, oc = sch.get_loops(output)
    y_group, y_tile, y_in = sch.split(y, [None, group[0], TILE])
    x_group, x_tile, x_in = sch.split(x, [None, group[1], TILE])
    sch.reorder(n, y_group, x_group, o, y_tile, x_tile, y_in, x_in, oc)
    parallel = sch.fuse(n, y_group, x_group)
    sch.parallel(parallel)
    _output_tile(sch, columns, x_tile, y_in, x_in, oc)
    sch.compute_at(products, parallel, preserve_unit_loops=True)
    xi, nu, n, o, ty, tx, oc, icb, ici = sch.get_loops(products)[-9:]
    e, t = sch.fuse(xi, nu), sch.fuse(ty, tx)
    o_outer, o_inner = sch.split(o, [None, a])
    t_outer, t_inner = sch.split(t, [None, b])
    sch.reorder(n, e, o_outer, t_outer, icb, ici, o_inner, t_inner, oc)
    write = _register_tile(sch, products, t_outer, icb, ici, o_inner, t_inner, oc)
    sch.compute_at(inputs, parallel, preserve_unit_loops=True)
    xi, nu, n, c, ty, tx, ci = sch.get_loops(inputs)[-7:]
    sch.reorder(n, c, ty, tx, xi, nu, ci)
    _input_tile(sch, inputs, rows, tx)
    scheduled(sch, products, rows, inputs, write, columns, output)
    return sch


def _steps(sch, products):
    """The blocks around the products: (input transform, its rows, output transform's rows, output)."""
    (inputs,) = sch.get_producers(products)
    (rows,) = sch.get_producers(inputs)
    (columns,) = sch.get_consumers(products)
    (output,) = sch.get_consumers(columns)
    return inputs, rows, columns, output


def _register_tile(sch, products, write_at, icb, ici, o_inner, t_inner, oc):
    """The products' register tile, as the direct conv's: its accumulators written back after the reduction."""
    from .conv_nchwc import sampled_unroll

    sch.unroll(o_inner)
    sch.unroll(t_inner)
    sch.vectorize(oc)
    sampled_unroll(sch, ici)
    write = sch.cache_write(products, 0, "global")
    sch.reverse_compute_at(write, write_at, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(write)[-1])
    return write


def _input_tile(sch, inputs, rows, per_tile) -> None:
    """Each tile's input transform under `per_tile`: its rows, then its columns, ξ, ν and the rows unrolled."""
    xi, nu, ci = sch.get_loops(inputs)[-3:]
    sch.compute_at(rows, per_tile)
    for loop in sch.get_loops(rows)[-3:-1]:  # ξ and the row
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(rows)[-1])
    sch.unroll(xi)
    sch.unroll(nu)
    sch.vectorize(ci)


def _output_tile(sch, columns, x_tile, y_in, x_in, oc) -> None:
    """Each tile's output transform under `x_tile`: its rows' columns, then its outputs with the epilogue."""
    sch.compute_at(columns, x_tile)
    for loop in sch.get_loops(columns)[-3:-1]:
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(columns)[-1])
    sch.unroll(y_in)
    sch.unroll(x_in)
    sch.vectorize(oc)


def schedule_rule(sch, products, machine: Machine = HOST_MEASURED):
    from .conv_nchwc import inline_epilogue, register_tiles, vector_registers

    # The epilogue is the same in every design space: fused once, before the spaces are copied (each inlining
    # analyses the whole function). The input transform reads the input padded in place (`padded_reader`).
    output = _steps(sch, products)[3]
    inline_epilogue(sch, output)

    extents = [int(sch.get(loop).extent) for loop in sch.get_loops(products)]
    out_blocks, tile_rows, tile_columns, lanes = extents[3:7]
    count, in_channels = tile_rows * tile_columns, extents[7] * extents[8]
    # register tiles over tiles are rectangles: the write-back of a row and a half would write two rows, one of
    # them half computed
    steps = [(a, b) for a, _, b in register_tiles(out_blocks, 1, count, vector_registers(lanes))
             if rectangle(tile_rows, tile_columns, b)] or [(1, 1)]
    spaces = []
    for a, b in steps:
        spaces += [_schedule(sch.copy(), products, (a, b), parallel) for parallel in (False, True)]
        group = fused_group(tile_rows, tile_columns, b, in_channels, machine)
        if group:
            shape = (group // tile_columns, tile_columns) if group >= tile_columns else (1, group)
            spaces.append(_grouped(sch.copy(), products, (a, b), shape))
    return spaces


def winograd_kernels(mod) -> int:
    """How many kernels of a lowered module compute a conv by F(4x4, 3x3) (its name says so; fused epilogues
    add to the name)."""
    return sum(1 for gv in mod.get_global_vars() if "conv2d_winograd" in gv.name_hint)
