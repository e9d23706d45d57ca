"""Blocked-channel convolutions (`--conv-layout NCHWc`): which convs are converted, the register tiles the schedule
rule offers, and a tuned library with every kind of conv (RGB input, strided, 1x1, depthwise, grouped, a width that
does not divide by the vector, residual, pooling, ReLU6 and hard-swish clips) agreeing with ONNX Runtime."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from prune_compile.backends import ort
from prune_compile.backends import tvm as tvm_backend
from prune_compile.backends.tvm import parallel_launcher
from prune_compile.backends.tvm.conv_nchwc import (
    MAX_SPACES,
    channel_block,
    fma_cycles,
    in_block_passes,
    input_block,
    pixel_count,
    register_tiles,
)

pytest.importorskip("tvm")

RTOL = 1e-4
# a tuned blocked build's pipeline, and how many of its kernels compute convs by Winograd's F(4x4, 3x3)
PIPELINE = re.compile(r"metaschedule, NCHW\d+c(, Winograd F\(4x4,3x3\) in \d+ kernels)?")


def mixed_convs_onnx():
    """Every conv shape the layout choice distinguishes, with BN folded the way compile folds it."""
    import torch

    from prune_compile.ir import export_onnx
    from prune_compile.ir.fx_importer import import_torch_module

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)  # RGB: read as NCHW, in one block of 3
            self.body = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
            self.bn = torch.nn.BatchNorm2d(16)
            self.down = torch.nn.Conv2d(16, 32, 1, stride=2)  # 1x1 strided
            self.dw = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)  # depthwise: NCHW8c, OIHW1i8o
            self.grouped = torch.nn.Conv2d(32, 32, 1, groups=4)  # grouped, not depthwise: stays NCHW
            self.narrow = torch.nn.Conv2d(32, 24, 1)  # 24 outputs: NCHW8c, also on AVX-512 (half a vector)
            self.odd = torch.nn.Conv2d(24, 12, 3, padding=1)  # 12 outputs: not a multiple of the vector, NCHW
            self.fc = torch.nn.Linear(12, 5)

        def forward(self, image):
            y = torch.relu(self.stem(image))
            y = torch.relu(self.bn(self.body(y)) + y)
            y = torch.nn.functional.max_pool2d(torch.relu(self.down(y)), 2, ceil_mode=True)
            y = self.grouped(torch.nn.functional.relu6(self.dw(y)) + torch.nn.functional.hardswish(y))
            y = self.odd(torch.nn.functional.hardswish(self.narrow(y)))  # reads the conv's output twice
            return self.fc(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Mixed().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return export_onnx(import_torch_module(model, (torch.randn(1, 3, 30, 30),), name="Mixed"))


def test_input_block_divides_the_input_channels() -> None:
    assert input_block(64, 8) == 8
    assert input_block(3, 8) == 3  # RGB: one block of 3
    assert input_block(12, 8) == 6
    assert input_block(20, 16) == 10
    assert input_block(24, 16) == 8  # the producer's half-vector block: no transform between the convs
    for c in range(1, 70):
        assert c % input_block(c, 8) == 0 and c % input_block(c, 16) == 0


def test_avx512_blocks_channels_only_a_half_vector_divides_by_8() -> None:
    assert [channel_block(c, 16) for c in (32, 24, 8, 12, 3)] == [16, 8, 8, 0, 0]
    assert [channel_block(c, 8) for c in (32, 24, 12, 4)] == [8, 8, 0, 0]  # AVX2: 4-lane halves stay NCHW
    assert [channel_block(c, 4) for c in (8, 6, 2)] == [4, 0, 0]


@pytest.mark.parametrize("shape,registers", [((4, 56, 56), 16), ((32, 7, 7), 16), ((8, 14, 14), 32), ((1, 1, 1), 16)])
@pytest.mark.parametrize("dense", [True, False])
def test_register_tiles_divide_the_output_and_leave_registers_for_operands(shape, registers, dense) -> None:
    tiles = register_tiles(*shape, registers, dense=dense)
    assert 0 < len(tiles) <= MAX_SPACES
    accumulators = [a * b * c for a, b, c in tiles]
    assert all(n <= registers - 4 for n in accumulators)  # 14 accumulators on 16 registers spilled
    for a, b, c in tiles:
        assert shape[0] % a == 0 and shape[1] % b == 0 and shape[2] % c == 0  # no partial tiles
    if dense:  # cheapest modelled tile first, none worse than 1.5x of it
        costs = [fma_cycles(t) for t in tiles]
        assert costs == sorted(costs) and costs[-1] <= 1.5 * costs[0]
    else:
        assert accumulators == sorted(accumulators, reverse=True)


def test_dense_tiles_skip_what_the_model_and_the_measurements_call_slow() -> None:
    """On 16 AVX2 registers: a 256-channel 7x7 conv keeps only the 7-column tile (it measured 0.42 ms against
    0.64 for 4 channel blocks × 1 pixel and 2.2 for one vector); a 32-channel 56x56 conv keeps its 8-accumulator
    tiles, the ones with 4 or 2 output-channel blocks first, and no 14-accumulator tile (1.26-1.8 ms vs 0.70)."""
    assert register_tiles(32, 7, 7, 16) == [(1, 1, 7)]
    tiles = register_tiles(4, 56, 56, 16)
    assert {a * b * c for a, b, c in tiles} <= {7, 8}
    assert all(t[0] > 1 for t in tiles[:5]) and all(t[0] == 1 for t in tiles[5:])
    assert fma_cycles((4, 2, 1)) < fma_cycles((1, 1, 8)) < fma_cycles((4, 1, 1)) < fma_cycles((1, 1, 1))


def test_outputs_no_fast_tile_divides_are_computed_as_flat_pixels() -> None:
    """7x7 outputs (the last ResNet stage) divide only into 7-pixel tiles; as 50 flat pixels they take 2 channel
    blocks x 5 pixels or 4 x 2 (the cycle model's best). Shapes a fast tile already divides, and 32-register targets (28
    accumulators: 4 blocks x 7 columns), keep rows and columns; at most 10% of the pixels are dropped ones."""
    assert pixel_count(32, 7, 7, 16) == 50
    assert set(register_tiles(32, 1, 50, 16)[:2]) == {(2, 1, 5), (4, 1, 2)}
    assert pixel_count(10, 7, 7, 16) == 50  # 2 blocks x 5 pixels
    assert pixel_count(3, 7, 7, 16) == 51  # 3 blocks x 3 pixels
    for blocks, size in [(4, 56), (8, 28), (16, 14), (2, 112), (1, 56), (32, 14)]:
        assert pixel_count(blocks, size, size, 16) == 0
    assert pixel_count(32, 7, 7, 32) == 0
    for blocks in range(1, 65):
        for size in range(1, 30):
            pixels = pixel_count(blocks, size, size, 16)
            assert pixels == 0 or size * size <= pixels <= size * size * 1.1
            if pixels:
                assert fma_cycles(register_tiles(blocks, 1, pixels, 16)[0]) < fma_cycles(
                    register_tiles(blocks, size, size, 16)[0])


def _conv_layouts(lanes: int) -> list[tuple[int, str, str, str]]:
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from prune_compile.backends.tvm.conv_nchwc import convert_layout

    mod = convert_layout(from_onnx(mixed_convs_onnx(), keep_params_in_input=False), lanes)
    layouts = []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.nn.conv2d":
            layouts.append((int(expr.attrs.groups), str(expr.attrs.data_layout), str(expr.attrs.kernel_layout),
                            str(expr.attrs.out_layout)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return sorted(layouts)


def test_dense_and_depthwise_convs_whose_outputs_divide_by_the_vector_are_blocked() -> None:
    assert _conv_layouts(8) == sorted([
        (1, "NCHW", "OIHW3i8o", "NCHW8c"), (1, "NCHW8c", "OIHW8i8o", "NCHW8c"),
        (1, "NCHW8c", "OIHW8i8o", "NCHW8c"), (32, "NCHW8c", "OIHW1i8o", "NCHW8c"), (4, "NCHW", "OIHW", "NCHW"),
        (1, "NCHW8c", "OIHW8i8o", "NCHW8c"), (1, "NCHW", "OIHW", "NCHW")])


def test_avx512_convs_take_16_channel_blocks_and_8_where_only_8_divides() -> None:
    assert _conv_layouts(16) == sorted([
        (1, "NCHW", "OIHW3i16o", "NCHW16c"), (1, "NCHW16c", "OIHW16i16o", "NCHW16c"),
        (1, "NCHW16c", "OIHW16i16o", "NCHW16c"), (32, "NCHW16c", "OIHW1i16o", "NCHW16c"),
        (4, "NCHW", "OIHW", "NCHW"), (1, "NCHW16c", "OIHW16i8o", "NCHW8c"), (1, "NCHW", "OIHW", "NCHW")])


def test_clips_follow_the_blocked_layout() -> None:
    """ReLU6 (the frontend's opaque TIR maximum/minimum) and hard-swish (relax.clip) become Relax maximum/minimum,
    which ConvertLayout moves into NCHW8c: no layout transform around them, so they fuse into the conv."""
    from collections import Counter

    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from prune_compile.backends.tvm.clip_ops import clips_as_min_max
    from prune_compile.backends.tvm.conv_nchwc import convert_layout

    def counts(mod) -> Counter:
        found: Counter = Counter()
        relax.analysis.post_order_visit(mod["main"], lambda e: found.update(
            [e.op.name] if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else []))
        return found

    plain = from_onnx(mixed_convs_onnx(), keep_params_in_input=False)
    rewritten = clips_as_min_max(plain)
    before = counts(convert_layout(plain, 8))  # the input module is left as it was
    after = counts(convert_layout(rewritten, 8))
    assert after.get("relax.clip", 0) == 0 and before.get("relax.clip", 0) == 2  # the two hard-swishes
    assert after["relax.maximum"] == before.get("relax.maximum", 0) + 3  # and the ReLU6
    assert after["relax.minimum"] == before.get("relax.minimum", 0) + 3
    # Each clip in NCHW cost a transform out of and back into the blocked layout.
    assert after["relax.layout_transform"] <= before["relax.layout_transform"] - 6


def test_only_topi_maximum_and_minimum_calls_are_rewritten() -> None:
    """The call_tir rewrite compares the PrimFunc's body with topi's, whatever its name (the frontend's are
    `maximum`, `maximum1`, ... one per shape): a function that computes something else stays."""
    import tvm
    from tvm import relax, te, topi

    x = relax.Var("x", relax.TensorType((1, 8, 4, 4), "float32"))
    c = relax.Var("c", relax.TensorType((), "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x, c]):
        with builder.dataflow():
            doubled = builder.emit_te(lambda a, b: te.compute(a.shape, lambda *i: tvm.tirx.max(a(*i), b()) * 2,
                                                              name="T_maximum"), x, c, primfunc_name_hint="maximum")
            real = builder.emit_te(topi.maximum, doubled, c, primfunc_name_hint="clamp")
            out = builder.emit_output(real)
        builder.emit_func_output(out)
    from prune_compile.backends.tvm.clip_ops import clips_as_min_max

    calls = []
    relax.analysis.post_order_visit(clips_as_min_max(builder.get())["main"], lambda e: calls.append(
        e.op.name if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None))
    assert calls.count("relax.maximum") == 1 and calls.count("relax.call_tir") == 1


def _blocked_conv_reference(x: np.ndarray, k: np.ndarray, stride: int, depthwise: bool) -> np.ndarray:
    """k x k (from the kernel), padding k // 2, in the blocked layouts: x [n, cb, h, w, c], k [ocb, icb, kh, kw, ic,
    oc] (depthwise: icb = ic = 1, one kernel vector per channel block)."""
    size = k.shape[2]
    pad = size // 2
    p = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h, out_w = ((d + 2 * pad - size) // stride + 1 for d in x.shape[2:4])
    out = 0.0
    for i in range(size):
        for j in range(size):
            win = p[:, :, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
            if depthwise:
                out = out + win * k[None, :, 0, i, j, 0, :][:, :, None, None, :]
            else:
                out = out + np.einsum("nahwi,baio->nbhwo", win, k[:, :, i, j])
    return out


def test_in_block_passes_follow_the_kernel_size() -> None:
    """Spatial kernels: one input-channel block per pass (MLAS's order), 1x1 kernels: both orders, the pass at most
    4 blocks deep and dividing them; nothing to split with one block."""
    assert in_block_passes(9, 16) == [1]
    assert in_block_passes(49, 1) == [None]
    assert in_block_passes(1, 48) == [None, 4]
    assert in_block_passes(1, 6) == [None, 3]
    assert in_block_passes(1, 4) == [None]
    assert in_block_passes(1, 5) == [None, 1]


def count_inlines_in_spaces(monkeypatch, module, space_functions: tuple[str, ...]) -> list[int]:
    """Patch `module`'s per-design-space functions to count the compute_inline / reverse_compute_inline calls made
    while they run; returns the counter (one item per call). Each such call analyses the whole function (30 ms for
    a Winograd conv's pad), so a rule does them once, before its spaces are copied."""
    from tvm.s_tir import Schedule

    calls, inside = [], []
    for name in ("compute_inline", "reverse_compute_inline"):
        original = getattr(Schedule, name)

        def counted(self, *args, _original=original, **kwargs):
            if inside:
                calls.append(1)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(Schedule, name, counted)
    for name in space_functions:
        original = getattr(module, name)

        def space(*args, _original=original, **kwargs):
            inside.append(1)
            try:
                return _original(*args, **kwargs)
            finally:
                inside.pop()
        monkeypatch.setattr(module, name, space)
    return calls


@pytest.mark.parametrize(("depthwise", "stride", "size", "kernel_size", "in_blocks"),
                         [(True, 1, 12, 3, 2), (True, 2, 11, 3, 2), (False, 1, 10, 3, 2), (False, 1, 7, 3, 2),
                          (False, 2, 13, 3, 2), (False, 1, 10, 1, 6), (False, 1, 7, 1, 6), (False, 2, 12, 3, 0)])
def test_every_design_space_of_the_rule_computes_the_conv(depthwise, stride, size, kernel_size, in_blocks) -> None:
    """Each design space the rule offers (every register tile; for padded convs the padded rows written in a pass
    of their own or inside the parallel row loop, except flat pixels; for dense convs the input-channel blocks
    reduced in passes over a strip of rows, and for 1x1 kernels or too few parallel iterations all at once too;
    7x7 outputs as 50 flat pixels, the last one dropped; an RGB input read as NCHW, `in_blocks` 0) builds and
    agrees with a numpy conv: whichever MetaSchedule picks is correct, not only the ones a short tuning run
    happens to measure."""
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    from prune_compile.backends.tvm import conv_nchwc

    lanes, out_blocks = 8, 2
    rgb = in_blocks == 0  # NCHW input, 3 channels in one block
    data = te.placeholder((1, 3, size, size) if rgb else (1, in_blocks, size, size, lanes), name="data")
    pad = (kernel_size // 2,) * 4
    if depthwise:
        kernel = te.placeholder((in_blocks, 1, kernel_size, kernel_size, 1, lanes), name="kernel")
        out = conv_nchwc._depthwise_nchwc(data, kernel, (stride, stride), pad, (1, 1), "float32")
    else:
        in_shape = (1, kernel_size, kernel_size, 3) if rgb else (in_blocks, kernel_size, kernel_size, lanes)
        kernel = te.placeholder((out_blocks, *in_shape, lanes), name="kernel")
        out = conv_nchwc._conv2d_nchwc(data, kernel, (stride, stride), pad, (1, 1), "float32")
    sch = Schedule(te.create_prim_func([data, kernel, out]))
    spaces = conv_nchwc.schedule_rule(sch, sch.get_sblock("depthwise_nchwc" if depthwise else "conv2d_nchwc"))
    out_size = (size - 1) // stride + 1
    blocks = in_blocks if depthwise else out_blocks
    pixels = 0 if depthwise else pixel_count(blocks, out_size, out_size, 16)
    assert pixels == (50 if out_size == 7 else 0)
    rows, cols = (1, pixels) if pixels else (out_size, out_size)
    tiles = register_tiles(1 if depthwise else blocks, rows, cols, 16, dense=not depthwise)
    # padded (3x3): pad pass or pad in the row loop, flat pixels the pass only; dense 3x3: one block a pass
    # (one block in all: that one), and with flat pixels (2 channel blocks: too few parallel iterations) all at
    # once too; dense 1x1: 3 blocks a pass or all at once
    placements = 2 if kernel_size > 1 and not pixels else 1
    passes = 2 if not depthwise and (pixels or kernel_size == 1) else 1
    assert len(spaces) == len(tiles) * placements * passes
    rng = np.random.default_rng(0)
    x = rng.standard_normal([int(d) for d in data.shape]).astype(np.float32)
    k = rng.standard_normal([int(d) for d in kernel.shape]).astype(np.float32)
    blocked = x.reshape(1, 1, 3, size, size).transpose(0, 1, 3, 4, 2) if rgb else x
    expected = _blocked_conv_reference(blocked, k, stride, depthwise)
    dev = tvm.cpu()
    for space in spaces:
        lib = tvm.compile(space.mod, target=tvm.target.Target({"kind": "llvm"}))
        y = tvm.runtime.tensor(np.zeros(expected.shape, np.float32), dev)
        lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(k, dev), y)
        np.testing.assert_allclose(y.numpy(), expected, rtol=RTOL, atol=RTOL)


def _top_level_loops(func) -> list:
    """The loop nests directly under a PrimFunc's root block."""
    from tvm import tirx

    found = []

    def visit(stmt) -> None:
        if isinstance(stmt, tirx.For):
            found.append(stmt)
        elif isinstance(stmt, tirx.SeqStmt):
            for s in stmt.seq:
                visit(s)
        elif hasattr(stmt, "block"):  # the root's realize
            visit(stmt.block.body)
        elif hasattr(stmt, "body"):
            visit(stmt.body)

    visit(func.body)
    return found


def _activation(name: str, y):
    """The activation as the ONNX frontend writes it: hardswish and SiLU read their input twice."""
    from tvm import topi

    if name == "relu":
        return topi.nn.relu(y)
    if name == "hardswish":
        return topi.multiply(y, topi.divide(topi.minimum(topi.maximum(topi.add(y, 3.0), 0.0), 6.0), 6.0))
    return topi.multiply(y, topi.sigmoid(y))


def _activation_reference(name: str, y: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(y, 0)
    if name == "hardswish":
        return y * np.clip(y + 3, 0, 6) / 6
    return y / (1 + np.exp(-y))


@pytest.mark.parametrize("activation", ["relu", "hardswish", "silu"])
@pytest.mark.parametrize(("depthwise", "size"), [(True, 12), (False, 10), (False, 7)])
def test_every_design_space_fuses_the_bias_and_activation(monkeypatch, activation, depthwise, size) -> None:
    """The bias and activation after a conv run inside its parallel loop in every design space, also where the
    activation branches (hardswish, SiLU: the input read twice). They once ran after the conv as a serial scalar
    loop nest (our rules leave the root unscheduled): PP-LCNet's 16-channel 320x320 depthwise conv with hardswish
    took 1.5-2.9 ms of which the conv 0.35. Every loop nest left under the root is parallel, and the result agrees
    with numpy."""
    import tvm
    from tvm import te, tirx, topi
    from tvm.s_tir import Schedule

    from prune_compile.backends.tvm import conv_nchwc

    calls = count_inlines_in_spaces(monkeypatch, conv_nchwc, ("_schedule",))
    lanes, blocks = 8, 2
    data = te.placeholder((1, blocks, size, size, lanes), name="data")
    if depthwise:
        kernel = te.placeholder((blocks, 1, 3, 3, 1, lanes), name="kernel")
        out = conv_nchwc._depthwise_nchwc(data, kernel, (1, 1), (1, 1, 1, 1), (1, 1), "float32")
    else:
        kernel = te.placeholder((blocks, blocks, 3, 3, lanes, lanes), name="kernel")
        out = conv_nchwc._conv2d_nchwc(data, kernel, (1, 1), (1, 1, 1, 1), (1, 1), "float32")
    bias = te.placeholder((1, blocks, 1, 1, lanes), name="bias")
    result = _activation(activation, topi.add(out, bias))
    sch = Schedule(te.create_prim_func([data, kernel, bias, result]))
    spaces = conv_nchwc.schedule_rule(sch, sch.get_sblock("depthwise_nchwc" if depthwise else "conv2d_nchwc"))
    assert not calls  # fused once before the spaces were copied: each inlining analyses the whole function
    rng = np.random.default_rng(0)
    x, k, b = (rng.standard_normal([int(d) for d in t.shape]).astype(np.float32) for t in (data, kernel, bias))
    expected = _activation_reference(activation, _blocked_conv_reference(x, k, 1, depthwise) + b)
    dev = tvm.cpu()
    for space in spaces:
        loops = _top_level_loops(space.mod["main"])
        assert loops and all(loop.kind == tirx.ForKind.PARALLEL for loop in loops), space.mod.script()
        lib = tvm.compile(space.mod, target=tvm.target.Target({"kind": "llvm"}))
        y = tvm.runtime.tensor(np.zeros(expected.shape, np.float32), dev)
        lib["main"](*(tvm.runtime.tensor(a, dev) for a in (x, k, b)), y)
        np.testing.assert_allclose(y.numpy(), expected, rtol=RTOL, atol=RTOL)


def test_an_epilogue_that_cannot_fuse_still_runs_in_parallel() -> None:
    """A fused function that returns the biased conv output as well as its activation (FuseOps does, for a value
    used outside the function): the activation cannot be inlined into the tile's write-back of an output buffer, so
    it runs as a pass of its own, parallel over rows, and the results agree with numpy."""
    import tvm
    from tvm import te, tirx, topi
    from tvm.s_tir import Schedule

    from prune_compile.backends.tvm import conv_nchwc

    lanes, blocks, size = 8, 2, 12
    data = te.placeholder((1, blocks, size, size, lanes), name="data")
    kernel = te.placeholder((blocks, 1, 3, 3, 1, lanes), name="kernel")
    bias = te.placeholder((1, blocks, 1, 1, lanes), name="bias")
    biased = topi.add(conv_nchwc._depthwise_nchwc(data, kernel, (1, 1), (1, 1, 1, 1), (1, 1), "float32"), bias)
    activated = _activation("hardswish", biased)
    sch = Schedule(te.create_prim_func([data, kernel, bias, biased, activated]))
    spaces = conv_nchwc.schedule_rule(sch, sch.get_sblock("depthwise_nchwc"))
    rng = np.random.default_rng(0)
    x, k, b = (rng.standard_normal([int(d) for d in t.shape]).astype(np.float32) for t in (data, kernel, bias))
    want = _blocked_conv_reference(x, k, 1, True) + b
    dev = tvm.cpu()
    for space in spaces:
        loops = _top_level_loops(space.mod["main"])
        assert len(loops) >= 2 and all(loop.kind == tirx.ForKind.PARALLEL for loop in loops), space.mod.script()
        lib = tvm.compile(space.mod, target=tvm.target.Target({"kind": "llvm"}))
        outs = [tvm.runtime.tensor(np.zeros(want.shape, np.float32), dev) for _ in range(2)]
        lib["main"](*(tvm.runtime.tensor(a, dev) for a in (x, k, b)), *outs)
        np.testing.assert_allclose(outs[0].numpy(), want, rtol=RTOL, atol=RTOL)
        np.testing.assert_allclose(outs[1].numpy(), _activation_reference("hardswish", want), rtol=RTOL, atol=RTOL)


def test_paired_kernel_packs_two_half_blocks_a_vector_and_zero_filters_after_the_last() -> None:
    import tvm
    from tvm import te

    from prune_compile.backends.tvm.conv_nchwc import paired_kernel

    kernel = te.placeholder((3, 2, 3, 3, 4, 8), name="kernel")
    pairs = paired_kernel(kernel)
    assert [int(d) for d in pairs.shape] == [2, 2, 3, 3, 4, 16]
    lib = tvm.compile(te.create_prim_func([kernel, pairs]), target=tvm.target.Target({"kind": "llvm"}))
    k = np.random.default_rng(0).standard_normal((3, 2, 3, 3, 4, 8)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((2, 2, 3, 3, 4, 16), np.nan, np.float32))
    lib["main"](tvm.runtime.tensor(k), out)
    got = out.numpy()
    np.testing.assert_array_equal(got[0], np.concatenate([k[0], k[1]], axis=-1))
    np.testing.assert_array_equal(got[1, ..., :8], k[2])
    assert not got[1, ..., 8:].any()


def _vector_extents(func) -> list[int]:
    """The extents of every vectorized loop in a PrimFunc."""
    return [int(n) for n in re.findall(r"T\.vectorized\((\d+)\)", func.script())]


@pytest.mark.parametrize("epilogue", [True, False])
@pytest.mark.parametrize(("size", "kernel_size"), [(10, 3), (7, 3), (10, 1), (7, 1)])
def test_every_design_space_of_paired_half_blocks_computes_the_conv(size, kernel_size, epilogue) -> None:
    """24 output channels on AVX-512 (three 8-channel blocks) computed as two 16-lane pairs, the padded filters'
    outputs dropped on the way back into 8-channel blocks (`pairs_half_blocks`), with or without a bias and a
    hardswish (read twice) fused: every design space (rows x columns tiles, 7x7 as flat pixels; the pad pass or the
    pad in the row loop; input blocks a pass) runs the conv in 16-lane vectors, in parallel loop nests only, and
    agrees with numpy."""
    import tvm
    from tvm import te, tirx, topi
    from tvm.s_tir import Schedule

    from prune_compile.backends.tvm import conv_nchwc

    in_blocks, out_blocks, half = 3, 3, 8
    data = te.placeholder((1, in_blocks, size, size, half), name="data")
    kernel = te.placeholder(((out_blocks + 1) // 2, in_blocks, kernel_size, kernel_size, half, 2 * half),
                            name="kernel")
    conv = conv_nchwc._conv2d_nchwc(data, kernel, (1, 1), (kernel_size // 2,) * 4, (1, 1), "float32", out_blocks)
    bias = te.placeholder((1, out_blocks, 1, 1, half), name="bias")
    result = _activation("hardswish", topi.add(conv, bias)) if epilogue else conv
    assert [int(d) for d in result.shape] == [1, out_blocks, size, size, half]
    sch = Schedule(te.create_prim_func([data, kernel, bias, result]))
    spaces = conv_nchwc.schedule_rule(sch, sch.get_sblock("conv2d_nchwc"))
    assert spaces
    rng = np.random.default_rng(0)
    x, k, b = (rng.standard_normal([int(d) for d in t.shape]).astype(np.float32) for t in (data, kernel, bias))
    k[-1, ..., half:] = 0  # what paired_kernel pads with
    halves = np.concatenate([k[..., :half], k[..., half:]], axis=0)  # blocks 0, 2, 1, (padding)
    k8 = halves[[0, 2, 1]]
    expected = _blocked_conv_reference(x, k8, 1, False)
    if epilogue:
        expected = _activation_reference("hardswish", expected + b)
    dev = tvm.cpu()
    for space in spaces:
        func = space.mod["main"]
        loops = _top_level_loops(func)
        assert loops and all(loop.kind == tirx.ForKind.PARALLEL for loop in loops), space.mod.script()
        assert 2 * half in _vector_extents(func)  # the conv's accumulators: full vectors
        lib = tvm.compile(space.mod, target=tvm.target.Target({"kind": "llvm"}))
        y = tvm.runtime.tensor(np.zeros(expected.shape, np.float32), dev)
        lib["main"](*(tvm.runtime.tensor(a, dev) for a in (x, k, b)), y)
        np.testing.assert_allclose(y.numpy(), expected, rtol=RTOL, atol=RTOL)


def half_block_convs_onnx():
    """Dense convs whose outputs only a half AVX-512 vector divides (24, 40), one into a depthwise conv, and one
    that does not (16); 9x9 maps (flat pixels for the 1x1)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[1, 1]),
             helper.make_node("HardSwish", ["c2"], ["h2"]),
             helper.make_node("Conv", ["h2", "w3"], ["c3"], kernel_shape=[3, 3], pads=[1] * 4, group=40),
             helper.make_node("Conv", ["c3", "w4"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)]
    weights = [weight("w1", 24, 16, 3, 3), weight("b1", 24), weight("w2", 40, 24, 1, 1), weight("b2", 40),
               weight("w3", 40, 1, 3, 3), weight("w4", 16, 40, 3, 3)]
    graph = helper.make_graph(nodes, "half_blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                    [1, 16, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 9, 9])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.mark.parametrize("paired", [True, False])
def test_half_block_convs_compute_pairs_only_where_wide_vectors_pay(monkeypatch, paired) -> None:
    """With AVX-512 blocks, the 24- and 40-channel convs compute pairs of 8-channel blocks where 512-bit FMAs run at
    twice the 256-bit rate (forced here either way): their kernels are paired once, at build time (constant
    folding: no pairing kernel is left to run), the 16-channel and the depthwise conv are untouched, and the
    model agrees with ONNX Runtime."""
    import importlib

    import tvm
    from tvm import relax

    from prune_compile.backends.tvm.conv_nchwc import PAIRED
    from prune_compile.backends.tvm.targets import make_target

    from .test_tvm_layout_guard import blocked_outputs

    tvm_build = importlib.import_module("prune_compile.backends.tvm.build")  # the package exports build()
    monkeypatch.setattr(tvm_build, "pairs_half_blocks", lambda lanes: paired and lanes >= 16)
    model = half_block_convs_onnx()
    expected, actual, mod = blocked_outputs(model, 16)
    assert ort.relative_error(expected, actual) <= RTOL
    with make_target("cpu"):
        # the direct convs (its 3x3 stride-1 one would go to Winograd, conv_winograd, where that pays)
        lowerings = tvm_build.own_lowerings(16, winograd=False)
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(lowerings), relax.get_pipeline("zero")])(mod)
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert not [name for name in funcs if "kernel_pairs" in name]
    assert sum(PAIRED in f.script() for f in funcs.values()) == (2 if paired else 0)


def test_half_blocks_pair_only_on_avx512_cores_whose_wide_fmas_run_at_twice_the_rate(monkeypatch) -> None:
    from prune_compile.backends import fma_peak
    from prune_compile.backends.tvm.conv_nchwc import pairs_half_blocks

    for speedup, expected in ((2.01, True), (1.02, False)):
        monkeypatch.setattr(fma_peak, "wide_vector_speedup", lambda s=speedup: s)
        assert pairs_half_blocks(16) is expected
        assert pairs_half_blocks(8) is False  # AVX2: 8-channel blocks are the full vector

    def no_compiler():
        raise fma_peak.PeakUnavailable("no C compiler")

    monkeypatch.setattr(fma_peak, "wide_vector_speedup", no_compiler)
    assert pairs_half_blocks(16) is False


@pytest.mark.serial  # tuning times candidates
def test_tuned_nchwc_library_agrees_with_onnx_runtime(tmp_path) -> None:
    """Every conv kind above, tuned: each kernel our rules schedule (their functions' root is marked unscheduled, so
    MetaSchedule's parallelize/vectorize postprocessing skips it) runs only parallel loop nests (a hardswish after a
    conv once ran as a serial scalar loop there), and the library agrees with ONNX Runtime."""
    from tvm import tirx

    from prune_compile.backends.tvm.build import lower_model

    model = mixed_convs_onnx()
    lib = str(tmp_path / "m.so")
    options = tvm_backend.TargetOptions(conv_layout="NCHWc")
    tuning = tvm_backend.TuningOptions(trials=40, database=str(tmp_path / "db"))
    mod, _, _, summary = lower_model(model, "cpu", options, tuning)
    assert summary.to_json()["trials_valid"] > 0
    ours = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)
            and f.body.block.annotations.get("schedule_rule") == "None"}
    assert any(name.startswith("fused_conv2d_nchwc") for name in ours), list(ours)
    for name, func in ours.items():
        assert all(loop.kind == tirx.ForKind.PARALLEL for loop in _top_level_loops(func)), (name, func.script())
    result = tvm_backend.build(model, "cpu", lib, options, tuning)
    assert PIPELINE.fullmatch(result.pipeline), result.pipeline
    assert result.tuning["trials_run"] == 0  # the records above
    x = {"image": np.random.default_rng(0).standard_normal((1, 3, 30, 30)).astype(np.float32)}
    assert ort.relative_error(ort.run(model, x), tvm_backend.run_library(lib, x, ["image"])) <= RTOL
    # its parallel loops run through our launcher (backends/tvm/parallel_launcher.py); opted out, through TVM's
    assert parallel_launcher.installed(lib)
    np.save(str(tmp_path / "x.npy"), x["image"])
    script = ("import sys, numpy as np; from prune_compile.backends.tvm import run_library, parallel_launcher as p; "
              "y = run_library(sys.argv[1], {'image': np.load(sys.argv[2])}, ['image'])[0]; "
              "np.save(sys.argv[3], y); print(p.installed(sys.argv[1]))")
    env = dict(os.environ, **{parallel_launcher.ENV: "tvm"})
    proc = subprocess.run([sys.executable, "-c", script, lib, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["False"], proc.stderr
    assert ort.relative_error(ort.run(model, x), [np.load(str(tmp_path / "y.npy"))]) <= RTOL


def channel_joins_onnx():
    """Channel concats and splits between blocked convs, BN folded: an Inception concat of 16, 24 and 8 channels
    (blocks 16, 8, 8 on AVX-512), a split at 24, a chunk into whole 16-channel blocks, a concat of two 16-channel
    convs, and a DenseNet-style concat of a strided pool's output and a conv of it (the same block everywhere)."""
    import torch
    from torch import nn

    from prune_compile.ir import export_onnx
    from prune_compile.ir.fx_importer import import_torch_module
    from prune_compile.passes.fold_bn import folded_copy

    def conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class Joins(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = conv_bn(3, 48, 3)
            self.b1, self.b3, self.bp = conv_bn(48, 16, 1), conv_bn(48, 24, 3), conv_bn(48, 8, 1)
            self.mix = conv_bn(24, 32, 1)
            self.d1, self.d2 = conv_bn(32, 16, 3), conv_bn(32, 16, 1)
            self.trans, self.d3 = conv_bn(32, 16, 1), conv_bn(16, 16, 3)
            self.head, self.head2 = nn.Conv2d(32, 16, 1), nn.Conv2d(32, 16, 1)

        def forward(self, image):
            y = self.stem(image)
            y = torch.cat([self.b1(y), self.b3(y), self.bp(nn.functional.max_pool2d(y, 3, 1, 1))], 1)
            a, b = y.split(24, dim=1)
            z = self.mix(a + b)
            u, v = z.chunk(2, dim=1)
            t = nn.functional.avg_pool2d(self.trans(z), 2)
            dense = self.head2(torch.cat([t, self.d3(t)], 1)).mean((2, 3), keepdim=True)
            return self.head(torch.cat([self.d1(z), self.d2(z)], 1)) + u * v + dense

    torch.manual_seed(0)
    model = Joins().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    graph = import_torch_module(model, (torch.randn(1, 3, 20, 20),), name="Joins")
    folded, count = folded_copy(graph)
    assert count == 9
    return export_onnx(folded)


@pytest.mark.parametrize("lanes", [8, 16])
def test_channel_concats_and_splits_survive_blocked_layouts(lanes) -> None:
    """TVM's layout inference keeps a split's points in channels on an axis of blocks, and fails on a concat of
    inputs with different blocks ("Invalid layout axis 16b"): splits become slices, mixed concats take NCHW
    inputs, and a concat whose inputs all share one block stays blocked."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from prune_compile.backends.tvm.conv_nchwc import convert_layout

    mod = convert_layout(from_onnx(channel_joins_onnx(), keep_params_in_input=False), lanes)
    concats, splits = [], []

    def visit(e) -> None:
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            if e.op.name == "relax.concat":
                concats.append(e.ty.ndim)
            if e.op.name == "relax.split":
                splits.append(e.args[0].ty.ndim)

    relax.analysis.post_order_visit(mod["main"], visit)
    assert splits == []
    # the Inception concat: blocks 16, 8, 8 on AVX-512 (NCHW inputs), 8 everywhere on AVX2 (stays blocked); the
    # other two stay blocked
    assert sorted(concats) == ([4, 5, 5] if lanes == 16 else [5, 5, 5])


@pytest.mark.serial  # tuning times candidates
def test_tuned_library_with_channel_concats_and_splits_agrees_with_onnx_runtime(tmp_path) -> None:
    model = channel_joins_onnx()
    lib = str(tmp_path / "m.so")
    result = tvm_backend.build(model, "cpu", lib, tvm_backend.TargetOptions(conv_layout="NCHWc"),
                               tvm_backend.TuningOptions(trials=40, database=str(tmp_path / "db")))
    assert PIPELINE.fullmatch(result.pipeline), result.pipeline
    x = {"image": np.random.default_rng(0).standard_normal((1, 3, 20, 20)).astype(np.float32)}
    assert ort.relative_error(ort.run(model, x), tvm_backend.run_library(lib, x, ["image"])) <= RTOL


def test_untuned_builds_keep_nchw(tmp_path) -> None:
    result = tvm_backend.build(mixed_convs_onnx(), "cpu", str(tmp_path / "m.so"),
                               tvm_backend.TargetOptions(conv_layout="NCHWc"))
    assert result.pipeline == "default (untuned)"
