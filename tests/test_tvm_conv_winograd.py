"""3x3 stride-1 convs by Winograd's F(4x4, 3x3) in the blocked layout (conv_winograd): the transform matrices, which
convs take it, every design space of the schedule rule against a direct reference, and a tuned library (the kernel
transform folded, the epilogue fused) agreeing with ONNX Runtime, and the same model with `--no-winograd`."""

from __future__ import annotations

import numpy as np
import pytest

from prune_compile.backends import ort
from prune_compile.backends import tvm as tvm_backend
from prune_compile.backends.tvm import conv_winograd
from prune_compile.backends.tvm.conv_winograd import A_T, B_T, G, applies, pays

from .test_tvm_conv_nchwc import PIPELINE, _top_level_loops, count_inlines_in_spaces

pytest.importorskip("tvm")

RTOL = 1e-4


def test_transform_matrices_compute_a_4x4_tile_of_a_3x3_correlation() -> None:
    rng = np.random.default_rng(0)
    a_t, b_t, g = (np.array(m, dtype=np.float64) for m in (A_T, B_T, G))
    for _ in range(5):
        tile, kernel = rng.standard_normal((6, 6)), rng.standard_normal((3, 3))
        direct = np.array([[np.sum(tile[i:i + 3, j:j + 3] * kernel) for j in range(4)] for i in range(4)])
        winograd = a_t @ ((g @ kernel @ g.T) * (b_t @ tile @ b_t.T)) @ a_t.T
        np.testing.assert_allclose(winograd, direct, rtol=1e-12, atol=1e-12)


def test_winograd_pays_from_four_tiles_that_save_half_the_multiplies() -> None:
    small = 32 * 32  # channel pairs whose transformed weights stay in the cache
    assert not pays(4, 4, small)  # one tile: measured 10% slower than the direct conv
    assert pays(7, 7, small) and pays(8, 8, small) and pays(14, 14, small) and pays(56, 56, small)
    assert not pays(5, 5, small)  # four tiles for 25 outputs: 1.6x fewer multiplies
    assert pays(6, 6, small)  # 2.25x
    assert pays(3, 100, small) and pays(100, 3, small)  # one row of 25 tiles, 3 of each tile's 4 rows used: 3x


def test_winograd_streaming_its_weights_pays_only_where_enough_tiles_share_them() -> None:
    """Past the cache, each call reads the transformed weights (4x the kernel's): pruned resnet18's 256->256 7x7
    convs (9.4 MB, 4 tiles) ran slower than the direct conv in the model, its 128->128 14x14 ones (2.4 MB, 16
    tiles) faster."""
    assert not pays(7, 7, 256 * 256)
    assert pays(14, 14, 128 * 128)
    assert pays(28, 28, 512 * 512)  # 49 tiles share them
    assert pays(7, 7, 256 * 256, images=8)  # so do 8 images' tiles


def test_tile_groups_are_the_largest_rectangles_whose_transformed_inputs_fit_the_cache_share() -> None:
    """A group: a multiple of the register tile's tiles, part of a tile row or whole rows (a rectangle of the map),
    its transformed inputs (36 floats per tile and input channel) within a quarter of a core's L2, a group per core
    at least (the measured hosts: 2 cores, 1 MiB)."""
    per_tile = 36 * 4 * 48  # bytes of one tile's transformed inputs, 48 input channels
    assert 37 * per_tile <= conv_winograd.HOST_MEASURED.group_bytes < 38 * per_tile
    assert conv_winograd.fused_group(40, 40, 4, 48) == 20  # 37 fit; 20 divides the row
    assert conv_winograd.fused_group(40, 40, 8, 48) == 8  # the most within a row, in steps of 8
    assert conv_winograd.fused_group(40, 40, 8, 16) == 80  # 2 rows (113 tiles fit)
    assert conv_winograd.fused_group(14, 14, 7, 32) == 28  # 2 of 14 rows (56 fit; 42 is 3 rows, no divisor of 196)
    assert conv_winograd.fused_group(7, 7, 7, 32) == 7  # two groups at least: one row, not all 49
    assert conv_winograd.fused_group(4, 4, 16, 128) == 0  # one step is all the tiles: one group
    assert conv_winograd.fused_group(20, 20, 8, 2048) == 0  # one step of tiles is past the budget


def test_tile_groups_are_sized_by_the_machine_cores_and_l2() -> None:
    """More cores: at least as many groups (else cores idle in the grouped space); a smaller L2: smaller groups."""
    machine = conv_winograd.Machine
    assert conv_winograd.fused_group(14, 14, 7, 32, machine(cores=8)) == 14  # 196 / 8 = 24: one row, not two
    assert conv_winograd.fused_group(7, 7, 7, 32, machine(cores=8)) == 0  # a row per group is 7 groups
    assert conv_winograd.fused_group(40, 40, 4, 48, machine(cores=16)) == 20  # 100 groups: the cache limits
    assert conv_winograd.fused_group(14, 14, 7, 32, machine(l2_bytes=256 << 10)) == 14  # 14 tiles fit in 64 KiB
    assert conv_winograd.fused_group(40, 40, 8, 16, machine(cores=1)) == 80  # one core: the cache limits


def test_schedule_rule_offers_a_group_per_core() -> None:
    """The grouped design spaces' parallel loop has at least one group per core of the machine the rule is
    registered for (build.register_schedule_rules)."""
    from tvm import te
    from tvm.s_tir import Schedule

    data = te.placeholder((1, 2, 58, 58, 16), name="data")  # 32 -> 32 channels at 56x56: 14x14 tiles
    weights = te.placeholder((36, 2, 2, 16, 16), name="weights")
    y = conv_winograd.conv2d_winograd(data, weights, (0, 0, 0, 0), "float32")
    for cores in (2, 8, 16):
        sch = Schedule(te.create_prim_func([data, weights, y]))
        spaces = conv_winograd.schedule_rule(sch, sch.get_sblock("winograd_products"), conv_winograd.Machine(cores))
        grouped = [space for space in spaces if len(_top_level_loops(space.mod["main"])) == 1]
        assert grouped, cores
        for space in grouped:
            (loop,) = _top_level_loops(space.mod["main"])
            assert int(loop.extent) >= cores, (cores, space.mod["main"].script())


def test_the_input_is_read_padded_in_place_and_the_epilogue_fused_once_before_the_spaces_are_copied(
        monkeypatch) -> None:
    """The search replays a space's trace for every candidate it samples (16 a batch below the cost model's warm-up,
    hundreds in the evolutionary search). A pad stage inlined into the input transform's rows took 26 of the 31 ms
    of such a replay (64 channels at 56x56), so the rows read the input padded in place: no stage to inline. The
    epilogue is fused once by the rule, before the spaces are copied: each trace inlines its blocks and nothing
    else, and no space inlines anything again."""
    from tvm import te, topi
    from tvm.s_tir import Schedule

    calls = count_inlines_in_spaces(monkeypatch, conv_winograd, ("_schedule", "_grouped"))
    data = te.placeholder((1, 2, 56, 56, 16), name="data")  # 32 -> 32 channels at 56x56, padded: 14x14 tiles
    weights = te.placeholder((36, 2, 2, 16, 16), name="weights")
    bias = te.placeholder((1, 2, 1, 1, 16), name="bias")
    y = topi.nn.relu(topi.add(conv_winograd.conv2d_winograd(data, weights, (1, 1, 1, 1), "float32"), bias))
    sch = Schedule(te.create_prim_func([data, weights, bias, y]))
    assert not sch.get_producers(sch.get_sblock("winograd_input_rows"))
    spaces = conv_winograd.schedule_rule(sch, sch.get_sblock("winograd_products"))
    assert len(spaces) >= 6 and not calls
    for space in spaces:
        script = space.mod["main"].script()
        assert "pad" not in script.lower() and "T_add" not in script and "T_relu" not in script
        inlined = [i for i in space.trace.insts if i.kind.name in ("ComputeInline", "ReverseComputeInline")]
        assert len(inlined) == 2, space.trace  # the add and the ReLU


def test_the_transforms_select_coefficients_not_whole_sums() -> None:
    """The schedule unrolls the transforms' rows. A sum per row selected by the row left every unrolled row with all
    six sums until the simplifier dropped five, and TIR's passes after the unrolling walked them all: a 64-channel
    56x56 candidate built in 444 ms instead of 278. Only constants are selected: each term's coefficient."""
    import re

    from tvm import te

    data = te.placeholder((1, 2, 28, 28, 16), name="data")
    weights = te.placeholder((36, 2, 2, 16, 16), name="weights")
    kernel = te.placeholder((2, 2, 3, 3, 16, 16), name="kernel")
    conv = conv_winograd.conv2d_winograd(data, weights, (1, 1, 1, 1), "float32")
    for func in (te.create_prim_func([data, weights, conv]),
                 te.create_prim_func([kernel, conv_winograd.kernel_transform(kernel)])):
        selected = re.findall(r"T\.Select\([^,]+, ([^,]+),", func.script())
        assert selected and all(choice.startswith("T.float32(") for choice in selected), selected[:3]


def test_winograd_pays_where_a_core_l2_keeps_the_transformed_weights() -> None:
    """The choice follows the machine's L2: 256->256 at 7x7 (9.4 MB transformed) streams its weights on the
    measured hosts (direct), not where 16 MiB of L2 keeps them."""
    assert not pays(7, 7, 256 * 256)
    assert pays(7, 7, 256 * 256, machine=conv_winograd.Machine(l2_bytes=16 << 20))
    assert not pays(4, 4, 32 * 32, machine=conv_winograd.Machine(l2_bytes=16 << 20))  # one tile: never


def test_a_build_sizes_winograd_by_its_target_cores_and_l2() -> None:
    """`cpu` builds: the target's num-cores and this host's L2 per core; `arm`: the cores the target names and the
    board preset's L2 per core (a shared L2 divided among its cores); a board without one: the measured hosts'."""
    import tvm

    from prune_compile.backends.tvm.build import winograd_machine
    from prune_compile.backends.tvm.targets import TargetOptions
    from prune_compile.host_cpu import l2_bytes_per_core

    host = winograd_machine(tvm.target.Target({"kind": "llvm", "num-cores": 16}), "cpu")
    assert host == conv_winograd.Machine(16, l2_bytes_per_core() or conv_winograd.HOST_MEASURED.l2_bytes)
    board = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "num-cores": 4})
    assert winograd_machine(board, "arm") == conv_winograd.Machine(4, conv_winograd.HOST_MEASURED.l2_bytes)
    assert winograd_machine(board, "arm", TargetOptions(arm_board="rasp4")) == conv_winograd.Machine(4, 256 << 10)
    graviton = winograd_machine(board, "arm", TargetOptions(arm_board="graviton3"))
    assert graviton == conv_winograd.Machine(4, 1 << 20)
    bare = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    assert winograd_machine(bare, "arm") == conv_winograd.HOST_MEASURED


def test_board_l2_changes_what_pays() -> None:
    """A Raspberry Pi 4's 256 KiB per core: 64->64 on 7x7 (576 KiB transformed) no longer stays cached, and its 4
    tiles do not save the FMAs that streaming them costs; on 1 MiB it pays. 14x14 (16 tiles) pays either way."""
    rasp4 = conv_winograd.Machine(4, 256 << 10)
    assert pays(7, 7, 64 * 64)
    assert not pays(7, 7, 64 * 64, machine=rasp4)
    assert pays(14, 14, 64 * 64, machine=rasp4)


def _conv(data_shape, kernel_shape, strides=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1,
          dtype="float32"):
    from tvm import relax

    x = relax.Var("x", relax.TensorType(data_shape, dtype))
    w = relax.Var("w", relax.TensorType(kernel_shape, dtype))
    ib, ob = kernel_shape[4], kernel_shape[5]
    layouts = dict(data_layout=f"NCHW{ib}c", kernel_layout=f"OIHW{ib}i{ob}o", out_layout=f"NCHW{ob}c")
    return relax.op.nn.conv2d(x, w, strides, padding, dilation, groups, **layouts)


def test_winograd_applies_to_dense_3x3_stride_1_float_convs_in_the_blocked_layout() -> None:
    blocked = (1, 2, 14, 14, 16)
    assert applies(_conv(blocked, (2, 2, 3, 3, 16, 16)))
    assert applies(_conv(blocked, (3, 2, 3, 3, 16, 8)))  # 8-channel output blocks too
    assert applies(_conv(blocked, (2, 2, 3, 3, 16, 16), padding=(0, 0, 0, 0)))  # 12x12
    assert not applies(_conv(blocked, (2, 2, 3, 3, 16, 16), strides=(2, 2)))
    assert not applies(_conv(blocked, (2, 2, 3, 3, 16, 16), dilation=(2, 2)))
    assert not applies(_conv(blocked, (2, 2, 1, 1, 16, 16), padding=(0, 0, 0, 0)))
    assert not applies(_conv(blocked, (2, 2, 5, 5, 16, 16), padding=(2, 2, 2, 2)))
    assert not applies(_conv(blocked, (2, 1, 3, 3, 1, 16), groups=32))  # depthwise
    assert not applies(_conv((1, 2, 4, 4, 16), (2, 2, 3, 3, 16, 16)))  # one tile
    assert not applies(_conv((1, 16, 7, 7, 16), (16, 16, 3, 3, 16, 16)))  # 9.4 MB of weights for 4 tiles
    assert applies(_conv((8, 16, 7, 7, 16), (16, 16, 3, 3, 16, 16)))  # ... for 8 images' tiles
    assert not applies(_conv(blocked, (2, 2, 3, 3, 16, 16), dtype="float16"))


def _reference(x: np.ndarray, k: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    """The direct 3x3 correlation in NCHW, float64: x [n, c, h, w], k [o, c, 3, 3], padding (top, left, bottom,
    right)."""
    p = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])))
    out_h, out_w = p.shape[2] - 2, p.shape[3] - 2
    return sum(np.einsum("nchw,oc->nohw", p[:, :, i:i + out_h, j:j + out_w], k[:, :, i, j].astype(np.float64))
               for i in range(3) for j in range(3))


def _blocked(x: np.ndarray, block: int) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c // block, block, h, w).transpose(0, 1, 3, 4, 2).copy()


@pytest.mark.parametrize("channels,size,pad,lanes", [
    ((32, 32), (14, 14), (1, 1, 1, 1), 16),  # whole tiles but the last row and column (14 = 3 x 4 + 2)
    ((16, 48), (7, 7), (1, 1, 1, 1), 16),  # 2x2 tiles, a third of each dropped
    ((32, 16), (11, 9), (0, 0, 0, 0), 16),  # unpadded, 9x7 outputs
    ((24, 40), (10, 13), (0, 1, 2, 1), 8),  # asymmetric padding, 8-channel blocks (AVX2, or half blocks)
])
def test_every_design_space_computes_the_conv_with_its_epilogue(channels, size, pad, lanes) -> None:
    """Kernel transform, conv, bias, residual and ReLU, every design space against the direct correlation; each
    space runs parallel loop nests only, the epilogue inside the output transform's."""
    import tvm
    from tvm import te, topi
    from tvm.s_tir import Schedule

    from prune_compile.backends.tvm.conv_nchwc import register_tiles, vector_registers

    (cin, cout), (h, w) = channels, size
    out_h, out_w = h + pad[0] + pad[2] - 2, w + pad[1] + pad[3] - 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    k = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    skip = rng.standard_normal((1, cout, out_h, out_w)).astype(np.float32)
    want = _blocked(np.maximum(_reference(x, k, pad) + bias[None, :, None, None] + skip, 0), lanes)
    target = tvm.target.Target({"kind": "llvm"})
    dev = tvm.cpu()

    blocked_kernel = k.reshape(cout // lanes, lanes, cin // lanes, lanes, 3, 3).transpose(0, 2, 4, 5, 3, 1).copy()
    kernel = te.placeholder(blocked_kernel.shape, name="kernel")
    transformed = conv_winograd.kernel_transform(kernel)
    u = tvm.runtime.tensor(np.zeros([int(d) for d in transformed.shape], np.float32), dev)
    tvm.compile(te.create_prim_func([kernel, transformed]), target=target)(tvm.runtime.tensor(blocked_kernel, dev), u)

    data = te.placeholder((1, cin // lanes, h, w, lanes), name="data")
    weights = te.placeholder(u.shape, name="weights")
    b = te.placeholder((1, cout // lanes, 1, 1, lanes), name="bias")
    s = te.placeholder((1, cout // lanes, out_h, out_w, lanes), name="skip")
    y = topi.nn.relu(topi.add(topi.add(conv_winograd.conv2d_winograd(data, weights, pad, "float32"), b), s))
    sch = Schedule(te.create_prim_func([data, weights, b, s, y]))
    spaces = conv_winograd.schedule_rule(sch, sch.get_sblock("winograd_products"))
    tile_rows, tile_columns = conv_winograd.tiles(out_h, out_w)
    tile_count = tile_rows * tile_columns
    steps = [b for _, _, b in register_tiles(cout // lanes, 1, tile_count, vector_registers(lanes))
             if tile_columns % b == 0 or b % tile_columns == 0] or [1]
    groups = [conv_winograd.fused_group(tile_rows, tile_columns, b, cin) for b in steps]
    assert len(spaces) == 2 * len(steps) + sum(1 for g in groups if g)
    # grouped (`fused_group`): the three steps inside one loop nest over the groups, not a nest each
    nests = [len(_top_level_loops(space.mod["main"])) for space in spaces]
    assert nests.count(1) == sum(1 for g in groups if g) and nests.count(3) == 2 * len(steps), nests
    feeds = [tvm.runtime.tensor(a, dev) for a in (_blocked(x, lanes), u.numpy(), bias.reshape(1, -1, 1, 1, lanes),
                                                   _blocked(skip, lanes))]
    for space in spaces:
        func = space.mod["main"]
        assert all(loop.kind == tvm.tirx.ForKind.PARALLEL for loop in _top_level_loops(func)), func.script()
        assert "T_add" not in func.script() and "T_relu" not in func.script()  # fused into the output transform
        out = tvm.runtime.tensor(np.zeros(want.shape, np.float32), dev)
        tvm.compile(space.mod, target=target)(*feeds, out)
        assert ort.relative_error([want], [out.numpy()]) <= RTOL


def residual_block_onnx():
    """A stem and a ResNet basic block at 14x14: two 3x3 stride-1 convs (BN folded as compile folds it), the
    second with the residual add and ReLU after it, then a pooled classifier."""
    import torch
    from torch import nn

    from prune_compile.ir import export_onnx
    from prune_compile.ir.fx_importer import import_torch_module
    from prune_compile.passes.fold_bn import folded_copy

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
            self.conv1 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(32)
            self.conv2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(32)
            self.fc = nn.Linear(32, 10)

        def forward(self, image):
            x = torch.relu(self.stem(image))
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return self.fc(torch.relu(y + x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    graph = import_torch_module(model, (torch.randn(1, 3, 28, 28),), name="Block")
    folded, _ = folded_copy(graph)
    return export_onnx(folded)


@pytest.mark.serial  # tuning times candidates
def test_tuned_winograd_library_agrees_with_onnx_runtime(tmp_path) -> None:
    """Both block convs by F(4x4, 3x3), the kernel transforms folded into constants at build time, each conv's
    epilogue (bias; bias, residual, ReLU) fused into its kernel, only parallel loop nests; the library agrees with
    ONNX Runtime. `winograd=False` (`--no-winograd`): no Winograd kernel."""
    from tvm import tirx

    from prune_compile.backends.tvm.build import lower_model

    model = residual_block_onnx()
    tuning = tvm_backend.TuningOptions(trials=24, database=str(tmp_path / "db"))
    mod, _, pipeline, _ = lower_model(model, "cpu", tvm_backend.TargetOptions(conv_layout="NCHWc"), tuning)
    assert pipeline == "metaschedule, NCHW16c, Winograd F(4x4,3x3) in 2 kernels" or \
        pipeline == "metaschedule, NCHW8c, Winograd F(4x4,3x3) in 2 kernels", pipeline
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert not any("winograd_kernel" in name for name in names), names  # folded
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if "conv2d_winograd" in gv.name_hint}
    assert sorted(name.startswith("fused_conv2d_winograd_add") for name in kernels) == [True, True], list(kernels)
    assert any(name.endswith("_relu") or "relu" in name for name in kernels), list(kernels)
    for name, func in kernels.items():
        assert isinstance(func, tirx.PrimFunc) and func.body.block.annotations.get("schedule_rule") == "None"
        assert all(loop.kind == tirx.ForKind.PARALLEL for loop in _top_level_loops(func)), (name, func.script())
    lib = str(tmp_path / "w.so")
    result = tvm_backend.build(model, "cpu", lib, tvm_backend.TargetOptions(conv_layout="NCHWc"), tuning)
    assert PIPELINE.fullmatch(result.pipeline) and result.tuning["trials_run"] == 0
    x = {"image": np.random.default_rng(0).standard_normal((1, 3, 28, 28)).astype(np.float32)}
    assert ort.relative_error(ort.run(model, x), tvm_backend.run_library(lib, x, ["image"])) <= RTOL

    direct = tvm_backend.TargetOptions(conv_layout="NCHWc", winograd=False)
    mod, _, pipeline, _ = lower_model(model, "cpu", direct, tvm_backend.TuningOptions(trials=8,
                                                                                     database=str(tmp_path / "db")))
    assert PIPELINE.fullmatch(pipeline) and "Winograd" not in pipeline
    assert not any("winograd" in gv.name_hint for gv in mod.get_global_vars())
