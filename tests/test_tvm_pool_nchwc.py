"""The blocked max-pool schedule rule: the loop nest it builds computes the pool (padding read in place, odd sizes,
ceil mode, a fused epilogue), and pools it does not know keep MetaSchedule's generic rules."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")


def _fused_pool(shape, layout, kernel, stride, padding, ceil_mode):
    """The PrimFunc the build tunes: max_pool2d followed by an elementwise op, legalized and fused."""
    import tvm
    from tvm import relax

    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            pooled = builder.emit(relax.op.nn.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode,
                                                         layout=layout))
            out = builder.emit_output(builder.emit(relax.op.multiply(pooled, relax.const(2.0, "float32"))))
        builder.emit_func_output(out)
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])(builder.get())
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


def _pool_block(sch):
    return sch.get_sblock("pool_max")


@pytest.mark.parametrize(("size", "kernel", "stride", "padding", "ceil_mode"),
                         [(14, 3, 2, 1, False), (9, 2, 2, 0, True), (7, 3, 1, 1, False)])
def test_blocked_max_pool_schedule_computes_the_pool(size, kernel, stride, padding, ceil_mode) -> None:
    import torch
    import tvm
    from tvm.s_tir import Schedule

    from prune_compile.backends.tvm import pool_nchwc

    blocks, lanes = 2, 8
    func = _fused_pool((1, blocks, size, size, lanes), "NCHW8c", (kernel, kernel), (stride, stride),
                       (padding,) * 4, ceil_mode)
    sch = Schedule(func)
    (space,) = pool_nchwc.schedule_rule(sch, _pool_block(sch))
    # every block scheduled here: none left for MetaSchedule's generic rules
    for block in [space.get_sblock("root"), *space.get_child_blocks(space.get_sblock("root"))]:
        assert dict(space.get(block).annotations).get("schedule_rule") == "None"
    x = np.random.default_rng(0).standard_normal((1, blocks, size, size, lanes)).astype(np.float32)
    nchw = torch.from_numpy(x).permute(0, 1, 4, 2, 3).reshape(1, blocks * lanes, size, size)
    ref = torch.nn.functional.max_pool2d(nchw, kernel, stride, padding, ceil_mode=ceil_mode) * 2
    out_size = ref.shape[-1]
    expected = ref.reshape(1, blocks, lanes, out_size, out_size).permute(0, 1, 3, 4, 2).numpy()
    lib = tvm.compile(space.mod, target=tvm.target.Target({"kind": "llvm"}))
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.zeros(expected.shape, np.float32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), y)
    np.testing.assert_array_equal(y.numpy(), expected)
    loops = [space.get(loop) for loop in space.get_loops(_pool_block(space))]
    assert str(loops[0].kind).endswith("PARALLEL") or int(loops[0].kind) == 1
    assert str(loops[-1].kind).endswith("VECTORIZED") or int(loops[-1].kind) == 2


def test_nchw_pools_are_left_to_the_generic_rules() -> None:
    from tvm.s_tir import Schedule

    from prune_compile.backends.tvm import pool_nchwc

    sch = Schedule(_fused_pool((1, 16, 14, 14), "NCHW", (3, 3), (2, 2), (1, 1, 1, 1), False))
    block = _pool_block(sch)
    (space,) = pool_nchwc.schedule_rule(sch, block)
    assert "schedule_rule" not in space.get(block).annotations
    assert space.trace is None or len(space.trace.insts) <= len(sch.trace.insts)
